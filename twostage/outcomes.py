"""Outcomes: what users did with items (a rating's value, or whether an event happened), read per split part.

The behaviour predictor (``twostage.predictor``) learns and is evaluated on these. Which events are
training-side follows the split: on temporal splits, every event before the user's earliest held-out cut-off
(what every other model of twostage trains on); on a random split (``[split] by = "event"``), every event that
is not itself held out. A held-out outcome is the first event of its (user, item) at or after the held row's
cut-off. The SQL is here, beside the split's, so the two can be read together.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from twostage.errors import NotFoundError
from twostage.store import USER_CUTOFFS

if TYPE_CHECKING:
    from twostage.store import Store

_TRAIN_TEMPORAL = f"""
    WITH cut AS ({USER_CUTOFFS})
    SELECT e.user_id, e.item_id, e.event, e.value FROM events e LEFT JOIN cut c USING (user_id)
    WHERE c.cts IS NULL OR (e.ts, e.seq) < (c.cts, c.cseq)
    ORDER BY e.user_id, e.ts DESC, e.seq DESC
"""

_TRAIN_RANDOM = """
    SELECT e.user_id, e.item_id, e.event, e.value FROM events e
    WHERE NOT EXISTS (
        SELECT 1 FROM splits s WHERE s.split = ? AND s.request_id = e.user_id AND s.item_id = e.item_id
          AND s.cutoff_ts = e.ts AND s.cutoff_seq = e.seq)
    ORDER BY e.user_id, e.ts DESC, e.seq DESC
"""

_HELD = """
    WITH held AS (
        SELECT request_id AS user_id, item_id, min_by(cutoff_ts, (cutoff_ts, cutoff_seq)) AS cts,
               min_by(cutoff_seq, (cutoff_ts, cutoff_seq)) AS cseq
        FROM splits WHERE split = ? AND part = ? AND request_kind = 'user' GROUP BY 1, 2)
    SELECT h.user_id, h.item_id, e.event, arg_min(e.value, (e.ts, e.seq))
    FROM held h JOIN events e
      ON e.user_id = h.user_id AND e.item_id = h.item_id AND (e.ts, e.seq) >= (h.cts, h.cseq)
    GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
"""


@dataclass(frozen=True)
class Columns:
    """Parallel arrays, one row per index of their first axis: taking rows takes them from every array."""

    def __len__(self) -> int:
        return len(getattr(self, dataclasses.fields(self)[0].name))

    def take(self, index: np.ndarray) -> Self:
        return type(self)(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))

    def sample(self, limit: int | None, rng: np.random.Generator) -> Self:
        """All rows shuffled, or ``limit`` of them drawn without replacement."""
        if limit is None or len(self) <= limit:
            return self.take(rng.permutation(len(self)))
        return self.take(rng.choice(len(self), size=limit, replace=False))


@dataclass(frozen=True)
class Outcomes(Columns):
    """Parallel arrays, one row per (user, item, event): ``value`` is the event's value (NaN when it has none)."""

    users: np.ndarray
    items: np.ndarray
    events: np.ndarray
    values: np.ndarray

    @classmethod
    def from_rows(cls, rows: list[tuple]) -> Outcomes:
        cols = list(zip(*rows, strict=True)) if rows else [(), (), (), ()]
        return cls(
            np.asarray(cols[0], dtype=object),
            np.asarray(cols[1], dtype=object),
            np.asarray(cols[2], dtype=object),
            np.asarray([np.nan if v is None else v for v in cols[3]], dtype=np.float64),
        )

    def of(self, event: str) -> Outcomes:
        """The rows of one event type."""
        return self.take(self.events == event)


def _rows(store: Store, sql: str, params: list) -> list[tuple]:
    with store.cursor() as cur:
        return cur.execute(sql, params).fetchall()


def is_random_split(store: Store, split: str) -> bool:
    """Whether ``split`` holds out events at random (``by = "event"``) rather than by time."""
    import json

    rows = _rows(store, "SELECT strategy, config FROM split_info WHERE split = ?", [split])
    if not rows:
        raise NotFoundError(f"no split '{split}'; run 'twostage split' first")
    strategy, config = rows[0]
    return strategy == "ratio" and json.loads(config).get("by") == "event"


def train_outcomes(store: Store, split: str) -> Outcomes:
    """Every training-side event of ``split``, newest first per user."""
    sql = _TRAIN_RANDOM if is_random_split(store, split) else _TRAIN_TEMPORAL
    return Outcomes.from_rows(_rows(store, sql, [split]))


def held_outcomes(store: Store, split: str, part: str) -> Outcomes:
    """The held-out events of ``split/part``: per held (user, item) and event type, its first occurrence."""
    rows = _rows(store, _HELD, [split, part])
    if not rows:
        raise NotFoundError(f"split '{split}' has no '{part}' events to predict; split the events first")
    return Outcomes.from_rows(rows)


def sample_negatives(
    positives: Outcomes, candidates: np.ndarray, seen: dict[str, set[str]], per_positive: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(users, items) pairs the users never touched: ``per_positive`` uniform draws from ``candidates`` for
    each positive, skipping any item in the user's ``seen`` set (their whole log), seeded."""
    rng = np.random.default_rng(seed)
    users: list[str] = []
    items: list[str] = []
    for user in positives.users:
        taken = seen.get(user, set())
        for _ in range(per_positive):
            for _attempt in range(20):
                item = candidates[rng.integers(len(candidates))]
                if item not in taken:
                    users.append(user)
                    items.append(item)
                    break
    return np.asarray(users, dtype=object), np.asarray(items, dtype=object)


# How many of a user's latest events ``predict`` reads per context item: enough to fill the context after
# skipping the items asked about. Snapshots publish as many per user.
LATEST_EVENTS = 4


def user_log(store: Store, user_id: str, limit: int) -> list[tuple[str, str, float]]:
    """A user's latest ``limit`` events (item, event, value), newest first: the context ``predict`` serves."""
    rows = _rows(
        store,
        "SELECT item_id, event, value FROM events WHERE user_id = ? ORDER BY ts DESC, seq DESC LIMIT ?",
        [user_id, limit],
    )
    return [(i, e, float("nan") if v is None else float(v)) for i, e, v in rows]


def export_latest_events(store: Store, path: Any, limit: int) -> None:
    """Every user's latest ``limit`` events (``user_id``, ``item_id``, ``event``, ``value``), newest first per
    user, to a Parquet file: what a published snapshot serves ``/predict`` from (the rows ``user_log`` reads)."""
    target = str(path).replace("'", "''")
    with store.cursor() as cur:
        cur.execute(
            f"""
            COPY (
                SELECT user_id, item_id, event, value FROM (
                    SELECT *, row_number() OVER (PARTITION BY user_id ORDER BY ts DESC, seq DESC) AS pos FROM events)
                WHERE pos <= {int(limit)} ORDER BY user_id, pos
            ) TO '{target}' (FORMAT parquet)
            """
        )


def read_latest_events(path: Any) -> dict[str, list[tuple[str, str, float]]]:
    """:func:`export_latest_events`'s file as {user: [(item, event, value), ...]}, newest first."""
    import pyarrow.parquet as pq

    table = pq.read_table(path).to_pydict()
    out: dict[str, list[tuple[str, str, float]]] = {}
    for u, i, e, v in zip(table["user_id"], table["item_id"], table["event"], table["value"], strict=True):
        out.setdefault(u, []).append((i, e, float("nan") if v is None else float(v)))
    return out


def user_ratings(store: Store, split: str | None, rating_event: str) -> dict[str, dict[str, float]]:
    """Each user's latest rating of each item they rated, before their earliest held-out cut-off in ``split``
    (every event when None): the ratings the expected-rating blend reads beside a user's history."""
    rows = _rows(
        store,
        f"""
        WITH cut AS ({USER_CUTOFFS})  -- split NULL: no cut-offs, every event counts
        SELECT e.user_id, e.item_id, arg_max(e.value, (e.ts, e.seq)) FROM events e LEFT JOIN cut c USING (user_id)
        WHERE e.event = ? AND e.value IS NOT NULL AND (c.cts IS NULL OR (e.ts, e.seq) < (c.cts, c.cseq))
        GROUP BY 1, 2
        """,
        [split, rating_event],
    )
    out: dict[str, dict[str, float]] = {}
    for user, item, value in rows:
        out.setdefault(user, {})[item] = float(value)
    return out
