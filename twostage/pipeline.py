"""The two stages run over a batch of requests: recall (bi-encoder + FAISS) then rerank (cross-encoder).

The same code serves one request (``Engine.search``/``recommend``) and thousands (evaluation), so what is
measured offline is what runs online.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from twostage.rerank import Candidate, RerankedHit, fuse

if TYPE_CHECKING:
    from twostage.encoders import BiEncoder
    from twostage.index import VectorIndex
    from twostage.requests import Catalogue, Request
    from twostage.rerank import Reranker

Scored = list[tuple[str, float]]

_LOCKS_GUARD = threading.Lock()


def model_lock(model: object) -> threading.Lock:
    """One lock per model object, shared by every Pipeline that uses it (pipelines are rebuilt on updates)."""
    with _LOCKS_GUARD:
        lock = getattr(model, "_twostage_lock", None)
        if lock is None:
            lock = threading.Lock()
            model._twostage_lock = lock  # type: ignore[attr-defined]
        return lock


class Pipeline:
    """Recall and rerank with fixed models; safe to call from many threads.

    Model forward passes are serialised by a lock (fast tokenizers are not re-entrant, and on CPU torch
    already uses every core inside one call); FAISS search and the store run outside it.
    """

    def __init__(
        self,
        *,
        encoder: BiEncoder,
        index: VectorIndex,
        catalogue: Catalogue,
        reranker: Reranker | None = None,
        rerank_texts: Mapping[str, str] | None = None,
        fusion_weight: float = 0.0,
        cowatched: Mapping[str, Sequence[str]] | None = None,
        cowatch_weight: float = 0.0,
        history_size: int = 5,
        popularity: Mapping[str, float] | None = None,
        popularity_weight: float = 0.0,
    ):
        self.encoder = encoder
        self.index = index
        self.catalogue = catalogue
        self.reranker = reranker
        self.rerank_texts = rerank_texts if rerank_texts is not None else catalogue.texts
        self.fusion_weight = fusion_weight
        self.cowatched = cowatched or {}
        self.cowatch_weight = cowatch_weight
        self.history_size = history_size
        self.popularity = popularity or {}
        self.popularity_weight = popularity_weight
        self._encode_lock = model_lock(encoder)
        self._rerank_lock = model_lock(reranker) if reranker is not None else threading.Lock()

    def encode(self, texts: Sequence[str]):
        """Bi-encoder vectors for texts (under the model lock)."""
        with self._encode_lock:
            return self.encoder.encode(list(texts))

    def score_pairs(self, pairs: Sequence[tuple[str, str]]):
        """Raw cross-encoder scores for (request text, item text) pairs (under the model lock)."""
        if self.reranker is None:
            raise ValueError("this pipeline has no reranker")
        with self._rerank_lock:
            return self.reranker.score(pairs)

    @property
    def runs_reranker(self) -> bool:
        """True when the cross-encoder can change the order: it is loaded and the fusion weight is below 1."""
        return self.reranker is not None and self.fusion_weight < 1.0

    def reorders(self, request: Request) -> bool:
        """True when stage 2 can change stage 1's order for this request: the cross-encoder runs, or co-watch
        scores are fused and the request has a history to overlap."""
        if self.reranker is None:
            return False
        return self.runs_reranker or (self.cowatch_weight > 0.0 and bool(self.cowatched and request.history))

    def watched_with(self, request: Request, item_id: str) -> list[str]:
        """The request's recent history items that are co-watched with ``item_id`` (its co-watch score)."""
        from twostage.cowatch import shared_history

        return shared_history(request.history[: self.history_size], item_id, self.cowatched)

    def rerank_text(self, item_id: str) -> str:
        """The text stage 2 reads for an item (``[reranker] item_template``)."""
        return self.rerank_texts[item_id]

    def with_rerank_texts(self, texts: Mapping[str, str]) -> Pipeline:
        """The same models reading other item texts in stage 2 (e.g. co-watch lists counted before a cut-off)."""
        other = copy.copy(self)
        other.rerank_texts = texts
        return other

    def with_weights(
        self, *, fusion_weight: float | None = None, cowatch_weight: float | None = None
    ) -> Pipeline:
        """The same models with other stage-2 weights (to compare settings on the same candidates)."""
        other = copy.copy(self)
        if fusion_weight is not None:
            other.fusion_weight = fusion_weight
        if cowatch_weight is not None:
            other.cowatch_weight = cowatch_weight
        return other

    def with_cowatched(self, lists: Mapping[str, Sequence[str]]) -> Pipeline:
        """The same models and weights with other co-watch lists (e.g. counted before a split's cut-offs)."""
        other = copy.copy(self)
        other.cowatched = lists
        return other

    def with_popularity(self, popularity: Mapping[str, float], weight: float | None = None) -> Pipeline:
        """The same models with another popularity table (e.g. counted only before a split's cut-off)."""
        other = copy.copy(self)
        other.popularity = popularity
        if weight is not None:
            other.popularity_weight = weight
        return other

    def recall(self, requests: Sequence[Request], depth: int, *, progress: bool = False) -> list[Scored]:
        """Top-``depth`` candidates per request, excluding each request's ``exclude`` items.

        With ``popularity_weight`` β > 0 the score is ``cos(q, i) + β · ln(1 + users(i))``: a popularity prior
        that undoes the bias of in-batch negatives (a popular item is another example's positive more often,
        so MultipleNegativesRankingLoss learns to push it down; this is the logQ correction of sampled
        softmax, applied at serving time). FAISS is searched deeper (10 × depth, at least 1,000) and the
        candidates re-sorted, so popular items outside the cosine top-depth can come in (on ml-latest-small,
        validation Recall@100 was 0.21 with a 300-deep search and 0.29 with 1,000).
        """
        if not requests:
            return []
        with self._encode_lock:
            query_vecs = self.encoder.encode([r.text for r in requests], progress=progress)
        exclude = [r.exclude for r in requests] if any(r.exclude for r in requests) else None
        if self.popularity_weight <= 0 or not self.popularity:
            return self.index.search(query_vecs, depth, exclude=exclude)
        deep = self.index.search(query_vecs, max(10 * depth, 1000), exclude=exclude)
        beta, pop = self.popularity_weight, self.popularity
        out = []
        for hits in deep:
            rescored = [(i, s + beta * math.log1p(pop.get(i, 0.0))) for i, s in hits]
            rescored.sort(key=lambda x: (-x[1], x[0]))
            out.append(rescored[:depth])
        return out

    def rerank(
        self,
        requests: Sequence[Request],
        candidates: Sequence[Scored],
        depth: int,
        *,
        texts: Sequence[str] | None = None,
        progress: bool = False,
    ) -> list[list[RerankedHit]]:
        """Rerank the top ``depth`` candidates of each request (all of them come back, reordered).

        ``texts`` overrides the request texts (explanations rescore edited contexts this way). With fusion
        weight 1 the cross-encoder cannot change the order, so it is not run: the hits keep stage-1 order
        (reordered by co-watch scores when their weight is above 0) and their ``rerank_score`` is NaN.
        """
        if self.reranker is None:
            raise ValueError("this pipeline has no reranker")
        batch = []
        for n, (request, cands) in enumerate(zip(requests, candidates, strict=True)):
            top = [
                Candidate(
                    i, self.rerank_text(i), s, len(self.watched_with(request, i)) if self.cowatched else 0
                )
                for i, s in cands[:depth]
            ]
            batch.append((texts[n] if texts is not None else request.text, top))
        weights = {"fusion_weight": self.fusion_weight, "cowatch_weight": self.cowatch_weight}
        if not self.runs_reranker:
            return [fuse(top, np.full(len(top), np.nan), k=depth, **weights) for _, top in batch]
        with self._rerank_lock:
            return self.reranker.rerank_batch(batch, k=depth, progress=progress, **weights)

    def run(
        self, requests: Sequence[Request], *, depth: int, rerank_depth: int | None, progress: bool = False
    ) -> tuple[list[Scored], list[Scored] | None, list[list[RerankedHit]] | None]:
        """Both stages: stage-1 lists, final lists (reranked head + the rest of stage 1), and rerank hits.

        The rest of the stage-1 list is kept after the reranked head, so deep metrics (R@100) stay defined
        for the full pipeline and equal stage 1's beyond the rerank depth.
        """
        stage1 = self.recall(requests, depth, progress=progress)
        if self.reranker is None or not rerank_depth:
            return stage1, None, None
        hits = self.rerank(requests, stage1, rerank_depth, progress=progress)
        return stage1, with_reranked_head(stage1, hits), hits


def with_reranked_head(stage1: Sequence[Scored], hits: Sequence[list[RerankedHit]]) -> list[Scored]:
    """Each stage-1 list with its head replaced by the reranked hits; the tail keeps stage-1 order, scored
    below the head so ranks stay consistent with scores."""
    final = []
    for cands, reranked in zip(stage1, hits, strict=True):
        head = [(h.item_id, h.score) for h in reranked]
        floor = min((s for _, s in head), default=0.0)
        final.append(head + [(i, floor - 1.0 - n) for n, (i, _) in enumerate(cands[len(head) :])])
    return final
