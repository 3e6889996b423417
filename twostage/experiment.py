"""One evaluation run: every ranking (baselines, zero-shot, stage 1, the full pipeline, MMR variants) for the
same requests, stored and evaluated side by side with paired comparisons.

The pipeline's rankings come from :meth:`Pipeline.rank`, the call that serves: the "rerank" ranking of a user
is what ``recommend`` returns for them at the split's cut-off, and "mmr-λ" what ``recommend(diversify=λ)``
returns. This module receives its data (store, pipelines, config) and never the Engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twostage.baselines import BM25, popularity_rankings
from twostage.evaluate import EvalReport, StageMetrics, beyond_accuracy, compare, evaluate_ranking, write_html
from twostage.requests import split_requests

if TYPE_CHECKING:
    from twostage.config import Config
    from twostage.pipeline import Pipeline
    from twostage.requests import Request
    from twostage.store import Store

logger = logging.getLogger(__name__)

Lists = list[list[tuple[str, float]]]
# b − a comparisons reported: stage 2 against stage 1 and against each baseline, stage 1 against each baseline
BASELINES = ("popularity", "bm25", "itemknn", "ease", "zero-shot", "recall-no-prior", "recall-dense")
PAIRS = [("recall", "rerank")] + [(b, "recall") for b in BASELINES] + [(b, "rerank") for b in BASELINES]


def _timed(fn: Callable[[], Lists]) -> tuple[Lists, float]:
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def _ranked(pipe: Pipeline, requests: list[Request], k: int, progress: bool, **options: Any) -> Lists:
    return [
        [(h.item_id, h.score) for h in r.hits] for r in pipe.rank(requests, k, progress=progress, **options)
    ]


def run_evaluation(
    store: Store,
    pipe: Pipeline,
    *,
    config: Config,
    split: str,
    part: str,
    baselines: bool = True,
    zero_shot: Callable[[], Pipeline | None] | None = None,
    max_requests: int | None = None,
    mmr_lambdas: Sequence[float] = (),
    report: str | Path | None = None,
    progress: bool = False,
) -> EvalReport:
    """Evaluate every ranking on ``split/part``: the baseline (popularity or BM25), the untuned bi-encoder
    (``zero_shot`` makes its pipeline once the part is known to exist, or None when there is none), stage 1
    (and stage 1 without its popularity prior), both stages, and MMR at each of ``mmr_lambdas``. ``pipe`` must
    be the pipeline as it runs on ``split`` (log counts before its cut-offs)."""
    kind = store.require_split(split)
    requests = split_requests(
        store,
        pipe.catalogue,
        pipe.text,
        split=split,
        part=part,
        max_requests=max_requests,
        exclude_seen=pipe.settings.exclude_seen,
    )
    ks = tuple(sorted(config.eval.ks))
    depth = max(max(ks), pipe.settings.recall_depth)
    fingerprint = getattr(pipe.encoder, "fingerprint", None)
    pipe = pipe.memoized()  # the rankings below share their model scores: each pair is scored once
    run_id = store.new_run("eval", {**config.to_dict(), "split": split, "part": part}, fingerprint)

    rankings: list[tuple[str, Lists, float]] = []
    if baselines:
        rankings.append(_baseline(store, pipe, kind, split, requests, depth))
        if kind == "user":
            rankings += _id_baselines(store, pipe, config, split, requests, depth)
        zero = zero_shot() if zero_shot is not None else None
        if zero is not None:
            lists = _timed(lambda: _ranked(zero, requests, depth, progress, stage="recall"))
            rankings.append(("zero-shot", *lists))
    # stage 1 first: its time includes encoding the requests, which the memoized pipeline then reuses
    recall = ("recall", *_timed(lambda: _ranked(pipe, requests, depth, progress, stage="recall")))
    if pipe.settings.popularity_weight > 0:
        plain = pipe.with_settings(popularity_weight=0.0)
        lists = _timed(lambda: _ranked(plain, requests, depth, progress, stage="recall"))
        rankings.append(("recall-no-prior", *lists))
    if pipe.hybrid or pipe.settings.items_weight > 0:
        # stage 1 without its BM25 or EASE channel, beside that channel alone (a baseline) and the fusion
        dense = pipe.with_settings(lexical_weight=0.0, items_weight=0.0)
        rankings.append(
            ("recall-dense", *_timed(lambda: _ranked(dense, requests, depth, progress, stage="recall")))
        )
    rankings.append(recall)
    if pipe.reranker is not None or pipe.learned is not None:  # stage 2's time alone: stage 1's is remembered
        rankings.append(("rerank", *_timed(lambda: _ranked(pipe, requests, depth, progress))))

    beyond = _beyond_fn(store, pipe, kind, split, part)
    evaluated = {"ks": ks, "metric_names": config.eval.metrics}
    rows = [
        _evaluate(store, run_id, split, part, requests, name, lists, secs, beyond, **evaluated)
        for name, lists, secs in rankings
    ]
    extra: dict[str, Any] = {"run_id": run_id, "n_requests": len(requests)}
    if mmr_lambdas:
        extra["mmr_sweep"] = _mmr_sweep(
            store, pipe, run_id, split, part, requests, depth, mmr_lambdas, beyond, progress
        )

    labels = [lbl for lbl in rows[-1].means if lbl.split("@")[0] in ("nDCG", "R", "RR", "AP")]
    by_name = {r.name: r for r in rows}
    comparisons: list[dict[str, Any]] = []
    for a, b in PAIRS:
        if a in by_name and b in by_name:
            comparisons += compare(
                by_name[a], by_name[b], labels, n_resamples=config.eval.bootstrap, seed=config.eval.seed
            )
    if kind == "user":
        extra["cold_start"] = _cold_start(store, pipe, config, split, part, requests, rows)
    result = EvalReport(split, part, rows, comparisons, extra)
    if report is not None:
        write_html(result, report)
    return result


def _evaluate(
    store: Store,
    run_id: str,
    split: str,
    part: str,
    requests: list[Request],
    name: str,
    lists: Lists,
    seconds: float | None,
    beyond: Callable[[list[list[str]]], dict[str, float]],
    *,
    ks: Sequence[int],
    metric_names: Sequence[str],
) -> StageMetrics:
    """Store one ranking in ``results`` and evaluate it against the split's targets in SQL."""
    store.write_results(run_id, name, {r.request_id: hits for r, hits in zip(requests, lists, strict=True)})
    row = evaluate_ranking(
        store,
        name=name,
        run_id=run_id,
        stage=name,
        split=split,
        part=part,
        ks=ks,
        metric_names=metric_names,
        request_ids=[r.request_id for r in requests],
        beyond=beyond,
        seconds=seconds,
    )
    logger.info("evaluated %s (%d requests, %.1fs)", name, row.n_requests, seconds or 0.0)
    return row


def _baseline(
    store: Store, pipe: Pipeline, kind: str, split: str, requests: list[Request], depth: int
) -> tuple[str, Lists, float]:
    if kind == "user":
        popularity = _popularity(store, pipe, split)
        exclude = {r.request_id: r.exclude for r in requests}
        return (
            "popularity",
            *_timed(lambda: list(popularity_rankings(popularity, exclude, k=depth).values())),
        )

    def bm25() -> Lists:
        index = pipe.lexical or BM25.of_catalogue(pipe.catalogue)
        return index.search([r.text for r in requests], k=depth)

    return ("bm25", *_timed(bm25))


def _id_baselines(
    store: Store, pipe: Pipeline, config: Config, split: str, requests: list[Request], depth: int
) -> list[tuple[str, Lists, float]]:
    """The id-only baselines on the log before the split's cut-offs: ItemKNN over each request's recent
    ``[text] history_size`` items (on ml-latest-small's validation users, nDCG@10 0.045 from the last 5 items
    and 0.026 from whole histories), and EASE (the items channel's weights) over the whole history."""
    from twostage.cowatch import seen_matrix, snapshot
    from twostage.logbaselines import fit_itemknn

    out = []
    started = time.perf_counter()
    with snapshot(store) as cur:
        seen = seen_matrix(cur, split, config.ranker.ease_recent_items)
    knn = fit_itemknn(seen.item_ids, seen.users, seen.items)
    recent = pipe.text.history_size
    lists = [knn.top(r.history[:recent], depth, r.exclude) for r in requests]
    out.append(("itemknn", lists, time.perf_counter() - started))
    if pipe.counts.items is not None:  # the items channel alone
        items = pipe.counts.items
        out.append(("ease", *_timed(lambda: [items.top(r.history, depth, r.exclude) for r in requests])))
    return out


COLD_USERS = 5  # a target with fewer training users than this is cold


def _cold_start(
    store: Store,
    pipe: Pipeline,
    config: Config,
    split: str,
    part: str,
    requests: list[Request],
    rows: list[StageMetrics],
) -> dict[str, Any]:
    """Every ranking on the cold-start slice: the requests whose held-out item had fewer than
    :data:`COLD_USERS` users before the split's cut-offs (items added after the cut-off have none), where the
    log says little and only the text can; with the pipeline's paired tests against each baseline there."""
    popularity = _popularity(store, pipe, split)
    targets = store.targets(split, part, limit=len(requests) if config.eval.max_requests else None)
    cold = {
        r.request_id
        for r in requests
        if any(popularity.get(i, 0) < COLD_USERS for i in targets.get(r.request_id, {}))
    }
    sliced = {row.name: row.subset(row.name, cold) for row in rows}
    labels = [lbl for lbl in rows[-1].means if lbl.split("@")[0] in ("nDCG", "R", "RR")] if rows else []
    comparisons: list[dict[str, Any]] = []
    if len(cold) > 1:
        for a, b in PAIRS:
            if a in sliced and b in sliced:
                comparisons += compare(
                    sliced[a], sliced[b], labels, n_resamples=config.eval.bootstrap, seed=config.eval.seed
                )
    return {
        "definition": f"held-out item with fewer than {COLD_USERS} users before the cut-off",
        "n_requests": len(cold),
        "rows": {name: row.means for name, row in sliced.items()},
        "comparisons": comparisons,
    }


def _popularity(store: Store, pipe: Pipeline, split: str) -> Mapping[str, float]:
    """Users per item before the split's cut-offs: the pipeline's own counts when it has them (one count of
    the events per evaluation, not one per use)."""
    return pipe.counts.popularity or store.popularity(split)


def _beyond_fn(
    store: Store, pipe: Pipeline, kind: str, split: str, part: str
) -> Callable[[list[list[str]]], dict[str, float]]:
    """Beyond-accuracy metrics of a ranking's top lists: coverage, exposure, diversity, novelty."""
    catalogue = pipe.catalogue
    categories = catalogue.categories()
    has_categories = any(categories.values())
    popularity = _popularity(store, pipe, split) if kind == "user" else None
    n_users = store.user_count()  # every held-out user has events

    def beyond(lists: list[list[str]]) -> dict[str, float]:
        return beyond_accuracy(
            lists,
            catalogue_size=len(catalogue),
            popularity=popularity,
            n_users=n_users,
            categories=categories if has_categories else None,
            vectors=pipe.index.vectors,
        )

    return beyond


def _mmr_sweep(
    store: Store,
    pipe: Pipeline,
    run_id: str,
    split: str,
    part: str,
    requests: list[Request],
    depth: int,
    lambdas: Sequence[float],
    beyond: Callable[[list[list[str]]], dict[str, float]],
    progress: bool,
) -> list[dict[str, float]]:
    """The accuracy/diversity trade-off: the full pipeline diversified at each λ, as ``diversify=λ`` serves it."""
    k = 10
    sweep = []
    for lam in lambdas:
        lists = _ranked(pipe, requests, depth, progress, diversify=lam)
        row = _evaluate(
            store,
            run_id,
            split,
            part,
            requests,
            f"mmr-{lam:g}",
            lists,
            None,
            beyond,
            ks=(k,),
            metric_names=("ndcg", "recall"),
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
