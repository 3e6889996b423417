"""Ingestion: one file of items, events, queries or judgments into the store, in one transaction.

Loading is the one place where outside data meets the schema, so it gets its own module: DuckDB's own
readers parse the file, SQL checks find every bad row before anything is written, and a bad file changes
nothing while the error names file, row and column. Every value is a ``?`` parameter; the only identifiers
that reach SQL are column names read from the file's own header, and they are quoted.
:class:`twostage.store.Store` owns the connection and calls in here (``Store.ingest``, ``Store.attach_tags``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from twostage.errors import InputError, did_you_mean

if TYPE_CHECKING:
    import duckdb

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
    # events identical to ones already stored (same user, item, event, value and time): a file loaded twice
    # would otherwise double the log and put the same item in a user's validation and test targets
    already_stored: int = 0


_EPOCH_2200 = 7_258_118_400  # 2200-01-01 in epoch seconds


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
_COLUMNS_RE = re.compile(r"Expected Number of Columns: (\d+) Found: (\d+)")


def _csv_rows(path: Path) -> Iterator[list[str]]:
    """The file's non-blank rows as the csv module splits them (DuckDB skips blank lines too)."""
    import csv
    import gzip

    opener = gzip.open if path.suffix.lower() == ".gz" else open
    delimiter = "\t" if ".tsv" in [s.lower() for s in path.suffixes] else ","
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        yield from (row for row in csv.reader(f, delimiter=delimiter) if row)


def _csv_header(path: Path) -> list[str] | None:
    import csv

    try:
        return next(_csv_rows(path), None)
    except (UnicodeDecodeError, csv.Error, OSError):
        return None


def _ragged_row(path: Path) -> InputError | None:
    """The first data row whose field count differs from the header's, as an error; None if all agree.

    Given such a row, DuckDB's sniffer may read every line as one column, take a later line for the header,
    or find no data rows, and the user would be told something beside the point. Reading the file once with
    the csv module finds the row that caused it; rows are numbered as everywhere else (blank lines skipped).
    """
    import csv

    try:
        rows = _csv_rows(path)
        header = next(rows, None)
        if header is None or len(header) < 2:
            return None
        for n, row in enumerate(rows, start=1):
            if len(row) != len(header):
                return InputError(
                    f"expected {len(header)} fields as in the header, found {len(row)}", file=str(path), row=n
                )
    except (UnicodeDecodeError, csv.Error, OSError):
        return None
    return None


def _reader_error(path: Path, error: Exception) -> InputError:
    """Turn a DuckDB reader failure into one line naming the file and, where DuckDB knows it, the row."""
    text = str(error)
    row = None
    if m := _LINE_RE.search(text):
        row = max(int(m.group(1)) - 1, 1)
    first = next((ln for ln in text.splitlines() if ln.strip()), text).strip()
    if m := _COLUMNS_RE.search(text):
        reason = f"expected {m.group(1)} fields as in the header, found {m.group(2)}"
    elif "invalid unicode" in text.lower() or "not utf-8" in text.lower():
        reason = "not UTF-8 encoded; convert it to UTF-8 (e.g. iconv -t UTF-8)"
    else:
        reason = f"cannot be read: {first}"
    return InputError(reason, file=str(path), row=row)


def _literal(value: str) -> str:
    """A SQL string literal for a column label or constant chosen by the program (never row data)."""
    return "'" + str(value).replace("'", "''") + "'"


def ingest_file(
    con: duckdb.DuckDBPyConnection,
    path: str | Path,
    kind: str,
    *,
    mapping: Mapping[str, str] | None,
    keep_rejects: bool,
    event: str,
    part: str,
    category_separator: str,
) -> IngestReport:
    """Load one file of ``kind`` over ``con``, a cursor inside the transaction ``Store.ingest`` opened (a
    failure anywhere rolls everything back; the cursor's temporary tables go with it).

    See :meth:`twostage.store.Store.ingest` for the arguments (and their defaults).

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
    try:
        loaded, rejected, already = _ingest_in_transaction(
            con, path, kind, reader, dict(mapping or {}), keep_rejects, event, part, category_separator
        )
    except duckdb.Error as e:
        first = next((ln for ln in str(e).splitlines() if ln.strip()), str(e))
        raise InputError(f"cannot be loaded: {first.strip()}", file=str(path)) from e
    for temp in ("_src", "_bad", "_new"):
        con.execute(f"DROP TABLE IF EXISTS {temp}")
    return IngestReport(kind, str(path), loaded, rejected, time.perf_counter() - started, already)


def _ingest_in_transaction(
    con: duckdb.DuckDBPyConnection,
    path: Path,
    kind: str,
    reader: str,
    mapping: dict[str, str],
    keep_rejects: bool,
    event: str,
    part: str,
    separator: str,
) -> tuple[int, int, int]:
    """Rows loaded, rows rejected, events skipped as already stored."""
    import duckdb

    file = str(path)
    try:
        con.execute(f"CREATE TEMP TABLE _src AS SELECT * FROM {reader}", [file])
    except duckdb.Error as e:
        ragged = _ragged_row(path) if reader.startswith("read_csv") and "sniffing" in str(e) else None
        raise (ragged or _reader_error(path, e)) from e
    described = con.execute("DESCRIBE _src").fetchall()
    columns = {name: ctype for name, ctype, *_ in described}
    total = con.execute("SELECT count(*) FROM _src").fetchone()[0]
    # when the sniffer did not read the first line as the header of every row, say which row disagrees
    sniffed_apart = len(columns) == 1 or total == 0 or list(columns) != _csv_header(path)
    if reader.startswith("read_csv") and sniffed_apart and (ragged := _ragged_row(path)):
        raise ragged
    if total == 0:
        raise InputError("file has no data rows", file=file)
    targets = _COLUMNS[kind]
    unknown = set(mapping) - {t for t, _, _ in targets}
    if unknown:
        names = [t for t, _, _ in targets]
        close = [m for m in (did_you_mean(u, names) for u in sorted(unknown)) if m]
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise InputError(
            f"--map names unknown column(s) {sorted(unknown)}; {kind} columns are {', '.join(names)}{hint}",
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
    exprs, checks = _column_sql(kind, source, columns, event, part, separator)
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
        row, col, reason = con.execute("SELECT _row, col, reason FROM _bad ORDER BY _row LIMIT 1").fetchone()
        more = f" ({n_bad} bad rows in all; --keep-rejects loads the rest)" if n_bad > 1 else ""
        raise InputError(reason + more, file=file, row=int(row), column=col)
    if n_bad:
        con.execute(
            "INSERT INTO rejects SELECT ?, ?, _row, col, reason, now()::TIMESTAMP FROM _bad", [kind, file]
        )
    select = ", ".join(f"{expr} AS {name}" for name, expr in exprs)
    good = "FROM _src WHERE _row NOT IN (SELECT _row FROM _bad)"
    if kind == "items":
        # an item loaded again is patched, not replaced: columns the file lacks keep their values, attrs
        # keys merge (tags attached from another file survive a new titles file)
        updates = {t: f"excluded.{t}" for t, _, _ in _COLUMNS["items"][1:] if source[t] is not None}
        # merge-patching {} first drops the file's empty cells, which would otherwise delete stored keys
        updates["attrs"] = (
            "CASE WHEN excluded.attrs IS NULL THEN items.attrs "
            "ELSE json_merge_patch(coalesce(items.attrs, '{}'), json_merge_patch('{}', excluded.attrs)) END"
        )
        # rows that would not change are left alone: rewriting a list column costs DuckDB ~0.3 ms a row
        changed = " OR ".join(f"items.{c} IS DISTINCT FROM {e}" for c, e in updates.items())
        sets = ", ".join(f"{c} = {e}" for c, e in updates.items())
        con.execute(
            f"INSERT INTO items SELECT {select}, now()::TIMESTAMP {good} "
            f"ON CONFLICT (item_id) DO UPDATE SET {sets}, updated_at = excluded.updated_at WHERE {changed}"
        )
    elif kind == "events":
        base = con.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
        con.execute(f"CREATE TEMP TABLE _new AS SELECT {select}, ? + _row AS seq {good}", [base])
        # one stored event matches one file row: two identical clicks in the file and one in the store add one
        keys = ("user_id", "item_id", "event", "value", "ts")
        same = " AND ".join(f"s.{c} IS NOT DISTINCT FROM n.{c}" for c in keys)
        added = con.execute(
            f"""INSERT INTO events SELECT n.* EXCLUDE (copy) FROM (
                    SELECT *, row_number() OVER (PARTITION BY {", ".join(keys)} ORDER BY seq) AS copy FROM _new
                ) n LEFT JOIN (
                    SELECT {", ".join(keys)}, count(*) AS stored FROM events GROUP BY ALL
                ) s ON {same}
                WHERE n.copy > coalesce(s.stored, 0)"""
        ).fetchone()[0]
        return added, n_bad, total - n_bad - added
    elif kind == "queries":
        con.execute(f"INSERT OR REPLACE INTO queries SELECT {select} {good}")
    else:
        con.execute(f"INSERT OR REPLACE INTO judgments SELECT {select} {good}")
    return total - n_bad, n_bad, 0


def _column_sql(
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
            # epoch milliseconds read as seconds land tens of thousands of years ahead and order nothing wrong
            # enough to notice; refuse them instead of storing the year 32000
            checks.append(
                f"SELECT _row, {label}, 'epoch seconds outside the years 1740–2200: ' || {as_text} || "
                f"' (milliseconds? divide by 1000)' FROM _src "
                f"WHERE abs(TRY_CAST({q} AS DOUBLE)) >= {_EPOCH_2200} AND ({expr}) IS NOT NULL"
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
    # references to rows that must already be in the store: (column, table, kinds that carry it)
    for ref, table, kinds in (
        ("item_id", "items", ("events", "judgments")),
        ("query_id", "queries", ("judgments",)),
    ):
        if kind not in kinds:
            continue
        k = _quote(source[ref] or ref)
        checks.append(
            f"SELECT _row, {lit(source[ref])}, 'unknown {ref} ' || trim(CAST({k} AS VARCHAR)) || "
            f"'; ingest the {table} first' FROM _src WHERE {k} IS NOT NULL AND trim(CAST({k} AS VARCHAR)) "
            f"NOT IN (SELECT {ref} FROM {table})"
        )
    if kind == "items":
        extras = [c for c in columns if c not in {s for s in source.values() if s}]
        if extras:
            fields = ", ".join(f"{_quote(c)} := {_quote(c)}" for c in extras)
            exprs.append(("attrs", f"to_json(struct_pack({fields}))"))
        else:
            exprs.append(("attrs", "NULL"))
    return exprs, checks


def attach_tags(
    con: duckdb.DuckDBPyConnection, path: str | Path, *, item_column: str, tag_column: str, top: int
) -> int:
    """Put each item's most frequent tags into ``attrs.tags`` over ``con``, a cursor inside the transaction
    ``Store.attach_tags`` opened.

    Returns the number of items that got tags.
    """
    import duckdb

    path = Path(path)
    if not path.exists():
        raise InputError("no such file", file=str(path))
    reader = _reader_sql(path)
    try:
        con.execute(f"CREATE TEMP TABLE _tags AS SELECT * FROM {reader}", [str(path)])
    except duckdb.Error as e:
        raise _reader_error(path, e) from e
    columns = [r[0] for r in con.execute("DESCRIBE _tags").fetchall()]
    for col in (item_column, tag_column):
        if col not in columns:
            raise InputError(f"column missing (columns: {', '.join(columns)})", file=str(path), column=col)
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
    return n
