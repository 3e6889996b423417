"""The one ranking path: an immutable :class:`Pipeline` that serving, evaluation, tuning, explanations and the
benchmarks all call.

A pipeline fixes, when it is built, everything a ranking depends on: the models, the index, the catalogue, what
was counted from the event log (popularity, co-watch lists, the item texts stage 2 reads) and the serving
:class:`Settings`. :meth:`Pipeline.rank` ranks a batch of requests end to end (recall, rerank and fuse,
diversify, explain) and nothing else composes the stages, so what ``evaluate`` measures is what ``search`` and
``recommend`` return. A rebuilt index or retrained model makes a new pipeline; a request in flight finishes on
the one it started with.

Every list is ranked in full and then cut at ``k``: stage 1 returns ``recall_depth`` candidates (more only when
``k`` asks for more), stage 2 reorders the top ``rerank_depth`` of them, MMR the top ``mmr_depth`` of the
result, and what lies below each keeps its order. Every pool is fixed by the settings, never by ``k``, so the
first ``k`` hits never depend on ``k`` (on an exact index): a top 10 served is the top 10 evaluated.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from twostage.config import IndexConfig, PredictorConfig, RerankerConfig, RetrieverConfig
from twostage.cowatch import shared_history
from twostage.errors import ConfigError, NotFoundError, TwostageError
from twostage.explain import explain_hits
from twostage.features import candidate_features
from twostage.ranker import LEXICAL_FUSIONS, TIE_DECIMALS, Candidate, fuse, fuse_channels, mmr, zscore
from twostage.requests import Request, user_text
from twostage.results import Hit, Ranking

if TYPE_CHECKING:
    from twostage.index import VectorIndex
    from twostage.itemitem import ItemItem
    from twostage.ltr import LearnedRanker
    from twostage.requests import Catalogue
    from twostage.text import UserTemplate

STAGES = ("recall", "rerank")


class TextEncoder(Protocol):
    """What stage 1 needs of a bi-encoder (``twostage.encoders.BiEncoder`` is one): unit vectors for texts."""

    def encode(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray: ...


class LexicalSearch(Protocol):
    """What the lexical recall channel needs (``twostage.baselines.BM25`` is one): top-k (item, score) lists."""

    def search(self, texts: Sequence[str], *, k: int) -> list[list[tuple[str, float]]]: ...

    def scores(self, text: str, item_ids: Sequence[str]) -> list[float]: ...


class PairScorer(Protocol):
    """What stage 2 needs of a cross-encoder (``twostage.rerank.Reranker`` is one): a score per pair."""

    def score(self, pairs: Sequence[tuple[str, str]], *, progress: bool = False) -> np.ndarray: ...


class RatingPredictor(Protocol):
    """What the expected-rating blend needs of a behaviour predictor (``twostage.predictor.Predictor`` is
    one): a predicted rating per item for a user and their rated history."""

    def expected_ratings(
        self,
        user_id: str,
        history: Sequence[tuple[str, float]],
        item_ids: Sequence[str],
        catalogue: Catalogue,
    ) -> np.ndarray: ...


@dataclass(frozen=True)
class Settings:
    """How a pipeline ranks with its models; every value comes from ``twostage.config`` (or tuning).

    ``recall_depth`` candidates come from stage 1 (more when ``k`` asks for more): with ``lexical_weight`` α > 0
    and a lexical channel, the union of the dense and BM25 top lists fused by ``lexical_fusion`` (see
    :func:`twostage.ranker.fuse_channels`), else the dense list; stage 2 reranks the top
    ``rerank_depth`` of them with ``(1 − w)·z(cross-encoder) + w·z(stage 1) + c·z(co-watch)``
    (``fusion_weight`` w, ``cowatch_weight`` c); ``popularity_weight`` β adds ``β·ln(1 + users)`` to stage
    1 over a deeper search (see :meth:`Pipeline.rank`); ``mmr_lambda`` λ < 1 diversifies the top ``mmr_depth``.
    """

    # the defaults are the config's (one place for every default); tuned values replace them in a project
    recall_depth: int = IndexConfig.depth
    rerank_depth: int = RerankerConfig.depth
    fusion_weight: float = 0.0
    cowatch_weight: float = 0.0
    lexical_weight: float = 0.0
    lexical_fusion: str = RetrieverConfig.lexical_fusion
    items_weight: float = 0.0
    popularity_weight: float = RetrieverConfig.popularity_weight
    popularity_pool: int = RetrieverConfig.popularity_pool
    popularity_pool_factor: int = RetrieverConfig.popularity_pool_factor
    mmr_lambda: float | None = RerankerConfig.mmr_lambda
    mmr_depth: int = RerankerConfig.mmr_depth
    exclude_seen: bool = IndexConfig.exclude_seen
    max_k: int = IndexConfig.max_k
    predict_weight: float = 0.0
    predict_depth: int = PredictorConfig.recommend_depth

    def __post_init__(self) -> None:
        for key in (
            "recall_depth",
            "rerank_depth",
            "mmr_depth",
            "popularity_pool",
            "popularity_pool_factor",
            "max_k",
            "predict_depth",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"must be at least 1, got {getattr(self, key)}", key=key)
        for key in ("fusion_weight", "lexical_weight", "items_weight", "predict_weight"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"must be between 0 and 1, got {getattr(self, key)}", key=key)
        if self.lexical_fusion not in LEXICAL_FUSIONS:
            raise ConfigError(
                f"unknown fusion '{self.lexical_fusion}'; use one of {', '.join(LEXICAL_FUSIONS)}",
                key="lexical_fusion",
            )
        for key in ("cowatch_weight", "popularity_weight"):
            if not getattr(self, key) >= 0.0:
                raise ConfigError(f"must be >= 0, got {getattr(self, key)}", key=key)
        if self.mmr_lambda is not None and not 0.0 <= self.mmr_lambda <= 1.0:
            raise ConfigError(f"must be between 0 and 1, got {self.mmr_lambda}", key="mmr_lambda")


@dataclass(frozen=True)
class LogCounts:
    """What a pipeline reads from the event log, counted up to one moment (all events when serving, the
    events before a split's cut-offs when evaluating): users per item, each item's co-watched items, and the
    item texts stage 2 reads (which may quote the co-watch lists; None = the catalogue's texts), the EASE
    item-to-item weights of the items recall channel and the learned ranker's features (None = not fit), and
    each user's ratings of the items they rated (the expected-rating blend's context; None = not read)."""

    popularity: Mapping[str, float] = field(default_factory=dict)
    cowatched: Mapping[str, Sequence[str]] = field(default_factory=dict)
    rerank_texts: Mapping[str, str] | None = None
    items: ItemItem | None = None
    ratings: Mapping[str, Mapping[str, float]] | None = None


def _new_version() -> str:
    return uuid.uuid4().hex[:12]


@dataclass(frozen=True, eq=False)
class Pipeline:
    """Recall and rerank with fixed models, data and settings; safe to call from many threads (the models own
    their locks, FAISS searches concurrently, and nothing here changes after construction).

    ``version`` names this exact pipeline: every :class:`~twostage.results.Ranking` it returns carries it.

    Example:
        >>> pipe = Pipeline(encoder=encoder, index=index, catalogue=catalogue, text=config.text)  # doctest: +SKIP
        >>> [r.item_ids() for r in pipe.rank([Request("q", "space opera")], k=3)]  # doctest: +SKIP
    """

    encoder: TextEncoder
    index: VectorIndex
    catalogue: Catalogue
    text: UserTemplate
    settings: Settings = field(default_factory=Settings)
    reranker: PairScorer | None = None
    counts: LogCounts = field(default_factory=LogCounts)
    lexical: LexicalSearch | None = None
    learned: LearnedRanker | None = None
    predictor: RatingPredictor | None = None
    version: str = field(default_factory=_new_version)
    # memoized() pipelines remember their stage-1 lists here (shared by their variants)
    recall_memo: dict | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ variants
    def replace(self, **changes: Any) -> Pipeline:
        """Another pipeline (with a new version) that differs in the given fields."""
        return dataclasses.replace(self, **{"version": _new_version(), **changes})

    def with_settings(self, **changes: Any) -> Pipeline:
        """Another pipeline with some settings changed, e.g. ``with_settings(fusion_weight=1.0)``."""
        return self.replace(settings=dataclasses.replace(self.settings, **changes))

    def memoized(self) -> Pipeline:
        """The same pipeline whose models remember their outputs (pure functions of the texts), for ranking the
        same requests under several settings or stages: each text is encoded and each pair scored once. Its
        variants (:meth:`with_settings`) share the memory. ``reranker.scored`` counts the pairs it ran."""
        reranker = _MemoScorer(self.reranker) if self.reranker is not None else None
        return self.replace(encoder=_MemoEncoder(self.encoder), reranker=reranker, recall_memo={})

    # ------------------------------------------------------------------ requests
    def user_request(self, user_id: str, history: Sequence[str]) -> Request:
        """A user's request from their history (item ids, newest first), rendered with this catalogue."""
        history = tuple(history)
        exclude = frozenset(history) if self.settings.exclude_seen else frozenset()
        return Request(str(user_id), user_text(history, self.catalogue, self.text), exclude, history)

    def session_request(self, history: Sequence[str]) -> Request:
        """An anonymous session's request from its item ids (newest first), each checked against the catalogue."""
        items = [str(i).strip() for i in history]
        unknown = [i for i in items if i not in self.catalogue]
        if unknown:
            raise NotFoundError(f"unknown item_id '{unknown[0]}' in the history")
        if not items:
            raise TwostageError("the history is empty; give at least one item id")
        return self.user_request("session", items)

    @property
    def hybrid(self) -> bool:
        """True when stage 1 fuses the lexical channel with the dense one (a channel and a weight above 0)."""
        return self.lexical is not None and self.settings.lexical_weight > 0.0

    def items_channel(self, request: Request) -> bool:
        """True when stage 1 fuses the EASE item-to-item channel for ``request``: it has a history, the
        pipeline has weights fit from the log and a weight above 0."""
        return bool(request.history) and self.counts.items is not None and self.settings.items_weight > 0.0

    @property
    def runs_reranker(self) -> bool:
        """True when the cross-encoder can change an order: it is loaded and its fusion weight is above 0 (with
        a learned ranker: its score is one of the ranker's features)."""
        if self.learned is not None:
            return self.reranker is not None and self.learned.uses_reranker
        return self.reranker is not None and self.settings.fusion_weight < 1.0

    def reorders(self, request: Request) -> bool:
        """True when stage 2 can change stage 1's order for ``request``: a learned ranker always can; else the
        cross-encoder runs, or co-watch scores are fused and the request has a history to overlap."""
        if self.learned is not None:
            return True
        if self.reranker is None:
            return False
        cowatch = self.settings.cowatch_weight > 0.0 and bool(self.counts.cowatched) and bool(request.history)
        return self.runs_reranker or cowatch

    @property
    def rerank_texts(self) -> Mapping[str, str]:
        """Every item's text as stage 2 reads it (``[reranker] item_template``)."""
        texts = self.counts.rerank_texts
        return texts if texts is not None else self.catalogue.texts

    def rerank_text(self, item_id: str) -> str:
        """The text stage 2 reads for an item."""
        return self.rerank_texts[item_id]

    def watched_with(self, request: Request, item_id: str) -> list[str]:
        """The request's recent history items that are co-watched with ``item_id`` (its co-watch score)."""
        return shared_history(request.history[: self.text.history_size], item_id, self.counts.cowatched)

    # ------------------------------------------------------------------ the one ranking path
    def rank(
        self,
        requests: Sequence[Request],
        k: int,
        *,
        stage: str = "rerank",
        diversify: float | None = None,
        explain: bool = False,
        progress: bool = False,
    ) -> list[Ranking]:
        """Rank each request end to end and return its top ``k``.

        Args:
            requests: queries or users (see :meth:`user_request`); each one's ``exclude`` items never come back.
            k: hits per request.
            stage: ``"rerank"`` (both stages) or ``"recall"`` (stage 1 only). Stage 2 runs only where it can
                change the order (:meth:`reorders`); hits it did not rank say ``stage="recall"``.
            diversify: MMR λ in [0, 1] (1 = none); None uses ``settings.mmr_lambda``.
            explain: attach to each hit what drove it, from this pipeline's own scores
                (:func:`twostage.explain.explain_hits`).
            progress: progress bars over the model passes.

        Returns:
            One :class:`~twostage.results.Ranking` per request, in input order.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise TwostageError(f"k must be a positive integer, got {k!r}")
        if k > self.settings.max_k:
            raise TwostageError(
                f"k is {k}; a ranking has at most {self.settings.max_k} items ([index] max_k)"
            )
        if stage not in STAGES:
            raise TwostageError(f"unknown stage '{stage}'; use 'recall' or 'rerank'")
        lam = self.settings.mmr_lambda if diversify is None else diversify
        if lam is not None and not 0.0 <= lam <= 1.0:
            raise TwostageError(f"diversify is an MMR λ in [0, 1] (1 = none), got {lam}")
        if not requests:
            return []
        candidates = self._recall(requests, max(self.settings.recall_depth, k), progress)
        staged = [stage == "rerank" and self.reorders(r) for r in requests]
        reranked = iter(
            self._rerank(
                [(r, c) for r, c, s in zip(requests, candidates, staged, strict=True) if s], progress
            )
        )
        rankings = []
        for request, recalled, stage2 in zip(requests, candidates, staged, strict=True):
            ordered = (
                next(reranked) if stage2 else [_Ranked(i, s, s, None, "recall") for i, s in recalled.hits]
            )
            if stage == "rerank" and self.blends(request):
                ordered = self._blend_expected_ratings(request, ordered)
            if lam is not None and lam < 1.0:
                ordered = self._diversify(ordered, lam)
            top = ordered[:k]
            notes = self._explain(request, top) if explain else {}
            hits = tuple(
                Hit(
                    item_id=r.item_id,
                    score=r.score,
                    rank=n,
                    stage=r.stage,
                    title=self.catalogue.title(r.item_id),
                    recall_score=r.recall_score,
                    rerank_score=r.rerank_score,
                    explanation=notes.get(r.item_id),
                )
                for n, r in enumerate(top, start=1)
            )
            rankings.append(Ranking(request.request_id, request.text, hits, self.version))
        return rankings

    def recall(self, requests: Sequence[Request], depth: int, *, progress: bool = False) -> list[_Recalled]:
        """Stage 1 alone, as :meth:`rank` runs it: each request's top ``depth`` candidates and its vector
        (training the learned ranker reads exactly what serving will rank)."""
        return self._recall(requests, depth, progress)

    # ------------------------------------------------------------------ its steps
    def _recall(self, requests: Sequence[Request], depth: int, progress: bool) -> list[_Recalled]:
        """Top-``depth`` stage-1 candidates per request, excluding each request's ``exclude`` items.

        With ``popularity_weight`` β > 0 the dense score is ``cos(q, i) + β · ln(1 + users(i))``: a popularity
        prior that undoes the bias of in-batch negatives (a popular item is another example's positive more
        often, so MultipleNegativesRankingLoss learns to push it down; this is the logQ correction of sampled
        softmax, applied at serving time). FAISS is searched deeper (``popularity_pool_factor`` ×
        ``recall_depth``, at least ``popularity_pool``, whatever ``k``) and the candidates re-sorted, so
        popular items outside the cosine top-depth can come in (on ml-latest-small, validation Recall@100 was
        0.21 with a 300-deep search and 0.29 with 1,000). The lexical (BM25) and items (EASE) channels are
        then fused into the head of that list (:meth:`_fuse`). A memoized pipeline remembers each request's
        lists.
        """
        beta, popularity = self.settings.popularity_weight, self.counts.popularity
        prior = beta > 0 and bool(popularity)
        search = max(
            self.settings.popularity_pool_factor * self.settings.recall_depth, self.settings.popularity_pool
        )
        search = max(search, depth) if prior else depth
        memo = self.recall_memo
        lexical = (
            (self.settings.lexical_weight, self.settings.lexical_fusion, id(self.lexical))
            if self.hybrid
            else None
        )
        items = (
            (self.settings.items_weight, id(self.counts.items)) if self.settings.items_weight > 0 else None
        )
        key = (
            depth,
            search,
            beta if prior else 0.0,
            id(popularity),
            id(self.index),
            id(self.encoder),
            lexical,
            items,
        )
        todo = [r for r in requests if memo is None or (key, r.text, r.exclude, r.history) not in memo]
        found = self._search(todo, depth, search, prior, progress) if todo else []
        if memo is None:
            return found
        memo.update({(key, r.text, r.exclude, r.history): hits for r, hits in zip(todo, found, strict=True)})
        return [memo[(key, r.text, r.exclude, r.history)] for r in requests]

    def _search(
        self, requests: Sequence[Request], depth: int, search: int, prior: bool, progress: bool
    ) -> list[_Recalled]:
        vecs = self.encoder.encode([r.text for r in requests], progress=progress)
        exclude = [r.exclude for r in requests] if any(r.exclude for r in requests) else None
        found = self.index.search(vecs, search if prior else depth, exclude=exclude)
        if prior:
            beta, popularity = self.settings.popularity_weight, self.counts.popularity
            found = [[(i, s + beta * math.log1p(popularity.get(i, 0.0))) for i, s in hits] for hits in found]
        # equal scores in item-id order: FAISS's order among ties is its heap's
        found = [sorted(hits, key=lambda x: (-x[1], x[0])) for hits in found]
        pool = self.settings.recall_depth
        if self.hybrid:
            lexical = self._lexical_search(requests, pool)
            weight, method = self.settings.lexical_weight, self.settings.lexical_fusion
            found = [self._fuse(h, o, weight, method) for h, o in zip(found, lexical, strict=True)]
        if self.settings.items_weight > 0 and self.counts.items is not None:
            weight = self.settings.items_weight
            found = [
                self._fuse(h, self._items_search(r, pool), weight, "convex") if self.items_channel(r) else h
                for h, r in zip(found, requests, strict=True)
            ]
        return [_Recalled(hits[:depth], vec) for hits, vec in zip(found, vecs, strict=True)]

    def _fuse(
        self, head: list[tuple[str, float]], other: list[tuple[str, float]], weight: float, method: str
    ) -> list[tuple[str, float]]:
        """A request's stage-1 list (best first) with another channel's list fused into its head.

        Both give their top ``recall_depth`` (fixed by the settings, never by ``k``, so a top k stays the
        head of any longer list) and :func:`fuse_channels` ranks their union; hits deeper than that (when
        ``k`` asks for more) follow in their own order, below every fused score."""
        pool = self.settings.recall_depth
        fused = fuse_channels(head[:pool], other, weight=weight, method=method)
        seen, floor = {i for i, _ in fused}, min((sc for _, sc in fused), default=0.0)
        deeper = [i for i, _ in head[pool:] if i not in seen]
        return fused + [(i, floor - 1.0 - n) for n, i in enumerate(deeper)]

    def _items_search(self, request: Request, k: int) -> list[tuple[str, float]]:
        """The items channel's top ``k`` for a request's history, among the indexed items and without its
        excluded ones (ties in item-id order)."""
        unindexed = max(0, len(self.catalogue) - self.index.count)
        hits = self.counts.items.top(request.history, k + unindexed, request.exclude)  # type: ignore[union-attr]
        return [(i, s) for i, s in hits if i in self.index][:k]

    def _lexical_search(self, requests: Sequence[Request], k: int) -> list[list[tuple[str, float]]]:
        """The lexical channel's top ``k`` per request among the indexed items and without the request's
        excluded ones (the catalogue may hold items not indexed yet, which the dense channel, MMR and
        explanations cannot read), ties in item-id order."""
        unindexed = max(0, len(self.catalogue) - self.index.count)
        deepest = k + unindexed + max((len(r.exclude) for r in requests), default=0)
        lists = self.lexical.search([r.text for r in requests], k=deepest)  # type: ignore[union-attr]
        return [
            sorted(
                ((i, s) for i, s in hits if i not in r.exclude and i in self.index),
                key=lambda x: (-x[1], x[0]),
            )[:k]
            for r, hits in zip(requests, lists, strict=True)
        ]

    def _rerank(self, batch: Sequence[tuple[Request, _Recalled]], progress: bool) -> list[list[_Ranked]]:
        """Each request's candidates with the top ``rerank_depth`` reordered by the fused score, the rest below
        in stage-1 order, scored under the head so ranks and scores agree. All pairs of the batch are scored in
        one cross-encoder pass; with fusion weight 1 the cross-encoder cannot change the order and is not run.
        A learned ranker orders the head by its own score instead (:meth:`_rank_learned`)."""
        if self.learned is not None:
            return self._rank_learned(batch, progress)
        depth = min(self.settings.rerank_depth, self.settings.recall_depth)  # never more because k asks more
        cowatched = bool(self.counts.cowatched)
        heads = [
            [Candidate(i, s, len(self.watched_with(r, i)) if cowatched else 0) for i, s in rec.hits[:depth]]
            for r, rec in batch
        ]
        sizes = [len(h) for h in heads]
        if self.runs_reranker and sum(sizes):
            pairs = [
                (r.text, self.rerank_text(c.item_id))
                for (r, _), head in zip(batch, heads, strict=True)
                for c in head
            ]
            scores = np.asarray(self.reranker.score(pairs, progress=progress), dtype=np.float64)  # type: ignore[union-attr]
        else:
            scores = np.full(sum(sizes), np.nan)
        starts = np.cumsum([0, *sizes])
        out = []
        for (_, recalled), head, start in zip(batch, heads, starts[:-1], strict=True):
            cands = recalled.hits
            fused = fuse(
                head,
                scores[start : start + len(head)],
                k=max(len(head), 1),
                fusion_weight=self.settings.fusion_weight,
                cowatch_weight=self.settings.cowatch_weight,
            )
            ranked = [
                _Ranked(
                    h.item_id,
                    h.score,
                    h.stage1_score,
                    h.rerank_score if self.runs_reranker else None,
                    "rerank",
                )
                for h in fused
            ]
            floor = min((h.score for h in fused), default=0.0)
            ranked += [
                _Ranked(i, floor - 1.0 - n, s, None, "recall") for n, (i, s) in enumerate(cands[depth:])
            ]
            out.append(ranked)
        return out

    def _rank_learned(
        self, batch: Sequence[tuple[Request, _Recalled]], progress: bool
    ) -> list[list[_Ranked]]:
        """Each request's top ``rerank_depth`` candidates ordered by the learned ranker's score over their
        :func:`~twostage.features.candidate_features` (ties by stage-1 rank, then item id), the rest below in
        stage-1 order. The cross-encoder runs, on all pairs of the batch at once, only when its score is one
        of the ranker's features."""
        learned = self.learned
        assert learned is not None
        depth = min(self.settings.rerank_depth, self.settings.recall_depth)
        heads = [rec.hits[:depth] for _, rec in batch]
        sizes = [len(h) for h in heads]
        scores = None
        if self.runs_reranker and sum(sizes):
            pairs = [
                (r.text, self.rerank_text(i))
                for (r, _), head in zip(batch, heads, strict=True)
                for i, _ in head
            ]
            scores = np.asarray(self.reranker.score(pairs, progress=progress), dtype=np.float64)  # type: ignore[union-attr]
        starts = np.cumsum([0, *sizes])
        out = []
        for (request, recalled), head, start in zip(batch, heads, starts[:-1], strict=True):
            rerank = scores[start : start + len(head)] if scores is not None else None
            rows = candidate_features(self, request, head, recalled.vector, learned.features, rerank)
            key = np.round(learned.score(rows), TIE_DECIMALS)
            order = sorted(range(len(head)), key=lambda j: (-key[j], j, head[j][0]))
            ranked = [
                _Ranked(
                    head[j][0],
                    float(key[j]),
                    head[j][1],
                    None if rerank is None else float(rerank[j]),
                    "rerank",
                )
                for j in order
            ]
            floor = min((r.score for r in ranked), default=0.0)
            ranked += [
                _Ranked(i, floor - 1.0 - n, s, None, "recall")
                for n, (i, s) in enumerate(recalled.hits[depth:])
            ]
            out.append(ranked)
        return out

    def blends(self, request: Request) -> bool:
        """True when the final order is blended with the predictor's expected ratings: a predictor, a weight
        above 0 and a user (a request with a history)."""
        return self.predictor is not None and self.settings.predict_weight > 0.0 and bool(request.history)

    def _blend_expected_ratings(self, request: Request, ordered: list[_Ranked]) -> list[_Ranked]:
        """Reorder the top ``predict_depth`` by ``(1 − b)·z(score) + b·z(expected rating)``; the rest keeps its
        order below them. The context is the request's history with the user's ratings as counted."""
        assert self.predictor is not None
        head, tail = ordered[: self.settings.predict_depth], ordered[self.settings.predict_depth :]
        if len(head) < 2:
            return ordered
        rated = (self.counts.ratings or {}).get(request.request_id, {})
        history = [(i, rated.get(i, math.nan)) for i in request.history]
        expected = self.predictor.expected_ratings(
            request.request_id, history, [r.item_id for r in head], self.catalogue
        )
        b = self.settings.predict_weight
        blended = (1.0 - b) * zscore(np.asarray([r.score for r in head])) + b * zscore(expected)
        order = sorted(range(len(head)), key=lambda n: (-round(float(blended[n]), TIE_DECIMALS), n))
        # a head hit's score is the blend it was sorted by (as MMR does, the tail keeps its own scores)
        return [dataclasses.replace(head[n], score=float(blended[n])) for n in order] + tail

    def _diversify(self, ordered: list[_Ranked], lam: float) -> list[_Ranked]:
        """MMR over the top ``min(mmr_depth, recall_depth)``; the rest keeps its order below.

        Relevance is the rank in ``ordered`` (linearly from 1 to 0 over the pool): the fused head and the
        stage-1 tail are scored on different scales, and the rank is what both stages agreed on. Greedy MMR picks in an order
        that does not depend on how many it picks, so the top k of a diversified list never depends on k.
        """
        size = min(self.settings.mmr_depth, self.settings.recall_depth)  # never more because k asks more
        pool = ordered[:size]
        if len(pool) < 2 or lam >= 1.0:
            return ordered
        vecs = self.index.vectors([r.item_id for r in pool])
        relevance = 1.0 - np.arange(len(pool)) / max(size - 1, 1)
        picked = mmr(vecs, relevance, k=len(pool), lam=lam)
        return [pool[p] for p in picked] + ordered[len(pool) :]

    def _explain(self, request: Request, top: list[_Ranked]) -> dict[str, dict[str, Any]]:
        """Explanations from the scores that ranked each hit: stage 2's (the cross-encoder where it ran, the
        co-watched history items where co-watch scores took part) for the reranked head, stage 1's below it."""
        head = [r.item_id for r in top if r.stage == "rerank"]
        tail = [r.item_id for r in top if r.stage != "rerank"]
        notes = explain_hits(
            self, request, head, use_reranker=self.runs_reranker, cowatch=self.settings.cowatch_weight > 0
        )
        notes = {**notes, **explain_hits(self, request, tail, use_reranker=False)}
        if self.hybrid and top:  # what each recall channel gave every hit (the fused stage-1 score's parts)
            ids = [r.item_id for r in top]
            dense = self.pair_scores([request.text], ids, use_reranker=False)[0]
            lexical = self.lexical.scores(request.text, ids)  # type: ignore[union-attr]
            for item_id, d, b in zip(ids, dense, lexical, strict=True):
                notes.setdefault(item_id, {})["channels"] = {
                    "dense": float(d),
                    "bm25": float(b),
                    "lexical_weight": self.settings.lexical_weight,
                }
        return notes

    def pair_scores(self, texts: Sequence[str], item_ids: Sequence[str], *, use_reranker: bool) -> np.ndarray:
        """Scores of every (text, item): a texts × items matrix from the cross-encoder (on stage 2's item texts)
        or the bi-encoder (cosine with the indexed vectors). Explanations rescore edited requests with it."""
        if use_reranker:
            if self.reranker is None:
                raise TwostageError("this pipeline has no reranker")
            pairs = [(t, self.rerank_text(i)) for t in texts for i in item_ids]
            scores = np.asarray(self.reranker.score(pairs), dtype=np.float64)
            return scores.reshape(len(texts), len(item_ids))
        text_vecs = self.encoder.encode(list(texts))
        return (text_vecs @ self.index.vectors(list(item_ids)).T).astype(np.float64)


class _MemoEncoder:
    """A bi-encoder that encodes each distinct text once."""

    def __init__(self, encoder: TextEncoder):
        self.encoder, self.vectors = encoder, {}

    def encode(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        new = list(dict.fromkeys(t for t in texts if t not in self.vectors))
        if new:
            self.vectors.update(zip(new, self.encoder.encode(new, progress=progress), strict=True))
        if not texts:
            return self.encoder.encode([], progress=False)
        return np.stack([self.vectors[t] for t in texts])


class _MemoScorer:
    """A cross-encoder that scores each distinct (request, item) pair once; ``scored`` counts the pairs run."""

    def __init__(self, scorer: PairScorer):
        self.scorer, self.scores, self.scored = scorer, {}, 0

    def score(self, pairs: Sequence[tuple[str, str]], *, progress: bool = False) -> np.ndarray:
        new = list(dict.fromkeys(p for p in pairs if p not in self.scores))
        if new:
            self.scores.update(zip(new, np.asarray(self.scorer.score(new, progress=progress)), strict=True))
            self.scored += len(new)
        return np.asarray([self.scores[p] for p in pairs], dtype=np.float64)


@dataclass(frozen=True, eq=False)
class _Recalled:
    """One request's stage-1 list (best first) and its bi-encoder vector (the learned ranker's ``dense``)."""

    hits: list[tuple[str, float]]
    vector: np.ndarray


@dataclass(frozen=True)
class _Ranked:
    """One entry of a ranked list before it becomes a Hit: its sort score and what each stage said."""

    item_id: str
    score: float
    recall_score: float
    rerank_score: float | None
    stage: str
