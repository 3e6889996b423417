"""`make bench`: every benchmark in order, each writing JSON to tools/bench/results/, then the README tables.

Quality runs train models (tens of minutes on a 2-core CPU); pass --fast to run only the cheap ones.
Usage: python tools/bench/run_all.py [--fast]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

FAST = [["bench_ingest_eval.py"], ["bench_ann.py"], ["bench_encode.py"]]
SLOW = [["bench_quality.py", "movielens"], ["bench_quality.py", "scifact"], ["bench_latency.py"]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--fast", action="store_true", help="skip the training-heavy quality and latency runs"
    )
    args = parser.parse_args()
    failed = []
    for step in FAST + ([] if args.fast else SLOW):
        print(f"== {' '.join(step)}", flush=True)
        if subprocess.run([sys.executable, str(HERE / step[0]), *step[1:]], cwd=HERE).returncode:
            failed.append(" ".join(step))
    subprocess.run([sys.executable, str(HERE / "readme_tables.py")], cwd=HERE, check=False)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
