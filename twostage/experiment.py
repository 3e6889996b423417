"""One evaluation run: produce every ranking (baselines, zero-shot, stage 1, full pipeline, MMR variants)
for the same requests, store them, and evaluate them side by side with paired comparisons.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from twostage.evaluate import EvalReport, StageMetrics, beyond_accuracy, compare, evaluate_ranking, write_html
from twostage.requests import split_requests

if TYPE_CHECKING:
    from twostage.engine import Engine
    from twostage.pipeline import Pipeline
    from twostage.requests import Request

logger = logging.getLogger(__name__)

Lists = list[list[tuple[str, float]]]


def _timed(fn: Callable[[], Lists]) -> tuple[Lists, float]:
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def run_evaluation(
    engine: Engine,
    *,
    split: str,
    part: str,
    baselines: bool,
    max_requests: int | None,
    mmr_lambdas: Sequence[float],
    report: str | Path | None,
    pipeline: Pipeline | None = None,
) -> EvalReport:
    """Evaluate every ranking the project can produce on ``split/part``; see ``Engine.evaluate``."""
    store, config = engine.store, engine.config
    catalogue = engine.catalogue()
    kind = store.require_split(split)
    requests = split_requests(
        store,
        catalogue,
        config.text,
        split=split,
        part=part,
        max_requests=max_requests,
        exclude_seen=config.index.exclude_seen,
    )
    ks = tuple(sorted(config.eval.ks))
    depth = max(max(ks), config.index.depth)
    encoder = engine.retriever()
    run_id = store.new_run("eval", {**config.to_dict(), "split": split, "part": part}, encoder.fingerprint)
    pipe = engine.split_pipeline(split, pipeline)

    rankings: list[tuple[str, Lists, float]] = []
    if baselines:
        rankings.append(_baseline(engine, kind, split, requests, depth))
        if engine.models_dir("retriever").exists():
            rankings.append(("zero-shot", *_timed(lambda: _zero_shot(engine, requests, depth))))
    if pipe.popularity_weight > 0:
        plain = pipe.with_popularity({}, 0.0)
        rankings.append(
            ("recall-no-prior", *_timed(lambda: plain.recall(requests, depth, progress=engine.progress)))
        )
    stage1, seconds = _timed(lambda: pipe.recall(requests, depth, progress=engine.progress))
    rankings.append(("recall", stage1, seconds))
    final = None
    if pipe.reranker is not None:
        final, seconds = _timed(lambda: _full(pipe, requests, stage1, engine.rerank_depth(), engine.progress))
        rankings.append(("rerank", final, seconds))

    beyond = _beyond_fn(engine, kind, split, pipe.index)
    rows: list[StageMetrics] = []
    for name, lists, secs in rankings:
        store.write_results(
            run_id, name, {r.request_id: hits for r, hits in zip(requests, lists, strict=True)}
        )
        rows.append(
            evaluate_ranking(
                store,
                name=name,
                run_id=run_id,
                stage=name,
                split=split,
                part=part,
                ks=ks,
                metric_names=config.eval.metrics,
                request_ids=[r.request_id for r in requests],
                beyond=beyond,
                seconds=secs,
            )
        )
        logger.info("evaluated %s (%d requests, %.1fs)", name, rows[-1].n_requests, secs)

    extra: dict[str, Any] = {"run_id": run_id, "n_requests": len(requests)}
    if mmr_lambdas:
        head = final if final is not None else stage1
        extra["mmr_sweep"] = _mmr_sweep(engine, pipe.index, run_id, split, part, requests, head, mmr_lambdas)

    labels = [lbl for lbl in rows[-1].means if lbl.split("@")[0] in ("nDCG", "R", "RR", "AP")]
    by_name = {r.name: r for r in rows}
    pairs = [("recall", "rerank")] + [
        (b, "recall") for b in ("popularity", "bm25", "zero-shot", "recall-no-prior")
    ]
    comparisons: list[dict[str, Any]] = []
    for a, b in pairs:
        if a in by_name and b in by_name:
            comparisons += compare(
                by_name[a], by_name[b], labels, n_resamples=config.eval.bootstrap, seed=config.eval.seed
            )
    result = EvalReport(split, part, rows, comparisons, extra)
    if report is not None:
        write_html(result, report)
    return result


def _baseline(
    engine: Engine, kind: str, split: str, requests: list[Request], depth: int
) -> tuple[str, Lists, float]:
    from twostage.baselines import BM25, popularity_rankings

    if kind == "user":
        pop = engine.store.popularity(split)
        lists, secs = _timed(
            lambda: list(
                popularity_rankings(pop, {r.request_id: r.exclude for r in requests}, k=depth).values()
            )
        )
        return "popularity", lists, secs
    catalogue = engine.catalogue()

    def bm25() -> Lists:
        index = BM25(catalogue.item_ids, [catalogue.text(i) for i in catalogue.item_ids])
        return index.search([r.text for r in requests], k=depth)

    return ("bm25", *_timed(bm25))


def _zero_shot(engine: Engine, requests: list[Request], depth: int) -> Lists:
    """The untuned base bi-encoder with exact search: what fine-tuning has to beat."""
    from twostage.index import IndexSpec, VectorIndex

    base = engine.retriever(base=True)
    ids, vecs = engine.item_vectors(base)
    index = VectorIndex.build(ids, vecs, IndexSpec(factory="Flat"), model_fingerprint=base.fingerprint)
    query_vecs = base.encode([r.text for r in requests], progress=engine.progress)
    exclude = [r.exclude for r in requests] if any(r.exclude for r in requests) else None
    return index.search(query_vecs, depth, exclude=exclude)


def _full(pipe: Any, requests: list[Request], stage1: Lists, rerank_depth: int, progress: bool) -> Lists:
    """Reranked head (top ``rerank_depth``) followed by the rest of the stage-1 list."""
    from twostage.pipeline import with_reranked_head

    return with_reranked_head(stage1, pipe.rerank(requests, stage1, rerank_depth, progress=progress))


def _beyond_fn(
    engine: Engine, kind: str, split: str, index: Any
) -> Callable[[list[list[str]]], dict[str, float]]:
    catalogue = engine.catalogue()
    categories = catalogue.categories()
    has_categories = any(categories.values())
    popularity = engine.store.popularity(split) if kind == "user" else {}
    n_users = len(engine.store.targets(split, engine.config.eval.part)) if kind == "user" else 0
    n_users = max(n_users, engine.store.stats()["users"])

    def beyond(lists: list[list[str]]) -> dict[str, float]:
        return beyond_accuracy(
            lists,
            catalogue_size=len(catalogue),
            popularity=popularity if kind == "user" else None,
            n_users=n_users,
            categories=categories if has_categories else None,
            vectors=index.vectors,
        )

    return beyond


def _mmr_sweep(
    engine: Engine,
    index: Any,
    run_id: str,
    split: str,
    part: str,
    requests: list[Request],
    lists: Lists,
    lambdas: Sequence[float],
) -> list[dict[str, float]]:
    """Accuracy/diversity trade-off: MMR over each final list's top 50 for a few λ values."""
    from twostage.rerank import mmr

    beyond = _beyond_fn(engine, engine.store.require_split(split), split, index)
    k = 10
    sweep = []
    for lam in lambdas:
        out = []
        for hits in lists:
            head = hits[:50]
            if len(head) <= 1:
                out.append(head)
                continue
            vecs = index.vectors([i for i, _ in head])
            order = mmr(
                vecs, np.asarray([s for _, s in head], dtype=np.float32), k=min(k, len(head)), lam=lam
            )
            out.append([head[j] for j in order])
        name = f"mmr-{lam:g}"
        engine.store.write_results(
            run_id, name, {r.request_id: h for r, h in zip(requests, out, strict=True)}
        )
        row = evaluate_ranking(
            engine.store,
            name=name,
            run_id=run_id,
            stage=name,
            split=split,
            part=part,
            ks=(k,),
            metric_names=("ndcg", "recall"),
            request_ids=[r.request_id for r in requests],
            beyond=beyond,
        )
        sweep.append(
            {
                "lambda": lam,
                "ndcg": row.means.get(f"nDCG@{k}", 0.0),
                "recall": row.means.get(f"R@{k}", 0.0),
                "ild": row.beyond.get("ild_embeddings", float("nan")),
                "coverage": row.beyond.get("coverage", 0.0),
            }
        )
    return sweep
