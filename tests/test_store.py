"""Ingestion, validation (one transaction, file:row:column errors), splits and results in the DuckDB store."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED_DATA, write

from twostage.config import Config, RelevanceConfig, SplitConfig
from twostage.errors import InputError, NotFoundError, TwostageError
from twostage.store import Store

ITEMS = "item_id,title,genres\n1,Heat (1995),Action|Crime\n2,Casino (1995),Crime|Drama\n3,Toy Story (1995),Animation\n"
EVENTS = "user,item,rating,ts\nu1,1,5,100\nu1,2,3,200\nu1,3,4,300\nu2,1,4,150\nu2,3,2,250\nu2,2,5,260\n"
EVENT_MAP = {"user_id": "user", "item_id": "item", "value": "rating"}
CLICK_MAP = {"user_id": "user", "item_id": "item"}


@pytest.fixture
def store(tmp_path) -> Store:
    s = Store(tmp_path / "p.duckdb")
    s.ingest(write(tmp_path, "items.csv", ITEMS), "items", mapping={"categories": "genres"})
    s.ingest(write(tmp_path, "events.csv", EVENTS), "events", mapping=EVENT_MAP, event="rating")
    return s


def snapshot(store: Store) -> dict[str, list]:
    tables = ("items", "events", "queries", "judgments", "rejects")
    out = {}
    for t in tables:
        cols = f"* EXCLUDE ({_volatile(t)})" if t in ("items", "rejects") else "*"
        out[t] = sorted(map(str, store.con.execute(f"SELECT {cols} FROM {t}").fetchall()))
    return out


def _volatile(table: str) -> str:
    return {"items": "updated_at", "rejects": "ingested_at"}[table]


def test_ingest_items_and_events(store):
    assert store.count("items") == 3
    assert store.count("events") == 6
    heat = store.items(["1"])[0]
    assert heat["title"] == "Heat (1995)"
    assert heat["categories"] == ["Action", "Crime"]
    ts = store.con.execute("SELECT ts FROM events WHERE user_id = 'u1' AND item_id = '1'").fetchone()[0]
    assert str(ts) == "1970-01-01 00:01:40"


def test_reingest_items_updates_and_events_append(store, tmp_path):
    store.ingest(write(tmp_path, "tags.csv", "item_id,tags\n1,heist\n"), "items")
    store.ingest(write(tmp_path, "items2.csv", "item_id,title\n1,Heat (1995 remaster)\n4,New\n"), "items")
    assert store.count("items") == 4
    heat = store.items(["1"])[0]
    assert heat["title"] == "Heat (1995 remaster)"
    # patched, not replaced: the categories the new file lacks and the attrs from the tags file stay
    assert heat["categories"] == ["Action", "Crime"]
    assert heat["attrs"]["tags"] == "heist"
    assert not store.items(["4"])[0]["categories"]
    # an empty cell in a later file does not delete what an earlier one stored
    store.ingest(write(tmp_path, "tags2.csv", "item_id,tags,brand\n1,,acme\n"), "items")
    assert store.items(["1"])[0]["attrs"] == {"tags": "heist", "brand": "acme"}
    store.ingest(
        write(tmp_path, "e2.csv", "user,item,ts\nu3,4,500\n"),
        "events",
        mapping={"user_id": "user", "item_id": "item"},
    )
    assert store.count("events") == 7


def test_events_already_stored_are_skipped_so_a_second_load_changes_nothing(store, tmp_path):
    before = snapshot(store)
    again = store.ingest(tmp_path / "events.csv", "events", mapping=EVENT_MAP, event="rating")
    assert (again.rows, again.already_stored) == (0, 6)
    assert snapshot(store) == before
    # a file that overlaps the log: only its new events are added; a changed value is a new event;
    # identical rows inside one file are all kept (the file is the record of what happened)
    overlap = "user,item,rating,ts\nu1,1,5,100\nu1,1,4,100\nu3,2,1,400\nu3,2,1,400\n"
    report = store.ingest(write(tmp_path, "e3.csv", overlap), "events", mapping=EVENT_MAP, event="rating")
    assert (report.rows, report.already_stored) == (3, 1)
    assert store.count("events") == 9
    seqs = [r[0] for r in store.con.execute("SELECT seq FROM events ORDER BY seq").fetchall()]
    assert len(set(seqs)) == len(seqs)  # the order of events stays a strict one
    # one stored copy matches one row: two identical clicks in a later export, one of them stored, add one
    store.ingest(
        write(tmp_path, "c1.csv", "user,item,ts\nu1,3,900\n"), "events", mapping=CLICK_MAP, event="click"
    )
    export = store.ingest(
        write(tmp_path, "c2.csv", "user,item,ts\nu1,3,900\nu1,3,900\n"),
        "events",
        mapping=CLICK_MAP,
        event="click",
    )
    assert (export.rows, export.already_stored) == (1, 1)
    assert (
        store.sql("SELECT count(*) FROM events WHERE event = 'click' AND ts = to_timestamp(900)")[1][0][0]
        == 2
    )
    # another event type for the same (user, item, time) is not a duplicate
    clicks = store.ingest(tmp_path / "events.csv", "events", mapping=EVENT_MAP, event="click")
    assert (clicks.rows, clicks.already_stored) == (6, 0)


def test_extra_columns_go_to_attrs(tmp_path):
    s = Store(":memory:")
    s.ingest(write(tmp_path, "i.csv", "item_id,title,brand\nA,Shoe,acme\n"), "items")
    assert s.items(["A"])[0]["attrs"] == {"brand": "acme"}


@pytest.mark.parametrize(
    ("kind", "name", "content", "mapping", "expected"),
    [
        (
            "items",
            "missing_col.csv",
            "id,title\n1,x\n",
            None,
            "missing_col.csv:item_id: required column missing",
        ),
        (
            "events",
            "bad_type.csv",
            "user,item,rating,ts\nu1,1,5,100\nu1,2,five,200\n",
            EVENT_MAP,
            "bad_type.csv:row 2:rating: not a number: five",
        ),
        (
            "events",
            "bad_ts.csv",
            "user,item,rating,ts\nu1,1,5,yesterday\n",
            EVENT_MAP,
            "bad_ts.csv:row 1:ts: not a timestamp",
        ),
        (
            "items",
            "dup.csv",
            "item_id,title\n7,a\n8,b\n7,c\n",
            None,
            "dup.csv:row 3:item_id: duplicate item_id 7 (first at row 1)",
        ),
        (
            "events",
            "unknown.csv",
            "user,item,rating,ts\nu1,1,5,100\nu9,99,4,100\n",
            EVENT_MAP,
            "unknown.csv:row 2:item: unknown item_id 99",
        ),
        (
            "judgments",
            "qrels.csv",
            "query_id,item_id,relevance\nq9,1,1\n",
            None,
            "qrels.csv:row 1:query_id: unknown query_id q9; ingest the queries first",
        ),
        (
            "events",
            "missing_val.csv",
            "user,item,rating,ts\n,1,5,100\n",
            EVENT_MAP,
            "missing_val.csv:row 1:user: missing value",
        ),
        (
            "events",
            "millis.csv",
            "user,item,rating,ts\nu1,1,5,964982703\nu1,2,4,964982703000\n",
            EVENT_MAP,
            "millis.csv:row 2:ts: epoch seconds outside the years 1740–2200: 964982703000 (milliseconds? divide by 1000)",
        ),
        (
            "events",
            "ragged.csv",
            "user,item,rating,ts\nu1,1,5,100\nu1,2,4,200,9\nu1,3,4,300\n",
            EVENT_MAP,
            "ragged.csv:row 2: expected 4 fields as in the header, found 5",
        ),
        (
            "events",
            "short.csv",
            "user,item,rating,ts\n" + "u1,1,5,100\n" * 3000 + "u1,2,4\n",
            EVENT_MAP,
            "short.csv:row 3001: expected 4 fields as in the header, found 3",
        ),
        (
            "events",
            "typo_map.csv",
            "user,item,rating,ts\nu1,1,5,100\n",
            {**EVENT_MAP, "userid": "user"},
            "--map names unknown column(s) ['userid']; events columns are user_id, item_id, event, value, ts "
            "(did you mean 'user_id'?)",
        ),
        (
            "items",
            "concatenated.csv",
            "item_id,title\n1,a\n2,b\nitem_id,title,year\n3,c,2000\n4,d,2001\n",
            None,
            "concatenated.csv:row 3: expected 2 fields as in the header, found 3",
        ),
        (
            "events",
            "blank_line.csv",
            "user,item,rating,ts\nu1,1,5,100\n\nu1,2,4,200\nu1,3,4,300,1\n",
            EVENT_MAP,
            "blank_line.csv:row 3: expected 4 fields as in the header, found 5",
        ),
        ("items", "empty.csv", "", None, "empty.csv: file is empty"),
        ("items", "header_only.csv", "item_id,title\n", None, "header_only.csv: file has no data rows"),
        ("items", "latin1.csv", "item_id,title\n1,ok\n2,Caf\xe9\n".encode("latin-1"), None, "latin1.csv"),
    ],
)
def test_bad_input_fails_with_location_and_changes_nothing(
    store, tmp_path, kind, name, content, mapping, expected
):
    before = snapshot(store)
    path = write(tmp_path, name, content)
    with pytest.raises(InputError) as err:
        store.ingest(path, kind, mapping=mapping, event="rating")
    message = str(err.value)
    assert "\n" not in message
    assert expected in message
    assert str(path) in message
    assert snapshot(store) == before


def test_non_utf8_names_encoding(store, tmp_path):
    path = write(tmp_path, "latin1.csv", "item_id,title\n1,ok\n2,Caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        store.ingest(path, "items")


def test_missing_path(store, tmp_path):
    before = snapshot(store)
    with pytest.raises(InputError, match=r"nope\.csv: no such file"):
        store.ingest(tmp_path / "nope.csv", "items")
    assert snapshot(store) == before


def test_keep_rejects_loads_good_rows(store, tmp_path):
    path = write(
        tmp_path, "mixed.csv", "user,item,rating,ts\nu3,1,5,100\nu3,99,4,100\nu3,2,x,100\nu3,3,1,400\n"
    )
    report = store.ingest(path, "events", mapping=EVENT_MAP, keep_rejects=True, event="rating")
    assert (report.rows, report.rejected) == (2, 2)
    assert store.count("events") == 8
    rejects = store.con.execute('SELECT "row", "column" FROM rejects ORDER BY "row"').fetchall()
    assert rejects == [(2, "item"), (3, "rating")]


def test_jsonl_and_parquet_readers(tmp_path):
    s = Store(":memory:")
    lines = [
        {"_id": "d1", "title": "T", "text": "body", "categories": ["a", "b"]},
        {"_id": "d2", "title": "U", "text": "x"},
    ]
    path = write(tmp_path, "c.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n")
    s.ingest(path, "items", mapping={"item_id": "_id", "body": "text"})
    assert s.items(["d1"])[0]["categories"] == ["a", "b"]
    s.con.execute(
        f"COPY (SELECT 'u1' AS user_id, 'd1' AS item_id, TIMESTAMP '2020-01-01' AS ts) TO '{tmp_path / 'e.parquet'}'"
    )
    s.ingest(tmp_path / "e.parquet", "events")
    assert s.count("events") == 1


def test_leave_last_out_split_never_leaks(store):
    counts = store.split(SplitConfig(), RelevanceConfig())
    assert counts == {"test": 2, "valid": 2}
    assert store.targets("leave-last-out", "test") == {"u1": {"3": 2.0}, "u2": {"2": 3.0}}
    assert store.targets("leave-last-out", "valid") == {"u1": {"2": 1.0}, "u2": {"3": 1.0}}
    hist = store.histories(["u1", "u2"], cutoffs=store.cutoffs("leave-last-out", "test"))
    assert hist == {"u1": ["2", "1"], "u2": ["3", "1"]}
    hist = store.histories(["u1"], cutoffs=store.cutoffs("leave-last-out", "valid"))
    assert hist == {"u1": ["1"]}
    train = store.train_events("leave-last-out", RelevanceConfig())
    assert [(u, i) for u, i, *_ in train] == [("u1", "1"), ("u2", "1")]


def test_ratio_split_by_time(store):
    counts = store.split(SplitConfig(strategy="ratio", ratios=(0.5, 0.25, 0.25)), RelevanceConfig(), name="r")
    assert sum(counts.values()) >= 2
    # everything held out is later than everything trained on
    train_max = max(ts for *_, ts, _ in store.train_events("r", RelevanceConfig()))
    held_min = store.con.execute("SELECT min(cutoff_ts) FROM splits WHERE split = 'r'").fetchone()[0]
    assert train_max <= held_min


def test_ratio_split_by_time_keeps_users_below_min_events_in_train(store):
    store.split(SplitConfig(strategy="ratio", ratios=(0.5, 0.25, 0.25)), RelevanceConfig(), name="r")
    held = {u for part in ("valid", "test") for u in store.targets("r", part)}
    events = dict(store.con.execute("SELECT user_id, count(*) FROM events GROUP BY 1").fetchall())
    assert held and all(events[u] >= 3 for u in held)
    strict = SplitConfig(strategy="ratio", ratios=(0.5, 0.25, 0.25), min_events=max(events.values()) + 1)
    assert store.split(strict, RelevanceConfig(), name="r2") == {}


def test_given_split_needs_judgments(store):
    with pytest.raises(NotFoundError, match="judgments"):
        store.split(SplitConfig(strategy="given"), RelevanceConfig())


def test_results_roundtrip(store):
    run = store.new_run("test", Config().to_dict())
    n = store.write_results(run, "recall", {"u1": [("1", 0.9), ("2", 0.5)], "u2": [("3", 0.1)]})
    assert n == 3
    rows = store.con.execute("SELECT request_id, item_id, rank FROM results ORDER BY 1, 3").fetchall()
    assert rows == [("u1", "1", 1), ("u1", "2", 2), ("u2", "3", 1)]


@pytest.mark.slow
def test_real_datasets_row_counts(tmp_path):
    from twostage.datasets import load_beir, load_movielens

    if not SHARED_DATA.exists():
        pytest.skip("shared data not present")
    s = Store(tmp_path / "real.duckdb")
    load_movielens(s, SHARED_DATA / "ml-latest-small")
    assert s.count("items") == 9742
    assert s.count("events") == 100836
    assert s.stats()["users"] == 610
    b = Store(tmp_path / "beir.duckdb")
    load_beir(b, SHARED_DATA / "scifact")
    assert b.count("items") == 5183
    assert b.count("queries") == 1109
    parts = dict(b.con.execute("SELECT part, count(*) FROM judgments GROUP BY 1").fetchall())
    assert parts == {"test": 339, "train": 919}
    assert (
        b.con.execute("SELECT count(DISTINCT query_id) FROM judgments WHERE part = 'test'").fetchone()[0]
        == 300
    )


def test_full_ratings_ingest_is_fast(tmp_path):
    import time

    if not SHARED_DATA.exists():
        pytest.skip("shared data not present")
    s = Store(tmp_path / "t.duckdb")
    ml = SHARED_DATA / "ml-latest-small"
    s.ingest(ml / "movies.csv", "items", mapping={"item_id": "movieId"})
    started = time.perf_counter()
    s.ingest(
        ml / "ratings.csv",
        "events",
        mapping={"user_id": "userId", "item_id": "movieId", "value": "rating", "ts": "timestamp"},
    )
    assert time.perf_counter() - started < 10
    assert s.count("events") == 100836


def test_a_store_held_by_another_process_is_named_with_its_pid(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "held.duckdb"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import duckdb, sys; c = duckdb.connect({str(path)!r}); print('ok', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ok"
        with pytest.raises(TwostageError, match=rf"open in another process \(PID {holder.pid}\)"):
            Store(path)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def _scanned(store: Store, users, cutoffs=None) -> dict[str, list[str]]:
    """Histories read from every event (the path a store without a current histories table takes)."""
    store._histories_current = False
    try:
        return store.histories(users, cutoffs=cutoffs)
    finally:
        store._histories_current = None


def test_histories_table_follows_ingest_sql_and_cutoffs(store, tmp_path):
    """The per-user histories table gives what a scan of the events gives, after an ingest (only the users
    with new events rebuilt), an `sql --write` change, at cut-offs, for one user and for many."""
    users = ["u1", "u2", "u3", "nobody"]
    assert store.histories(["u1"]) == {"u1": ["3", "2", "1"]}  # the one-user key lookup
    assert store.histories(users) == _scanned(store, users)
    store.ingest(
        write(tmp_path, "more.csv", "user,item,ts\nu2,1,300\nu3,2,50\n"), "events", mapping=CLICK_MAP
    )
    assert store.histories(["u2"]) == {"u2": ["1", "2", "3", "1"]}
    assert store.histories(users) == _scanned(store, users)
    assert store.con.execute("SELECT count(*) FROM histories").fetchone()[0] == 3
    # a cut-off is strict on (ts, seq): u2's event at 260 and everything after are left out
    ts, seq = store.con.execute(
        "SELECT ts, seq FROM events WHERE user_id = 'u2' AND item_id = '2'"
    ).fetchone()
    cut = {"u2": (ts, seq), "u1": (ts, seq)}
    assert store.histories(["u2"], cutoffs=cut) == {"u2": ["3", "1"]}
    assert store.histories(users, cutoffs=cut) == _scanned(store, users, cut) != store.histories(users)
    assert store.histories(["u1", "u2"], limit=1) == {"u1": ["3"], "u2": ["1"]}
    store.sql("DELETE FROM events WHERE user_id = 'u1' AND item_id = '3'", write=True)
    assert store.histories(["u1"]) == {"u1": ["2", "1"]} == _scanned(store, ["u1"])


def test_a_store_from_before_the_histories_table_gets_it_on_open(store, tmp_path):
    path = store.path
    store.con.execute("DROP TABLE histories")
    store.con.execute("DROP TABLE derived_from")
    store.close()
    with Store(path, read_only=True) as old:  # read-only: no table to use, the events are scanned
        assert old.histories(["u1", "u2"]) == {"u1": ["3", "2", "1"], "u2": ["2", "3", "1"]}
    with Store(path) as opened:
        assert opened.con.execute("SELECT count(*) FROM histories").fetchone()[0] == 2
        assert opened.histories(["u2"]) == {"u2": ["2", "3", "1"]}


def test_a_dropped_histories_table_is_built_again(store):
    store.sql("DROP TABLE histories", write=True)  # not a core table: derived from the events
    path = store.path
    store.close()
    with Store(path) as opened:
        assert opened.histories(["u1"]) == {"u1": ["3", "2", "1"]}
        assert opened.con.execute("SELECT count(*) FROM histories").fetchone()[0] == 2


def test_targets_and_cutoffs_of_the_requests_asked_only(store):
    store.split(SplitConfig(min_events=3), RelevanceConfig())
    every = store.targets("leave-last-out", "test")
    assert sorted(every) == ["u1", "u2"]
    assert store.targets("leave-last-out", "test", limit=1) == {"u1": every["u1"]}
    both = store.cutoffs("leave-last-out", "test")
    assert store.cutoffs("leave-last-out", "test", ["u2"]) == {"u2": both["u2"]}
    assert store.cutoffs("leave-last-out", "test", []) == {}
    assert store.user_count() == 2


def test_a_directory_of_parquet_partitions_loads_in_one_transaction(store, tmp_path):
    """A partitioned export (Hive-style key=value directories) is read in place, file by file, all or
    nothing; the partition key is a column; a bad row is named by its own file and row."""
    import duckdb

    root = tmp_path / "events"
    for event, rows in {"click": "('u1', '2', 400), ('u3', '1', 500)", "view": "('u3', '3', 600)"}.items():
        (root / f"event={event}").mkdir(parents=True)
        target = root / f"event={event}" / "part-0.parquet"
        duckdb.sql(f"COPY (SELECT * FROM (VALUES {rows}) t(user, item, ts)) TO '{target}' (FORMAT parquet)")
    report = store.ingest(root, "events", mapping=CLICK_MAP)
    assert (report.rows, report.file) == (3, str(root))
    assert store.histories(["u3"]) == {"u3": ["3", "1"]}
    assert store.con.execute("SELECT event, count(*) FROM events GROUP BY 1 ORDER BY 1").fetchall() == [
        ("click", 2),
        ("rating", 6),
        ("view", 1),
    ]
    before = snapshot(store)
    (root / "event=zbad").mkdir()
    bad = root / "event=zbad" / "part-0.parquet"
    duckdb.sql(
        f"COPY (SELECT * FROM (VALUES ('u1', '1', 700), ('u2', 'nope', 800)) t(user, item, ts)) TO '{bad}' (FORMAT parquet)"
    )
    with pytest.raises(InputError) as failed:
        store.ingest(root, "events", mapping=CLICK_MAP)
    assert str(failed.value).startswith(f"{bad}:row 2:item:")
    assert snapshot(store) == before  # the good files of the same load are not kept either
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="directory without Parquet files"):
        store.ingest(tmp_path / "empty", "events")


def test_histories_follow_an_sql_update_that_keeps_the_event_count(store):
    store.sql("UPDATE events SET item_id = '1' WHERE user_id = 'u1' AND item_id = '3'", write=True)
    assert store.histories(["u1"]) == {"u1": ["1", "2", "1"]} == _scanned(store, ["u1"])
    store.sql("DROP TABLE histories", write=True)
    assert store.histories(["u1", "u2"]) == _scanned(store, ["u1", "u2"])  # the events are read instead
