"""The CLI: exit codes, exact one-line errors, --json output, and the store seen through the library."""

from __future__ import annotations

import json

from click.testing import CliRunner

from twostage.cli import cli
from twostage.engine import Engine


def run(*args: str, project=None):
    base = ["-p", str(project)] if project else []
    return CliRunner().invoke(cli, [*base, *args], catch_exceptions=False)


def test_init_load_split_stats(tmp_path):
    project = tmp_path / "p"
    assert run("init", str(project)).exit_code == 0
    result = run("datasets", "load", "sample", "--json", project=project)
    assert result.exit_code == 0
    reports = json.loads(result.output)
    assert [r["kind"] for r in reports] == ["items", "events"]
    assert run("split", project=project).exit_code == 0
    stats = json.loads(run("stats", "--json", project=project).output)
    assert stats["items"] == 1500
    assert stats["events"] == 37801
    assert stats["splits"] == {"leave-last-out/test": 300, "leave-last-out/valid": 300}
    rows = json.loads(run("sql", "SELECT count(*) AS n FROM items", "--json", project=project).output)
    assert rows == [{"n": 1500}]


def test_ingest_error_is_one_line_exit_1_and_store_unchanged(tmp_path):
    project = tmp_path / "p"
    run("init", str(project))
    bad = tmp_path / "items.csv"
    bad.write_text("item_id,title\n1,a\n1,b\n")
    result = CliRunner().invoke(cli, ["-p", str(project), "ingest", "items", str(bad)])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {bad}:row 2:item_id: duplicate item_id 1 (first at row 1)"
    assert Engine.open(project).stats()["items"] == 0


def test_keep_rejects_reports_count(tmp_path):
    project = tmp_path / "p"
    run("init", str(project))
    good = tmp_path / "items.csv"
    good.write_text("item_id,title\n1,a\n2,b\n")
    run("ingest", "items", str(good), project=project)
    events = tmp_path / "e.csv"
    events.write_text("user_id,item_id,ts\nu,1,10\nu,9,11\n")
    result = run("ingest", "events", str(events), "--keep-rejects", "--json", project=project)
    assert json.loads(result.output)[0]["rejected"] == 1
    assert Engine.open(project).stats()["rejects"] == 1


def test_bad_map_is_usage_error(tmp_path):
    project = tmp_path / "p"
    run("init", str(project))
    result = CliRunner().invoke(cli, ["-p", str(project), "ingest", "items", "x.csv", "--map", "item_id"])
    assert result.exit_code == 2
    assert "TARGET=COLUMN" in result.output


def test_not_a_project(tmp_path):
    result = CliRunner().invoke(cli, ["-p", str(tmp_path / "none"), "stats"])
    assert result.exit_code == 1
    assert "not a twostage project" in result.output


def test_progress_lines_are_ours_and_library_chatter_stays_out():
    import logging

    from twostage.cli import configure_logging

    root, ours = logging.getLogger(), logging.getLogger("twostage")
    saved = root.level, ours.level
    try:
        configure_logging(verbose=True)
        assert logging.getLogger("twostage.engine").isEnabledFor(logging.INFO)
        # faiss's loader logs its AVX probing at INFO; sentence-transformers says "No device provided"
        assert not logging.getLogger("faiss.loader").isEnabledFor(logging.INFO)
        assert not logging.getLogger("sentence_transformers").isEnabledFor(logging.INFO)
        assert logging.getLogger("sentence_transformers").isEnabledFor(logging.WARNING)
        configure_logging(verbose=False)
        assert not logging.getLogger("twostage.engine").isEnabledFor(logging.INFO)
        assert logging.getLogger("twostage.engine").isEnabledFor(logging.WARNING)
    finally:
        root.setLevel(saved[0])
        ours.setLevel(saved[1])


def test_demo_honours_the_group_project_option(tmp_path):
    taken = tmp_path / "mine"
    taken.mkdir()
    (taken / "notes.txt").write_text("not a demo project")
    # the directory is refused (it holds other files), which shows -p was the one used; nothing is deleted
    result = CliRunner().invoke(cli, ["-p", str(taken), "demo"])
    assert result.exit_code == 1
    assert f"{taken} exists and is not a demo project" in result.output
    assert (taken / "notes.txt").exists()


def _beir_folder(root):
    """A three-document BEIR layout: corpus, queries, train and test qrels."""
    (root / "qrels").mkdir(parents=True)
    docs = [("d1", "Heat", "a heist film"), ("d2", "Casino", "a crime drama"), ("d3", "Up", "a balloon")]
    (root / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": i, "title": t, "text": b}) + "\n" for i, t, b in docs)
    )
    (root / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in [("q1", "heist"), ("q2", "crime")])
    )
    (root / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq2\td2\t1\n")
    return root


def test_split_of_judgments_without_events_is_the_given_split(tmp_path, caplog):
    project = tmp_path / "p"
    assert run("init", str(project)).exit_code == 0
    assert (
        run("datasets", "load", "beir", str(_beir_folder(tmp_path / "beir")), project=project).exit_code == 0
    )
    result = CliRunner().invoke(cli, ["-p", str(project), "split", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"test": 1, "train": 1}
    assert "no events but 2 judgments: making the 'given' split" in caplog.text
    stats = json.loads(run("stats", "--json", project=project).output)
    assert stats["splits"] == {"given/test": 1, "given/train": 1}
    # a strategy named on the command line is still obeyed (and says what it needs)
    refused = run("split", "--strategy", "leave-last-out", project=project)
    assert refused.exit_code == 1 and "needs events" in refused.output
