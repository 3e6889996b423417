"""Rating prediction on ml-latest-small (issue 20): the behaviour predictor against the global mean, user +
item biases and biased MF, on a 70/15/15 split by time and on a random 70/15/15 split of the ratings.

Every model reads the same training events; the predictor runs with the CLI's default ``[predictor]``
settings (only the split is configured here), and MF's settings are chosen on the validation ratings. The test
part is read once, at the end.

Usage: python tools/bench/bench_predict.py [--split time|event ...] [--project-root DIR] [--max-examples N]
       → tools/bench/results/predict_movielens.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from common import RESULTS, SHARED_DATA, write

from twostage import Engine

TOML = """
[split]
strategy = "ratio"
by = "{by}"
ratios = [0.7, 0.15, 0.15]
"""


def run(root: Path, by: str, *, max_examples: int | None, reuse: bool) -> dict[str, Any]:
    """Build (or reuse) a project on the split, train the predictor with defaults, evaluate on test."""
    started = time.perf_counter()
    if not (reuse and (root / "models" / "predictor").exists()):
        if root.exists():
            import shutil

            shutil.rmtree(root)
        Engine.init(root)
        (root / "twostage.toml").write_text(TOML.format(by=by))
        with Engine.open(root, progress=False) as engine:
            engine.datasets_load("movielens", SHARED_DATA / "ml-latest-small")
            parts = engine.split()
            trained = engine.train_predictor()
    else:
        with Engine.open(root, progress=False) as engine:
            parts = {}
            trained = json.loads((root / "models" / "predictor" / "predictor.json").read_text())
    with Engine.open(root, progress=False) as engine:
        scored = engine.evaluate_predictions(part="test", max_examples=max_examples)
    training = {
        k: trained[k]
        for k in (
            "examples",
            "steps",
            "planned_steps",
            "best_step",
            "stopped",
            "valid_at_start",
            "valid_best",
            "seconds",
        )
        if k in trained
    }
    return {
        "split": f"ratio by {by} (0.7/0.15/0.15)",
        "parts": parts,
        "training": training,
        "rows": scored["rows"],
        "comparisons": scored["comparisons"],
        "baseline_settings": scored.get("baseline_settings"),
        "cold_users": scored.get("cold_users"),
        "seconds": round(time.perf_counter() - started, 1),
    }


VARIANTS = {
    "rating only": {"rating": 1.0},
    "ranking only": {"listnet": 1.0},
    "multi-task": {"rating": 1.0, "listnet": 0.3},
}


def multitask(
    base: Path, root: Path, *, budget: float, max_examples: int | None, reuse: bool = False
) -> dict[str, Any]:
    """The shared encoder trained on rating and ranking together against each task alone: each variant copies
    the base project's store, trains with the same time budget, and is scored on the same test ratings and
    lists."""
    import shutil

    out: dict[str, Any] = {"budget_minutes": budget, "variants": {}}
    for name, tasks in VARIANTS.items():
        target = root / name.replace(" ", "-")
        record = target / "models" / "predictor" / "predictor.json"
        if not (reuse and record.exists()):
            shutil.rmtree(target, ignore_errors=True)
            Engine.init(target)
            shutil.copy(base / "twostage.duckdb", target / "twostage.duckdb")
            spec = ", ".join(f"{k} = {v}" for k, v in tasks.items())
            config = (base / "twostage.toml").read_text()
            config += f"\n[predictor]\ntasks = {{ {spec} }}\ntime_budget_minutes = {budget}\n"
            (target / "twostage.toml").write_text(config)
            with Engine.open(target, progress=False) as engine:
                engine.train_predictor()
        trained = json.loads(record.read_text())
        with Engine.open(target, progress=False) as engine:
            scored = engine.evaluate_predictions(part="test", max_examples=max_examples)
        out["variants"][name] = {
            "tasks": tasks,
            "training": {
                k: trained[k] for k in ("examples", "steps", "best_step", "stopped", "valid_best", "seconds")
            },
            "rows": scored["rows"],
            "comparisons": scored["comparisons"],
        }
        print(
            name,
            json.dumps(
                [
                    {k: v for k, v in r.items() if k != "seconds"}
                    for r in scored["rows"]
                    if r["name"] == "predictor"
                ]
            ),
        )
    return out


def main() -> None:
    import importlib

    # import what training and evaluation use now, so a long run never mixes module versions edited meanwhile
    for name in ("twostage.prediction_eval", "twostage.train.predictor", "twostage.predictor"):
        importlib.import_module(name)
    parser = argparse.ArgumentParser()
    parser.add_argument("--split", action="append", choices=["time", "event"], help="default: both")
    parser.add_argument("--project-root", default="/tmp/bench_predict", help="projects are made under it")
    parser.add_argument("--max-examples", type=int, help="a seeded sample of the test ratings")
    parser.add_argument("--reuse", action="store_true", help="keep a trained predictor, evaluate again")
    parser.add_argument(
        "--multitask", action="store_true", help="rating, ranking and both together on the time split's store"
    )
    parser.add_argument("--budget", type=float, default=12.0, help="--multitask: minutes per variant")
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(message)s")
    logging.getLogger("twostage").setLevel(logging.INFO)
    out_path = RESULTS / "predict_movielens.json"
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    result.update(
        {"dataset": "ml-latest-small", "protocol": "rating prediction, RMSE/MAE on held-out ratings"}
    )
    if args.multitask:
        base = Path(args.project_root) / "time"
        result["multitask"] = multitask(
            base,
            Path(args.project_root) / "multitask",
            budget=args.budget,
            max_examples=args.max_examples,
            reuse=args.reuse,
        )
        write("predict_movielens", result)
        return
    for by in args.split or ["time", "event"]:
        result[by] = run(Path(args.project_root) / by, by, max_examples=args.max_examples, reuse=args.reuse)
        write("predict_movielens", result)
        rows = {r["name"]: r["RMSE"] for r in result[by]["rows"]}
        print(by, json.dumps(rows))


if __name__ == "__main__":
    main()
