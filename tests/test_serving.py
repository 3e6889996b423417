"""Serving a project without training anything (tiny untrained models): the CLI's search, recommend, index and
evaluate commands; offline = online; and many threads served while the catalogue and index change."""

from __future__ import annotations

import json
import random
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_served_project

from twostage import Engine
from twostage.cli import cli
from twostage.requests import Request

SPLIT = "leave-last-out"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_bert_path) -> Path:
    return make_served_project(tmp_path_factory.mktemp("served"), tiny_bert_path)


def cli_run(project: Path, *args: str):
    return CliRunner().invoke(cli, ["-p", str(project), *args])


# ---------------------------------------------------------------------- offline = online
def _evaluated(engine: Engine, report, stage: str) -> dict[str, list[str]]:
    rows = engine.sql(
        f"SELECT request_id, list(item_id ORDER BY rank) FROM results WHERE run_id = '{report.extra['run_id']}' "
        f"AND stage = '{stage}' AND rank <= 10 GROUP BY 1"
    )[1]
    return dict(rows)


def test_what_evaluate_scores_is_what_recommend_returns_at_the_cut_off(served):
    engine = Engine.open(served)
    report = engine.evaluate(mmr_lambdas=(0.5,))
    assert {"recall", "rerank"} <= {r.name for r in report.rows} and report.extra["mmr_sweep"]
    assert engine.pipeline(SPLIT).counts.cowatched and engine.pipeline(SPLIT).counts.popularity
    users = sorted(engine.store.targets(SPLIT, "test"))
    for stage, options in (("rerank", {}), ("recall", {"stage": "recall"}), ("mmr-0.5", {"diversify": 0.5})):
        evaluated = _evaluated(engine, report, stage)
        for user in users:
            served_list = engine.recommend(user, 10, split=SPLIT, part="test", **options).item_ids()
            assert served_list == evaluated[user], (stage, user)
    engine.close()


def test_recommend_as_of_a_split_needs_a_target_there(served):
    from twostage.errors import NotFoundError

    engine = Engine.open(served)
    with pytest.raises(NotFoundError, match="has no 'test' target in split 'leave-last-out'"):
        engine.recommend("nobody", split=SPLIT)
    engine.close()


def test_a_disabled_reranker_serves_and_evaluates_stage_one_alone(served):
    engine = Engine.open(served, overrides={"reranker.enabled": False})
    assert engine.pipeline().reranker is None
    assert {h.stage for h in engine.search("comedy film", k=3).hits} == {"recall"}
    report = engine.evaluate(baselines=False, max_requests=4)
    assert "rerank" not in {r.name for r in report.rows}
    engine.close()


# ---------------------------------------------------------------------- the CLI
def test_search_prints_the_ranking_and_its_json(served):
    result = cli_run(served, "search", "comedy film", "-k", "3", "--quiet")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "request: comedy film"
    assert [line.split(".")[0].strip() for line in lines[1:4]] == ["1", "2", "3"]
    data = json.loads(cli_run(served, "search", "comedy film", "-k", "3", "--json").stdout)
    assert len(data["hits"]) == 3 and data["version"]
    assert [h["rank"] for h in data["hits"]] == [1, 2, 3]
    assert {h["stage"] for h in data["hits"]} == {"rerank"}
    explained = json.loads(cli_run(served, "search", "comedy film", "-k", "2", "--explain", "--json").stdout)
    assert all(
        {t["term"] for t in h["explanation"]["terms"]} == {"comedy", "film"} for h in explained["hits"]
    )
    old_name = json.loads(cli_run(served, "query", "comedy film", "-k", "3", "--json").stdout)
    assert [h["item_id"] for h in old_name["hits"]] == [h["item_id"] for h in data["hits"]]
    empty = cli_run(served, "search", "  ")
    assert empty.exit_code == 1 and "empty query" in empty.output


def test_recommend_for_a_user_and_for_an_anonymous_history(served):
    engine = Engine.open(served)
    history = engine.store.histories(["3"])["3"]
    engine.close()
    result = cli_run(served, "recommend", "3", "-k", "4", "--explain", "--json")
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)["hits"]
    assert len(hits) == 4 and not {h["item_id"] for h in hits} & set(history)
    assert all({d["item_id"] for d in h["explanation"]["drivers"]} <= set(history) for h in hits)
    human = cli_run(served, "recommend", "3", "-k", "2", "--quiet")
    assert human.exit_code == 0 and human.stdout.startswith("request: Recently:")
    session = json.loads(
        cli_run(served, "recommend", "--history", f"{history[0]},{history[1]}", "--json").stdout
    )
    assert session["request_id"] == "session" and not {h["item_id"] for h in session["hits"]} & set(
        history[:2]
    )
    both = cli_run(served, "recommend", "3", "--history", "1")
    assert both.exit_code == 2 and "one of them" in both.output
    unknown = cli_run(served, "recommend", "nobody")
    assert unknown.exit_code == 1 and "unknown user 'nobody'" in unknown.output
    bad_item = cli_run(served, "recommend", "--history", "nope")
    assert bad_item.exit_code == 1 and "unknown item_id 'nope'" in bad_item.output


def test_index_commands_change_the_saved_index(served, tmp_path):
    project = tmp_path / "copy"
    shutil.copytree(served, project)
    manifest = project / "indexes" / "default" / "manifest.json"
    info = json.loads(cli_run(project, "index", "info", "--json").stdout)
    assert info["count"] == 40 == json.loads(manifest.read_text())["count"]
    removed = cli_run(project, "index", "remove", "5", "7", "--quiet")
    assert removed.exit_code == 0 and removed.stdout.strip() == "Index now holds 38 items"
    assert json.loads(manifest.read_text())["count"] == 38
    hits = json.loads(cli_run(project, "search", "film", "-k", "38", "--json").stdout)["hits"]
    assert len(hits) == 38 and not {"5", "7"} & {h["item_id"] for h in hits}
    added = cli_run(project, "index", "add", "--quiet")  # every catalogue item the index lacks
    assert added.exit_code == 0 and added.stdout.strip() == "Index now holds 40 items"
    unknown = cli_run(project, "index", "add", "999")
    assert unknown.exit_code == 1 and "unknown item_id '999'" in unknown.output
    assert json.loads(manifest.read_text())["count"] == 40
    built = cli_run(project, "index", "build", "--build", "hnsw", "--quiet")
    assert built.exit_code == 0 and built.stdout.strip().startswith("Built HNSW")
    assert json.loads(manifest.read_text())["factory"].startswith("HNSW")


def test_evaluate_prints_the_table_and_stores_the_run(served, tmp_path):
    project = tmp_path / "copy"
    shutil.copytree(served, project)
    runs = Engine.open(project).sql("SELECT count(*) FROM runs WHERE kind = 'eval'")[1][0][0]
    result = cli_run(project, "evaluate", "--max-requests", "6", "--no-baselines", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "split leave-last-out/test: 6 requests"
    assert "rerank vs recall: nDCG@10" in result.stdout
    data = json.loads(cli_run(project, "evaluate", "--max-requests", "6", "--json").stdout)
    assert [r["name"] for r in data["rows"]] == [
        "popularity",
        "itemknn",
        "recall-no-prior",
        "recall",
        "rerank",
    ]
    engine = Engine.open(project)
    stored = engine.sql(f"SELECT count(DISTINCT stage) FROM metrics WHERE run_id = '{data['run_id']}'")[1][0][
        0
    ]
    assert stored == 5
    assert engine.sql("SELECT count(*) FROM runs WHERE kind = 'eval'")[1][0][0] == runs + 2
    engine.close()


# ---------------------------------------------------------------------- concurrency
def test_threads_are_served_while_items_are_ingested_and_the_index_updated(served, tmp_path):
    """8 threads of mixed search/recommend (both stages, MMR, explanations) for a bounded time while another
    thread ingests items and updates the index: every answer equals the serial answer of the pipeline version
    it names, and nothing raises."""
    project = tmp_path / "copy"
    shutil.copytree(served, project)
    engine = Engine.open(project)
    versions = {engine.pipeline().version: engine.pipeline()}
    users = sorted(engine.store.targets(SPLIT, "test"))[:8]
    histories = engine.store.histories(users)
    answers: list[tuple[str, dict, object]] = []
    errors: list[BaseException] = []
    done = threading.Event()
    deadline = time.monotonic() + 60

    def serve(worker: int) -> None:
        rng = random.Random(worker)
        try:
            while not done.is_set() and time.monotonic() < deadline:
                call = {
                    "stage": rng.choice(["rerank", "recall"]),
                    "explain": rng.random() < 0.3,
                    "diversify": rng.choice([None, 0.6]),
                }
                if rng.random() < 0.5:
                    call["user"] = rng.choice(users)
                    ranking = engine.recommend(call["user"], 5, **_options(call))
                else:
                    call["query"] = rng.choice(["comedy film", "a drama", "horror night"])
                    ranking = engine.search(call["query"], 5, **_options(call))
                answers.append((ranking.version, call, ranking))
        except BaseException as e:
            errors.append(e)

    def update() -> None:
        try:
            for n in range(3):
                time.sleep(0.3)
                items = tmp_path / f"items{n}.csv"
                items.write_text(
                    f"item_id,title,genres\nnew{n},comedy film new {n},Comedy\n1,retitled {n},Drama\n"
                )
                engine.ingest(items, "items")
                versions[engine.pipeline().version] = engine.pipeline()
                engine.index_add()
                versions[engine.pipeline().version] = engine.pipeline()
        except BaseException as e:
            errors.append(e)
        finally:
            time.sleep(0.3)
            done.set()

    threads = [threading.Thread(target=serve, args=(w,)) for w in range(8)] + [
        threading.Thread(target=update)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[0]
    assert not any(t.is_alive() for t in threads)
    seen = {v for v, _, _ in answers}
    assert len(answers) >= 16 and len(seen) >= 2, (len(answers), seen)
    assert seen <= set(versions)  # every answer came from a pipeline the engine served
    assert "new2" in versions[list(versions)[-1]].index  # the last pipeline has the last items indexed
    for version, call, ranking in answers:
        pipe = versions[version]
        if "user" in call:
            request = pipe.user_request(call["user"], histories[call["user"]])
        else:
            request = Request("query", call["query"])
        serial = pipe.rank([request], 5, **_options(call))[0]
        assert ranking.item_ids() == serial.item_ids(), call
        assert np.allclose([h.score for h in ranking.hits], [h.score for h in serial.hits], atol=1e-5)
        assert [h.stage for h in ranking.hits] == [h.stage for h in serial.hits]
        if call["explain"]:
            assert [h.explanation for h in ranking.hits] == [h.explanation for h in serial.hits]
    engine.close()


def _options(call: dict) -> dict:
    return {"stage": call["stage"], "explain": call["explain"], "diversify": call["diversify"]}
