"""Serving over HTTP (issue 15): a real ``twostage serve`` process on 127.0.0.1 against the library in this
process, on the demo project (``make demo`` builds and publishes it).

1. the library baseline: ``Engine.search``/``recommend`` called in this process, one request at a time,
   each followed by the same request over HTTP (interleaved, so both see the same machine)
2. load: search and recommend, both stages, at 1, 4 and 16 concurrent clients: p50/p99 latency, requests/s,
   errors; every distinct answer compared with the library's (same items, same scores)
3. hot swap under load: a new snapshot is published (by this process, on the project's store, while the server
   reads its snapshot) and reloaded mid-run; failed requests, and the responses served by each snapshot
4. ``--workers 2`` serving while ``twostage train reranker`` runs in a third process: latency and errors
   before and during training, and the worker processes seen

Every loop is bounded in requests and in time, and every server process is stopped at the end.
Usage: python tools/bench/bench_serve.py [--project demo-project] [--requests 48] → results/serve.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from common import RESULTS, ROOT, percentiles, write

from twostage import Engine
from twostage.snapshot import current_id

K = 10
TWOSTAGE = (sys.executable, "-m", "twostage.cli")
SAMPLE_TAGS = ROOT / "twostage" / "datasets" / "sample" / "tags.csv"


def log(message: str) -> None:
    print(f"[bench_serve] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(project: Path, *, workers: int = 1, timeout: float = 180.0):
    """A ``twostage serve`` process on 127.0.0.1 (its own process group), ready; stopped on exit."""
    port = free_port()
    proc = subprocess.Popen(
        [*TWOSTAGE, "-p", str(project), "serve", "--port", str(port), "--workers", str(workers), "--quiet"],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TWOSTAGE_API_KEY": ""},
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready within {timeout:.0f}s")
            time.sleep(0.3)
        if workers > 1:  # every worker loads its snapshot on start: wait until the pool is warm
            for _ in range(4 * workers):
                httpx.get(f"{url}/readyz", timeout=30)
        yield proc, url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def worker_pids(proc: subprocess.Popen) -> list[int]:
    """The uvicorn worker processes under the server: its children started by multiprocessing's spawn (not
    its resource tracker)."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    pids = [int(p) for p in children.read_text().split()] if children.exists() else []
    return [p for p in pids if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


# ---------------------------------------------------------------------- requests
def make_requests(engine: Engine, n: int, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Real requests: tags users wrote in the sample as queries, and users of the project."""
    rng = random.Random(seed)
    with SAMPLE_TAGS.open(encoding="utf-8") as f:
        tags = sorted({row["tag"].strip() for row in csv.DictReader(f) if len(row["tag"].strip()) > 3})
    users = sorted(engine.store.targets(engine.default_split(), "test"))
    return {
        "search": [{"query": q, "k": K} for q in rng.sample(tags, n)],
        "recommend": [{"user_id": u, "k": K} for u in rng.sample(users, n)],
    }


def library_answer(engine: Engine, endpoint: str, body: dict[str, Any], stage: str):
    if endpoint == "search":
        return engine.search(body["query"], K, stage=stage)
    return engine.recommend(body["user_id"], K, stage=stage)


def compare(served: dict[str, Any], ranking) -> tuple[bool, float]:
    """Same items in the same order, and the largest score difference."""
    same = [h["item_id"] for h in served["hits"]] == ranking.item_ids()
    diff = max(
        (abs(h["score"] - r.score) for h, r in zip(served["hits"], ranking.hits, strict=False)), default=0.0
    )
    return same, diff


# ---------------------------------------------------------------------- load
def load(
    url: str,
    calls: list[tuple[str, dict[str, Any]]],
    clients: int,
    *,
    max_seconds: float,
    on_progress: Any = None,
) -> dict[str, Any]:
    """``clients`` threads share ``calls`` (each sent once) until done or ``max_seconds``; every response and
    error is recorded with its start time."""
    queue = list(enumerate(calls))
    lock = threading.Lock()
    records: list[dict[str, Any]] = []
    deadline = time.monotonic() + max_seconds

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            while time.monotonic() < deadline:
                with lock:
                    if not queue:
                        return
                    n, (endpoint, body) = queue.pop(0)
                started = time.perf_counter()
                try:
                    response = http.post(f"/{endpoint}", json=body)
                    record = {
                        "n": n,
                        "status": response.status_code,
                        "body": response.json() if response.status_code == 200 else response.text[:300],
                    }
                except httpx.HTTPError as e:
                    record = {"n": n, "status": None, "body": repr(e)}
                record |= {"start": started, "seconds": time.perf_counter() - started}
                with lock:
                    records.append(record)
                if on_progress is not None:
                    on_progress(len(records))

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ok = [r for r in records if r["status"] == 200]
    return {
        "clients": clients,
        "sent": len(records),
        "unsent": len(calls) - len(records),
        "errors": len(records) - len(ok),
        "error_samples": [r["body"] for r in records if r["status"] != 200][:3],
        "seconds": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 3) if wall else None,
        "latency_s": percentiles([r["seconds"] for r in ok]) if ok else None,
        "records": records,
    }


def summary(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "records"}


def part_load(engine: Engine, url: str, requests: dict[str, list[dict[str, Any]]], args) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for endpoint, bodies in requests.items():
        for stage in ("recall", "rerank"):
            calls = [(endpoint, {**b, "stage": stage}) for b in bodies]
            # the baseline, interleaved with one HTTP call each so drift in the machine's load hits both alike
            library, times, served_times = {}, [], []
            with httpx.Client(base_url=url, timeout=120) as http:
                for n, (_, body) in enumerate(calls):
                    t0 = time.perf_counter()
                    library[n] = library_answer(engine, endpoint, body, stage)
                    t1 = time.perf_counter()
                    http.post(f"/{endpoint}", json=body).raise_for_status()
                    times.append(t1 - t0)
                    served_times.append(time.perf_counter() - t1)
            row: dict[str, Any] = {
                "library_latency_s": percentiles(times),
                "served_interleaved_latency_s": percentiles(served_times),
            }
            mismatched, max_diff = 0, 0.0
            for clients in (1, 4, 16):
                result = load(url, calls, clients, max_seconds=args.max_seconds)
                for r in result["records"]:
                    if r["status"] == 200:
                        same, diff = compare(r["body"], library[r["n"]])
                        mismatched += not same
                        max_diff = max(max_diff, diff)
                row[f"clients_{clients}"] = summary(result)
                lat = result["latency_s"] or {}
                log(
                    f"{endpoint}/{stage} x{clients}: p50 {lat.get('p50', float('nan')):.3f}s "
                    f"p99 {lat.get('p99', float('nan')):.3f}s {result['requests_per_s']} req/s, "
                    f"{result['errors']} errors, {result['unsent']} unsent"
                )
            served = row["served_interleaved_latency_s"]["p50"]
            row["served_over_library_p50"] = round(served / row["library_latency_s"]["p50"], 3)
            row["answers_differing_from_library"] = mismatched
            row["max_score_difference"] = max_diff
            out[f"{endpoint}_{stage}"] = row
    return out


def part_swap(engine: Engine, url: str, requests: dict[str, list[dict[str, Any]]], args) -> dict[str, Any]:
    """Publish and reload while 4 clients send a mix of requests; count the responses per snapshot."""
    old = current_id(engine.project_dir)
    calls = [("search", {**b, "stage": "rerank"}) for b in requests["search"]] + [
        ("recommend", {**b, "stage": "recall"}) for b in requests["recommend"]
    ]
    calls = (calls * 4)[: max(len(calls), 4 * args.requests)]
    random.Random(1).shuffle(calls)
    swap: dict[str, Any] = {}
    fired = threading.Event()

    def publish_and_reload(done: int) -> None:
        if done >= len(calls) // 3 and not fired.is_set():
            fired.set()
            threading.Thread(target=do_swap).start()

    def do_swap() -> None:
        t0 = time.perf_counter()
        swap["published"] = engine.publish()["snapshot_id"]
        swap["publish_seconds"] = round(time.perf_counter() - t0, 2)
        t1 = time.perf_counter()
        swap["reload"] = httpx.post(f"{url}/admin/reload", timeout=300).json()
        swap["reload_seconds"] = round(time.perf_counter() - t1, 2)
        swap["reloaded_at"] = time.perf_counter()

    result = load(url, calls, 4, max_seconds=args.max_seconds * 2, on_progress=publish_and_reload)
    deadline = time.monotonic() + 300
    while "reloaded_at" not in swap and time.monotonic() < deadline:
        time.sleep(0.2)
    ok = [r for r in result["records"] if r["status"] == 200]
    by_snapshot = Counter(r["body"]["snapshot"] for r in ok)
    after = [r for r in ok if r["start"] > swap.get("reloaded_at", float("inf"))]
    return {
        **summary(result),
        "old_snapshot": old,
        "new_snapshot": swap.get("published"),
        "publish_seconds": swap.get("publish_seconds"),
        "reload_seconds": swap.get("reload_seconds"),
        "reload": swap.get("reload"),
        "responses_per_snapshot": dict(by_snapshot),
        "responses_from_other_snapshots": sum(
            n for s, n in by_snapshot.items() if s not in (old, swap.get("published"))
        ),
        "started_after_reload_from_old": sum(r["body"]["snapshot"] == old for r in after),
    }


def part_workers(project: Path, requests: dict[str, list[dict[str, Any]]], args) -> dict[str, Any]:
    """Two worker processes serving while ``twostage train reranker`` retrains in a third process."""
    calls = [("recommend", {**b, "stage": "recall"}) for b in requests["recommend"]] + [
        ("search", {**b, "stage": "recall"}) for b in requests["search"]
    ]
    out: dict[str, Any] = {}
    with server(project, workers=2) as (proc, url):
        out["worker_processes"] = len(worker_pids(proc))
        out["before_training"] = summary(load(url, calls, 4, max_seconds=args.max_seconds))
        trainer = subprocess.Popen(
            [*TWOSTAGE, "-p", str(project), "train", "reranker", "--no-publish", "--quiet", "--json"],
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        rounds, t0 = [], time.perf_counter()
        try:
            while trainer.poll() is None and time.perf_counter() - t0 < args.train_seconds:
                rounds.append(load(url, calls, 4, max_seconds=args.max_seconds))
                out["worker_processes_during_training"] = len(worker_pids(proc))
        finally:
            if trainer.poll() is None:
                os.killpg(trainer.pid, signal.SIGTERM)
                out["training_stopped_by_bench_after_s"] = round(time.perf_counter() - t0, 1)
            trainer.wait(timeout=120)
        out["training_exit_code"] = trainer.returncode
        out["training_stderr_tail"] = (trainer.stderr.read() or b"").decode(errors="replace")[-500:]
        out["training_seconds"] = round(time.perf_counter() - t0, 1)
        records = [r for res in rounds for r in res["records"]]
        ok = [r for r in records if r["status"] == 200]
        out["during_training"] = {
            "rounds": len(rounds),
            "sent": len(records),
            "errors": len(records) - len(ok),
            "latency_s": percentiles([r["seconds"] for r in ok]) if ok else None,
        }
        before, during = out["before_training"]["latency_s"], out["during_training"]["latency_s"]
        if before and during:
            out["p50_during_over_before"] = round(during["p50"] / before["p50"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=ROOT / "demo-project")
    parser.add_argument("--requests", type=int, default=48, help="distinct requests per endpoint")
    parser.add_argument("--max-seconds", type=float, default=240.0, help="time cap of one load run")
    parser.add_argument("--train-seconds", type=float, default=900.0, help="time cap of the training run")
    parser.add_argument("--only", choices=["load", "swap", "workers"], action="append")
    args = parser.parse_args()
    parts = args.only or ["load", "swap", "workers"]
    project = args.project.resolve()
    engine = Engine.open(project, progress=False)
    if current_id(project) is None:
        engine.publish()
    requests = make_requests(engine, args.requests)
    results: dict[str, Any] = {"project": str(project), "requests_per_endpoint": args.requests, "k": K}
    with server(project) as (_proc, url):
        if "load" in parts:
            results["load"] = part_load(engine, url, requests, args)
        if "swap" in parts:
            results["swap"] = part_swap(engine, url, requests, args)
            log(f"swap: {results['swap']['responses_per_snapshot']}, {results['swap']['errors']} errors")
    engine.close()  # the trainer process needs the project's store
    if "workers" in parts:
        results["workers"] = part_workers(project, requests, args)
        log(f"workers: {summary(results['workers'])}")
    if args.only and (RESULTS / "serve.json").exists():  # keep the parts not run this time
        previous = json.loads((RESULTS / "serve.json").read_text())
        results = {**{k: previous[k] for k in ("load", "swap", "workers") if k in previous}, **results}
    path = write("serve", results)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
