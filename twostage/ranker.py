"""Stage 2's ordering rules: fusing the scores of both stages (and co-watch), and MMR diversification.

Pure functions over scores and vectors, shared by every ranking the pipeline makes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from twostage.errors import ConfigError, InputError

TIE_DECIMALS = 5  # fused scores equal to this many decimals are ties (see fuse)


@dataclass(frozen=True)
class Candidate:
    """One stage-1 result going into stage 2: the item's id, its stage-1 score and its co-watch score (how many
    of the user's recent items are watched with it; 0 for queries)."""

    item_id: str
    stage1_score: float
    cowatch: float = 0.0


@dataclass(frozen=True)
class RerankedHit:
    """One reranked result.

    ``score`` is the sort key (see :func:`fuse`); ``rerank_score`` is the raw
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


def zscore(x: np.ndarray) -> np.ndarray:
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
        fused = fusion_weight * zscore(stage1) + cowatch_weight * zscore(cowatch)
        if fusion_weight < 1.0:
            fused += (1.0 - fusion_weight) * zscore(rerank)
    elif fusion_weight == 0.0:
        fused = rerank
    elif fusion_weight == 1.0:
        fused = stage1
    else:
        fused = (1.0 - fusion_weight) * zscore(rerank) + fusion_weight * zscore(stage1)
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


LEXICAL_FUSIONS = ("convex", "rrf")
RRF_K = 60  # the constant of reciprocal rank fusion (Cormack et al. 2009), as ranx and Vespa use


def fuse_channels(
    dense: Sequence[tuple[str, float]],
    lexical: Sequence[tuple[str, float]],
    *,
    weight: float,
    method: str = "convex",
) -> list[tuple[str, float]]:
    """Stage 1's hybrid list: the union of the dense and lexical candidates, best first (ties by item id).

    ``convex``: ``(1 − weight)·dense + weight·lexical`` with each channel's scores min-max normalised over its
    own list and 0 where a channel did not return the item (so it counts as that channel's worst).
    ``rrf``: ``(1 − weight)/(60 + dense rank) + weight/(60 + lexical rank)``, nothing where absent. Written
    here rather than taken from ranx: it runs per request on the serving path, on two short lists.

    >>> dense, lexical = [("a", 0.9), ("b", 0.7), ("d", 0.5)], [("b", 10.0), ("c", 8.0), ("e", 2.0)]
    >>> fuse_channels(dense, lexical, weight=0.5)
    [('b', 0.75), ('a', 0.5), ('c', 0.375), ('d', 0.0), ('e', 0.0)]
    """
    if method not in LEXICAL_FUSIONS:
        raise ConfigError(
            f"unknown fusion '{method}'; use one of {', '.join(LEXICAL_FUSIONS)}", key="lexical_fusion"
        )
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"must be between 0 and 1, got {weight}", key="lexical_weight")
    fused: dict[str, float] = {}
    for hits, w in ((dense, 1.0 - weight), (lexical, weight)):
        if not hits:
            continue
        if method == "rrf":
            parts = {item: w / (RRF_K + n) for n, (item, _) in enumerate(hits, start=1)}
        else:
            scores = np.array([s for _, s in hits], dtype=np.float64)
            low, span = scores.min(), scores.max() - scores.min()
            normed = (scores - low) / span if span > 0 else np.ones_like(scores)
            parts = {item: w * float(x) for (item, _), x in zip(hits, normed, strict=True)}
        for item, part in parts.items():
            fused[item] = fused.get(item, 0.0) + part
    return sorted(fused.items(), key=lambda x: (-round(x[1], 12), x[0]))
