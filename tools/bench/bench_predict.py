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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--split", action="append", choices=["time", "event"], help="default: both")
    parser.add_argument("--project-root", default="/tmp/bench_predict", help="projects are made under it")
    parser.add_argument("--max-examples", type=int, help="a seeded sample of the test ratings")
    parser.add_argument("--reuse", action="store_true", help="keep a trained predictor, evaluate again")
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(message)s")
    logging.getLogger("twostage").setLevel(logging.INFO)
    out_path = RESULTS / "predict_movielens.json"
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    result.update(
        {"dataset": "ml-latest-small", "protocol": "rating prediction, RMSE/MAE on held-out ratings"}
    )
    for by in args.split or ["time", "event"]:
        result[by] = run(Path(args.project_root) / by, by, max_examples=args.max_examples, reuse=args.reuse)
        write("predict_movielens", result)
        rows = {r["name"]: r["RMSE"] for r in result[by]["rows"]}
        print(by, json.dumps(rows))


if __name__ == "__main__":
    main()
