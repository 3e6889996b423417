"""Ingestion and evaluation speed on real data (issues 2 and 5).

1. Ingest ml-latest-small ratings (100,836 rows) into a fresh store, several times: median seconds; then the
   same ratings and movies again (all skipped or unchanged), against the first load.
2. Evaluate 10,000 requests × 100 results through the DuckDB join + NumPy metrics: median seconds, against
   a baseline in the same process: ir_measures computing the same metrics from the same run.

Usage: python tools/bench/bench_ingest_eval.py  → tools/bench/results/ingest_eval.json
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

from common import SHARED_DATA, percentiles, repeat, write

from twostage.config import Config
from twostage.evaluate import evaluate_ranking
from twostage.store import Store


def bench_ingest(repeats: int = 5) -> dict:
    """First load of the ratings, then the same files again into the reopened store (a re-run of an ingest
    script): every event is already stored and skipped, every item unchanged and left alone."""
    ml = SHARED_DATA / "ml-latest-small"
    items = {"item_id": "movieId", "categories": "genres"}
    events = {"user_id": "userId", "item_id": "movieId", "value": "rating", "ts": "timestamp"}
    times, reload_events, reload_items = [], [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            store = Store(Path(tmp) / "s.duckdb")
            store.ingest(ml / "movies.csv", "items", mapping=items)
            started = time.perf_counter()
            report = store.ingest(ml / "ratings.csv", "events", mapping=events, event="rating")
            times.append(time.perf_counter() - started)
            assert report.rows == 100_836
            store.close()
            store = Store(Path(tmp) / "s.duckdb")
            started = time.perf_counter()
            again = store.ingest(ml / "ratings.csv", "events", mapping=events, event="rating")
            reload_events.append(time.perf_counter() - started)
            assert (again.rows, again.already_stored) == (0, 100_836)
            started = time.perf_counter()
            store.ingest(ml / "movies.csv", "items", mapping=items)
            reload_items.append(time.perf_counter() - started)
            assert store.count("events") == 100_836
            store.close()
    return {
        "rows": 100_836,
        "seconds": percentiles(times),
        "reload_events_seconds": percentiles(reload_events),
        "reload_items_seconds": percentiles(reload_items),
        "items": 9_742,
    }


def bench_eval(n_requests: int = 10_000, depth: int = 100, repeats: int = 3) -> dict:
    import ir_measures
    from ir_measures import AP, RR, R, Success, nDCG

    rng = random.Random(0)
    store = Store(":memory:")
    n_items = 50_000
    # targets: 1–5 graded relevant items per request, written as a 'given' split
    rows = []
    for q in range(n_requests):
        for item in rng.sample(range(n_items), rng.randint(1, 5)):
            rows.append((f"q{q}", f"i{item}", float(rng.randint(1, 3))))
    store.con.executemany("INSERT INTO splits VALUES ('bench', 'test', 'query', ?, ?, ?, NULL, NULL)", rows)
    run_id = store.new_run("bench", Config().to_dict())
    relevant = {}
    for q, i, g in rows:
        relevant.setdefault(q, {})[i] = g
    rankings = {}
    for q in range(n_requests):
        hits = [f"i{x}" for x in rng.sample(range(n_items), depth)]
        # plant some relevant items at random ranks so metrics are not all zero
        for item in relevant[f"q{q}"]:
            if rng.random() < 0.5:
                hits[rng.randrange(depth)] = item
        seen, ranked = set(), []
        for h in hits:
            if h not in seen:
                seen.add(h)
                ranked.append((h, float(depth - len(ranked))))
        rankings[f"q{q}"] = ranked
    store.write_results(run_id, "recall", rankings)
    ks = (1, 5, 10, 100)
    ours = repeat(
        lambda: evaluate_ranking(
            store,
            name="recall",
            run_id=run_id,
            stage="recall",
            split="bench",
            part="test",
            ks=ks,
            metric_names=("recall", "precision", "ndcg", "mrr", "map", "hit"),
        ),
        repeats,
    )
    ours_result = evaluate_ranking(
        store,
        name="recall",
        run_id=run_id,
        stage="recall",
        split="bench",
        part="test",
        ks=ks,
        metric_names=("ndcg", "recall", "mrr", "map", "hit"),
    )
    qrels = [ir_measures.Qrel(q, i, int(g)) for q, i, g in rows]
    run = [ir_measures.ScoredDoc(q, i, s) for q, hits in rankings.items() for i, s in hits]
    measures = [nDCG @ 10, nDCG @ 100, R @ 100, RR @ 10, AP @ 100, Success @ 10]
    baseline_result = {}
    base = repeat(lambda: baseline_result.update(ir_measures.calc_aggregate(measures, qrels, run)), repeats)
    agree = {
        "nDCG@10": (ours_result.means["nDCG@10"], baseline_result[nDCG @ 10]),
        "R@100": (ours_result.means["R@100"], baseline_result[R @ 100]),
        "RR@10": (ours_result.means["RR@10"], baseline_result[RR @ 10]),
        "AP@100": (ours_result.means["AP@100"], baseline_result[AP @ 100]),
    }
    return {
        "requests": n_requests,
        "depth": depth,
        "ours_seconds": percentiles(ours),
        "ir_measures_seconds": percentiles(base),
        "ratio_ours_over_ir_measures": percentiles(ours)["median"] / percentiles(base)["median"],
        "agreement": agree,
    }


def main() -> None:
    # 1. ingestion
    ingest = bench_ingest()
    print(f"ingest 100,836 ratings: median {ingest['seconds']['median']:.3f}s")
    # 2. evaluation of 10k requests x 100 results
    ev = bench_eval()
    print(
        f"evaluate 10k x 100: ours median {ev['ours_seconds']['median']:.2f}s, ir_measures "
        f"{ev['ir_measures_seconds']['median']:.2f}s (ratio {ev['ratio_ours_over_ir_measures']:.2f})"
    )
    print(write("ingest_eval", {"ingest": ingest, "evaluate": ev}))


if __name__ == "__main__":
    main()
