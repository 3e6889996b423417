"""Shared helpers for benchmarks: machine facts, timing statistics, JSON output under tools/bench/results/."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "tools" / "bench" / "results"
SHARED_DATA = ROOT.parent / "shared" / "data"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.is_available()
    except ImportError:
        pass
    try:
        import faiss

        info["faiss"] = faiss.__version__
        info["faiss_gpus"] = faiss.get_num_gpus()
    except ImportError:
        pass
    return info


def percentiles(times: list[float]) -> dict[str, float]:
    s = sorted(times)
    return {
        "median": statistics.median(s),
        "p50": s[int(0.50 * (len(s) - 1))],
        "p99": s[min(len(s) - 1, round(0.99 * (len(s) - 1)))],
        "n": len(s),
    }


def repeat(fn: Callable[[], Any], n: int) -> list[float]:
    """Wall times of n calls."""
    out = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def write(name: str, data: dict[str, Any]) -> Path:
    """Write a result file atomically and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(
        json.dumps(
            {"machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M:%S"), **data}, indent=2, default=str
        )
    )
    os.replace(tmp, path)
    return path
