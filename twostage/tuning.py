"""Choosing serving settings on validation requests: stage 2's fusion and co-watch weights and rerank depth,
and stage 1's popularity prior and hybrid (BM25) weight.

Every setting is scored by ranking the validation requests with :meth:`Pipeline.rank`, the very call that
serves them, on a :meth:`Pipeline.memoized` pipeline: the first setting runs the models, every other one only
re-fuses and re-sorts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from twostage.metrics import mean_metric

if TYPE_CHECKING:
    from twostage.config import RerankerConfig, RetrieverConfig
    from twostage.pipeline import Pipeline
    from twostage.requests import Request

logger = logging.getLogger(__name__)

Judged = Mapping[str, float]


def _in_reach(ranked_ids: Sequence[str], judged: Judged) -> bool:
    """Whether a positive is among the candidates: only there can stage 2 change the request's nDCG@10."""
    ids = set(ranked_ids)
    return any(g > 0 and i in ids for i, g in judged.items())


def shallowest_depth(ndcg_by_depth: Mapping[int, float], full: int, tolerance: float) -> int:
    """The smallest rerank depth whose nDCG@10 is within ``tolerance`` (relative) of reranking ``full``
    candidates: deeper reranking would cost time and buy nothing measurable. Relative, because nDCG@10 is
    0.7 on a search benchmark and 0.04 on next-item recommendation."""
    floor = ndcg_by_depth[full] * (1.0 - tolerance)
    return min(d for d, v in ndcg_by_depth.items() if v >= floor)


def choose_stage2(
    pipe: Pipeline,
    requests: Sequence[Request],
    judged: Sequence[Judged],
    cfg: RerankerConfig,
    *,
    recommending: bool,
) -> dict[str, Any]:
    """Choose the fusion and co-watch weights (nDCG@10 over ``fusion_grid`` × ``cowatch_grid`` at
    ``cfg.depth``), then the rerank depth (:func:`shallowest_depth` over ``depth_grid``) for ``pipe``'s
    reranker on the validation ``requests``. A weight set in the config is the one served: only the other is
    searched; co-watch weights only on recommendation splits (queries have no history to overlap). MMR is
    left out: the weights are chosen for relevance, diversity is traded on top.

    A request with no positive among its top ``cfg.depth`` candidates has the same nDCG@10 whatever stage 2
    does, so the cross-encoder scores only the others (on next-item recommendation most requests are such).
    """
    memo = pipe.with_settings(rerank_depth=cfg.depth, mmr_lambda=None).memoized()
    stage1 = memo.rank(requests, cfg.depth, stage="recall")
    reach = [_in_reach(r.item_ids(), j) for r, j in zip(stage1, judged, strict=True)]
    scored = [r for r, ok in zip(requests, reach, strict=True) if ok]
    scored_judged = [j for j, ok in zip(judged, reach, strict=True) if ok]
    fixed = sum(
        mean_metric([r.item_ids()], [j], "ndcg", 10)
        for r, j, ok in zip(stage1, judged, reach, strict=True)
        if not ok
    )
    logger.info(
        "tuning stage 2 on %d validation requests (%d with a positive in reach)", len(requests), len(scored)
    )

    def ndcg10(fusion: float, cowatch: float, depth: int) -> float:
        if not scored:
            return fixed / max(len(requests), 1)
        variant = memo.with_settings(fusion_weight=fusion, cowatch_weight=cowatch, rerank_depth=depth)
        lists = [r.item_ids() for r in variant.rank(scored, 10)]
        return (mean_metric(lists, scored_judged, "ndcg", 10) * len(scored) + fixed) / len(requests)

    fusion_grid = cfg.fusion_grid if cfg.fusion_weight is None else (cfg.fusion_weight,)
    cowatch_grid = (
        (cfg.cowatch_grid if cfg.cowatch_weight is None else (cfg.cowatch_weight,))
        if recommending
        else (0.0,)
    )
    grid = {(w, c): ndcg10(w, c, cfg.depth) for w in fusion_grid for c in cowatch_grid}
    # ties go to more cross-encoder (smaller w) and less co-watch
    best_w, best_c = max(grid, key=lambda wc: (grid[wc], -wc[0], -wc[1]))
    depths = {d: ndcg10(best_w, best_c, d) for d in sorted({*cfg.depth_grid, cfg.depth}) if d <= cfg.depth}
    return {
        "fusion_weight": best_w,
        "cowatch_weight": best_c,
        "weight_grid": [[w, c, v] for (w, c), v in grid.items()],
        "fusion_sweep": {w: v for (w, c), v in grid.items() if c == best_c},
        "cowatch_sweep": {c: v for (w, c), v in grid.items() if w == best_w},
        "rerank_depth": shallowest_depth(depths, cfg.depth, cfg.depth_tolerance),
        "depth_sweep": depths,
        "pairs_scored": memo.reranker.scored if memo.reranker is not None else 0,  # type: ignore[union-attr]
    }


def choose_popularity_weight(
    pipe: Pipeline, requests: Sequence[Request], judged: Sequence[Judged], cfg: RetrieverConfig
) -> dict[str, Any]:
    """The stage-1 popularity prior β from ``popularity_grid`` with the highest validation Recall@``eval_k``
    (ties to the smaller β); ``pipe`` must count popularity before the split's cut-offs."""
    memo = pipe.replace(reranker=None).memoized()
    k = cfg.eval_k
    sweep = {}
    for beta in cfg.popularity_grid:
        ranked = memo.with_settings(popularity_weight=beta, mmr_lambda=None).rank(requests, k, stage="recall")
        sweep[beta] = mean_metric([r.item_ids() for r in ranked], list(judged), "recall", k)
    best = max(sweep, key=lambda b: (sweep[b], -b))
    return {"best": best, f"valid_recall@{k}": sweep}


def choose_lexical_weight(
    pipe: Pipeline,
    lexical: Any,
    requests: Sequence[Request],
    judged: Sequence[Judged],
    cfg: RetrieverConfig,
) -> dict[str, Any]:
    """Hybrid recall's BM25 weight α: the value of ``lexical_grid`` (0 always tried) whose stage-1 ranking has
    the highest validation nDCG@10, ties to the smaller α, so BM25 is fused only where validation says it
    helps (on BEIR it helps some corpora and hurts others). ``lexical`` is the BM25 channel."""
    memo = pipe.replace(reranker=None, lexical=lexical).memoized()
    sweep = {}
    for alpha in sorted({0.0, *cfg.lexical_grid}):
        variant = memo.with_settings(lexical_weight=alpha, lexical_fusion=cfg.lexical_fusion, mmr_lambda=None)
        ranked = variant.rank(requests, 10, stage="recall")
        sweep[alpha] = mean_metric([r.item_ids() for r in ranked], list(judged), "ndcg", 10)
    best = max(sweep, key=lambda a: (sweep[a], -a))
    logger.info(
        "hybrid recall: BM25 weight %.2f (validation nDCG@10 %.4f; %.4f without BM25)",
        best,
        sweep[best],
        sweep[0.0],
    )
    return {"lexical_weight": best, "lexical_sweep": sweep}
