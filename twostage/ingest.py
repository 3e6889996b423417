"""Ingestion: one file of items, events, queries or judgments into the store, in one transaction.

Loading is the one place where outside data meets the schema, so it gets its own module: DuckDB's own
readers parse the file, SQL checks find every bad row before anything is written, and a bad file changes
nothing while the error names file, row and column. Every value is a ``?`` parameter; the only identifiers
that reach SQL are column names read from the file's own header, and they are quoted.
:class:`twostage.store.Store` owns the connection and calls in here (``Store.ingest``, ``Store.attach_tags``).

Beyond the types, a row is refused (or with ``keep_rejects`` put in ``rejects``) when an event ``value`` is
negative, NaN or infinite (it is a rating, an amount or a duration), a ``relevance`` is NaN or infinite, a
``ts`` lies more than ``[ingest] future_seconds`` past now (it would be its user's test target), or an id or
label (``user_id``, ``item_id``, ``query_id``, ``event``, ``part``) holds a NUL byte. A NUL byte in free text
(``title``, ``body``, query ``text``, ``categories``, extra item columns) is dropped instead: it carries no
meaning there, and terminals and C libraries would cut the text at it. A ``ts`` column of a type that holds no
time (a Parquet BOOLEAN, a BLOB, a time of day) is refused as a whole rather than read as 1970.
With ``keep_rejects`` the rows a reader cannot split apply too: a CSV row with a field too many or too few or
with bytes that are not UTF-8 (DuckDB's ``store_rejects``), a JSONL line that is not valid JSON or whose value
does not fit its column's type (DuckDB's ``ignore_errors``, every line read again as raw JSON to find them).
What no reader can skip (a CSV whose layout cannot be sniffed, a broken Parquet or ``.json`` document) fails
with a message saying so.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from twostage.config import IngestConfig
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

    @classmethod
    def combined(cls, path: str, reports: Sequence[IngestReport]) -> IngestReport:
        """One report for the files of a directory loaded together."""
        return cls(
            reports[0].kind,
            path,
            sum(r.rows for r in reports),
            sum(r.rejected for r in reports),
            sum(r.seconds for r in reports),
            sum(r.already_stored for r in reports),
        )


def partition_files(directory: Path) -> list[Path]:
    """The Parquet files under a directory (any depth, e.g. Hive-style ``key=value/`` partitions), in path
    order. Only Parquet: a partitioned export is Parquet, and mixed formats in one load are a mistake."""
    files = sorted(
        p
        for p in directory.rglob("*")
        if p.is_file()
        and p.suffix.lower() in (".parquet", ".pq")
        # hidden and underscore entries are a writer's temporary or metadata files (_temporary/, .part-*.crc)
        and not any(part.startswith((".", "_")) for part in p.relative_to(directory).parts)
    )
    if not files:
        raise InputError(
            "is a directory without Parquet files; give a file, or a directory of .parquet files",
            file=str(directory),
        )
    return files


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
    if suffix in (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz"):
        return "read_json(?, format = 'newline_delimited')"
    if suffix in (".json", ".json.gz"):
        return "read_json(?, format = 'auto')"
    raise InputError(
        f"unsupported file type '{path.suffix}'; use .csv, .tsv, .parquet or .jsonl", file=str(path)
    )


_LINE_RE = re.compile(r"Line: (\d+)")
_COLUMNS_RE = re.compile(r"Expected Number of Columns: (\d+) Found: (\d+)")
# DuckDB numbers a malformed JSON line one ahead of itself ("line 4" for the third line, "record/value 2" for
# the first), a line whose value does not fit its column's type by its own number
_JSON_ERROR_RE = re.compile(
    r"(Malformed JSON|JSON transform error) in file .*?in (?:line|record/value) (\d+): (.*?)\.?\s*$"
)
_NOT_UTF8 = "not UTF-8 encoded; convert it to UTF-8 (e.g. iconv -t UTF-8)"
# what a reader failure says with --keep-rejects when the reader cannot go on past the bad place
_CANNOT_SKIP = "; --keep-rejects cannot skip this: the reader cannot split the file into rows past it"
# the column types a timestamp can be read from (numbers are epoch seconds, text is ISO 8601)
_TIME_TYPES = re.compile(
    r"VARCHAR|JSON|DATE|TIMESTAMP.*|U?(?:TINYINT|SMALLINT|INTEGER|BIGINT|HUGEINT)|FLOAT|DOUBLE|DECIMAL.*"
)


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


def _ragged_row(path: Path, note: str = "") -> InputError | None:
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
                    f"expected {len(header)} fields as in the header, found {len(row)}{note}",
                    file=str(path),
                    row=n,
                )
    except (UnicodeDecodeError, csv.Error, OSError):
        return None
    return None


def _reader_error(path: Path, error: Exception, note: str = "") -> InputError:
    """Turn a DuckDB reader failure into one line naming the file and, where DuckDB knows it, the row."""
    text = str(error)
    row = None
    first = next((ln for ln in text.splitlines() if ln.strip()), text).strip()
    if m := _JSON_ERROR_RE.search(first):
        malformed = m.group(1) == "Malformed JSON"
        row = max(int(m.group(2)) - malformed, 1)
        what = "not valid JSON" if malformed else "a value does not fit its column's type"
        return InputError(f"{what}: {m.group(3)}{note}", file=str(path), row=row)
    if m := _LINE_RE.search(text):
        row = max(int(m.group(1)) - 1, 1)
    if m := _COLUMNS_RE.search(text):
        reason = f"expected {m.group(1)} fields as in the header, found {m.group(2)}"
    elif "invalid unicode" in text.lower() or "not utf-8" in text.lower():
        reason = _NOT_UTF8
    else:
        reason = f"cannot be read: {first}"
    return InputError(reason + note, file=str(path), row=row)


def _csv_keeping_rejects(
    con: duckdb.DuckDBPyConnection, path: Path, reader: str
) -> list[tuple[int, str | None, str]]:
    """Read a CSV into ``_src`` with DuckDB's ``store_rejects``: a row it cannot split (a field too many or too
    few, bytes that are not UTF-8) is left out of ``_src`` and returned as (row, column, reason)."""
    options = (
        "store_rejects = true, rejects_table = '_csv_rejects', rejects_scan = '_csv_scans', rejects_limit = 0"
    )
    con.execute(f"CREATE TEMP TABLE _src AS SELECT * FROM {reader[:-1]}, {options})", [str(path)])
    found = con.execute(
        "SELECT line, column_name, error_type, error_message FROM _csv_rejects ORDER BY line, column_idx"
    ).fetchall()
    rows = _csv_data_rows(path, {line for line, *_ in found if line is not None})
    bad: list[tuple[int, str | None, str]] = []
    for line, column, error_type, message in found:
        row = rows.get(line, max((line or 2) - 1, 1))
        if m := _COLUMNS_RE.search(message or ""):
            bad.append((row, None, f"expected {m.group(1)} fields as in the header, found {m.group(2)}"))
        elif error_type == "INVALID ENCODING":
            bad.append((row, column, _NOT_UTF8))
        else:
            bad.append((row, column, f"cannot be read: {(message or error_type).strip().splitlines()[0]}"))
    return bad


def _csv_data_rows(path: Path, lines: set[int]) -> dict[int, int]:
    """The data row (1-based, blank lines skipped, as everywhere else) of each record DuckDB's CSV reader
    numbers in ``lines`` (the header is its line 1, blank lines count, a quoted line break does not)."""
    import csv
    import gzip

    if not lines:
        return {}
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    delimiter = "\t" if ".tsv" in [s.lower() for s in path.suffixes] else ","
    out: dict[int, int] = {}
    data, last = 0, max(lines)
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace", newline="") as f:
            for line, record in enumerate(csv.reader(f, delimiter=delimiter), start=1):
                data += bool(record) and line > 1
                if line in lines:
                    out[line] = data if record else data + 1
                if line >= last:
                    break
    except (csv.Error, OSError):
        pass
    return out


def _ndjson_keeping_rejects(con: duckdb.DuckDBPyConnection, file: str) -> list[tuple[int, str | None, str]]:
    """Read newline-delimited JSON into ``_src`` with DuckDB's ``ignore_errors`` and return the rows it spoiled
    as (row, column, reason): a line that is not valid JSON becomes a row of NULLs and a value that does not fit
    its column's type a NULL, silently, so every line is read again as raw JSON (``_raw``) to find them."""
    con.execute(
        "CREATE TEMP TABLE _src AS SELECT * FROM read_json(?, format = 'newline_delimited', ignore_errors = true)",
        [file],
    )
    con.execute(
        "CREATE TEMP TABLE _raw AS SELECT json AS raw FROM read_ndjson_objects(?, ignore_errors = true)",
        [file],
    )
    n_src, n_raw = (con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("_src", "_raw"))
    if n_src != n_raw:
        raise InputError(
            f"cannot be read line by line ({n_src} rows but {n_raw} lines){_CANNOT_SKIP}", file=file
        )
    row = "r.rowid - (SELECT min(rowid) FROM _raw) + 1"
    checks = [
        f"SELECT {row}, NULL, 'not valid JSON' FROM _raw r WHERE r.raw IS NULL",
        f"SELECT {row}, NULL, 'not a JSON object: ' || left(r.raw, 40) FROM _raw r WHERE json_type(r.raw) <> 'OBJECT'",
    ]
    for name, ctype, *_ in con.execute("DESCRIBE _src").fetchall():
        pointer = _literal("/" + name.replace("~", "~0").replace("/", "~1"))  # a JSON pointer to the key
        checks.append(
            f"SELECT {row}, {_literal(name)}, 'does not fit the type {ctype} of this column in the other lines: ' "
            f"|| left(json_extract(r.raw, {pointer})::VARCHAR, 40) FROM _raw r JOIN _src s ON s.rowid = r.rowid "
            f"WHERE s.{_quote(name)} IS NULL AND json_type(r.raw, {pointer}) <> 'NULL'"
        )
    return [(int(r), c, reason) for r, c, reason in con.execute(" UNION ALL ".join(checks)).fetchall()]


def _ndjson_error(con: duckdb.DuckDBPyConnection, path: Path, error: Exception) -> InputError:
    """The first bad line of a newline-delimited JSON file DuckDB could not read, found as ``keep_rejects``
    finds them (so both number rows alike) on a cursor of its own: the failed read aborted ``con``'s
    transaction."""
    import duckdb

    probe = con.cursor()
    try:
        bad = sorted(_ndjson_keeping_rejects(probe, str(path)), key=lambda b: (b[0], b[1] or ""))
    except (duckdb.Error, InputError):
        bad = []
    finally:
        probe.close()
    if not bad:
        return _reader_error(path, error)
    row, column, reason = bad[0]
    rows = {r for r, _, _ in bad}
    m = _JSON_ERROR_RE.search(next((ln for ln in str(error).splitlines() if ln.strip()), ""))
    if reason == "not valid JSON" and m and sum(why == reason for _, _, why in bad) == 1:
        reason += f": {m.group(3)}"  # then DuckDB's words are about this line
    more = f" ({len(rows)} bad rows in all; --keep-rejects loads the rest)" if len(rows) > 1 else ""
    return InputError(reason + more, file=str(path), row=row, column=column)


def _shown(column: str) -> str:
    """SQL for a (quoted) column's value as a message shows it: trimmed text, a NUL byte written ``\\0``."""
    return f"replace(trim(CAST({column} AS VARCHAR)), chr(0), '\\0')"


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
    future_seconds: float | None = None,
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
    if future_seconds is None:
        future_seconds = IngestConfig.future_seconds
    try:
        loaded, rejected, already = _ingest_in_transaction(
            con,
            path,
            kind,
            reader,
            dict(mapping or {}),
            keep_rejects,
            event,
            part,
            category_separator,
            future_seconds,
        )
    except duckdb.Error as e:
        first = next((ln for ln in str(e).splitlines() if ln.strip()), str(e))
        raise InputError(f"cannot be loaded: {first.strip()}", file=str(path)) from e
    for temp in ("_src", "_bad", "_new", "_raw", "_filebad", "_csv_rejects", "_csv_scans"):
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
    future_seconds: float,
) -> tuple[int, int, int]:
    """Rows loaded, rows rejected, events skipped as already stored."""
    import duckdb

    file = str(path)
    is_csv, is_ndjson = reader.startswith("read_csv"), "newline_delimited" in reader
    # rows the reader could not take apart, as (row, column, reason); a CSV's are missing from _src, a JSONL's
    # are rows of NULLs in it
    file_bad: list[tuple[int, str | None, str]] = []
    try:
        if keep_rejects and is_csv:
            file_bad = _csv_keeping_rejects(con, path, reader)
        elif keep_rejects and is_ndjson:
            file_bad = _ndjson_keeping_rejects(con, file)
        else:
            con.execute(f"CREATE TEMP TABLE _src AS SELECT * FROM {reader}", [file])
    except duckdb.Error as e:
        if is_ndjson and not keep_rejects:
            raise _ndjson_error(con, path, e) from e
        note = _CANNOT_SKIP if keep_rejects else ""
        ragged = _ragged_row(path, note) if is_csv and "sniffing" in str(e) else None
        raise (ragged or _reader_error(path, e, note)) from e
    described = con.execute("DESCRIBE _src").fetchall()
    columns = {name: ctype for name, ctype, *_ in described}
    total = con.execute("SELECT count(*) FROM _src").fetchone()[0]
    dropped = len({r for r, _, _ in file_bad}) if is_csv else 0  # rows of the file not in _src
    # when the sniffer did not read the first line as the header of every row, say which row disagrees
    empty = total == 0 and not file_bad
    sniffed_apart = len(columns) == 1 or empty or list(columns) != _csv_header(path)
    if is_csv and sniffed_apart and (ragged := _ragged_row(path, _CANNOT_SKIP if keep_rejects else "")):
        raise ragged
    if empty:
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
    for target, ctype, _ in targets:
        src = source[target]
        # numbers are epoch seconds, so a boolean would become 1970-01-01 00:00:01
        if ctype == "timestamp" and src is not None and not _TIME_TYPES.fullmatch(columns[src]):
            raise InputError(
                f"a {columns[src]} column cannot hold timestamps; use epoch seconds, ISO 8601 text or a "
                "TIMESTAMP column",
                file=file,
                column=src,
            )

    # Row numbers are 1-based data rows in file order (DuckDB keeps insertion order).
    limit = time.time() + future_seconds
    exprs, checks = _column_sql(kind, source, columns, event, part, separator, limit, future_seconds)
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _src AS SELECT rowid - (SELECT min(rowid) FROM _src) + 1 AS _row, * FROM _src"
    )
    if file_bad:
        con.execute("CREATE TEMP TABLE _filebad(_row BIGINT, col VARCHAR, reason VARCHAR)")
        con.execute(
            "INSERT INTO _filebad SELECT unnest(?::BIGINT[]), unnest(?::VARCHAR[]), unnest(?::VARCHAR[])",
            [list(column) for column in zip(*file_bad, strict=True)],
        )
    if dropped:
        # the rows of _src take the row numbers the reader's rejects left free, in order
        con.execute(
            "UPDATE _src SET _row = free.n FROM (SELECT n, row_number() OVER (ORDER BY n) AS k FROM range(1, ?) t(n) "
            "WHERE n NOT IN (SELECT _row FROM _filebad)) free WHERE _src._row = free.k",
            [total + dropped + 1],
        )
    con.execute(
        "CREATE TEMP TABLE _bad AS SELECT _row, col, reason FROM ("
        + " UNION ALL ".join(checks)
        + ") AS checks(_row, col, reason) ORDER BY _row, col"
    )
    if file_bad:
        # a JSONL line the reader spoiled is a row of NULLs: its reader's reason is the one that counts
        con.execute("DELETE FROM _bad WHERE _row IN (SELECT _row FROM _filebad)")
        con.execute("INSERT INTO _bad SELECT * FROM _filebad")
    total += dropped
    n_bad = con.execute("SELECT count(DISTINCT _row) FROM _bad").fetchone()[0]
    if n_bad and not keep_rejects:
        row, col, reason = con.execute(
            "SELECT _row, col, reason FROM _bad ORDER BY _row, col NULLS FIRST, reason LIMIT 1"
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
        if base == 0:  # nothing stored (seq starts at 1): every row is new, no need to match them
            added = con.execute("INSERT INTO events SELECT * FROM _new").fetchone()[0]
            return added, n_bad, total - n_bad - added
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
    future_limit: float,
    future_seconds: float,
) -> tuple[list[tuple[str, str]], list[str]]:
    """SQL expressions producing each target column, and the checks that find bad rows (``future_limit``: the
    latest epoch second a ``ts`` may be, ``future_seconds`` past now)."""
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
        shown = _shown(q)
        if ctype == "id" or target in defaults:
            checks.append(
                f"SELECT _row, {label}, 'contains a NUL byte (shown as \\0): ' || {shown} FROM _src "
                f"WHERE contains(CAST({q} AS VARCHAR), chr(0))"
            )
        if required:
            checks.append(
                f"SELECT _row, {label} AS col, 'missing value' AS reason FROM _src WHERE {q} IS NULL OR {as_text} = ''"
            )
        if target in defaults:
            exprs.append((target, f"coalesce(nullif({as_text}, ''), {lit(defaults[target])})"))
        elif ctype in ("id", "text"):
            exprs.append((target, as_text if ctype == "id" else f"replace(CAST({q} AS VARCHAR), chr(0), '')"))
        elif ctype == "double":
            fallback = "1.0" if target == "relevance" else "NULL"
            number = f"TRY_CAST({q} AS DOUBLE)"
            exprs.append((target, f"coalesce({number}, {fallback})"))
            checks.append(
                f"SELECT _row, {label}, 'not a number: ' || {shown} FROM _src "
                f"WHERE {q} IS NOT NULL AND {as_text} <> '' AND {number} IS NULL"
            )
            checks.append(
                f"SELECT _row, {label}, 'not a finite number: ' || {shown} FROM _src WHERE NOT isfinite({number})"
            )
            if target == "value":  # a rating, an amount, a duration: below 0 is a sign or unit gone wrong
                checks.append(
                    f"SELECT _row, {label}, 'negative value: ' || {shown} || ' (a rating, amount or duration is "
                    f"at least 0)' FROM _src WHERE {number} < 0 AND isfinite({number})"
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
                f"SELECT _row, {label}, 'not a timestamp (epoch seconds or ISO 8601): ' || {shown} FROM _src "
                f"WHERE {q} IS NOT NULL AND {as_text} <> '' AND ({expr}) IS NULL"
            )
            # epoch milliseconds read as seconds land tens of thousands of years ahead and order nothing wrong
            # enough to notice; refuse them instead of storing the year 32000
            checks.append(
                f"SELECT _row, {label}, 'epoch seconds outside the years 1740–2200: ' || {as_text} || "
                f"' (milliseconds? divide by 1000)' FROM _src "
                f"WHERE abs(TRY_CAST({q} AS DOUBLE)) >= {_EPOCH_2200} AND ({expr}) IS NOT NULL"
            )
            # a future event would be its user's last one, so every split would hold it out as the test target
            checks.append(
                f"SELECT _row, {label}, 'in the future: ' || CAST(({expr}) AS VARCHAR) || ' (more than [ingest] "
                f"future_seconds = {future_seconds:g} after now)' FROM _src "
                f"WHERE ({expr}) > make_timestamp({int(future_limit * 1_000_000)}) "
                f"AND coalesce(abs(TRY_CAST({q} AS DOUBLE)) < {_EPOCH_2200}, true)"
            )
        elif ctype == "list":
            if columns[src].endswith("[]"):
                exprs.append(
                    (target, f"list_transform(CAST({q} AS VARCHAR[]), lambda x: replace(x, chr(0), ''))")
                )
            else:
                exprs.append(
                    (
                        target,
                        f"list_filter(list_transform(string_split(replace(CAST({q} AS VARCHAR), chr(0), ''), "
                        f"{lit(separator)}), "
                        f"lambda x: trim(x)), lambda x: x <> '' AND x <> '(no genres listed)')",
                    )
                )
    key = {"items": "item_id", "queries": "query_id"}.get(kind)
    if key and source[key]:
        k = _quote(source[key])
        checks.append(
            f"SELECT _row, {lit(source[key])}, 'duplicate {key} ' || {_shown(k)} || "
            f"' (first at row ' || first_row || ')' FROM (SELECT _row, {k}, "
            f"min(_row) OVER (PARTITION BY trim(CAST({k} AS VARCHAR))) AS first_row FROM _src) WHERE _row > first_row"
        )
    if kind == "judgments":
        q_, i_ = _quote(source["query_id"] or "query_id"), _quote(source["item_id"] or "item_id")
        p_ = _quote(source["part"]) if source["part"] else lit(part)
        checks.append(
            f"SELECT _row, {lit(source['item_id'])}, 'duplicate judgment for query ' || {_shown(q_)} "
            f"|| ' and item ' || {_shown(i_)} || ' (first at row ' || first_row || ')' FROM ("
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
            f"SELECT _row, {lit(source[ref])}, 'unknown {ref} ' || {_shown(k)} || "
            f"'; ingest the {table} first' FROM _src WHERE {k} IS NOT NULL AND trim(CAST({k} AS VARCHAR)) "
            f"NOT IN (SELECT {ref} FROM {table})"
        )
    if kind == "items":
        extras = [c for c in columns if c not in {s for s in source.values() if s}]
        if extras:
            fields = ", ".join(
                f"{_quote(c)} := "
                + (f"replace({_quote(c)}, chr(0), '')" if columns[c] == "VARCHAR" else _quote(c))
                for c in extras
            )
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
