"""Publishing snapshots and serving them over HTTP: every endpoint against the library's answers, every error
status with its message, the API key, hot swaps (and a refused corrupt snapshot), the CLI commands, and one
real uvicorn process on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_served_project, sharpened_reranker

from twostage import Engine
from twostage import snapshot as snapshots
from twostage.cli import cli
from twostage.errors import InputError, NotFoundError

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from twostage.serve import create_app

SERVE_CONFIG = """
[serve]
max_k = 30
max_query_chars = 200
max_batch = 4
max_history = 20
poll_seconds = 0
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_bert_path) -> Path:
    """The serving test project with one published snapshot."""
    root = make_served_project(tmp_path_factory.mktemp("serve"), tiny_bert_path, SERVE_CONFIG)
    engine = Engine.open(root)
    engine.publish()
    engine.close()
    return root


@pytest.fixture(scope="module")
def client(project):
    with TestClient(create_app(project)) as c:
        yield c


def _library(project: Path):
    return Engine.open(project)


def _hits(ranking) -> list[tuple[str, float]]:
    return [(h.item_id, round(h.score, 5)) for h in ranking.hits]


def _served_hits(body: dict) -> list[tuple[str, float]]:
    return [(h["item_id"], round(h["score"], 5)) for h in body["hits"]]


# ---------------------------------------------------------------------- snapshots
def test_publish_freezes_what_serving_reads_with_a_checked_manifest(project):
    current = snapshots.current_id(project)
    root = snapshots.snapshots_dir(project) / current
    manifest = json.loads((root / "manifest.json").read_text())
    names = set(manifest["files"])
    assert {"items.parquet", "histories.parquet", "cowatched.parquet", "popularity.parquet"} <= names
    assert {"settings.json", "index/manifest.json"} <= names
    assert any(n.startswith("retriever/") for n in names) and any(n.startswith("reranker/") for n in names)
    assert manifest["counts"]["items"] == 40 and manifest["snapshot_id"] == current
    assert not [p for p in snapshots.snapshots_dir(project).iterdir() if p.name.endswith(".tmp")]
    served = snapshots.load(project)
    engine = _library(project)
    pipe = engine.pipeline()
    assert served.pipeline.settings == pipe.settings
    assert dict(served.pipeline.counts.popularity) == dict(pipe.counts.popularity)
    assert {i: list(v) for i, v in served.pipeline.counts.cowatched.items()} == {
        i: list(v) for i, v in pipe.counts.cowatched.items()
    }
    assert served.pipeline.catalogue.texts == pipe.catalogue.texts
    user = sorted(served.histories)[0]
    assert list(served.history(user)) == engine.store.histories([user])[user]
    with pytest.raises(NotFoundError, match="unknown user 'nobody'"):
        served.history("nobody")


def test_snapshots_are_pruned_rolled_back_and_refused_when_changed(tmp_path, project):
    copy = tmp_path / "copy"
    shutil.copytree(project, copy)
    (copy / "twostage.toml").write_text((copy / "twostage.toml").read_text() + "keep_snapshots = 2\n")
    engine = Engine.open(copy)
    first = snapshots.current_id(copy)
    second = engine.publish()["snapshot_id"]
    third = engine.publish()["snapshot_id"]
    assert snapshots.list_snapshots(copy) == [second, third] and snapshots.current_id(copy) == third
    assert engine.publish(switch=second)["snapshot_id"] == second and snapshots.current_id(copy) == second
    with pytest.raises(NotFoundError, match=f"no snapshot '{first}'"):
        engine.publish(switch=first)
    engine.close()
    # a changed byte anywhere is refused by name
    items = snapshots.snapshots_dir(copy) / third / "items.parquet"
    items.write_bytes(items.read_bytes()[:-1] + b"\0")
    with pytest.raises(InputError, match=r"items.parquet.*checksum mismatch"):
        snapshots.load(copy, third)
    (snapshots.snapshots_dir(copy) / second / "index" / "index.faiss").unlink()
    with pytest.raises(InputError, match=r"index.faiss.*missing"):
        snapshots.check(copy, second)


# ---------------------------------------------------------------------- endpoints = the library
def test_health_ready_docs_and_items(client, project):
    current = snapshots.current_id(project)
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"ready": True, "snapshot": current}
    assert "/recommend" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200
    item = client.get("/items/3").json()
    assert item["item_id"] == "3" and item["title"] == "horror film 3 (1993)" and item["snapshot"] == current
    assert item["categories"] == ["Horror"]


@pytest.mark.parametrize("stage", ["rerank", "recall"])
def test_search_and_recommend_answer_what_the_library_answers(client, project, stage):
    engine = _library(project)
    current = snapshots.current_id(project)
    for query in ("comedy film", "a drama about war"):
        body = client.post("/search", json={"query": query, "k": 7, "stage": stage}).json()
        assert body["snapshot"] == current
        assert _served_hits(body) == _hits(engine.search(query, 7, stage=stage))
    users = sorted(snapshots.load(project).histories)[:5]
    for user in users:
        body = client.post("/recommend", json={"user_id": user, "k": 6, "stage": stage}).json()
        assert _served_hits(body) == _hits(engine.recommend(user, 6, stage=stage))
    session = ["3", "8", "13"]
    body = client.post(
        "/recommend", json={"history": session, "k": 6, "stage": stage, "diversify": 0.5}
    ).json()
    expected = engine.recommend(history=session, k=6, stage=stage, diversify=0.5)
    assert _served_hits(body) == _hits(expected) and not set(session) & {h["item_id"] for h in body["hits"]}
    engine.close()


def test_explanations_and_batches_match_the_library(client, project):
    engine = _library(project)
    user = sorted(snapshots.load(project).histories)[0]
    body = client.post("/recommend", json={"user_id": user, "k": 3, "explain": True}).json()
    expected = engine.recommend(user, 3, explain=True)
    assert [h["explanation"] for h in body["hits"]] == [
        json.loads(json.dumps(h.explanation)) for h in expected.hits
    ]
    batch = [
        {"search": {"query": "comedy film", "k": 4}},
        {"recommend": {"user_id": user, "k": 5}},
        {"search": {"query": "horror night", "k": 4, "stage": "recall"}},
        {"recommend": {"history": ["2", "7"], "k": 5}},
    ]
    results = client.post("/batch", json={"requests": batch}).json()["results"]
    alone = [
        engine.search("comedy film", 4),
        engine.recommend(user, 5),
        engine.search("horror night", 4, stage="recall"),
        engine.recommend(history=["2", "7"], k=5),
    ]
    # ranked together, texts are padded to a common length: the same items, scores equal to float noise
    assert [[h["item_id"] for h in r["hits"]] for r in results] == [r.item_ids() for r in alone]
    for served, ranking in zip(results, alone, strict=True):
        assert [h["score"] for h in served["hits"]] == pytest.approx(
            [h.score for h in ranking.hits], abs=1e-3
        )
    engine.close()


def test_metrics_count_requests_per_endpoint_template(client):
    client.get("/items/5")
    client.get("/items/6")
    client.post("/search", json={"query": "comedy", "k": 2})
    text = client.get("/metrics").text
    assert 'twostage_requests_total{endpoint="/items/{item_id}",status="200"}' in text
    assert 'twostage_request_seconds_bucket{endpoint="/search"' in text
    assert "/items/5" not in text


# ---------------------------------------------------------------------- errors
ERRORS = [
    ("post", "/search", {"k": 3}, 422, "query: Field required"),
    ("post", "/search", {"query": "x", "k": 0}, 422, "k: Input should be greater than or equal to 1"),
    ("post", "/search", {"query": "x", "stage": "both"}, 422, "stage: Input should be 'rerank' or 'recall'"),
    ("post", "/search", {"query": "   "}, 400, "empty query; give some text to search for"),
    (
        "post",
        "/search",
        {"query": "x", "k": 31},
        413,
        "k is 31; this server returns at most 30 ([serve] max_k)",
    ),
    ("post", "/search", {"query": "x" * 201}, 413, "the query has 201 characters; at most 200"),
    ("post", "/recommend", {"k": 3}, 422, "give either user_id or history"),
    ("post", "/recommend", {"user_id": "1", "history": ["2"]}, 422, "give either user_id or history"),
    ("post", "/recommend", {"user_id": "nobody"}, 404, "unknown user 'nobody' (no events in snapshot"),
    ("post", "/recommend", {"history": ["2", "nope"]}, 404, "unknown item_id 'nope' in the history"),
    ("post", "/recommend", {"history": []}, 400, "the history is empty; give at least one item id"),
    ("post", "/recommend", {"history": ["2"] * 21}, 413, "the history has 21 items; at most 20"),
    ("post", "/recommend", {"user_id": "1", "diversify": 2}, 422, "diversify: Input should be less than"),
    (
        "post",
        "/batch",
        {"requests": [{"search": {"query": "x"}}] * 5},
        413,
        "the batch has 5 requests; at most 4",
    ),
    (
        "post",
        "/batch",
        {"requests": [{}]},
        422,
        "each batch entry is {'search': {...}} or {'recommend': {...}}",
    ),
    ("get", "/items/nope", None, 404, "unknown item_id 'nope'"),
    ("get", "/nowhere", None, 404, "Not Found"),
    ("get", "/search", None, 405, "Method Not Allowed"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "message"), ERRORS)
def test_bad_requests_get_a_json_error_with_the_library_message(client, method, path, body, status, message):
    response = client.request(method, path, json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert "Traceback" not in response.text


def test_malformed_json_is_a_422(client):
    response = client.post("/search", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and "error" in response.json()


def test_an_internal_failure_is_a_logged_500_without_a_traceback(project, monkeypatch, caplog):
    from twostage.pipeline import Pipeline

    def broken(*_a, **_k):
        raise RuntimeError("the index file vanished")

    with TestClient(create_app(project), raise_server_exceptions=False) as c:
        monkeypatch.setattr(Pipeline, "rank", broken)
        with caplog.at_level(logging.ERROR, logger="twostage.serve"):
            response = c.post("/search", json={"query": "comedy"})
    assert response.status_code == 500
    assert response.json() == {"error": "internal error; the server log has the details"}
    assert "the index file vanished" in caplog.text and "vanished" not in response.text


def test_before_anything_is_published_it_is_alive_but_not_ready(tmp_path):
    Engine.init(tmp_path / "empty")
    with TestClient(create_app(tmp_path / "empty")) as c:
        assert c.get("/healthz").status_code == 200
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        response = c.post("/search", json={"query": "x"})
        assert response.status_code == 503 and "twostage publish" in response.json()["error"]


def test_the_api_key_guards_everything_but_health(project):
    with TestClient(create_app(project, api_key="s3cret")) as c:
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = c.post("/search", json={"query": "comedy"}, headers=headers)
            assert response.status_code == 401 and "API key" in response.json()["error"]
            assert c.get("/metrics", headers=headers).status_code == 401
        ok = c.post("/search", json={"query": "comedy"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["hits"]


# ---------------------------------------------------------------------- hot swap
def test_reload_swaps_in_a_new_snapshot_and_refuses_a_corrupt_one(tmp_path, project, caplog):
    copy = tmp_path / "copy"
    shutil.copytree(project, copy)
    old = snapshots.current_id(copy)
    with TestClient(create_app(copy)) as c:
        assert c.post("/admin/reload").json()["reason"] == "already serving it"
        # training, ingestion and publishing use the project's store while the server reads its snapshot
        engine = Engine.open(copy)
        (tmp_path / "new.csv").write_text("item_id,title,genres\nnew1,comedy film premiere,Comedy\n")
        engine.ingest(tmp_path / "new.csv", "items")
        engine.index_add()
        fresh = engine.publish()["snapshot_id"]
        assert c.get("/items/new1").status_code == 404  # still the old snapshot until reloaded
        swapped = c.post("/admin/reload").json()
        assert swapped == {"snapshot": fresh, "reloaded": True, "previous": old}
        assert c.get("/items/new1").json()["snapshot"] == fresh
        assert c.post("/search", json={"query": "comedy premiere"}).json()["snapshot"] == fresh
        # a snapshot whose files do not match its manifest is refused; the one serving keeps serving
        broken = engine.publish()["snapshot_id"]
        engine.close()
        model = next((snapshots.snapshots_dir(copy) / broken / "reranker").glob("*.safetensors"))
        model.unlink()
        model.write_bytes(b"garbage")
        with caplog.at_level(logging.ERROR, logger="twostage.serve"):
            refused = c.post("/admin/reload").json()
        assert refused["reloaded"] is False and refused["snapshot"] == fresh
        assert f"snapshot {broken} refused" in refused["reason"] and "checksum mismatch" in refused["reason"]
        assert f"snapshot {broken} refused" in caplog.text
        assert c.get("/readyz").json()["snapshot"] == fresh
        assert c.post("/search", json={"query": "comedy"}).status_code == 200


def test_under_concurrent_requests_a_swap_fails_none_and_each_answer_is_its_snapshots(tmp_path, project):
    """Threads search while a new snapshot (with a retitled item) is published and reloaded: no request fails,
    and every response equals the ranking of the snapshot it names."""
    import threading

    copy = tmp_path / "copy"
    shutil.copytree(project, copy)
    old = snapshots.current_id(copy)
    engine = Engine.open(copy)
    (tmp_path / "retitle.csv").write_text("item_id,title,genres\n4,romance film premiere,Romance\n")
    engine.ingest(tmp_path / "retitle.csv", "items")
    engine.index_add()
    queries = ["comedy film", "romance premiere", "a drama"]
    responses, stop = [], threading.Event()
    with TestClient(create_app(copy)) as c:

        def send(n: int) -> None:
            while not stop.is_set():
                r = c.post("/search", json={"query": queries[n % 3], "k": 5})
                responses.append((queries[n % 3], r.status_code, r.json()))
                n += 1

        threads = [threading.Thread(target=send, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        new = engine.publish()["snapshot_id"]
        assert c.post("/admin/reload").json()["reloaded"] is True
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(timeout=60)
    engine.close()
    assert {status for _, status, _ in responses} == {200}
    seen = Counter(body["snapshot"] for _, _, body in responses)
    assert set(seen) == {old, new} and min(seen.values()) >= 3, seen
    pipes = {sid: snapshots.load(copy, sid).pipeline for sid in (old, new)}
    from twostage.requests import Request

    expected = {
        (sid, q): [h.item_id for h in pipe.rank([Request("query", q)], 5)[0].hits]
        for sid, pipe in pipes.items()
        for q in queries
    }
    assert expected[(old, "romance premiere")] != expected[(new, "romance premiere")]
    for query, _, body in responses:
        assert [h["item_id"] for h in body["hits"]] == expected[(body["snapshot"], query)]


def test_a_pinned_snapshot_is_served_and_the_poll_follows_current(tmp_path, project):
    copy = tmp_path / "copy"
    shutil.copytree(project, copy)
    (copy / "twostage.toml").write_text(
        (copy / "twostage.toml").read_text().replace("poll_seconds = 0", "poll_seconds = 0.2")
    )
    pinned = snapshots.current_id(copy)
    engine = Engine.open(copy)
    with TestClient(create_app(copy, snapshot=pinned)) as fixed, TestClient(create_app(copy)) as polled:
        fresh = engine.publish()["snapshot_id"]
        deadline = time.monotonic() + 20
        while polled.get("/readyz").json()["snapshot"] != fresh and time.monotonic() < deadline:
            time.sleep(0.1)
        assert polled.get("/readyz").json()["snapshot"] == fresh
        assert fixed.get("/readyz").json()["snapshot"] == pinned
        assert fixed.post("/admin/reload").json()["reloaded"] is False
    engine.close()


# ---------------------------------------------------------------------- CLI
def test_cli_publish_list_switch_and_auto_publish(tmp_path, project):
    copy = tmp_path / "copy"
    shutil.copytree(project, copy)
    first = snapshots.current_id(copy)

    def run(*args: str):
        result = CliRunner().invoke(cli, ["-p", str(copy), *args])
        assert result.exit_code == 0, result.output
        return result

    built = json.loads(run("index", "build", "--json").output)
    assert built["published"]["snapshot_id"] == snapshots.current_id(copy) != first
    assert json.loads(run("index", "build", "--no-publish", "--json").output)["published"] is None
    other = json.loads(run("index", "build", "--name", "other", "--json").output)
    assert other["published"] is None  # not the served index
    listed = json.loads(run("publish", "--list", "--json").output)
    assert listed["current"] == built["published"]["snapshot_id"] and first in listed["snapshots"]
    assert f"Switched to snapshot {first}" in run("publish", "--switch", first).output
    assert snapshots.current_id(copy) == first
    refused = CliRunner().invoke(cli, ["-p", str(copy), "publish", "--switch", "nope"])
    assert refused.exit_code == 1 and "Error: no snapshot 'nope'" in refused.output
    empty = tmp_path / "empty"
    Engine.init(empty)
    unserved = CliRunner().invoke(cli, ["-p", str(empty), "serve"])
    assert unserved.exit_code == 1 and "no snapshot published yet; run 'twostage publish'" in unserved.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_curls() -> list[str]:
    """The curl lines of the README's serving section."""
    section = README.read_text("utf-8").split("\n## Serving", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```bash\n(.*?)^```", section, re.S | re.M)
    return [line for block in blocks for line in block.splitlines() if line.startswith("curl ")]


def _curl(line: str, base: str) -> tuple[int, str]:
    """Run one README curl line against ``base`` (curl itself when installed, else the same request by httpx)."""
    import httpx

    args = shlex.split(line.replace("localhost:8000", base))
    if shutil.which("curl"):
        done = subprocess.run([*args, "-w", "\n%{http_code}"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        body, _, status = done.stdout.rpartition("\n")
        return int(status), body
    method, url, headers, data = "GET", "", {}, None
    it = iter(args[1:])
    for arg in it:
        if arg == "-X":
            method = next(it)
        elif arg == "-H":
            name, _, value = next(it).partition(":")
            headers[name.strip()] = value.strip()
        elif arg == "-d":
            data, method = next(it), "POST" if method == "GET" else method
        elif not arg.startswith("-"):
            url = arg
    response = httpx.request(method, f"http://{url}", headers=headers, content=data, timeout=60)
    return response.status_code, response.text


@pytest.fixture(scope="module")
def sample_project(tmp_path_factory, tiny_bert_path) -> Path:
    """The bundled sample (the README's ids) with the tiny BERT as both models, published."""
    root = tmp_path_factory.mktemp("sample")
    project = root / "project"
    Engine.init(project)
    (project / "twostage.toml").write_text(
        f'[retriever]\nmodel = "{tiny_bert_path}"\nmax_seq_length = 32\n[reranker]\nmax_length = 48\n'
        f'[predictor]\nmodel = "{tiny_bert_path}"\nmax_length = 48\nmax_train_examples = 32\neval_examples = 16\n'
    )
    engine = Engine.open(project)
    engine.datasets_load("sample")
    engine.split()
    engine.train_predictor()  # the README's /predict example
    engine.index_build()
    rr = sharpened_reranker(tiny_bert_path, list(engine.project.catalogue().texts.values())[:60])
    rr.model.save_pretrained(str(project / "models" / "reranker"))
    engine.publish()
    engine.close()
    return project


def test_twostage_serve_runs_the_readme_examples_over_http(sample_project):
    """The CLI's server process on 127.0.0.1 answers every curl line of the README as the library does; it is
    stopped within the test."""
    import httpx

    curls = _readme_curls()
    assert len(curls) >= 6 and any("/recommend" in c and "history" in c for c in curls)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "twostage.cli", "-p", str(sample_project), "serve", "--port", str(port), "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stdout.read().decode()
            try:
                if httpx.get(f"http://{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        current = snapshots.current_id(sample_project)
        for line in curls:
            status, body = _curl(line, base)
            assert status == 200, (line, body)
            if "/metrics" in line:
                assert 'twostage_requests_total{endpoint="/search",status="200"}' in body
                continue
            answer = json.loads(body)
            assert answer["snapshot"] == current, (line, answer)
            if "/search" in line:
                query = json.loads(shlex.split(line)[-1])["query"]
                engine = Engine.open(sample_project)
                assert _served_hits(answer) == _hits(engine.search(query, 3))
                engine.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
