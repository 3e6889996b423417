"""Benchmark the bundled index configs: recall@100 against exact Flat search, build time and query latency.

Why: the defaults in indexes/*.toml promise recall@100 >= 0.95; this measures that promise and what each
config costs, on clustered synthetic vectors and optionally on real embeddings (``--vecs items.npy``; the
last ``--queries`` rows are held out as queries, or pass ``--query-vecs``).

    python tools/bench/bench_ann.py                      # synthetic, 20k x 384
    python tools/bench/bench_ann.py --vecs tools/bench/results/scifact_item_vecs.npy
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from common import write

from twostage.index import BUILTIN_SPECS, VectorIndex, load_spec


@dataclass(frozen=True)
class AnnCase:
    """One benchmark case: a data set and the configs to measure on it."""

    dataset: str
    item_vecs: np.ndarray
    query_vecs: np.ndarray
    configs: tuple[str, ...] = tuple(BUILTIN_SPECS)
    k: int = 100


def clustered(n: int, n_queries: int, *, dim: int, centres: int, noise: float, seed: int):
    """Gaussian clusters on the unit sphere: centre + noise (norm ``noise`` x the centre's), normalised."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)

    def points(m: int) -> np.ndarray:
        x = c[rng.integers(0, centres, m)] + noise * rng.standard_normal((m, dim)).astype(
            np.float32
        ) / np.sqrt(dim)
        return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)

    return points(n), points(n_queries)


def timed(fn, repeats: int) -> tuple[object, float]:
    """Result of the last call and the median wall time in seconds."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def run_case(case: AnnCase, *, repeats: int, single: int) -> dict:
    """Build every config, then measure recall@k against the flat run and batch / single-query latency."""
    ids = [f"i{j}" for j in range(len(case.item_vecs))]
    rows, truth = [], None
    for name in ("flat", *[c for c in case.configs if c != "flat"]):
        spec = load_spec(name)
        start = time.perf_counter()
        index = VectorIndex.build(ids, case.item_vecs, spec, model_fingerprint="bench")
        build_s = time.perf_counter() - start
        results, batch_s = timed(lambda index=index: index.search(case.query_vecs, case.k), repeats)
        _, single_s = timed(
            lambda index=index: [index.search(q[None], case.k) for q in case.query_vecs[:single]], repeats
        )
        found = [{i for i, _ in r} for r in results]
        if name == "flat":
            truth = found
        recall = float(np.mean([len(f & t) / case.k for f, t in zip(found, truth, strict=True)]))
        rows.append(
            {
                "config": name,
                "factory": index.manifest["resolved_factory"],
                "search_params": spec.search_params(),
                f"recall@{case.k}": round(recall, 4),
                "build_s": round(build_s, 3),
                "batch_ms_per_query": round(1000 * batch_s / len(case.query_vecs), 4),
                "single_query_ms": round(1000 * single_s / single, 4),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    flat = rows[0]
    for row in rows:
        row["batch_speedup_vs_flat"] = round(flat["batch_ms_per_query"] / row["batch_ms_per_query"], 2)
        row["single_speedup_vs_flat"] = round(flat["single_query_ms"] / row["single_query_ms"], 2)
    return {
        "dataset": case.dataset,
        "items": len(case.item_vecs),
        "queries": len(case.query_vecs),
        "dim": int(case.item_vecs.shape[1]),
        "k": case.k,
        "results": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=20_000, help="synthetic items")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--centres", type=int, default=100)
    parser.add_argument("--noise", type=float, default=2.0)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--vecs", type=Path, help="real item embeddings (.npy, n x dim)")
    parser.add_argument(
        "--query-vecs", type=Path, help="real query embeddings (.npy); default: hold out rows"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--single", type=int, default=50, help="queries timed one at a time")
    parser.add_argument("--no-synthetic", action="store_true")
    parser.add_argument("--name", default="ann", help="result file: tools/bench/results/<name>.json")
    args = parser.parse_args()

    # 1. data sets
    cases = []
    if not args.no_synthetic:
        x, q = clustered(args.n, args.queries, dim=args.dim, centres=args.centres, noise=args.noise, seed=0)
        name = f"synthetic-clustered(n={args.n},dim={args.dim},centres={args.centres},noise={args.noise})"
        cases.append(AnnCase(name, x, q))
    if args.vecs:
        vecs = np.load(args.vecs).astype(np.float32)
        if args.query_vecs:
            items, queries = vecs, np.load(args.query_vecs).astype(np.float32)
        else:
            items, queries = vecs[: -args.queries], vecs[-args.queries :]
        cases.append(AnnCase(str(args.vecs), np.ascontiguousarray(items), np.ascontiguousarray(queries)))

    # 2. measure
    report = {
        "bench": "ann",
        "note": "recall@k is against exact Flat search on the same vectors; latency medians over --repeats",
        "cases": [
            run_case(c, repeats=args.repeats, single=min(args.single, len(c.query_vecs))) for c in cases
        ],
    }

    # 3. write (atomically, with machine facts)
    print(f"wrote {write(args.name, report)}")


if __name__ == "__main__":
    main()
