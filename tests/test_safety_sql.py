"""`twostage sql` is read-only by default and reaches nothing outside the store; a dropped core table is an error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from twostage.cli import cli
from twostage.engine import Engine
from twostage.errors import TwostageError
from twostage.project import STORE_FILE
from twostage.store import Store

EVENTS = [("u1", "1", 10), ("u1", "2", 20), ("u2", "1", 30)]


def run(project: Path, *args: str):
    return CliRunner().invoke(cli, ["-p", str(project), *args], catch_exceptions=False)


def counts(project: Path) -> dict[str, int]:
    with Store(project / STORE_FILE, read_only=True) as store:
        return {t: store.count(t) for t in ("items", "events")}


@pytest.fixture
def project(tmp_path) -> Path:
    """A project with 2 items and 3 events, written straight to the store (no ingest)."""
    root = tmp_path / "p"
    assert run(root, "init", str(root)).exit_code == 0
    with Store(root / STORE_FILE) as store, store.transaction() as cur:
        cur.execute("INSERT INTO items (item_id, title) VALUES ('1', 'Heat'), ('2', 'Casino')")
        for seq, (user, item, ts) in enumerate(EVENTS):
            cur.execute(
                "INSERT INTO events VALUES (?, ?, 'click', NULL, to_timestamp(?)::TIMESTAMP, ?)",
                [user, item, ts, seq],
            )
    return root


@pytest.fixture
def outside(tmp_path) -> Path:
    """A directory outside the project, with a CSV in it."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    return path


def test_statements_are_counted_by_duckdbs_parser(tmp_path):
    with Store(tmp_path / "s.duckdb") as store:
        assert store.sql("SELECT 1 AS one;") == (["one"], [(1,)])
        assert store.sql("SELECT ';' AS semi -- ; not a second statement") == (["semi"], [(";",)])
        with pytest.raises(
            TwostageError, match=r"^sql runs one statement; found 2 \(separate them into calls\)$"
        ):
            store.sql("SELECT 1; SELECT 2")
        with pytest.raises(TwostageError, match="found 0"):
            store.sql("  -- nothing")


def test_multi_statement_is_refused_and_nothing_runs(project):
    result = run(project, "sql", "SELECT count(*) FROM events; DROP TABLE events")
    assert result.exit_code == 1
    assert result.output.strip() == "Error: sql runs one statement; found 2 (separate them into calls)"
    assert counts(project) == {"items": 2, "events": 3}


@pytest.mark.parametrize(
    ("query", "kind"),
    [
        ("DROP TABLE events", "DROP"),
        ("DELETE FROM events", "DELETE"),
        ("UPDATE items SET title = 'x'", "UPDATE"),
        ("INSERT INTO items (item_id) VALUES ('3')", "INSERT"),
        ("CREATE TABLE t AS SELECT 1", "CREATE"),
    ],
)
def test_writes_need_write(project, query, kind):
    result = run(project, "sql", query)
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: sql is read-only: {kind} statements need --write"
    assert counts(project) == {"items": 2, "events": 3}


def test_a_write_hidden_in_a_read_is_stopped_by_the_read_only_store(project):
    result = run(project, "sql", "EXPLAIN ANALYZE DELETE FROM events")
    assert result.exit_code == 1
    assert "read-only" in result.output and len(result.output.strip().splitlines()) == 1
    assert counts(project) == {"items": 2, "events": 3}


@pytest.mark.parametrize("write", [False, True])
def test_nothing_outside_the_store_is_reached(project, outside, write):
    flag = ["--write"] if write else []
    copy_to = outside / "dump.csv"
    other = outside / "other.duckdb"
    for query, kind in [
        (f"COPY events TO '{copy_to}'", "COPY"),
        (f"COPY (SELECT * FROM items) TO '{copy_to}' (FORMAT parquet)", "COPY"),
        (f"ATTACH '{other}' AS o", "ATTACH"),
        ("INSTALL httpfs", "INSTALL"),
        ("LOAD httpfs", "LOAD"),
        (f"EXPORT DATABASE '{outside / 'export'}'", "EXPORT"),
        ("CREATE PERSISTENT SECRET s (TYPE s3, KEY_ID 'k', SECRET 'v')", "CREATE SECRET"),
    ]:
        result = run(project, "sql", query, *flag)
        assert result.exit_code == 1, query
        assert result.output.startswith(f"Error: sql does not run {kind} statements, even with --write"), (
            query
        )
    assert sorted(p.name for p in outside.iterdir()) == ["secret.csv"]  # no dump, no database, no export
    # a read of a file outside the project is stopped by DuckDB itself (external access is off)
    for query in [
        f"SELECT * FROM read_csv('{outside / 'secret.csv'}')",
        f"SELECT * FROM '{outside / 'secret.csv'}'",
        "SELECT * FROM read_text('/etc/passwd')",
    ]:
        result = run(project, "sql", query, *flag)
        assert result.exit_code == 1, query
        assert result.output.startswith("Error: SQL error: Permission Error: Cannot access file"), query
        assert "file system operations are disabled" in result.output, query
        assert len(result.output.strip().splitlines()) == 1
    assert counts(project) == {"items": 2, "events": 3}


def test_write_deletes_and_reports_the_count(project, outside):
    result = run(project, "sql", "DELETE FROM events WHERE user_id = 'u2'", "--write")
    assert result.exit_code == 0, result.output
    assert result.output.split() == ["Count", "-----", "1"]
    result = run(project, "sql", "DELETE FROM events WHERE user_id = 'u1'", "--write", "--json")
    assert json.loads(result.output) == [{"Count": 2}]
    assert counts(project) == {"items": 2, "events": 0}
    # --write changes the store, but still cannot pull a file in
    query = f"INSERT INTO items (item_id) SELECT a FROM read_csv('{outside / 'secret.csv'}')"
    assert "file system operations are disabled" in run(project, "sql", query, "--write").output
    assert counts(project) == {"items": 2, "events": 0}


def test_sql_help_says_what_write_allows():
    text = CliRunner().invoke(cli, ["sql", "--help"]).output
    assert "--write" in text and "DELETE" in text and "ATTACH" in text
    assert "Example: twostage sql" in text


def test_engine_sql_guards_its_own_connection(project):
    with Engine.open(project) as engine:
        assert engine.sql("SELECT count(*) FROM events") == (["count_star()"], [(3,)])
        with pytest.raises(TwostageError, match=r"^sql is read-only: DROP statements need --write$"):
            engine.sql("DROP TABLE events")
        with pytest.raises(TwostageError, match="read-only"):
            engine.sql("EXPLAIN ANALYZE DELETE FROM events")
        with pytest.raises(TwostageError, match="does not run ATTACH"):
            engine.sql("ATTACH ':memory:' AS m", write=True)
        with pytest.raises(TwostageError, match="does not run SET"):
            engine.sql("SET GLOBAL enable_external_access = false", write=True)
        assert engine.store.count("events") == 3
        assert engine.sql("DELETE FROM events WHERE user_id = 'u2'", write=True) == (["Count"], [(1,)])
        assert engine.store.count("events") == 2


def test_a_dropped_core_table_is_an_error_not_a_new_empty_table(project):
    assert run(project, "sql", "DROP TABLE rejects", "--write").exit_code == 0
    assert counts(project) == {"items": 2, "events": 3}  # not a core table: re-created on open
    assert run(project, "sql", "DROP TABLE events", "--write").exit_code == 0
    store_file = project / STORE_FILE
    message = (
        f"{store_file}: table 'events' is missing (dropped?); restore the store from a backup or re-ingest "
        "into a new project"
    )
    for _ in range(2):  # and opening it did not re-create the table
        with pytest.raises(TwostageError) as err:
            Store(store_file)
        assert str(err.value) == message
    result = run(project, "stats")
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {message}"
    assert (
        run(project, "sql", "DROP TABLE items", "--write").output.strip().startswith(f"Error: {store_file}")
    )
