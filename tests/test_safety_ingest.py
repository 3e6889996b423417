"""Issue 19, ingestion: no bad value slips in silently. NaN, infinite and negative event values, boolean and
future timestamps, NUL bytes, and rows the readers cannot split are refused with file, row and column (the
store unchanged), or with keep_rejects put into ``rejects`` while the good rows load."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import write

from twostage.cli import cli
from twostage.engine import Engine
from twostage.errors import InputError
from twostage.store import Store

ITEMS = "item_id,title\n1,Heat\n2,Casino\n3,Toy Story\n"
EVENT_MAP = {"user_id": "user", "item_id": "item", "value": "rating"}
HEADER = "user,item,rating,ts\n"


@pytest.fixture
def store(tmp_path) -> Store:
    s = Store(tmp_path / "p.duckdb")
    s.ingest(write(tmp_path, "items.csv", ITEMS), "items")
    s.ingest(write(tmp_path, "events.csv", HEADER + "u1,1,5,100\n"), "events", mapping=EVENT_MAP)
    return s


def snapshot(store: Store) -> dict[str, list]:
    out = {}
    for table in ("items", "events", "queries", "judgments", "rejects"):
        volatile = {"items": " EXCLUDE (updated_at)", "rejects": " EXCLUDE (ingested_at)"}.get(table, "")
        out[table] = sorted(map(str, store.con.execute(f"SELECT *{volatile} FROM {table}").fetchall()))
    return out


def rejects(store: Store) -> list[tuple]:
    return store.con.execute(
        'SELECT "row", "column", reason FROM rejects ORDER BY "row", "column"'
    ).fetchall()


def refused(store: Store, path: Path, kind: str = "events", **options) -> str:
    """The one-line message ingesting ``path`` fails with, the file named by its name; the store unchanged."""
    before = snapshot(store)
    with pytest.raises(InputError) as err:
        store.ingest(path, kind, **options)
    assert snapshot(store) == before
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:")
    return message.replace(str(path), path.name, 1)


FUTURE = "(more than [ingest] future_seconds = 86400 after now)"


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("nan", "row 2:rating: not a finite number: nan"),
        ("NaN", "row 2:rating: not a finite number: NaN"),
        ("inf", "row 2:rating: not a finite number: inf"),
        ("-Infinity", "row 2:rating: not a finite number: -Infinity"),
        ("-1", "row 2:rating: negative value: -1 (a rating, amount or duration is at least 0)"),
        ("-0.5", "row 2:rating: negative value: -0.5 (a rating, amount or duration is at least 0)"),
    ],
)
def test_non_finite_and_negative_values_are_refused(store, tmp_path, cell, expected):
    path = write(tmp_path, "r.csv", HEADER + f"u2,1,4,100\nu2,2,{cell},200\nu2,3,3,300\n")
    assert refused(store, path, mapping=EVENT_MAP) == f"r.csv:{expected}"


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("4102444800", "row 2:ts: in the future: 2100-01-01 00:00:00 " + FUTURE),
        ("2150-06-01T12:00:00", "row 2:ts: in the future: 2150-06-01 12:00:00 " + FUTURE),
    ],
)
def test_future_timestamps_are_refused(store, tmp_path, ts, expected):
    path = write(tmp_path, "f.csv", HEADER + f"u2,1,4,100\nu2,2,4,{ts}\n")
    assert refused(store, path, mapping=EVENT_MAP) == f"f.csv:{expected}"


def test_future_timestamps_load_when_the_config_allows_them(tmp_path):
    project = tmp_path / "p"
    Engine.init(project)
    toml = project / "twostage.toml"
    toml.write_text(toml.read_text().replace("future_seconds = 86400.0", "future_seconds = 5e9"))
    runner = CliRunner()
    items = write(tmp_path, "items.csv", ITEMS)
    assert runner.invoke(cli, ["-p", str(project), "ingest", "items", str(items)]).exit_code == 0
    events = write(tmp_path, "f.csv", HEADER + "u2,1,4,100\nu2,2,4,2150-06-01\n")
    args = [
        "-p",
        str(project),
        "ingest",
        "events",
        str(events),
        "--map",
        "user_id=user",
        "--map",
        "item_id=item",
    ]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert Engine.open(project).stats()["events"] == 2
    # and the default refuses them through the CLI too, naming file, row and column
    toml.write_text(toml.read_text().replace("future_seconds = 5e9", "future_seconds = 86400.0"))
    again = write(tmp_path, "g.csv", HEADER + "u3,1,4,100\nu3,2,4,2150-06-01\n")
    result = runner.invoke(cli, [*args[:4], str(again), *args[5:]])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {again}:row 2:ts: in the future: 2150-06-01 00:00:00 {FUTURE}"
    assert Engine.open(project).stats()["events"] == 2


def test_keep_rejects_puts_bad_values_in_rejects_and_loads_the_rest(store, tmp_path):
    path = write(
        tmp_path,
        "mixed.csv",
        HEADER + "u2,1,4,100\nu2,2,nan,200\nu2,3,-2,300\nu2,1,3,4102444800\nu2,2,1,400\n",
    )
    report = store.ingest(path, "events", mapping=EVENT_MAP, keep_rejects=True)
    assert (report.rows, report.rejected) == (2, 3)
    assert rejects(store) == [
        (2, "rating", "not a finite number: nan"),
        (3, "rating", "negative value: -2 (a rating, amount or duration is at least 0)"),
        (4, "ts", "in the future: 2100-01-01 00:00:00 " + FUTURE),
    ]
    rows = store.con.execute("SELECT item_id, value FROM events WHERE user_id = 'u2' ORDER BY ts").fetchall()
    assert rows == [("1", 4.0), ("2", 1.0)]


def test_parquet_nan_value_and_boolean_timestamps_are_refused(store, tmp_path):
    nan = tmp_path / "nan.parquet"
    table = {"user": ["u2", "u2"], "item": ["1", "2"], "rating": [4.0, float("nan")], "ts": [100, 200]}
    pq.write_table(pa.table(table), nan)
    assert refused(store, nan, mapping=EVENT_MAP) == "nan.parquet:row 2:rating: not a finite number: nan"
    boolean = tmp_path / "bool.parquet"
    pq.write_table(pa.table({"user": ["u2"], "item": ["1"], "ts": [True]}), boolean)
    expected = "bool.parquet:ts: a BOOLEAN column cannot hold timestamps; use epoch seconds, ISO 8601 text or a TIMESTAMP column"
    clicks = {"user_id": "user", "item_id": "item"}
    assert refused(store, boolean, mapping=clicks) == expected
    # a whole column of the wrong type is no row to reject: keep_rejects refuses it too
    assert refused(store, boolean, mapping=clicks, keep_rejects=True) == expected


def test_nul_bytes_refuse_ids_and_are_dropped_from_text(store, tmp_path):
    path = write(tmp_path, "nul.csv", "item_id,title,brand\n4,ab\x00cd,ac\x00me\n5\x00x,ok,z\n")
    assert refused(store, path, "items") == "nul.csv:row 2:item_id: contains a NUL byte (shown as \\0): 5\\0x"
    events = write(tmp_path, "nul_e.csv", HEADER + "u\x002,1,4,100\n")
    assert (
        refused(store, events, mapping=EVENT_MAP)
        == "nul_e.csv:row 1:user: contains a NUL byte (shown as \\0): u\\02"
    )
    report = store.ingest(path, "items", keep_rejects=True)
    assert (report.rows, report.rejected) == (1, 1)
    item = store.items(["4"])[0]
    assert (item["title"], item["attrs"]) == ("abcd", {"brand": "acme"})
    assert rejects(store) == [(2, "item_id", "contains a NUL byte (shown as \\0): 5\\0x")]


def test_keep_rejects_skips_ragged_csv_rows_with_their_row_numbers(store, tmp_path):
    # a field too many (row 2), a blank line (not a row), a bad value after them (row 3), a field too few (row 5)
    text = HEADER + "u2,1,4,100\nu2,2,4,200,9\n\nu2,3,x,300\nu2,2,4,400\nu2,1,4\n"
    path = write(tmp_path, "ragged.csv", text)
    assert (
        refused(store, path, mapping=EVENT_MAP)
        == "ragged.csv:row 2: expected 4 fields as in the header, found 5"
    )
    report = store.ingest(path, "events", mapping=EVENT_MAP, keep_rejects=True)
    assert (report.rows, report.rejected) == (2, 3)
    assert rejects(store) == [
        (2, None, "expected 4 fields as in the header, found 5"),
        (3, "rating", "not a number: x"),
        (5, None, "expected 4 fields as in the header, found 3"),
    ]
    seqs = store.con.execute("SELECT item_id, ts FROM events WHERE user_id = 'u2' ORDER BY seq").fetchall()
    assert [(i, str(t)) for i, t in seqs] == [("1", "1970-01-01 00:01:40"), ("2", "1970-01-01 00:06:40")]


def test_keep_rejects_skips_rows_that_are_not_utf8(store, tmp_path):
    path = write(tmp_path, "latin1.csv", "item_id,title\n4,ok\n5,Caf\xe9\n6,fine\n".encode("latin-1"))
    assert refused(store, path, "items").startswith("latin1.csv:row 2: not UTF-8 encoded")
    report = store.ingest(path, "items", keep_rejects=True)
    assert (report.rows, report.rejected) == (2, 1)
    assert [i["item_id"] for i in store.items(["4", "6"])] == ["4", "6"]
    assert rejects(store) == [(2, "title", "not UTF-8 encoded; convert it to UTF-8 (e.g. iconv -t UTF-8)")]


def test_broken_jsonl_line_is_named_by_its_own_number(store, tmp_path):
    lines = [{"user": "u2", "item": "1", "ts": 100}, {"user": "u2", "item": "2", "ts": 200}]
    text = "\n".join(map(json.dumps, lines)) + '\n{"user": "u2", nope\n' + json.dumps(lines[0]) + "\n"
    path = write(tmp_path, "e.jsonl", text)
    clicks = {"user_id": "user", "item_id": "item"}
    assert refused(store, path, mapping=clicks) == "e.jsonl:row 3: not valid JSON: unexpected character"
    report = store.ingest(path, "events", mapping=clicks, keep_rejects=True)
    assert (report.rows, report.rejected) == (3, 1)
    assert rejects(store) == [(3, None, "not valid JSON")]


def test_jsonl_value_of_the_wrong_type_is_named_by_row_and_column(store, tmp_path):
    # past the lines DuckDB samples for the types (20,480), a value that does not fit would become NULL
    good = [json.dumps({"user": "u2", "item": "1", "rating": 4, "ts": 100 + i}) for i in range(21_000)]
    bad = json.dumps({"user": "u2", "item": "2", "rating": "four", "ts": 99})
    path = write(tmp_path, "t.jsonl", "\n".join([*good, bad, good[0]]) + "\n")
    message = refused(store, path, mapping=EVENT_MAP)
    reason = 'does not fit the type BIGINT of this column in the other lines: "four"'
    assert message == f"t.jsonl:row 21001:rating: {reason}"
    report = store.ingest(path, "events", mapping=EVENT_MAP, keep_rejects=True)
    # the repeated first line is the file's second copy of that event, so it is loaded too
    assert (report.rows, report.rejected) == (21_001, 1)
    assert rejects(store) == [(21_001, "rating", reason)]


def test_what_keep_rejects_cannot_skip_says_so(store, tmp_path):
    path = write(tmp_path, "broken.parquet", b"PAR1 this is not parquet at all")
    assert refused(store, path, mapping=EVENT_MAP).startswith("broken.parquet: cannot be read:")
    message = refused(store, path, mapping=EVENT_MAP, keep_rejects=True)
    assert message.endswith(
        "; --keep-rejects cannot skip this: the reader cannot split the file into rows past it"
    )
