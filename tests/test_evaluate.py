"""The evaluation join (results ⋈ splits in DuckDB), metrics written back, paired comparisons, HTML report."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from twostage.config import Config
from twostage.evaluate import EvalReport, compare, evaluate_ranking, judged_gains, write_html
from twostage.store import Store


@pytest.fixture
def store() -> Store:
    s = Store(":memory:")
    rows = [("q1", "a", 2.0), ("q1", "b", 1.0), ("q2", "c", 1.0), ("q3", "d", 1.0)]
    s.con.executemany("INSERT INTO splits VALUES ('s', 'test', 'query', ?, ?, ?, NULL, NULL)", rows)
    # a judgment of another part must not count
    s.con.execute("INSERT INTO splits VALUES ('s', 'train', 'query', 'q1', 'z', 1.0, NULL, NULL)")
    return s


def test_join_builds_gains_and_keeps_requests_without_results(store):
    run = store.new_run("t", Config().to_dict())
    store.write_results(
        run, "recall", {"q1": [("b", 0.9), ("x", 0.5), ("a", 0.1), ("z", 0.0)], "q2": [("y", 1.0)]}
    )
    ids, gains, relevant = judged_gains(store, run_id=run, stage="recall", split="s", part="test", depth=3)
    assert ids == ["q1", "q2", "q3"]  # q3 has no results: kept, scores 0
    assert gains.tolist() == [[1.0, 0.0, 2.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert [r.tolist() for r in relevant] == [[2.0, 1.0], [1.0], [1.0]]


def test_evaluate_ranking_writes_per_request_and_means(store):
    run = store.new_run("t", Config().to_dict())
    store.write_results(run, "recall", {"q1": [("a", 1.0)], "q2": [("c", 1.0)], "q3": [("x", 1.0)]})
    row = evaluate_ranking(
        store,
        name="recall",
        run_id=run,
        stage="recall",
        split="s",
        part="test",
        ks=(1, 10),
        metric_names=("recall", "ndcg"),
    )
    # q1: 1 of 2 relevant at rank 1; q2: hit; q3: miss → R@1 = (0.5 + 1 + 0) / 3
    assert row.means["R@1"] == pytest.approx(0.5)
    assert row.per_request["R@1"].tolist() == [0.5, 1.0, 0.0]
    stored = store.con.execute("SELECT value FROM metrics WHERE metric = 'recall' AND k = 1").fetchone()[0]
    assert stored == pytest.approx(0.5)
    n = store.con.execute("SELECT count(*) FROM request_metrics WHERE metric = 'ndcg' AND k = 10").fetchone()[
        0
    ]
    assert n == 3
    only = evaluate_ranking(
        store,
        name="recall",
        run_id=run,
        stage="recall",
        split="s",
        part="test",
        ks=(1,),
        metric_names=("recall",),
        request_ids=["q2", "q1"],
    )
    assert only.n_requests == 2
    assert only.per_request["R@1"].tolist() == [1.0, 0.5]


def test_compare_is_paired(store):
    run = store.new_run("t", Config().to_dict())
    store.write_results(run, "a", {"q1": [("x", 1.0)], "q2": [("y", 1.0)], "q3": [("d", 1.0)]})
    store.write_results(run, "b", {"q1": [("a", 1.0)], "q2": [("c", 1.0)], "q3": [("d", 1.0)]})
    kw = {"run_id": run, "split": "s", "part": "test", "ks": (1,), "metric_names": ("hit",)}
    a = evaluate_ranking(store, name="a", stage="a", **kw)
    b = evaluate_ranking(store, name="b", stage="b", **kw)
    (c,) = compare(a, b, ["Hit@1"], n_resamples=500, seed=0)
    assert c["diff"] == pytest.approx(2 / 3)
    assert c["a"] == "a" and c["b"] == "b"


def _report(store) -> EvalReport:
    run = store.new_run("t", Config().to_dict())
    store.write_results(run, "recall", {"q1": [("a", 1.0), ("b", 0.5)], "q2": [("c", 1.0)]})
    row = evaluate_ranking(
        store,
        name="recall",
        run_id=run,
        stage="recall",
        split="s",
        part="test",
        ks=(1, 10),
        metric_names=("recall", "ndcg", "mrr"),
    )
    return EvalReport("s", "test", [row], [], {"mmr_sweep": [{"lambda": 0.5, "ndcg": 0.3, "ild": 0.4}]})


def test_html_report_is_self_contained(store, tmp_path):
    path = write_html(_report(store), tmp_path / "r.html")
    page = path.read_text()
    assert page.count("data:image/png;base64,") >= 3
    assert "nDCG@10" in page and "R@1" in page
    assert "http" not in page.replace("http-equiv", "")  # no external resources


@pytest.mark.slow
def test_html_report_renders_in_headless_chromium(store, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    path = write_html(_report(store), tmp_path / "r.html")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert "<table>" in dom.stdout and "nDCG@10" in dom.stdout
    shot = tmp_path / "shot.png"
    subprocess.run(
        [chromium, *flags, f"--screenshot={shot}", "--window-size=1200,2000", path.as_uri()],
        capture_output=True,
        timeout=120,
    )
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    # a rendered page with plots is far from blank: many distinct byte values in the compressed image
    assert len(data) > 20_000 and len(np.unique(np.frombuffer(data[:50_000], dtype=np.uint8))) > 200
