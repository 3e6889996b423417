"""How every step's cost grows with the data (issue 18): S, M, L synthetic MovieLens-shaped logs.

Sizes: S = 10k items / 100k events, M = 100k / 1M, L = 1M / 10M, about 165 events per user (ml-latest-small's
ratio), item choice Zipf-skewed (a few items are in most histories, as in real logs), each user's events
at increasing timestamps. The models are a tiny random 2-layer BERT (hidden 32) for both stages, so encoding
is cheap and the numbers are about everything around the model: the store, splits, co-watch counts, index
builds, lookups, evaluation, publishing. A real model's encoding cost is linear in items and measured in
bench_encode.py.

Each step runs in a fresh Python process, so its peak RSS (``ru_maxrss``) is its own; the process start
(imports) is reported apart and excluded from the step's seconds. Steps, in order, on one project per size:

    ingest        movies.csv + ratings.csv through ``datasets load movielens`` (one transaction each)
    split         leave-last-out
    cowatch       the co-watch lists of the split (what stage 2 reads), counted and stored
    encode        every item through the tiny bi-encoder into the embedding cache (the model step)
    index_flat, index_ivf, index_hnsw   builds from the cached embeddings
    recommend     warm in-process ``Engine.recommend`` p50 over 200 users, recall only and the full
                  pipeline (tiny cross-encoder, co-watch weight 0.5, rerank depth 20)
    evaluate      1,000 test requests, both stages, no baselines
    publish       a serving snapshot

Usage: python tools/bench/bench_scale.py [--sizes S,M,L] [--workdir DIR]  → tools/bench/results/scale.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, ROOT, percentiles, write

SIZES = {"S": (10_000, 100_000), "M": (100_000, 1_000_000), "L": (1_000_000, 10_000_000)}
EVENTS_PER_USER = 165
GENRES = (
    "Action Adventure Animation Children Comedy Crime Documentary Drama Fantasy Film-Noir Horror IMAX "
    "Musical Mystery Romance Sci-Fi Thriller War Western"
).split()
STEPS = (
    "ingest",
    "split",
    "cowatch",
    "encode",
    "index_flat",
    "index_ivf",
    "index_hnsw",
    "recommend",
    "evaluate",
    "publish",
)
MODEL_STEPS = {"encode"}

CONFIG = """\
[retriever]
model = "{model}"
popularity_weight = 0.0

[index]
build = "flat"
depth = 100

[reranker]
model = "{model}"
item_template = "{{title}}. {{categories}}. Watched with: {{cowatched}}"
cowatch_weight = 0.5
fusion_weight = 0.5
serve_depth = 20

[eval]
ks = [10, 100]
bootstrap = 200
max_requests = 1000
"""


# ------------------------------------------------------------------------------------------ data and models
def generate(root: Path, n_items: int, n_events: int, seed: int = 0) -> Path:
    """A MovieLens folder: movies.csv (title with year, genres) and ratings.csv (user, movie, rating, ts)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    ids = np.arange(1, n_items + 1)
    genres = np.array(GENRES)
    n_genres = rng.integers(1, 4, n_items)
    picks = rng.integers(0, len(GENRES), (n_items, 3))
    movies = pa.table(
        {
            "movieId": ids,
            "title": [f"Movie {i} ({1950 + i % 70})" for i in ids],
            "genres": ["|".join(genres[picks[n, : n_genres[n]]]) for n in range(n_items)],
        }
    )
    pacsv.write_csv(movies, root / "movies.csv")
    n_users = max(1, n_events // EVENTS_PER_USER)
    # Zipf-like popularity over a random permutation of items (exponent 1: the head is in most histories)
    weights = 1.0 / np.arange(1, n_items + 1)
    weights /= weights.sum()
    order = rng.permutation(ids)
    items = order[rng.choice(n_items, n_events, p=weights)]
    users = np.sort(rng.integers(1, n_users + 1, n_events))
    start = rng.integers(1_400_000_000, 1_600_000_000, n_users + 1)[users]
    nth = np.arange(n_events) - np.searchsorted(users, users)  # each event's place in its user's log
    ts = start + nth * 60  # a minute apart within each user (users are sorted)
    ratings = pa.table(
        {
            "userId": users,
            "movieId": items,
            "rating": rng.integers(1, 11, n_events) / 2.0,
            "timestamp": ts,
        }
    )
    pacsv.write_csv(ratings, root / "ratings.csv")
    return root


def tiny_model(root: Path) -> Path:
    """A randomly initialised 2-layer BERT (hidden 32) saved as a sentence-transformers directory."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(0)
    words = sorted({w.lower() for g in GENRES for w in g.split("-")} | {"movie", "watched", "with"})
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789.,:;()-'")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *letters, *[f"##{c}" for c in letters]]
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab=str(root / "vocab.txt"), do_lower_case=True)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    transformer = models.Transformer(str(root / "bert"), max_seq_length=64)
    pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(root / "st"))
    return root / "st"


# ------------------------------------------------------------------------------------------ one step
def run_step(step: str, project: Path, data: Path) -> dict:
    """Run one step in this (fresh) process and return its seconds and extra figures."""
    from twostage import Engine

    started = time.perf_counter()
    extra: dict = {}
    if step == "ingest":
        with Engine.open(project) as engine:
            started = time.perf_counter()
            engine.datasets_load("movielens", data)
    elif step == "split":
        with Engine.open(project) as engine:
            started = time.perf_counter()
            extra["rows"] = engine.split()
    elif step == "cowatch":
        with Engine.open(project) as engine:
            split = engine.default_split()
            started = time.perf_counter()
            lists = engine.project.cowatch_lists(split)
            extra["items_with_lists"] = len(lists)
    elif step == "encode":
        with Engine.open(project) as engine:
            started = time.perf_counter()
            ids, _ = engine.project.item_vectors(engine.project.retriever())
            extra["items"] = len(ids)
    elif step.startswith("index_"):
        with Engine.open(project) as engine:
            started = time.perf_counter()
            extra["info"] = {
                k: v
                for k, v in engine.index_build(build=step.removeprefix("index_")).items()
                if k != "manifest"
            }
    elif step == "recommend":
        extra = _recommend(project)
        started = time.perf_counter() - extra.pop("seconds")
    elif step == "evaluate":
        with Engine.open(project) as engine:
            started = time.perf_counter()
            report = engine.evaluate(baselines=False, max_requests=1000)
            extra["rows"] = {r.name: r.n_requests for r in report.rows}
    elif step == "publish":
        with Engine.open(project) as engine:
            started = time.perf_counter()
            extra["snapshot"] = engine.publish().get("snapshot_id")
    else:
        raise SystemExit(f"unknown step {step}")
    return {"seconds": time.perf_counter() - started, **extra}


# recommend modes: (stage, config overrides). "cowatch" is stage 2 fusing the co-watch score with stage 1's
# and not running the cross-encoder (fusion weight 1), the setting MovieLens tuned best (README); "rerank"
# adds the tiny cross-encoder over the top 20, whose cost is the model's (texts quote the co-watch lists).
RECOMMEND_MODES = {
    "recall": ("recall", {}),
    "cowatch": ("rerank", {"reranker.fusion_weight": 1.0}),
    "rerank": ("rerank", {}),
}


def _recommend(project: Path, n_users: int = 200) -> dict:
    """Warm p50 of recommend for users of the log in each of :data:`RECOMMEND_MODES`; the first call per mode
    (loading models, index, lists) is reported apart as ``<mode>_first_seconds``."""
    from twostage import Engine

    out: dict = {}
    total = 0.0
    for mode, (stage, overrides) in RECOMMEND_MODES.items():
        with Engine.open(project, read_only=True, overrides=overrides) as engine:
            users = [
                r[0] for r in engine.sql(f"SELECT DISTINCT user_id FROM events ORDER BY 1 LIMIT {n_users}")[1]
            ]
            started = time.perf_counter()
            engine.recommend(users[0], k=10, stage=stage)
            out[f"{mode}_first_seconds"] = time.perf_counter() - started
            times = []
            for user in users:
                started = time.perf_counter()
                engine.recommend(user, k=10, stage=stage)
                times.append(time.perf_counter() - started)
            total += sum(times) + out[f"{mode}_first_seconds"]
            out[mode] = percentiles(times)
    out["seconds"] = total
    return out


def child(step: str, project: Path, data: Path) -> None:
    """Entry point of a step's process: prints one JSON line with the step's figures and peak RSS."""
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    import sentence_transformers  # noqa: F401  (library imports are the process start, not the step)

    import twostage.engine  # noqa: F401

    after_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run_step(step, project, data)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["rss_after_imports_mb"] = after_imports / 1024
    del base
    print("RESULT " + json.dumps(result, default=str), flush=True)


# ------------------------------------------------------------------------------------------ orchestration
def run_size(name: str, workdir: Path, model: Path, timeout: float) -> dict:
    n_items, n_events = SIZES[name]
    root = workdir / name
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    data = generate(root / "data", n_items, n_events)
    out: dict = {"items": n_items, "events": n_events, "users": n_events // EVENTS_PER_USER}
    out["generate_seconds"] = time.perf_counter() - started
    project = root / "project"
    from twostage import Engine

    Engine.init(project).close()
    (project / "twostage.toml").write_text(CONFIG.format(model=model))
    (project / "models").mkdir(exist_ok=True)
    shutil.copytree(model, project / "models" / "reranker")  # the tiny BERT as the trained reranker
    steps: dict = {}
    for step in STEPS:
        print(f"[{name}] {step} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", step, "--project", str(project), "--data", str(data)],
                capture_output=True,
                text=True,
                timeout=timeout,
                env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
            )
        except subprocess.TimeoutExpired:
            steps[step] = {"error": f"did not finish in {timeout:.0f} s"}
            print(f"[{name}] {step}: timed out", file=sys.stderr, flush=True)
            break
        wall = time.perf_counter() - started
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            steps[step] = {"error": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
            print(f"[{name}] {step}: failed\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
            break
        result = json.loads(lines[-1].removeprefix("RESULT "))
        result["process_seconds"] = wall
        result["model_step"] = step in MODEL_STEPS
        steps[step] = result
        print(
            f"[{name}] {step}: {result['seconds']:.2f} s, peak {result['peak_rss_mb']:.0f} MB",
            file=sys.stderr,
            flush=True,
        )
    out["steps"] = steps
    out["disk_mb"] = sum(f.stat().st_size for f in project.rglob("*") if f.is_file()) / 2**20
    return out


def growth(results: dict) -> dict:
    """Per step, seconds at the larger size / seconds at the smaller, for each 10× step in data."""
    names = [n for n in SIZES if n in results]
    out: dict = {}
    for small, large in itertools.pairwise(names):
        ratios = {}
        for step in STEPS:
            a = results[small]["steps"].get(step, {})
            b = results[large]["steps"].get(step, {})
            if "seconds" in a and "seconds" in b and a["seconds"] > 0:
                ratios[step] = b["seconds"] / a["seconds"]
            if step == "recommend":
                for mode in RECOMMEND_MODES:
                    if mode in a and mode in b:
                        ratios[f"recommend_{mode}_p50"] = b[mode]["p50"] / a[mode]["p50"]
        out[f"{small}->{large}"] = ratios
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="S,M,L")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per step before giving up")
    parser.add_argument("--keep", action="store_true", help="keep the generated projects")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other sizes of the existing results (re-run some sizes)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--project", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.project, args.data)
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="twostage-scale-"))
    model = tiny_model(workdir / "tiny-bert")
    results: dict = {}
    if args.merge and (RESULTS / "scale.json").exists():
        results = json.loads((RESULTS / "scale.json").read_text())["sizes"]
    try:
        for name in args.sizes.split(","):
            results[name] = run_size(name, workdir, model, args.timeout)
            results = {n: results[n] for n in SIZES if n in results}  # S, M, L order for the growth ratios
            path = write("scale", {"sizes": results, "growth": growth(results), "steps": list(STEPS)})
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(path)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
