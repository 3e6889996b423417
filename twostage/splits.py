"""Splits: which events (recommendation) or judgments (search) are held out for validation and test.

A split is the one decision that can leak the future into training, so its SQL lives in one module where
the cut-offs can be read side by side: each held-out row carries the (ts, seq) before which its user's
history may be used. Every value is a ``?`` parameter. :class:`twostage.store.Store` owns the connection
and calls in here (``Store.split``); ``grade_expression`` is shared with ``Store.train_events``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from twostage.errors import NotFoundError

if TYPE_CHECKING:
    import duckdb

    from twostage.config import RelevanceConfig, SplitConfig


def write_split(
    con: duckdb.DuckDBPyConnection,
    config: SplitConfig,
    relevance: RelevanceConfig,
    *,
    name: str | None,
) -> dict[str, int]:
    """Write split ``name`` (default: the strategy) over ``con``, a cursor inside the transaction ``Store.split``
    opened: the work behind it.

    Returns the number of requests in each held-out part.
    """
    name = name or config.strategy
    con.execute("DELETE FROM splits WHERE split = ?", [name])
    con.execute("DELETE FROM split_info WHERE split = ?", [name])
    if config.strategy == "given":
        if not con.execute("SELECT count(*) FROM judgments").fetchone()[0]:
            raise NotFoundError("a 'given' split needs judgments; ingest qrels first")
        con.execute(
            "INSERT INTO splits SELECT ?, part, 'query', query_id, item_id, relevance, NULL, NULL "
            "FROM judgments WHERE relevance > 0",
            [name],
        )
    else:
        if not con.execute("SELECT count(*) FROM events").fetchone()[0]:
            raise NotFoundError("this split needs events; ingest events first")
        grade_sql, grade_params = grade_expression(relevance)
        if config.strategy == "leave-last-out":
            _leave_last_out(con, name, config, grade_sql, grade_params)
        elif config.by == "time":
            _ratio_by_time(con, name, config, grade_sql, grade_params)
        elif config.by == "event":
            _ratio_by_event(con, name, config, grade_sql, grade_params)
        else:
            _ratio_by_user(con, name, config, grade_sql, grade_params)
    con.execute(
        "INSERT INTO split_info VALUES (?, ?, ?, now()::TIMESTAMP)",
        [name, config.strategy, json.dumps(_asdict(config))],
    )
    return dict(
        con.execute(
            "SELECT part, count(DISTINCT request_id) FROM splits WHERE split = ? GROUP BY 1", [name]
        ).fetchall()
    )


def _leave_last_out(
    con: duckdb.DuckDBPyConnection, name: str, config: SplitConfig, grade_sql: str, params: list[Any]
) -> None:
    con.execute(
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


def _ratio_by_time(
    con: duckdb.DuckDBPyConnection, name: str, config: SplitConfig, grade_sql: str, params: list[Any]
) -> None:
    train, valid, _ = config.ratios
    con.execute(
        f"""
        INSERT INTO splits
        WITH ordered AS (
            SELECT *, (row_number() OVER (ORDER BY ts, seq) - 1) / count(*) OVER () AS q,
                   count(*) OVER (PARTITION BY user_id) AS n
            FROM events),
        held AS (
            SELECT *, CASE WHEN q < ? + ? THEN 'valid' ELSE 'test' END AS part
            FROM ordered WHERE q >= ? AND n >= ?),
        cut AS (SELECT part, min(ts) AS cts, min_by(seq, (ts, seq)) AS cseq FROM held GROUP BY part)
        SELECT ?, h.part, 'user', h.user_id, h.item_id, {grade_sql}, c.cts, c.cseq
        FROM held h JOIN cut c USING (part)
        """,
        [train, valid, train, config.min_events, name, *params],
    )


def _ratio_by_event(
    con: duckdb.DuckDBPyConnection, name: str, config: SplitConfig, grade_sql: str, params: list[Any]
) -> None:
    # Each event goes to a part at random (seeded hash of its identity): the rating-prediction protocol of
    # MovieLens benchmarks. A held row's cut-off is the event itself, so rankings trained on this split see
    # only each user's events before their first held-out one; the predictor trains on every event not held.
    train, valid, _ = config.ratios
    con.execute(
        f"""
        INSERT INTO splits
        WITH drawn AS (
            SELECT *, hash(user_id || '|' || item_id || '|' || seq::VARCHAR || '|' || ?::VARCHAR)
                      / 18446744073709551616.0 AS q,
                   count(*) OVER (PARTITION BY user_id) AS n
            FROM events)
        SELECT ?, CASE WHEN q < ? + ? THEN 'valid' ELSE 'test' END, 'user', user_id, item_id,
               {grade_sql}, ts, seq
        FROM drawn WHERE q >= ? AND n >= ?
        """,
        [config.seed, name, train, valid, *params, train, config.min_events],
    )


def _ratio_by_user(
    con: duckdb.DuckDBPyConnection, name: str, config: SplitConfig, grade_sql: str, params: list[Any]
) -> None:
    train, valid, _ = config.ratios
    # Held-out users keep their first 80% as context; their last 20% (at least one event) are targets.
    con.execute(
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
