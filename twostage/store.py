"""The DuckDB store: one file per project holding the behaviour logs, splits, runs, results and metrics.

Ingestion goes through DuckDB's own readers and is one transaction: a bad file changes nothing, and the
error names file, row and column. Every value is a ``?`` parameter; the only identifiers that reach SQL are
column names read from the file's own header, and they are quoted.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twostage.errors import InputError, NotFoundError, TwostageError

if TYPE_CHECKING:
    import duckdb

    from twostage.config import RelevanceConfig, SplitConfig

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
"""

KINDS = ("items", "events", "queries", "judgments")

# (target column, type, required). Types: id/text → VARCHAR, double, timestamp (epoch seconds or ISO), list.
_COLUMNS: dict[str, list[tuple[str, str, bool]]] = {
    "items": [
        ("item_id", "id", True),
        ("title", "text", False),
        ("body", "text", False),
        ("categories", "list", False),
    ],
    "events": [
        ("user_id", "id", True),
        ("item_id", "id", True),
        ("event", "text", False),
        ("value", "double", False),
        ("ts", "timestamp", True),
    ],
    "queries": [("query_id", "id", True), ("text", "text", True)],
    "judgments": [
        ("query_id", "id", True),
        ("item_id", "id", True),
        ("relevance", "double", False),
        ("part", "text", False),
    ],
}


@dataclass(frozen=True)
class IngestReport:
    """What one ingest did."""

    kind: str
    file: str
    rows: int
    rejected: int
    seconds: float


def _quote(name: str) -> str:
    """Quote a column name read from a file header (never user SQL) as a DuckDB identifier."""
    return '"' + name.replace('"', '""') + '"'


def _reader_sql(path: Path) -> str:
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix.lower() == ".gz" else path.suffix.lower()
    if suffix in (".csv", ".tsv", ".csv.gz", ".tsv.gz", ".txt"):
        return "read_csv(?, header = true, all_varchar = true)"
    if suffix in (".parquet", ".pq"):
        return "read_parquet(?)"
    if suffix in (".jsonl", ".json", ".ndjson", ".jsonl.gz"):
        return "read_json(?, format = 'auto')"
    raise InputError(
        f"unsupported file type '{path.suffix}'; use .csv, .tsv, .parquet or .jsonl", file=str(path)
    )


_LINE_RE = re.compile(r"Line: (\d+)")


def _reader_error(path: Path, error: Exception) -> InputError:
    """Turn a DuckDB reader failure into one line naming the file and, where DuckDB knows it, the row."""
    text = str(error)
    row = None
    if m := _LINE_RE.search(text):
        row = max(int(m.group(1)) - 1, 1)
    if "unicode" in text.lower() or "utf-8" in text.lower() or "utf8" in text.lower():
        reason = "not UTF-8 encoded; convert it to UTF-8 (e.g. iconv -t UTF-8)"
    else:
        first = next((ln for ln in text.splitlines() if ln.strip()), text)
        reason = f"cannot be read: {first.strip()}"
    return InputError(reason, file=str(path), row=row)


class Store:
    """One DuckDB database file per project.

    Example:
        >>> store = Store(":memory:")
        >>> store.count("items")
        0
    """

    def __init__(self, path: str | Path, *, read_only: bool = False):
        import duckdb

        self.path = str(path)
        try:
            self.con: duckdb.DuckDBPyConnection = duckdb.connect(self.path, read_only=read_only)
        except duckdb.Error as e:
            raise TwostageError(f"{self.path}: cannot open the store: {e}") from e
        self.con.execute("SET TimeZone = 'UTC'")
        if not read_only:
            self.con.execute(SCHEMA)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A cursor for another thread (DuckDB connections are not shared across threads)."""
        return self.con.cursor()

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
    ) -> IngestReport:
        """Load one file of ``kind`` (items, events, queries, judgments) in one transaction.

        Args:
            path: CSV/TSV (header row), Parquet or JSONL file.
            kind: which table the rows go to.
            mapping: target column → column in the file, e.g. ``{"item_id": "movieId"}``.
            keep_rejects: put invalid rows in the ``rejects`` table and load the rest, instead of failing.
            event: event type for files without an ``event`` column (e.g. ``rating``).
            part: split part for judgments without a ``part`` column (e.g. ``train``, ``test``).
            category_separator: splits a text ``categories`` column into a list.

        Raises:
            InputError: naming file, row and column; the store is left exactly as it was.
        """
        if kind not in KINDS:
            raise InputError(f"unknown kind '{kind}'; use one of {', '.join(KINDS)}")
        path = Path(path)
        if not path.exists():
            raise InputError("no such file", file=str(path))
        if path.is_dir():
            raise InputError("is a directory, expected a file", file=str(path))
        if path.stat().st_size == 0:
            raise InputError("file is empty", file=str(path))
        import duckdb

        started = time.perf_counter()
        reader = _reader_sql(path)
        con = self.con
        con.execute("BEGIN TRANSACTION")
        try:
            try:
                report = self._ingest_in_transaction(
                    path, kind, reader, dict(mapping or {}), keep_rejects, event, part, category_separator
                )
            except duckdb.Error as e:
                first = next((ln for ln in str(e).splitlines() if ln.strip()), str(e))
                raise InputError(f"cannot be loaded: {first.strip()}", file=str(path)) from e
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        finally:
            con.execute("DROP TABLE IF EXISTS _src")
            con.execute("DROP TABLE IF EXISTS _bad")
        return IngestReport(kind, str(path), report[0], report[1], time.perf_counter() - started)

    def _ingest_in_transaction(
        self,
        path: Path,
        kind: str,
        reader: str,
        mapping: dict[str, str],
        keep_rejects: bool,
        event: str,
        part: str,
        separator: str,
    ) -> tuple[int, int]:
        import duckdb

        con = self.con
        file = str(path)
        try:
            con.execute(f"CREATE TEMP TABLE _src AS SELECT * FROM {reader}", [file])
        except duckdb.Error as e:
            raise _reader_error(path, e) from e
        described = con.execute("DESCRIBE _src").fetchall()
        columns = {name: ctype for name, ctype, *_ in described}
        total = con.execute("SELECT count(*) FROM _src").fetchone()[0]
        if total == 0:
            raise InputError("file has no data rows", file=file)
        targets = _COLUMNS[kind]
        unknown = set(mapping) - {t for t, _, _ in targets}
        if unknown:
            raise InputError(
                f"--map names unknown column(s) {sorted(unknown)}; {kind} columns are "
                f"{', '.join(t for t, _, _ in targets)}",
                file=file,
            )
        lower = {c.lower(): c for c in columns}
        source: dict[str, str | None] = {}
        for target, _, required in targets:
            wanted = mapping.get(target, target)
            found = wanted if wanted in columns else lower.get(wanted.lower())
            if found is None and target in mapping:
                raise InputError(
                    f"mapped column '{wanted}' not in file (columns: {', '.join(columns)})",
                    file=file,
                    column=wanted,
                )
            if found is None and required:
                raise InputError(
                    f"required column missing (columns: {', '.join(columns)}); map one with --map {target}=COLUMN",
                    file=file,
                    column=target,
                )
            source[target] = found

        # Row numbers are 1-based data rows in file order (DuckDB keeps insertion order).
        exprs, checks = self._column_sql(kind, source, columns, event, part, separator)
        con.execute(
            "CREATE OR REPLACE TEMP TABLE _src AS SELECT rowid - (SELECT min(rowid) FROM _src) + 1 AS _row, * FROM _src"
        )
        con.execute(
            "CREATE TEMP TABLE _bad AS SELECT _row, col, reason FROM ("
            + " UNION ALL ".join(checks)
            + ") ORDER BY _row, col"
        )
        n_bad = con.execute("SELECT count(DISTINCT _row) FROM _bad").fetchone()[0]
        if n_bad and not keep_rejects:
            row, col, reason = con.execute(
                "SELECT _row, col, reason FROM _bad ORDER BY _row LIMIT 1"
            ).fetchone()
            more = f" ({n_bad} bad rows in all; --keep-rejects loads the rest)" if n_bad > 1 else ""
            raise InputError(reason + more, file=file, row=int(row), column=col)
        if n_bad:
            con.execute(
                "INSERT INTO rejects SELECT ?, ?, _row, col, reason, now()::TIMESTAMP FROM _bad", [kind, file]
            )
        select = ", ".join(f"{expr} AS {name}" for name, expr in exprs)
        good = "FROM _src WHERE _row NOT IN (SELECT _row FROM _bad)"
        if kind == "items":
            con.execute(f"INSERT OR REPLACE INTO items SELECT {select}, now()::TIMESTAMP {good}")
        elif kind == "events":
            base = con.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
            con.execute(f"INSERT INTO events SELECT {select}, ? + _row {good}", [base])
        elif kind == "queries":
            con.execute(f"INSERT OR REPLACE INTO queries SELECT {select} {good}")
        else:
            con.execute(f"INSERT OR REPLACE INTO judgments SELECT {select} {good}")
        return total - n_bad, n_bad

    def _column_sql(
        self,
        kind: str,
        source: Mapping[str, str | None],
        columns: Mapping[str, str],
        event: str,
        part: str,
        separator: str,
    ) -> tuple[list[tuple[str, str]], list[str]]:
        """SQL expressions producing each target column, and the checks that find bad rows."""
        exprs: list[tuple[str, str]] = []
        checks: list[str] = []
        defaults = {"event": event, "part": part}
        lit = _literal
        for target, ctype, required in _COLUMNS[kind]:
            src = source[target]
            label = lit(src or target)
            if src is None:
                if target in defaults:
                    exprs.append((target, lit(defaults[target])))
                elif target == "relevance":
                    exprs.append((target, "1.0"))
                else:
                    exprs.append((target, "NULL"))
                continue
            q = _quote(src)
            as_text = f"trim(CAST({q} AS VARCHAR))"
            if required:
                checks.append(
                    f"SELECT _row, {label} AS col, 'missing value' AS reason FROM _src WHERE {q} IS NULL OR {as_text} = ''"
                )
            if target in defaults:
                exprs.append((target, f"coalesce(nullif({as_text}, ''), {lit(defaults[target])})"))
            elif ctype in ("id", "text"):
                exprs.append((target, as_text if ctype == "id" else f"CAST({q} AS VARCHAR)"))
            elif ctype == "double":
                fallback = "1.0" if target == "relevance" else "NULL"
                exprs.append((target, f"coalesce(TRY_CAST({q} AS DOUBLE), {fallback})"))
                checks.append(
                    f"SELECT _row, {label}, 'not a number: ' || {as_text} FROM _src "
                    f"WHERE {q} IS NOT NULL AND {as_text} <> '' AND TRY_CAST({q} AS DOUBLE) IS NULL"
                )
            elif ctype == "timestamp":
                expr = (
                    f"CASE WHEN TRY_CAST({q} AS DOUBLE) IS NOT NULL "
                    f"THEN (CASE WHEN isfinite(TRY_CAST({q} AS DOUBLE)) AND abs(TRY_CAST({q} AS DOUBLE)) < 9.2e12 "
                    f"THEN make_timestamp(CAST(TRY_CAST({q} AS DOUBLE) * 1000000 AS BIGINT)) END) "
                    f"ELSE TRY_CAST(TRY_CAST({as_text} AS TIMESTAMPTZ) AS TIMESTAMP) END"
                )
                exprs.append((target, expr))
                checks.append(
                    f"SELECT _row, {label}, 'not a timestamp (epoch seconds or ISO 8601): ' || {as_text} FROM _src "
                    f"WHERE {q} IS NOT NULL AND {as_text} <> '' AND ({expr}) IS NULL"
                )
            elif ctype == "list":
                if columns[src].endswith("[]"):
                    exprs.append((target, f"CAST({q} AS VARCHAR[])"))
                else:
                    exprs.append(
                        (
                            target,
                            f"list_filter(list_transform(string_split(CAST({q} AS VARCHAR), {lit(separator)}), "
                            f"lambda x: trim(x)), lambda x: x <> '' AND x <> '(no genres listed)')",
                        )
                    )
        key = {"items": "item_id", "queries": "query_id"}.get(kind)
        if key and source[key]:
            k = _quote(source[key])
            checks.append(
                f"SELECT _row, {lit(source[key])}, 'duplicate {key} ' || trim(CAST({k} AS VARCHAR)) || "
                f"' (first at row ' || first_row || ')' FROM (SELECT _row, {k}, "
                f"min(_row) OVER (PARTITION BY trim(CAST({k} AS VARCHAR))) AS first_row FROM _src) WHERE _row > first_row"
            )
        if kind == "judgments":
            q_, i_ = _quote(source["query_id"] or "query_id"), _quote(source["item_id"] or "item_id")
            p_ = _quote(source["part"]) if source["part"] else lit(part)
            checks.append(
                f"SELECT _row, {lit(source['item_id'])}, 'duplicate judgment for query ' || trim(CAST({q_} AS VARCHAR)) "
                f"|| ' and item ' || trim(CAST({i_} AS VARCHAR)) || ' (first at row ' || first_row || ')' FROM ("
                f"SELECT _row, {q_}, {i_}, min(_row) OVER (PARTITION BY trim(CAST({q_} AS VARCHAR)), "
                f"trim(CAST({i_} AS VARCHAR)), CAST({p_} AS VARCHAR)) AS first_row FROM _src) WHERE _row > first_row"
            )
        if kind in ("events", "judgments"):
            k = _quote(source["item_id"] or "item_id")
            checks.append(
                f"SELECT _row, {lit(source['item_id'])}, 'unknown item_id ' || trim(CAST({k} AS VARCHAR)) || "
                f"'; ingest the items first' FROM _src WHERE {k} IS NOT NULL AND trim(CAST({k} AS VARCHAR)) "
                f"NOT IN (SELECT item_id FROM items)"
            )
        if kind == "judgments":
            k = _quote(source["query_id"] or "query_id")
            checks.append(
                f"SELECT _row, {lit(source['query_id'])}, 'unknown query_id ' || trim(CAST({k} AS VARCHAR)) || "
                f"'; ingest the queries first' FROM _src WHERE {k} IS NOT NULL AND trim(CAST({k} AS VARCHAR)) "
                f"NOT IN (SELECT query_id FROM queries)"
            )
        if kind == "items":
            extras = [c for c in columns if c not in {s for s in source.values() if s}]
            if extras:
                fields = ", ".join(f"{_quote(c)} := {_quote(c)}" for c in extras)
                exprs.append(("attrs", f"to_json(struct_pack({fields}))"))
            else:
                exprs.append(("attrs", "NULL"))
        return exprs, checks

    def attach_tags(self, path: str | Path, *, item_column: str, tag_column: str, top: int = 5) -> int:
        """Put each item's most frequent free-text tags into ``attrs.tags`` (MovieLens ``tags.csv``).

        Tags describe items, so they enrich item text instead of counting as interactions.
        Returns the number of items that got tags.
        """
        import duckdb

        path = Path(path)
        if not path.exists():
            raise InputError("no such file", file=str(path))
        reader = _reader_sql(path)
        con = self.con
        con.execute("BEGIN TRANSACTION")
        try:
            try:
                con.execute(f"CREATE TEMP TABLE _tags AS SELECT * FROM {reader}", [str(path)])
            except duckdb.Error as e:
                raise _reader_error(path, e) from e
            columns = [r[0] for r in con.execute("DESCRIBE _tags").fetchall()]
            for col in (item_column, tag_column):
                if col not in columns:
                    raise InputError(
                        f"column missing (columns: {', '.join(columns)})", file=str(path), column=col
                    )
            i, t = _quote(item_column), _quote(tag_column)
            n = con.execute(
                f"""
                UPDATE items SET attrs = json_merge_patch(coalesce(items.attrs, '{{}}'),
                                                          json_object('tags', g.tags))
                FROM (SELECT item_id, list(tag ORDER BY n DESC, tag)[1:?] AS tags
                      FROM (SELECT trim(CAST({i} AS VARCHAR)) AS item_id, lower(trim({t})) AS tag, count(*) AS n
                            FROM _tags WHERE {t} IS NOT NULL GROUP BY 1, 2)
                      GROUP BY 1) g
                WHERE items.item_id = g.item_id
                """,
                [top],
            ).fetchone()[0]
            con.execute("DROP TABLE _tags")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return n

    # ------------------------------------------------------------------ inspection
    def count(self, table: str) -> int:
        if table not in _TABLES:
            raise NotFoundError(f"no table '{table}'")
        return self.con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    def stats(self) -> dict[str, Any]:
        """Row counts, users, splits and runs: what ``twostage stats`` shows."""
        con = self.con
        out: dict[str, Any] = {
            t: self.count(t) for t in ("items", "events", "queries", "judgments", "rejects")
        }
        out["users"] = con.execute("SELECT count(DISTINCT user_id) FROM events").fetchone()[0]
        out["event_types"] = dict(
            con.execute("SELECT event, count(*) FROM events GROUP BY 1 ORDER BY 1").fetchall()
        )
        span = con.execute("SELECT min(ts), max(ts) FROM events").fetchone()
        out["time_span"] = [str(s) if s else None for s in span]
        out["splits"] = {
            f"{s}/{p}": n
            for s, p, n in con.execute(
                "SELECT split, part, count(DISTINCT request_id) FROM splits GROUP BY 1, 2 ORDER BY 1, 2"
            ).fetchall()
        }
        out["runs"] = self.count("runs")
        return out

    def sql(self, query: str, params: Sequence[Any] | None = None) -> tuple[list[str], list[tuple]]:
        """Run a user's SQL (``twostage sql``): column names and rows."""
        import duckdb

        try:
            cur = self.con.execute(query, params or [])
            names = [d[0] for d in cur.description] if cur.description else []
            return names, cur.fetchall() if cur.description else []
        except duckdb.Error as e:
            raise TwostageError(f"SQL error: {str(e).splitlines()[0]}") from e

    # ------------------------------------------------------------------ splits
    def split(
        self, config: SplitConfig, relevance: RelevanceConfig, *, name: str | None = None
    ) -> dict[str, int]:
        """Divide events (recommendation) or judgments (search) into train / valid / test; replaces ``name``.

        Returns the number of requests in each held-out part.
        """
        name = name or config.strategy
        con = self.con
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute("DELETE FROM splits WHERE split = ?", [name])
            con.execute("DELETE FROM split_info WHERE split = ?", [name])
            if config.strategy == "given":
                if not self.count("judgments"):
                    raise NotFoundError("a 'given' split needs judgments; ingest qrels first")
                con.execute(
                    "INSERT INTO splits SELECT ?, part, 'query', query_id, item_id, relevance, NULL, NULL "
                    "FROM judgments WHERE relevance > 0",
                    [name],
                )
            else:
                if not self.count("events"):
                    raise NotFoundError("this split needs events; ingest events first")
                grade_sql, grade_params = grade_expression(relevance)
                if config.strategy == "leave-last-out":
                    self._leave_last_out(name, config, grade_sql, grade_params)
                elif config.by == "time":
                    self._ratio_by_time(name, config, grade_sql, grade_params)
                else:
                    self._ratio_by_user(name, config, grade_sql, grade_params)
            con.execute(
                "INSERT INTO split_info VALUES (?, ?, ?, now()::TIMESTAMP)",
                [name, config.strategy, json.dumps(_asdict(config))],
            )
            counts = dict(
                con.execute(
                    "SELECT part, count(DISTINCT request_id) FROM splits WHERE split = ? GROUP BY 1", [name]
                ).fetchall()
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return counts

    def _leave_last_out(self, name: str, config: SplitConfig, grade_sql: str, params: list[Any]) -> None:
        self.con.execute(
            f"""
            INSERT INTO splits
            SELECT ?, CASE WHEN pos = 1 THEN 'test' ELSE 'valid' END, 'user', user_id, item_id,
                   {grade_sql}, ts, seq
            FROM (SELECT *, row_number() OVER (PARTITION BY user_id ORDER BY ts DESC, seq DESC) AS pos,
                         count(*) OVER (PARTITION BY user_id) AS n
                  FROM events)
            WHERE pos <= 2 AND n >= ?
            """,
            [name, *params, config.min_events],
        )

    def _ratio_by_time(self, name: str, config: SplitConfig, grade_sql: str, params: list[Any]) -> None:
        train, valid, _ = config.ratios
        self.con.execute(
            f"""
            INSERT INTO splits
            WITH ordered AS (
                SELECT *, (row_number() OVER (ORDER BY ts, seq) - 1) / count(*) OVER () AS q FROM events),
            held AS (SELECT *, CASE WHEN q < ? + ? THEN 'valid' ELSE 'test' END AS part FROM ordered WHERE q >= ?),
            cut AS (SELECT part, min(ts) AS cts, min_by(seq, (ts, seq)) AS cseq FROM held GROUP BY part)
            SELECT ?, h.part, 'user', h.user_id, h.item_id, {grade_sql}, c.cts, c.cseq
            FROM held h JOIN cut c USING (part)
            """,
            [train, valid, train, name, *params],
        )

    def _ratio_by_user(self, name: str, config: SplitConfig, grade_sql: str, params: list[Any]) -> None:
        train, valid, _ = config.ratios
        # Held-out users keep their first 80% as context; their last 20% (at least one event) are targets.
        self.con.execute(
            f"""
            INSERT INTO splits
            WITH users AS (
                SELECT user_id, (row_number() OVER (ORDER BY hash(user_id || ?::VARCHAR)) - 1)
                                / count(*) OVER () AS q
                FROM (SELECT DISTINCT user_id FROM events)),
            ranked AS (
                SELECT e.*, u.q, row_number() OVER (PARTITION BY e.user_id ORDER BY ts DESC, seq DESC) AS pos,
                       count(*) OVER (PARTITION BY e.user_id) AS n
                FROM events e JOIN users u USING (user_id)),
            held AS (
                SELECT *, CASE WHEN q < ? + ? THEN 'valid' ELSE 'test' END AS part FROM ranked
                WHERE q >= ? AND n >= ? AND pos <= greatest(1, floor(n * 0.2)))
            SELECT ?, part, 'user', user_id, item_id, {grade_sql},
                   min(ts) OVER (PARTITION BY user_id), min_by(seq, (ts, seq)) OVER (PARTITION BY user_id)
            FROM held
            """,
            [config.seed, train, valid, train, config.min_events, name, *params],
        )

    def split_names(self) -> list[str]:
        return [r[0] for r in self.con.execute("SELECT split FROM split_info ORDER BY split").fetchall()]

    def require_split(self, name: str) -> str:
        """The split's request kind ('user' or 'query'), or NotFoundError naming the splits that exist."""
        row = self.con.execute(
            "SELECT any_value(request_kind) FROM splits WHERE split = ?", [name]
        ).fetchone()
        if row is None or row[0] is None:
            have = ", ".join(self.split_names()) or "none"
            raise NotFoundError(f"no split '{name}' (splits: {have}); run 'twostage split' first")
        return row[0]

    # ------------------------------------------------------------------ runs and results
    def new_run(self, kind: str, config: Mapping[str, Any], model_fingerprint: str | None = None) -> str:
        """Record a run with its resolved config; returns its id."""
        run_id = f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.con.execute(
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
        cur = self.con.cursor()
        cur.register("_results_batch", table)
        cur.execute("INSERT INTO results SELECT * FROM _results_batch")
        cur.unregister("_results_batch")
        return len(req)

    # ------------------------------------------------------------------ reads used by the stages
    def items(self, item_ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Items as dicts (item_id, title, body, categories, attrs), in item_id order or the order asked."""
        cols = "item_id, title, body, categories, attrs"
        if item_ids is None:
            rows = self.con.execute(f"SELECT {cols} FROM items ORDER BY item_id").fetchall()
        else:
            wanted = list(item_ids)
            rows = self.con.execute(
                f"SELECT {cols} FROM items WHERE item_id IN (SELECT unnest(?::VARCHAR[]))", [wanted]
            ).fetchall()
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

    def targets(self, split: str, part: str) -> dict[str, dict[str, float]]:
        """Held-out relevance per request: ``{request_id: {item_id: grade}}``."""
        rows = self.con.execute(
            "SELECT request_id, item_id, max(relevance) FROM splits WHERE split = ? AND part = ? GROUP BY 1, 2",
            [split, part],
        ).fetchall()
        out: dict[str, dict[str, float]] = {}
        for request_id, item_id, rel in rows:
            out.setdefault(request_id, {})[item_id] = rel
        return out

    def cutoffs(self, split: str, part: str) -> dict[str, tuple[Any, int]]:
        """Per user: the (ts, seq) before which their history may be used for this part."""
        rows = self.con.execute(
            "SELECT request_id, min_by(cutoff_ts, (cutoff_ts, cutoff_seq)), min_by(cutoff_seq, (cutoff_ts, cutoff_seq)) FROM splits WHERE split = ? AND part = ? GROUP BY 1",
            [split, part],
        ).fetchall()
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
        table = pa.table(
            {
                "user_id": pa.array(list(user_ids), pa.string()),
                "cts": pa.array([cut.get(u, (None, None))[0] for u in user_ids], pa.timestamp("us")),
                "cseq": pa.array([cut.get(u, (None, None))[1] for u in user_ids], pa.int64()),
            }
        )
        cur = self.con.cursor()
        cur.register("_users", table)
        rows = cur.execute(
            """
            SELECT u.user_id, list(e.item_id ORDER BY e.ts DESC, e.seq DESC)
            FROM _users u JOIN events e ON e.user_id = u.user_id
            WHERE u.cts IS NULL OR (e.ts, e.seq) < (u.cts, u.cseq)
            GROUP BY u.user_id
            """
        ).fetchall()
        cur.unregister("_users")
        out = {u: [] for u in user_ids}
        for user_id, items in rows:
            out[user_id] = items[:limit] if limit else items
        return out

    def train_events(self, split: str, relevance: RelevanceConfig) -> list[tuple[str, str, float, Any, int]]:
        """Events usable for training under ``split``: before each user's earliest held-out cut-off.

        Returns (user_id, item_id, grade, ts, seq), oldest first per user.
        """
        grade_sql, params = grade_expression(relevance)
        return self.con.execute(
            f"""
            WITH cut AS (
                SELECT request_id AS user_id, min_by(cutoff_ts, (cutoff_ts, cutoff_seq)) AS cts,
                       min_by(cutoff_seq, (cutoff_ts, cutoff_seq)) AS cseq
                FROM splits WHERE split = ? AND request_kind = 'user' GROUP BY 1)
            SELECT e.user_id, e.item_id, {grade_sql}, e.ts, e.seq
            FROM events e LEFT JOIN cut c ON c.user_id = e.user_id
            WHERE c.cts IS NULL OR (e.ts, e.seq) < (c.cts, c.cseq)
            ORDER BY e.user_id, e.ts, e.seq
            """,
            [split, *params],
        ).fetchall()

    def popularity(self, split: str | None = None) -> dict[str, int]:
        """Distinct users per item, counted only from training events when a split is given."""
        if split is None:
            rows = self.con.execute(
                "SELECT item_id, count(DISTINCT user_id) FROM events GROUP BY 1"
            ).fetchall()
        else:
            rows = self.con.execute(
                """
                WITH cut AS (
                    SELECT request_id AS user_id, min_by(cutoff_ts, (cutoff_ts, cutoff_seq)) AS cts,
                           min_by(cutoff_seq, (cutoff_ts, cutoff_seq)) AS cseq
                    FROM splits WHERE split = ? AND request_kind = 'user' GROUP BY 1)
                SELECT e.item_id, count(DISTINCT e.user_id) FROM events e LEFT JOIN cut c USING (user_id)
                WHERE c.cts IS NULL OR (e.ts, e.seq) < (c.cts, c.cseq) GROUP BY 1
                """,
                [split],
            ).fetchall()
        return dict(rows)

    def query_texts(self, query_ids: Iterable[str] | None = None) -> dict[str, str]:
        if query_ids is None:
            return dict(self.con.execute("SELECT query_id, text FROM queries").fetchall())
        return dict(
            self.con.execute(
                "SELECT query_id, text FROM queries WHERE query_id IN (SELECT unnest(?::VARCHAR[]))",
                [list(query_ids)],
            ).fetchall()
        )


_TABLES = {
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
    "rejects",
}


def _literal(value: str) -> str:
    """A SQL string literal for a column label or constant chosen by the program (never row data)."""
    return "'" + str(value).replace("'", "''") + "'"


def _asdict(obj: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(obj)


def grade_expression(relevance: RelevanceConfig) -> tuple[str, list[Any]]:
    """SQL (over columns ``event``, ``value``) for the graded relevance of an event, and its parameters.

    grade = max(min_grade, rating grade for ``rating_event`` | event_grades[event] | min_grade).
    """
    params: list[Any] = [relevance.min_grade, relevance.rating_event]
    for threshold, grade in relevance.rating_grades:
        params += [threshold, grade]
    params.append(relevance.min_grade)
    for event, grade in relevance.event_grades.items():
        params += [event, grade]
    params.append(relevance.min_grade)
    rating_cases = " WHEN value >= ? THEN ?" * len(relevance.rating_grades)
    event_cases = " WHEN event = ? THEN ?" * len(relevance.event_grades)
    sql = (
        f"greatest(?, CASE WHEN event = ? THEN (CASE WHEN false THEN 0{rating_cases} ELSE ? END)"
        f"{event_cases} ELSE ? END)"
    )
    return sql, params
