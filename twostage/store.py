"""The DuckDB store: one file per project holding the behaviour logs, splits, runs, results and metrics.

:class:`Store` owns the connection (explicit, UTC) and the schema, and is the one object the stages talk to.
It is shared by threads: every read runs on a cursor of its own (DuckDB connections are not re-entrant) and
every write in :meth:`Store.transaction`.
The two larger jobs it offers have their own modules, so each stays one concept: :mod:`twostage.ingest`
(files → tables, one transaction, errors naming file, row and column) and :mod:`twostage.splits`
(held-out parts and their cut-offs). ``IngestReport``, ``KINDS`` and ``grade_expression`` are re-exported
from them. Every value is a ``?`` parameter.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twostage import ingest, splits
from twostage.errors import NotFoundError, TwostageError
from twostage.ingest import KINDS, IngestReport
from twostage.splits import grade_expression

if TYPE_CHECKING:
    import duckdb

    from twostage.config import RelevanceConfig, SplitConfig

# Ingestion and split names are re-exported from twostage.ingest and twostage.splits for existing callers.
__all__ = ["KINDS", "SCHEMA", "IngestReport", "Store", "grade_expression"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS items(
    item_id VARCHAR PRIMARY KEY, title VARCHAR, body VARCHAR, categories VARCHAR[], attrs JSON,
    updated_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS events(
    user_id VARCHAR NOT NULL, item_id VARCHAR NOT NULL, event VARCHAR NOT NULL, value DOUBLE,
    ts TIMESTAMP NOT NULL, seq BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS queries(query_id VARCHAR PRIMARY KEY, text VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS judgments(
    query_id VARCHAR NOT NULL, item_id VARCHAR NOT NULL, relevance DOUBLE NOT NULL, part VARCHAR NOT NULL,
    PRIMARY KEY (query_id, item_id, part));
CREATE TABLE IF NOT EXISTS splits(
    split VARCHAR NOT NULL, part VARCHAR NOT NULL, request_kind VARCHAR NOT NULL, request_id VARCHAR NOT NULL,
    item_id VARCHAR NOT NULL, relevance DOUBLE NOT NULL, cutoff_ts TIMESTAMP, cutoff_seq BIGINT);
CREATE TABLE IF NOT EXISTS split_info(
    split VARCHAR PRIMARY KEY, strategy VARCHAR, config JSON, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS runs(
    run_id VARCHAR PRIMARY KEY, kind VARCHAR, config JSON, model_fingerprint VARCHAR, created_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS results(
    run_id VARCHAR NOT NULL, request_id VARCHAR NOT NULL, item_id VARCHAR NOT NULL, stage VARCHAR NOT NULL,
    rank INTEGER NOT NULL, score DOUBLE);
CREATE TABLE IF NOT EXISTS metrics(
    run_id VARCHAR NOT NULL, stage VARCHAR NOT NULL, metric VARCHAR NOT NULL, k INTEGER, value DOUBLE);
CREATE TABLE IF NOT EXISTS request_metrics(
    run_id VARCHAR NOT NULL, stage VARCHAR NOT NULL, request_id VARCHAR NOT NULL, metric VARCHAR NOT NULL,
    k INTEGER, value DOUBLE);
CREATE TABLE IF NOT EXISTS rejects(
    kind VARCHAR, file VARCHAR, "row" BIGINT, "column" VARCHAR, reason VARCHAR, ingested_at TIMESTAMP);
CREATE TABLE IF NOT EXISTS histories(
    user_id VARCHAR PRIMARY KEY, item_ids VARCHAR[] NOT NULL, ts TIMESTAMP[] NOT NULL, seq BIGINT[] NOT NULL);
CREATE TABLE IF NOT EXISTS derived_from(
    name VARCHAR PRIMARY KEY, events_rows BIGINT NOT NULL, events_seq BIGINT NOT NULL);
"""

# The tables of the first release: a store that has tables but lacks one of these lost it (Store refuses to
# open it). Tables added to SCHEMA later are not listed, so opening an older store creates them.
CORE_TABLES = (
    "items",
    "events",
    "queries",
    "judgments",
    "splits",
    "split_info",
    "runs",
    "results",
    "metrics",
    "request_metrics",
)

# Each user's earliest held-out (ts, seq) in a split (bind the split name): events before it are train-side.
USER_CUTOFFS = """
    SELECT request_id AS user_id, min_by(cutoff_ts, (cutoff_ts, cutoff_seq)) AS cts,
           min_by(cutoff_seq, (cutoff_ts, cutoff_seq)) AS cseq
    FROM splits WHERE split = ? AND request_kind = 'user' GROUP BY 1
"""


# Every event of the users in _users, per user newest first: what the ``histories`` table holds.
# One ordered list of (item, ts, seq) per user, split into three lists: one sort per user, not three.
_USER_HISTORIES = """
    SELECT user_id, [e.i for e in log], [e.t for e in log], [e.s for e in log] FROM (
        SELECT user_id, list({{'i': item_id, 't': ts, 's': seq}} ORDER BY ts DESC, seq DESC) AS log
        FROM events WHERE {where} GROUP BY user_id)
"""


def events_version(con: duckdb.DuckDBPyConnection) -> tuple[int, int]:
    """(rows, latest seq) of the events table: ``seq`` only grows, so together they change with any write
    (DuckDB answers both from table statistics, in about a millisecond at 10M events)."""
    ((rows, seq),) = con.execute("SELECT count(*), coalesce(max(seq), 0) FROM events").fetchall()
    return int(rows), int(seq)


def refresh_histories(
    con: duckdb.DuckDBPyConnection, *, users: str | None = None, before: tuple[int, int] | None = None
) -> None:
    """Bring the ``histories`` table (each user's events newest first, one row per user: a lookup by key
    instead of a scan of every event) up to date with the events table, over ``con`` inside a transaction.

    An ingest passes ``users`` (a table with a ``user_id`` column: the only users who gained events) and
    ``before`` (:func:`events_version` before it inserted): when the table matched ``before``, only those
    users' rows are rebuilt. Otherwise every row is (one pass over the events).
    """
    done = _histories_version(con)
    now = events_version(con)
    if done == now:
        return
    if users is not None and done is not None and done == before:
        con.execute(f"DELETE FROM histories WHERE user_id IN (SELECT user_id FROM {users})")
        where = f"user_id IN (SELECT user_id FROM {users})"
    else:
        con.execute("DELETE FROM histories")
        where = "true"
    con.execute("INSERT INTO histories " + _USER_HISTORIES.format(where=where))
    con.execute("INSERT OR REPLACE INTO derived_from VALUES ('histories', ?, ?)", list(now))


# Users' items before their cut-offs (NULL: all), newest first, from ``{users}`` (user_id, cts, cseq): read
# from the histories table (one row per user), or from every event when that table is not current.
_CUT_HISTORIES = """
    SELECT u.user_id, CASE WHEN u.cts IS NULL THEN h.item_ids
                           ELSE [x[1] for x in list_zip(h.item_ids, h.ts, h.seq) if (x[2], x[3]) < (u.cts, u.cseq)] END
    FROM {users} u JOIN histories h ON h.user_id = u.user_id
"""
_ONE_HISTORY = """
    SELECT user_id, CASE WHEN ?::TIMESTAMP IS NULL THEN item_ids
                         ELSE [x[1] for x in list_zip(item_ids, ts, seq) if (x[2], x[3]) < (?::TIMESTAMP, ?::BIGINT)] END
    FROM histories WHERE user_id = ?
"""
_CUT_EVENTS = """
    SELECT u.user_id, list(e.item_id ORDER BY e.ts DESC, e.seq DESC)
    FROM {users} u JOIN events e ON e.user_id = u.user_id
    WHERE u.cts IS NULL OR (e.ts, e.seq) < (u.cts, u.cseq)
    GROUP BY u.user_id
"""


def histories_current(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether the ``histories`` table matches the events (a read-only store may hold a stale one)."""
    import duckdb

    try:
        done = _histories_version(con)
    except duckdb.CatalogException:  # a read-only store from before the table existed
        return False
    return done is not None and done == events_version(con)


def _histories_version(con: duckdb.DuckDBPyConnection) -> tuple[int, int] | None:
    """The :func:`events_version` the histories table was built at (None: never built)."""
    rows = con.execute("SELECT events_rows, events_seq FROM derived_from WHERE name = 'histories'").fetchall()
    return (int(rows[0][0]), int(rows[0][1])) if rows else None


_LOCK_HOLDER = re.compile(r"Conflicting lock is held in .*\(PID (\d+)\)")


class Store:
    """One DuckDB database file per project.

    Example:
        >>> store = Store(":memory:")
        >>> store.count("items")
        0
    """

    def __init__(self, path: str | Path, *, read_only: bool = False, external_access: bool = True):
        """Open (or create) the store. ``external_access=False`` switches DuckDB's ``enable_external_access``
        off for this connection's database: no file, URL, other database or extension outside the store can
        be reached (what ``twostage sql`` opens). DuckDB cannot switch it back on, nor open the same file with
        another configuration in the same process while this connection is open.

        Raises:
            TwostageError: the file is locked by another process, or a core table is missing.
        """
        import duckdb

        self.path = str(path)
        config = {} if external_access else {"enable_external_access": False}
        try:
            self.con: duckdb.DuckDBPyConnection = duckdb.connect(
                self.path, read_only=read_only, config=config
            )
        except duckdb.Error as e:
            if held := _LOCK_HOLDER.search(str(e)):
                raise TwostageError(
                    f"{self.path}: the project is open in another process (PID {held.group(1)}); one process "
                    "at a time can use a project: wait for it to finish or stop it"
                ) from e
            raise TwostageError(f"{self.path}: cannot open the store: {e}") from e
        self.con.execute("SET TimeZone = 'UTC'")
        had = self._require_core_tables()
        self._histories_current: bool | None = None  # known once asked; forgotten by this store's writes
        if not read_only:
            self.con.execute(SCHEMA)
            if "histories" not in had:  # created now (or again, after a DROP): nothing in it yet
                self.con.execute("DELETE FROM derived_from WHERE name = 'histories'")
            # a store from before the table, or from before events changed
            with self.transaction() as cur:
                refresh_histories(cur)

    def _require_core_tables(self) -> set[str]:
        """A store with tables but not every core one lost some (e.g. ``DROP TABLE``): re-creating them empty
        would silently lose the data, so that is an error. A new database (no tables) gets the schema; tables
        added to SCHEMA after the first release are not core, so older stores get them created."""
        have = {
            r[0]
            for r in self.con.execute(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
                "AND schema_name = 'main'"
            ).fetchall()
        }
        missing = [t for t in CORE_TABLES if t not in have]
        if have and missing:
            self.con.close()
            names = ", ".join(f"'{t}'" for t in missing)
            what = f"table {names} is" if len(missing) == 1 else f"tables {names} are"
            raise TwostageError(
                f"{self.path}: {what} missing (dropped?); restore the store from a backup or re-ingest into "
                "a new project"
            )
        return have

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A cursor of one's own: DuckDB connections are not shared across threads, cursors are cheap."""
        return self.con.cursor()

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """Every row of one read, on a cursor of its own (so reads from many threads never interleave)."""
        with self.con.cursor() as cur:
            return cur.execute(sql, list(params)).fetchall()

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor inside BEGIN … COMMIT: every write of the block lands, or (on any exception) none does.

        The cursor is closed afterwards, so temporary tables made inside go with it.
        """
        with self.con.cursor() as cur:
            cur.execute("BEGIN TRANSACTION")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    # ------------------------------------------------------------------ ingestion
    def ingest(
        self,
        path: str | Path,
        kind: str,
        *,
        mapping: Mapping[str, str] | None = None,
        keep_rejects: bool = False,
        event: str = "interaction",
        part: str = "test",
        category_separator: str = "|",
        future_seconds: float | None = None,
    ) -> IngestReport:
        """Load one file of ``kind`` (items, events, queries, judgments) in one transaction.

        Args:
            path: CSV/TSV (header row), Parquet or JSONL file; or a directory of Parquet files (a partitioned
                export, e.g. ``events/date=…/part-0.parquet``), each read in place by DuckDB, all loaded in
                the one transaction (a bad row anywhere loads none, and is named by its file and row).
            kind: which table the rows go to.
            mapping: target column → column in the file, e.g. ``{"item_id": "movieId"}``.
            keep_rejects: put invalid rows in the ``rejects`` table and load the rest, instead of failing.
            event: event type for files without an ``event`` column (e.g. ``rating``).
            part: split part for judgments without a ``part`` column (e.g. ``train``, ``test``).
            category_separator: splits a text ``categories`` column into a list.
            future_seconds: how far past now an event's ``ts`` may lie (``[ingest] future_seconds``; None:
                that key's default).

        Raises:
            InputError: naming file, row and column; the store is left exactly as it was.
        """
        self._histories_current = None
        files = ingest.partition_files(Path(path)) if Path(path).is_dir() else [path]
        with self.transaction() as cur:
            before = events_version(cur)
            reports = [
                ingest.ingest_file(
                    cur,
                    file,
                    kind,
                    mapping=mapping,
                    keep_rejects=keep_rejects,
                    event=event,
                    part=part,
                    category_separator=category_separator,
                    future_seconds=future_seconds,
                )
                for file in files
            ]
            report = reports[0] if len(reports) == 1 else ingest.IngestReport.combined(str(path), reports)
            if kind == "events":  # new events have seq past the old latest: only their users change
                cur.execute(
                    "CREATE TEMP TABLE _touched AS SELECT DISTINCT user_id FROM events WHERE seq > ?",
                    [before[1]],
                )
                refresh_histories(cur, users="_touched", before=before)
                cur.execute("DROP TABLE _touched")
            return report

    def attach_tags(self, path: str | Path, *, item_column: str, tag_column: str, top: int = 5) -> int:
        """Put each item's most frequent free-text tags into ``attrs.tags`` (MovieLens ``tags.csv``).

        Tags describe items, so they enrich item text instead of counting as interactions.
        Returns the number of items that got tags.
        """
        with self.transaction() as cur:
            return ingest.attach_tags(cur, path, item_column=item_column, tag_column=tag_column, top=top)

    # ------------------------------------------------------------------ inspection
    def checkpoint(self) -> None:
        """Write the WAL into the database file, so a copy of the file alone holds every committed row."""
        with self.con.cursor() as cur:
            cur.execute("CHECKPOINT")

    def count(self, table: str) -> int:
        if table not in _TABLES:
            raise NotFoundError(f"no table '{table}'")
        return self._rows(f"SELECT count(*) FROM {table}")[0][0]

    def stats(self) -> dict[str, Any]:
        """Row counts, users, splits and runs: what ``twostage stats`` shows."""
        out: dict[str, Any] = {
            t: self.count(t) for t in ("items", "events", "queries", "judgments", "rejects")
        }
        out["users"] = self.user_count()
        out["event_types"] = dict(self._rows("SELECT event, count(*) FROM events GROUP BY 1 ORDER BY 1"))
        span = self._rows("SELECT min(ts), max(ts) FROM events")[0]
        out["time_span"] = [str(s) if s else None for s in span]
        out["splits"] = {
            f"{s}/{p}": n
            for s, p, n in self._rows(
                "SELECT split, part, count(DISTINCT request_id) FROM splits GROUP BY 1, 2 ORDER BY 1, 2"
            )
        }
        out["runs"] = self.count("runs")
        return out

    def sql(
        self, query: str, params: Sequence[Any] | None = None, *, write: bool = False
    ) -> tuple[list[str], list[tuple]]:
        """Run one statement of a user's SQL (``twostage sql``): column names and rows.

        DuckDB's parser counts the statements and reports their type. Reads only, unless ``write``: a
        statement of another type is refused, and the read runs in a read-only transaction (which also stops
        ``EXPLAIN ANALYZE DELETE ...``). Statements reaching outside the store (ATTACH, COPY, EXPORT,
        INSTALL/LOAD) or the connection's state (SET, transactions, PREPARE) are refused even with
        ``write``. Reading files with table functions (``read_csv('/any/file')``) can only be stopped by
        DuckDB's ``enable_external_access``, which is per database and permanent: open the store with
        ``external_access=False`` for that (the CLI does).

        Raises:
            TwostageError: one line, naming the refusal or DuckDB's error.
        """
        import duckdb

        try:
            statements = self.con.extract_statements(query)
        except duckdb.Error as e:
            raise TwostageError(f"SQL error: {str(e).splitlines()[0]}") from e
        if len(statements) != 1:
            hint = " (separate them into calls)" if statements else " (the query is empty)"
            raise TwostageError(f"sql runs one statement; found {len(statements)}{hint}")
        _check_statement(statements[0], write=write)
        try:
            with self.con.cursor() as cur:
                if not write:
                    cur.execute("BEGIN TRANSACTION READ ONLY")
                cur.execute(query, params or [])
                names = [d[0] for d in cur.description] if cur.description else []
                rows = cur.fetchall() if cur.description else []
                if not write:
                    cur.execute("ROLLBACK")
            if write:  # the statement may have changed events: an UPDATE keeps their count and latest seq
                self._rebuild_histories()
            return names, rows
        except duckdb.Error as e:
            if not write and "read-only mode" in str(e):
                raise TwostageError(
                    "sql is read-only: this statement writes to the store; it needs --write"
                ) from e
            raise TwostageError(f"SQL error: {str(e).splitlines()[0]}") from e

    # ------------------------------------------------------------------ splits
    def split(
        self, config: SplitConfig, relevance: RelevanceConfig, *, name: str | None = None
    ) -> dict[str, int]:
        """Divide events (recommendation) or judgments (search) into train / valid / test; replaces ``name``.

        Returns the number of requests in each held-out part.
        """
        with self.transaction() as cur:
            return splits.write_split(cur, config, relevance, name=name)

    def split_names(self) -> list[str]:
        return [r[0] for r in self._rows("SELECT split FROM split_info ORDER BY split")]

    def require_split(self, name: str) -> str:
        """The split's request kind ('user' or 'query'), or NotFoundError naming the splits that exist."""
        row = self._rows("SELECT any_value(request_kind) FROM splits WHERE split = ?", [name])[0]
        if row[0] is None:
            have = ", ".join(self.split_names()) or "none"
            raise NotFoundError(f"no split '{name}' (splits: {have}); run 'twostage split' first")
        return row[0]

    # ------------------------------------------------------------------ runs and results
    def new_run(self, kind: str, config: Mapping[str, Any], model_fingerprint: str | None = None) -> str:
        """Record a run with its resolved config; returns its id."""
        run_id = f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        with self.transaction() as cur:
            cur.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, now()::TIMESTAMP)",
                [run_id, kind, json.dumps(config, sort_keys=True, default=str), model_fingerprint],
            )
        return run_id

    def write_results(
        self, run_id: str, stage: str, rankings: Mapping[str, Sequence[tuple[str, float]]]
    ) -> int:
        """Store ranked lists ``{request_id: [(item_id, score), ...]}`` (rank is 1-based list order)."""
        import pyarrow as pa

        req, items, ranks, scores = [], [], [], []
        for request_id, hits in rankings.items():
            for rank, (item_id, score) in enumerate(hits, start=1):
                req.append(str(request_id))
                items.append(str(item_id))
                ranks.append(rank)
                scores.append(float(score))
        table = pa.table(
            {
                "run_id": pa.array([run_id] * len(req), pa.string()),
                "request_id": pa.array(req, pa.string()),
                "item_id": pa.array(items, pa.string()),
                "stage": pa.array([stage] * len(req), pa.string()),
                "rank": pa.array(ranks, pa.int32()),
                "score": pa.array(scores, pa.float64()),
            }
        )
        with self.transaction() as cur:
            cur.register("_results_batch", table)
            cur.execute("INSERT INTO results SELECT * FROM _results_batch")
        return len(req)

    # ------------------------------------------------------------------ reads used by the stages
    def items(self, item_ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Items as dicts (item_id, title, body, categories, attrs), in item_id order or the order asked."""
        cols = "item_id, title, body, categories, attrs"
        if item_ids is None:
            rows = self._rows(f"SELECT {cols} FROM items ORDER BY item_id")
        else:
            wanted = list(item_ids)
            rows = self._rows(
                f"SELECT {cols} FROM items WHERE item_id IN (SELECT unnest(?::VARCHAR[]))", [wanted]
            )
            order = {i: n for n, i in enumerate(wanted)}
            rows.sort(key=lambda r: order[r[0]])
        return [
            {
                "item_id": r[0],
                "title": r[1],
                "body": r[2],
                "categories": r[3] or [],
                "attrs": json.loads(r[4]) if r[4] else {},
            }
            for r in rows
        ]

    def targets(self, split: str, part: str, *, limit: int | None = None) -> dict[str, dict[str, float]]:
        """Held-out relevance per request: ``{request_id: {item_id: grade}}``; with ``limit``, of the first
        ``limit`` requests by id only (what an evaluation of that many reads)."""
        rows = self._rows(
            """
            WITH asked AS (
                SELECT DISTINCT request_id FROM splits WHERE split = ? AND part = ? ORDER BY 1 LIMIT ?)
            SELECT request_id, item_id, max(relevance) FROM splits JOIN asked USING (request_id)
            WHERE split = ? AND part = ? GROUP BY 1, 2
            """,
            [split, part, limit, split, part],
        )
        out: dict[str, dict[str, float]] = {}
        for request_id, item_id, rel in rows:
            out.setdefault(request_id, {})[item_id] = rel
        return out

    def cutoffs(
        self, split: str, part: str, user_ids: Sequence[str] | None = None
    ) -> dict[str, tuple[Any, int]]:
        """Per user (of ``user_ids``, or all): the (ts, seq) before which their history may be used for this part."""
        rows = self._rows(
            """
            SELECT request_id, min_by(cutoff_ts, (cutoff_ts, cutoff_seq)), min_by(cutoff_seq, (cutoff_ts, cutoff_seq))
            FROM splits WHERE split = ? AND part = ? AND (? OR request_id IN (SELECT unnest(?::VARCHAR[])))
            GROUP BY 1
            """,
            [split, part, user_ids is None, list(user_ids or [])],
        )
        return {r[0]: (r[1], r[2]) for r in rows}

    def histories(
        self,
        user_ids: Sequence[str],
        *,
        cutoffs: Mapping[str, tuple[Any, int]] | None = None,
        limit: int | None = None,
    ) -> dict[str, list[str]]:
        """Each user's items before their cut-off, newest first (all their events without one).

        The cut-off is strict on (ts, seq), so the held-out event and everything after it never leak.
        """
        import pyarrow as pa

        cut = cutoffs or {}
        out: dict[str, list[str]] = {u: [] for u in user_ids}
        with self.con.cursor() as cur:
            current = self._reads_histories(cur)
            if len(out) == 1 and current:
                # one user (a served request): a lookup by the table's key, no table to register
                user = next(iter(out))
                cts, cseq = cut.get(user, (None, None))
                rows = cur.execute(_ONE_HISTORY, [cts, cts, cseq, user]).fetchall()
            else:
                table = pa.table(
                    {
                        "user_id": pa.array(list(out), pa.string()),
                        "cts": pa.array([cut.get(u, (None, None))[0] for u in out], pa.timestamp("us")),
                        "cseq": pa.array([cut.get(u, (None, None))[1] for u in out], pa.int64()),
                    }
                )
                cur.register("_users", table)
                sql = _CUT_HISTORIES if current else _CUT_EVENTS
                rows = cur.execute(sql.format(users="_users")).fetchall()
                cur.unregister("_users")
        for user_id, items in rows:
            out[user_id] = items[:limit] if limit else items
        return out

    def _rebuild_histories(self) -> None:
        """Every histories row again (after a write that may have changed any event); if the events or the
        histories table are gone, the table is marked not built, so reads scan the events or the next open
        reports the missing core table."""
        import duckdb

        self._histories_current = None
        try:
            with self.transaction() as cur:
                cur.execute("DELETE FROM derived_from WHERE name = 'histories'")
                refresh_histories(cur)
        except duckdb.CatalogException:
            with contextlib.suppress(duckdb.Error):
                self.con.execute("DELETE FROM derived_from WHERE name = 'histories'")

    def _reads_histories(self, cur: duckdb.DuckDBPyConnection) -> bool:
        """Whether reads may use the histories table: it matches the events (asked once, until this store
        writes; a read-only store may hold a stale one, and no other process writes while this one is open)."""
        if self._histories_current is None:
            self._histories_current = histories_current(cur)
        return self._histories_current

    def user_count(self) -> int:
        """Users with events (one row each in the histories table, when it is current)."""
        with self.con.cursor() as cur:
            if self._reads_histories(cur):
                return int(cur.execute("SELECT count(*) FROM histories").fetchall()[0][0])
            return int(cur.execute("SELECT count(DISTINCT user_id) FROM events").fetchall()[0][0])

    def export_histories(self, path: str | Path) -> None:
        """Write every user's items, newest first, to a Parquet file (``user_id``, ``history``): what a published
        snapshot serves ``recommend`` from. DuckDB writes it in one streaming pass."""
        target = str(path).replace("'", "''")
        with self.con.cursor() as cur:
            if self._reads_histories(cur):
                source = "SELECT user_id, item_ids AS history FROM histories"
            else:
                source = "SELECT user_id, list(item_id ORDER BY ts DESC, seq DESC) AS history FROM events GROUP BY 1"
            cur.execute(f"COPY ({source} ORDER BY 1) TO '{target}' (FORMAT parquet)")

    def train_events(self, split: str, relevance: RelevanceConfig) -> list[tuple[str, str, float, Any, int]]:
        """Events usable for training under ``split``: before each user's earliest held-out cut-off.

        Returns (user_id, item_id, grade, ts, seq), oldest first per user.
        """
        grade_sql, params = grade_expression(relevance)
        return self._rows(
            f"""
            WITH cut AS ({USER_CUTOFFS})
            SELECT e.user_id, e.item_id, {grade_sql}, e.ts, e.seq
            FROM events e LEFT JOIN cut c ON c.user_id = e.user_id
            WHERE c.cts IS NULL OR (e.ts, e.seq) < (c.cts, c.cseq)
            ORDER BY e.user_id, e.ts, e.seq
            """,
            [split, *params],
        )

    def popularity(self, split: str | None = None) -> dict[str, int]:
        """Distinct users per item, counted only from training events when a split is given."""
        if split is None:
            rows = self._rows("SELECT item_id, count(DISTINCT user_id) FROM events GROUP BY 1")
        else:
            rows = self._rows(
                f"""
                WITH cut AS ({USER_CUTOFFS})
                SELECT e.item_id, count(DISTINCT e.user_id) FROM events e LEFT JOIN cut c USING (user_id)
                WHERE c.cts IS NULL OR (e.ts, e.seq) < (c.cts, c.cseq) GROUP BY 1
                """,
                [split],
            )
        return dict(rows)

    def query_texts(self, query_ids: Iterable[str] | None = None) -> dict[str, str]:
        if query_ids is None:
            return dict(self._rows("SELECT query_id, text FROM queries"))
        return dict(
            self._rows(
                "SELECT query_id, text FROM queries WHERE query_id IN (SELECT unnest(?::VARCHAR[]))",
                [list(query_ids)],
            )
        )


# what `twostage sql` runs without --write: statement types that only read, and PRAGMAs that only show
_READ_STATEMENTS = {"SELECT", "EXPLAIN", "PRAGMA"}
_READ_PRAGMAS = {
    "collations",
    "database_list",
    "database_size",
    "functions",
    "metadata_info",
    "platform",
    "show",
    "show_databases",
    "show_tables",
    "show_tables_expanded",
    "storage_info",
    "table_info",
    "user_agent",
    "version",
}
# refused even with --write: they reach files, databases or extensions outside the store ...
_OUTSIDE_STATEMENTS = {"ATTACH", "DETACH", "COPY", "COPY_DATABASE", "EXPORT", "LOAD"}
# ... or change the connection rather than the store
_SESSION_STATEMENTS = {"SET", "VARIABLE_SET", "TRANSACTION", "PREPARE", "EXECUTE"}
_PRAGMA_NAME = re.compile(r"\s*PRAGMA\s+(\w+)\s*(?:\(|;|$)", re.IGNORECASE)
_CREATE_SECRET = re.compile(r"\s*CREATE\s+(OR\s+REPLACE\s+)?(\w+\s+)?SECRET\b", re.IGNORECASE)


def _check_statement(statement: Any, *, write: bool) -> None:
    """Refuse, in one line, a statement ``Store.sql`` does not run (see there)."""
    kind = statement.type.name
    name = kind.replace("_", " ")
    if kind == "LOAD":  # INSTALL and LOAD are both LOAD statements
        name = "INSTALL" if re.match(r"\s*(FORCE\s+)?INSTALL\b", statement.query, re.IGNORECASE) else "LOAD"
    if kind == "CREATE" and _CREATE_SECRET.match(statement.query):  # secrets are kept in ~/.duckdb
        kind = name = "CREATE SECRET"
    if kind in _OUTSIDE_STATEMENTS or kind == "CREATE SECRET":
        raise TwostageError(
            f"sql does not run {name} statements, even with --write: they reach files, databases or "
            "extensions outside the project's store (load files with 'twostage ingest')"
        )
    if kind in _SESSION_STATEMENTS:
        raise TwostageError(
            f"sql does not run {name} statements, even with --write: each call is one statement, and settings, "
            "transactions and prepared statements belong to the connection, not the store"
        )
    if write:
        return
    if kind == "PRAGMA":
        pragma = _PRAGMA_NAME.match(statement.query)
        if not pragma or pragma.group(1).lower() not in _READ_PRAGMAS:
            raise TwostageError("sql is read-only: this PRAGMA is not one that only shows; it needs --write")
    elif kind not in _READ_STATEMENTS:
        raise TwostageError(f"sql is read-only: {name} statements need --write")


_TABLES = {*CORE_TABLES, "rejects"}
