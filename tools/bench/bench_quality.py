"""Quality on real data, every stage against its baselines in the same process (issues 3, 4 and 5).

  scifact:    BM25 (k1=0.9, b=0.4), zero-shot all-MiniLM-L6-v2, fine-tuned retriever, + untrained reranker,
              + listwise-trained reranker; BEIR SciFact test qrels (300 queries).
  movielens:  popularity, zero-shot, fine-tuned retriever, full pipeline; ml-latest-small leave-last-out,
              full ranking over all unseen items (610 users).

Usage: python tools/bench/bench_quality.py scifact|movielens [--quick]  → tools/bench/results/quality_<name>.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from common import RESULTS, SHARED_DATA, write

from twostage import Engine

SCIFACT_TOML = """
[text]
item_template = "{{title}}. {{body}}"
[split]
strategy = "given"
[retriever]
max_seq_length = 256
epochs = {retriever_epochs}
train_batch_size = 32
learning_rate = 3e-5
eval_requests = 100
[index]
depth = 100
[reranker]
max_length = 192
depth = {rerank_depth}
list_size = 8
max_train_requests = {rerank_requests}
eval_requests = 40
train_batch_size = 2
learning_rate = 3e-5
epochs = 1
[eval]
ks = [1, 5, 10, 100]
bootstrap = 2000
"""

MOVIELENS_TOML = """
[text]
item_template = "{{title}}. {{categories}}. Tags: {{tags}}"
user_template = "Recently watched: {{history}}"
history_size = 5
[split]
strategy = "leave-last-out"
[retriever]
max_seq_length = 64
epochs = 1
train_batch_size = 32
max_train_pairs = {pairs}
learning_rate = 5e-5
eval_requests = 200
[index]
depth = 100
[reranker]
item_template = "{{title}}. {{categories}}. Watched with: {{cowatched}}"
max_length = 160
depth = {rerank_depth}
list_size = 8
max_train_requests = {rerank_requests}
label_window = 3
negatives = "sampled"
eval_requests = 610
train_batch_size = 4
learning_rate = 5e-5
[eval]
ks = [1, 5, 10, 20, 100]
bootstrap = 2000
"""


def rows(report: Any) -> dict[str, dict[str, float]]:
    return {r.name: {**r.means, **r.beyond, "seconds": r.seconds} for r in report.rows}


def timed(log: dict[str, float], name: str, fn: Any) -> Any:
    started = time.perf_counter()
    value = fn()
    log[name] = round(time.perf_counter() - started, 1)
    print(f"  {name}: {log[name]}s", flush=True)
    return value


def fresh(root: Path) -> Path:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    return root


def scifact(quick: bool, root: Path) -> dict[str, Any]:
    times: dict[str, float] = {}
    Engine.init(root)
    (root / "twostage.toml").write_text(
        SCIFACT_TOML.format(
            retriever_epochs=1 if quick else 2, rerank_depth=20, rerank_requests=120 if quick else 800
        )
    )
    engine = Engine.open(root)
    timed(times, "ingest", lambda: engine.datasets_load("beir", SHARED_DATA / "scifact"))
    engine.split()
    # 1. zero-shot bi-encoder (+ BM25 baseline)
    timed(times, "index_zero_shot", engine.index_build)
    zero = timed(times, "eval_zero_shot", lambda: engine.evaluate())
    # 2. fine-tuned bi-encoder
    trained = timed(times, "train_retriever", engine.train_retriever)
    timed(times, "index_fine_tuned", engine.index_build)
    # 3. untrained reranker (fresh 1-logit head on MiniLM) on the fine-tuned stage 1
    untrained = engine.pipeline().replace(reranker=engine.project.reranker(base=True))
    base_rr = timed(
        times, "eval_untrained_reranker", lambda: engine.evaluate(baselines=False, pipeline=untrained)
    )
    # 4. listwise-trained reranker
    timed(times, "train_reranker", engine.train_reranker)
    full = timed(times, "eval_full", lambda: engine.evaluate())
    return {
        "dataset": "BEIR SciFact test (300 queries)",
        "zero_shot_eval": rows(zero),
        "fine_tuned_eval": rows(full),
        "untrained_reranker_eval": rows(base_rr),
        "retriever_training": {
            "best": trained.best_metric,
            "metrics": dict(trained.metrics),
            "steps": trained.steps,
        },
        "reranker_training": reranker_record(engine),
        "comparisons": full.comparisons,
        "stage_seconds": times,
        "config": engine.config.to_dict(),
    }


PROTOCOLS = {
    "today": "ml-latest-small leave-last-out (610 users, full ranking over all 9,742 items minus each user's seen)",
    "published": "ml-latest-small 5-core (users and items), leave-one-out by time, full ranking over the "
    "remaining items minus each user's seen (LlamaRec's Table 2 protocol, arXiv 2311.02089)",
}


def five_core(source: Path, target: Path, core: int = 5) -> dict[str, int]:
    """The published protocol's data: users and items with at least ``core`` ratings, filtered again until
    both hold (every rating an interaction), written as a MovieLens folder."""
    import pandas as pd

    ratings = pd.read_csv(source / "ratings.csv")
    while True:
        items = ratings["movieId"].value_counts()
        users = ratings["userId"].value_counts()
        keep = ratings["movieId"].map(items).ge(core) & ratings["userId"].map(users).ge(core)
        if keep.all():
            break
        ratings = ratings[keep]
    target.mkdir(parents=True, exist_ok=True)
    ratings.to_csv(target / "ratings.csv", index=False)
    movies = pd.read_csv(source / "movies.csv")
    movies[movies["movieId"].isin(ratings["movieId"])].to_csv(target / "movies.csv", index=False)
    tags = pd.read_csv(source / "tags.csv")
    tags[tags["movieId"].isin(ratings["movieId"])].to_csv(target / "tags.csv", index=False)
    return {
        "users": int(ratings["userId"].nunique()),
        "items": int(ratings["movieId"].nunique()),
        "ratings": len(ratings),
    }


def movielens(quick: bool, root: Path, protocol: str, with_reranker: bool) -> dict[str, Any]:
    times: dict[str, float] = {}
    Engine.init(root)
    (root / "twostage.toml").write_text(
        MOVIELENS_TOML.format(
            pairs=3000 if quick else 6000,
            rerank_depth=20 if quick else 50,
            rerank_requests=1500 if quick else 2000,
        )
    )
    data, filtered = SHARED_DATA / "ml-latest-small", None
    if protocol == "published":
        filtered = five_core(data, root / "data-5core")
        data = root / "data-5core"
        print(f"  5-core: {filtered}", flush=True)
    engine = Engine.open(root)
    timed(times, "ingest", lambda: engine.datasets_load("movielens", data))
    engine.split()
    trained = timed(times, "train_retriever", engine.train_retriever)
    timed(times, "index", engine.index_build)
    prior = timed(times, "tune_prior", lambda: tune_prior(engine))
    print(f"  popularity prior on valid: {prior}")
    (root / "prior.json").write_text(json.dumps(prior))
    result: dict[str, Any] = {
        "protocol": protocol,
        "dataset": PROTOCOLS[protocol],
        "five_core": filtered,
        "popularity_prior": prior,
        "retriever_training": {
            "best": trained.best_metric,
            "metrics": dict(trained.metrics),
            "steps": trained.steps,
        },
    }
    engine = Engine.open(root, overrides={"retriever.popularity_weight": prior["best"]})
    if with_reranker:
        timed(times, "train_reranker", engine.train_reranker)
        result["reranker_training"] = reranker_record(engine)
    return {**result, **learned_stage2(root, times)}


def learned_stage2(root: Path, times: dict[str, float], ablate: bool = True) -> dict[str, Any]:
    """Train the learned ranker (and its EASE channel) on the bench project at ``root``, evaluate every
    ranking with the paired tests, and ablate each feature group and each recall channel (each variant
    retrained on the same split, chosen on validation as the default is)."""
    prior = json.loads((root / "prior.json").read_text())
    overrides = {"retriever.popularity_weight": prior["best"]}
    engine = Engine.open(root, overrides=overrides)
    record = timed(times, "train_ranker", engine.train_ranker)
    engine = Engine.open(root, overrides=overrides)
    report = timed(times, "evaluate", lambda: engine.evaluate(mmr_lambdas=(0.9, 0.7)))
    if not ablate:
        return {
            "eval": rows(report),
            "cold_start": report.extra.get("cold_start"),
            "mmr_sweep": report.extra.get("mmr_sweep"),
            "ranker": record,
            "comparisons": report.comparisons,
            "stage_seconds": times,
            "config": engine.config.to_dict(),
        }
    ablation = timed(times, "ablation", lambda: ranker_ablation(root, overrides, record))
    engine = Engine.open(root, overrides=overrides)
    engine.train_ranker()  # the default ranker back in place (bench_latency.py serves this project)
    return {
        "eval": rows(report),
        "cold_start": report.extra.get("cold_start"),
        "mmr_sweep": report.extra.get("mmr_sweep"),
        "ranker": record,
        "ablation": ablation,
        "comparisons": report.comparisons,
        "stage_seconds": times,
        "config": engine.config.to_dict(),
    }


FEATURE_GROUPS = {
    "stage-1 score and rank": ("stage1", "stage1_rank"),
    "bi-encoder cosine": ("dense",),
    "EASE scores": ("items", "items_recent"),
    "co-watch": ("cowatch", "cowatch_recency"),
    "popularity": ("popularity",),
    "history length": ("history_length",),
    "category overlap": ("category_overlap",),
}


def ranker_ablation(root: Path, overrides: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """nDCG@10 and R@10 on the test users of the full pipeline with each feature group removed, and with
    each recall channel removed (the EASE channel: items weight 0; the text channel: items weight 1, so the
    candidates are EASE's), each retrained on the same split."""
    from twostage.config import FEATURES

    everything = [f for f in FEATURES if f != "rerank"]
    variants: dict[str, dict[str, Any]] = {
        f"without {name}": {"ranker.features": [f for f in everything if f not in group]}
        for name, group in FEATURE_GROUPS.items()
    }
    variants["without the EASE channel (stage 1: bi-encoder only)"] = {"ranker.items_weight": 0.0}
    variants["without the text channel (stage 1: EASE only)"] = {"ranker.items_weight": 1.0}
    out = {}
    for name, change in variants.items():
        engine = Engine.open(root, overrides={**overrides, **change})
        trained = engine.train_ranker()
        engine = Engine.open(root, overrides={**overrides, **change})
        report = engine.evaluate(baselines=False)
        values = rows(report)["rerank"]
        out[name] = {
            "overrides": change,
            "features": trained["features"],
            "valid_ndcg@10": trained["valid_ndcg@10"],
            "nDCG@10": values["nDCG@10"],
            "R@10": values["R@10"],
            "comparison": [c for c in report.comparisons if c["metric"] == "nDCG@10" and c["a"] == "recall"],
        }
        print(f"  {name}: nDCG@10 {values['nDCG@10']:.4f} R@10 {values['R@10']:.4f}", flush=True)
    return out


def tune_prior(engine: Engine) -> dict[str, Any]:
    """The stage-1 popularity prior chosen on the validation users (highest Recall@100)."""
    from twostage.requests import split_requests
    from twostage.tuning import choose_popularity_weight

    split = engine.default_split()
    pipe = engine.project.pipeline(split, all_counts=True)  # popularity counted before the cut-offs
    requests = split_requests(engine.store, pipe.catalogue, engine.config.text, split=split, part="valid")
    targets = engine.store.targets(split, "valid")
    return choose_popularity_weight(
        pipe, requests, [targets[r.request_id] for r in requests], engine.config.retriever
    )


def reranker_record(engine: Engine) -> dict[str, Any]:
    """What training and validation tuning saved with the project's reranker."""
    import json

    record = json.loads((engine.project.models_dir("reranker") / "training.json").read_text())
    keep = ("metrics", "steps", "train_lists", "seconds", "fusion_weight", "cowatch_weight", "rerank_depth")
    return {"best": record["best_metric"], **{k: record.get(k) for k in keep}, "tuning": record}


def stage2_ablation(engine: Engine) -> dict[str, Any]:
    """The full pipeline without each of its stage-2 signals, on the same test users (recommendation).

    Each variant keeps the best weight validation found for the remaining signal (from the tuning grid, at
    the full training depth): the cross-encoder without co-watch scores, and co-watch scores fused with stage 1
    without the cross-encoder (which then is not run). Both are evaluated at the served rerank depth.
    """
    grid = {(w, c): v for w, c, v in reranker_record(engine)["tuning"]["weight_grid"]}
    variants = {}
    if any(c == 0.0 for _, c in grid):
        best_w = max((w for w, c in grid if c == 0.0), key=lambda w: (grid[(w, 0.0)], -w))
        variants["cross-encoder, no co-watch"] = (best_w, 0.0)
    if any(w == 1.0 and c > 0.0 for w, c in grid):
        best_c = max((c for w, c in grid if w == 1.0 and c > 0.0), key=lambda c: (grid[(1.0, c)], -c))
        variants["co-watch, no cross-encoder"] = (1.0, best_c)
    out = {}
    for name, (w, c) in variants.items():
        pipe = engine.pipeline().with_settings(fusion_weight=w, cowatch_weight=c)
        report = engine.evaluate(baselines=False, pipeline=pipe)
        out[name] = {
            "fusion_weight": w,
            "cowatch_weight": c,
            "valid_ndcg@10_full_depth": grid[(w, c)],
            "rerank_depth": pipe.settings.rerank_depth,
            "eval": rows(report)["rerank"],
            "comparisons": [x for x in report.comparisons if x["metric"] in ("nDCG@10", "R@10")],
        }
        print(f"  {name}: nDCG@10 {out[name]['eval']['nDCG@10']:.4f}", flush=True)
    return out


def rerank_only(dataset: str, root: Path, retune: bool) -> dict[str, Any]:
    """Retrain (or, with ``retune``, only re-tune) and re-evaluate stage 2 on an existing bench project;
    stage-1 results are kept from its JSON."""
    import json

    from common import RESULTS

    previous = json.loads((RESULTS / f"quality_{dataset}.json").read_text())
    previous = {k: v for k, v in previous.items() if k not in ("machine", "when", "quick")}
    times = previous.get("stage_seconds", {})
    prior = previous.get("popularity_prior")
    overrides = {"retriever.popularity_weight": prior["best"]} if prior else None
    engine = Engine.open(root, overrides=overrides)
    if retune:
        timed(times, "tune_reranker", lambda: engine.train_reranker(tune_only=True))
    else:
        timed(times, "train_reranker", engine.train_reranker)
    engine = Engine.open(root, overrides=overrides)
    report = timed(
        times,
        "evaluate",
        lambda: engine.evaluate(mmr_lambdas=(0.9, 0.7, 0.5) if dataset == "movielens" else ()),
    )
    key = "fine_tuned_eval" if dataset == "scifact" else "eval"
    previous[key] = rows(report)
    previous["reranker_training"] = reranker_record(engine)
    previous["comparisons"] = report.comparisons
    if dataset == "movielens":
        previous["mmr_sweep"] = report.extra.get("mmr_sweep")
        previous["stage2_ablation"] = timed(times, "ablation", lambda: stage2_ablation(engine))
    previous["stage_seconds"] = times
    previous["config"] = engine.config.to_dict()
    return previous


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset", choices=["scifact", "movielens"])
    parser.add_argument("--quick", action="store_true", help="smaller training and rerank depth")
    parser.add_argument("--project", help="project dir to (re)create; kept for bench_latency.py")
    parser.add_argument("--rerank-only", action="store_true", help="reuse the project's retriever and index")
    parser.add_argument(
        "--retune", action="store_true", help="with --rerank-only: keep the reranker, tune its serving again"
    )
    parser.add_argument(
        "--protocol", choices=sorted(PROTOCOLS), default="today", help="movielens: which evaluation protocol"
    )
    parser.add_argument(
        "--with-reranker",
        action="store_true",
        help="movielens: also train the cross-encoder (not a feature by default)",
    )
    parser.add_argument(
        "--ranker-only", action="store_true", help="movielens: reuse the bench project's retriever and index"
    )
    parser.add_argument(
        "--no-ablation", action="store_true", help="with --ranker-only: keep the earlier run's ablation"
    )
    args = parser.parse_args()
    name = args.dataset if args.dataset == "scifact" else f"movielens-{args.protocol}"
    root = Path(args.project or Path(tempfile.gettempdir()) / "twostage-bench" / name)
    output = f"quality_{args.dataset}" if args.dataset == "scifact" else f"quality_movielens_{args.protocol}"
    if args.rerank_only:
        result = rerank_only(args.dataset, root, args.retune)
        output = f"quality_{args.dataset}"
    elif args.ranker_only:
        previous = (
            json.loads((RESULTS / f"{output}.json").read_text())
            if (RESULTS / f"{output}.json").exists()
            else {}
        )
        keep = {k: v for k, v in previous.items() if k not in ("machine", "when", "quick")}
        result = {
            **keep,
            "protocol": args.protocol,
            "dataset": PROTOCOLS[args.protocol],
            **learned_stage2(root, {}, ablate=not args.no_ablation),
        }
        if args.no_ablation and keep.get("ablation"):  # say what the kept ablation was run with
            result["ablation_ranker_config"] = keep.get("ablation_ranker_config") or keep["config"]["ranker"]
            result["ablation_full"] = keep.get("ablation_full") or keep["eval"]["rerank"]
    elif args.dataset == "scifact":
        fresh(root)
        result = scifact(args.quick, root)
    else:
        fresh(root)
        result = movielens(args.quick, root, args.protocol, args.with_reranker)
    print(write(output, {"quick": args.quick, **result}))
    for name, values in (result.get("fine_tuned_eval") or result.get("eval")).items():
        print(f"{name:12} nDCG@10 {values.get('nDCG@10', 0):.4f}  R@100 {values.get('R@100', 0):.4f}")


if __name__ == "__main__":
    main()
