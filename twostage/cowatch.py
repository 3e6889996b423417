"""Items watched together, as text stage 2 can read: ``{cowatched}`` in ``[reranker] item_template``.

Each item's ``cowatched`` field lists the titles of the items most often in the same users' histories
(cosine of co-occurrence counts). A cross-encoder reads the user's recent titles and the candidate's
co-watched titles in one sequence and can match them title for title: the collaborative signal of item-kNN,
in a form a text model can use. A bi-encoder squeezes each side into one vector before they meet, so this
set overlap is exactly what stage 2 can see and stage 1 cannot. On ml-latest-small (validation users, top
100 of stage 1), adding "how many of the last 5 titles are in the candidate's top-8 co-watched list" to the
stage-1 score raised nDCG@10 from 0.035 to 0.05.

The same lists also give stage 2 a score of its own, fused with the cross-encoder's and stage 1's
(``[reranker] cowatch_weight``): :func:`shared_history`, the user's recent items that are in the candidate's
list. The cross-encoder has to learn to read that overlap from text; the count needs no training.

The counts come from the event log in DuckDB: for evaluation only from events before the split's cut-offs,
and for reranker training from other users than the request's (:func:`training_folds`), so a training
positive is never "co-watched" because of the very user it is the positive of.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from twostage.atomic import write_file
from twostage.store import USER_CUTOFFS

if TYPE_CHECKING:
    import duckdb

    from twostage.store import Store

logger = logging.getLogger(__name__)

FIELD = "cowatched"
SEPARATOR = "; "


def co_watched(
    store: Store,
    *,
    top: int,
    split: str | None = None,
    exclude_users: Iterable[str] = (),
    min_users: int,
    recent_items: int,
) -> dict[str, list[str]]:
    """Each item's ``top`` most co-watched items, best first (ties by item id).

    ``split`` counts only events before that split's cut-offs (as the popularity prior does);
    ``exclude_users`` leaves those users' events out entirely. A co-watched item needs ``min_users`` users
    (below that, cosine is noise), and only each user's ``recent_items`` latest items count (bounding the
    work on heavy users); ``[reranker] cowatch_min_users`` and ``cowatch_recent_items`` set them.
    """
    with snapshot(store) as cur:
        seen = seen_matrix(cur, split, recent_items, exclude=exclude_users)
    return _count(seen, 0, top=top, min_users=min_users)[0]


def co_watched_folds(
    store: Store,
    folds: Sequence[Iterable[str]],
    *,
    top: int,
    split: str | None = None,
    min_users: int,
    recent_items: int,
) -> list[dict[str, list[str]]]:
    """For each of the disjoint user sets ``folds``, :func:`co_watched` with ``exclude_users`` that fold, in
    one pass: per block of items the counts over every user and each fold's own counts, subtracted."""
    with snapshot(store) as cur:
        seen = seen_matrix(cur, split, recent_items, folds=folds)
    return _count(seen, len(folds), top=top, min_users=min_users)


def cached_co_watched(
    store: Store,
    directory: str | os.PathLike[str],
    folds: Sequence[Iterable[str]] = ((),),
    *,
    top: int,
    split: str | None = None,
    min_users: int,
    recent_items: int,
) -> list[dict[str, list[str]]]:
    """:func:`co_watched_folds` read from ``directory`` (``cowatch-<key>.parquet``, one file per fold) where
    stored, the missing folds counted in one pass and stored. The key hashes what the lists are counted from:
    the split (name and creation time), the fold's users, the options and the events table's version (row
    count and latest ``seq``), so an ingest or a new split makes new files rather than stale reads. A store
    that cannot be written to (a read-only project) is counted in memory; a failed write is only logged."""
    directory = Path(directory)
    folds = [frozenset(f) for f in folds]
    with snapshot(store) as cur:
        described = version(cur, split)
        options = {"top": int(top), "min_users": int(min_users), "recent_items": int(recent_items)}
        paths = [directory / f"cowatch-{_key(described, options, fold)}.parquet" for fold in folds]
        lists: list[dict[str, list[str]] | None] = [_read(path) for path in paths]
        missing = [n for n, value in enumerate(lists) if value is None]
        if missing:
            one = len(missing) == 1  # one fold: leave its users out in SQL rather than subtract
            seen = seen_matrix(
                cur,
                split,
                recent_items,
                exclude=folds[missing[0]] if one else (),
                folds=() if one else [folds[n] for n in missing],
            )
    if missing:
        counted = _count(seen, 0 if one else len(missing), top=top, min_users=min_users)
        for n, value in zip(missing, counted, strict=True):
            lists[n] = value
            _write(paths[n], value)
        _prune(directory)
    return lists  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- counting
# Largest co-occurrence block multiplied at once, in stored counts (about 60 bytes each while it is scored).
BLOCK_NONZEROS = 1 << 22


@dataclasses.dataclass
class Seen:
    """Each user's recent distinct items after the cut-offs and exclusions: users × items, 1 where seen."""

    item_ids: list[str]  # column order: DuckDB's ORDER BY item_id, so index order is the SQL tie order
    users: np.ndarray  # int32 row per (user, item) pair
    items: np.ndarray  # int32 column per pair
    fold: np.ndarray  # int32 fold of each row (user), -1 for users in none


@contextlib.contextmanager
def snapshot(store: Store) -> Iterator[duckdb.DuckDBPyConnection]:
    """A cursor in one read transaction: the queries of one count see the same events and splits."""
    with store.cursor() as cur:
        cur.execute("BEGIN TRANSACTION")
        try:
            yield cur
        finally:
            cur.execute("ROLLBACK")  # read only: nothing to keep


def seen_matrix(
    cur: duckdb.DuckDBPyConnection,
    split: str | None,
    recent_items: int,
    *,
    exclude: Iterable[str] = (),
    folds: Sequence[Iterable[str]] = (),
) -> Seen:
    """DuckDB filters (cut-offs, excluded users, each user's ``recent_items`` latest distinct items, ties by
    item id) and numbers users and items: the pairs cross into Python as int arrays, the item ids once."""
    import pyarrow as pa

    fold_of: dict[str, int] = {}
    for n, fold in enumerate(folds):
        for user in fold:
            if fold_of.setdefault(user, n) != n:
                raise ValueError(f"user {user!r} is in more than one fold")
    item_ids = [
        str(i)
        for i in cur.execute("SELECT DISTINCT item_id FROM events ORDER BY item_id").fetchnumpy()["item_id"]
    ]
    cur.register(
        "_items",
        pa.table(
            {
                "item_id": pa.array(item_ids, pa.string()),
                "i": pa.array(np.arange(len(item_ids), dtype=np.int32)),
            }
        ),
    )
    cur.register("_excluded", pa.table({"user_id": pa.array(sorted(set(exclude)), pa.string())}))
    cur.register(
        "_folds",
        pa.table(
            {
                "user_id": pa.array(list(fold_of), pa.string()),
                "fold": pa.array(list(fold_of.values()), pa.int32()),
            }
        ),
    )
    try:
        got = cur.execute(
            f"""
            WITH cut AS ({USER_CUTOFFS}),  -- split NULL: no cut-offs, every event counts
            ranked AS (
                SELECT e.user_id, e.item_id,
                       row_number() OVER (PARTITION BY e.user_id ORDER BY max(e.ts) DESC, e.item_id) AS n
                FROM events e LEFT JOIN cut c USING (user_id)
                WHERE (c.cts IS NULL OR (e.ts, e.seq) < (c.cts, c.cseq))
                  AND e.user_id NOT IN (SELECT user_id FROM _excluded)
                GROUP BY e.user_id, e.item_id
            ),
            seen AS (SELECT user_id, item_id FROM ranked WHERE n <= {int(recent_items)})
            SELECT (dense_rank() OVER (ORDER BY s.user_id) - 1)::INTEGER AS u, i.i,
                   coalesce(f.fold, -1)::INTEGER AS fold
            FROM seen s JOIN _items i USING (item_id) LEFT JOIN _folds f USING (user_id)
            """,
            [split],
        ).fetchnumpy()
    finally:
        for name in ("_items", "_excluded", "_folds"):
            cur.unregister(name)
    users, items = np.asarray(got["u"], np.int32), np.asarray(got["i"], np.int32)
    fold = np.full(int(users.max()) + 1 if len(users) else 0, -1, np.int32)
    fold[users] = got["fold"]
    return Seen(item_ids, users, items, fold)


def _count(seen: Seen, folds: int, *, top: int, min_users: int) -> list[dict[str, list[str]]]:
    """The lists without each of the ``folds`` folds of users tagged in ``seen`` (0: one list set, counted
    over every user in ``seen``).

    The co-occurrence counts C = XᵀX of the binary users × items matrix X are multiplied a block of item rows
    at a time (bounded by :data:`BLOCK_NONZEROS`) and each block is cut down to its rows' top ``top`` before
    the next, so memory stays bounded however many pairs there are. A fold's counts are C − X_fᵀX_f and
    n − n_f, X_f being the fold's users' rows: every fold shares the one product over all users.
    """
    import scipy.sparse as sp

    if top < 1:
        raise ValueError(f"top must be >= 1, not {top}")
    n_items, n_users = len(seen.item_ids), len(seen.fold)
    x = sp.csr_array((np.ones(len(seen.users), np.int32), (seen.users, seen.items)), shape=(n_users, n_items))
    users_of = np.bincount(seen.items, minlength=n_items).astype(np.int64)  # n: users per item
    # only items with enough users over everyone can have enough without a fold: the co-watched columns
    keep = np.flatnonzero(users_of >= min_users).astype(np.int32)
    xt, xk = x.T.tocsr(), x[:, keep].tocsr()
    groups = []  # per output: (its fold's X_fᵀ, X_f's kept columns) or None, and n without the fold
    for fold in range(folds) if folds else [None]:
        rows = np.flatnonzero(seen.fold == fold) if fold is not None else np.empty(0, np.int64)
        if not len(rows):
            groups.append((None, users_of))
            continue
        xf = x[rows]
        groups.append(
            ((xf.T.tocsr(), xf[:, keep].tocsr()), users_of - np.bincount(xf.indices, minlength=n_items))
        )
    found: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in groups]
    if len(keep):
        # an item row's products (its users' kept items) bound its stored counts, as does the column count;
        # each row also holds ``top`` slots while it is ranked
        cost = np.minimum(xt @ np.diff(xk.indptr).astype(np.int64), len(keep)) + top
        for lo, hi in _blocks(cost, BLOCK_NONZEROS):
            everyone = xt[lo:hi] @ xk
            for out, (fold_mats, users) in zip(found, groups, strict=True):
                block = everyone if fold_mats is None else everyone - fold_mats[0][lo:hi] @ fold_mats[1]
                out.append(_block_top(block, lo, keep, users, min_users=min_users, top=top))
    names = np.array(seen.item_ids, dtype=object)
    lists = []
    for out in found:
        if not out:
            lists.append({})
            continue
        rows, best, counts = (np.concatenate(parts) for parts in zip(*out, strict=True))
        titles = [t[:c] for t, c in zip(names[best].tolist(), counts.tolist(), strict=True)]
        lists.append(dict(zip(names[rows].tolist(), titles, strict=True)))
    return lists


def _blocks(cost: np.ndarray, budget: int) -> Iterator[tuple[int, int]]:
    """Consecutive row ranges whose summed ``cost`` stays within ``budget`` (a row over it goes alone)."""
    total = np.cumsum(cost)
    lo = 0
    while lo < len(cost):
        spent = total[lo - 1] if lo else 0
        hi = max(int(np.searchsorted(total, spent + budget, side="right")), lo + 1)
        yield lo, hi
        lo = hi


def _block_top(
    block: Any, lo: int, keep: np.ndarray, users: np.ndarray, *, min_users: int, top: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows of ``block`` (items ``lo``…: co-occurrence counts with the items ``keep``) that have a
    co-watched item: their item ids, their best ``top`` item ids by (cosine descending, id ascending), padded
    with 0, and how many each has. ``users`` is n per item.

    Cosine is ``c / sqrt(n_a · n_b)`` in float64 with the integer product under the root, as DuckDB computes
    it, so equal cosines tie here exactly where they tie in SQL.
    """
    # Rows are contiguous in CSR order; ids within a row are not sorted (sorting a whole block costs more than
    # the rest together): only the tied entries at a row's cut and the chosen entries are sorted below.
    m = block.shape[0]
    a = np.repeat(np.arange(lo, lo + m, dtype=np.int32), np.diff(block.indptr))
    b = keep[block.indices]
    ok = (b != a) & (users[b] >= min_users) & (block.data > 0)
    a, b, c = a[ok], b[ok], block.data[ok]
    cos = c.astype(np.float64) / np.sqrt((users[a] * users[b]).astype(np.float64))
    row = a - lo
    length = np.bincount(row, minlength=m)
    start = np.cumsum(length) - length
    # a row's top: the cosines above its top-th largest, then the smallest ids among those equal to it
    kth = np.full(m, -np.inf)
    long = np.flatnonzero(length > top)
    kth[long] = _kth_largest(cos, start[long], length[long], top)
    chosen = cos > kth[row]
    room = top - np.bincount(row[chosen], minlength=m)
    tied = np.flatnonzero(cos == kth[row])
    if len(tied):
        tied = tied[np.lexsort((b[tied], row[tied]))]  # by row, then id
        tied_rows = row[tied]
        rank = np.arange(len(tied)) - np.searchsorted(tied_rows, tied_rows)  # 0-based within its row
        chosen[tied[rank < room[tied_rows]]] = True
    picked = np.flatnonzero(chosen)
    picked = picked[np.lexsort((b[picked], -cos[picked], row[picked]))]  # row, cosine down, id up
    row, b = row[picked], b[picked]
    count = np.bincount(row, minlength=m)
    slot = np.arange(len(row)) - (np.cumsum(count) - count)[row]
    best = np.zeros((m, top), np.int32)
    best[row, slot] = b
    has = count > 0
    return np.flatnonzero(has) + lo, best[has], count[has]


def _kth_largest(values: np.ndarray, start: np.ndarray, length: np.ndarray, k: int) -> np.ndarray:
    """The ``k``-th largest of each segment ``values[start:start + length]`` (each longer than ``k``): the
    segments of similar length are padded into one matrix and partitioned row-wise, in one call per size."""
    out = np.empty(len(start))
    width_bits = np.ceil(np.log2(length)).astype(np.int64)
    for bits in np.unique(width_bits):
        which = np.flatnonzero(width_bits == bits)
        size, width = length[which], 1 << int(bits)
        row = np.repeat(np.arange(len(which)), size)
        col = np.arange(int(size.sum())) - np.repeat(np.cumsum(size) - size, size)
        grid = np.full((len(which), width), -np.inf)
        grid[row, col] = values[np.repeat(start[which], size) + col]
        out[which] = np.partition(grid, width - k, axis=1)[:, width - k]
    return out


# ---------------------------------------------------------------------------------------------- the store
# Bump when the stored lists would differ for the same inputs (a change of what is counted or how).
CACHE_FORMAT = 1
# Stored list files kept in a project's counts/ directory; the least recently used beyond are deleted.
CACHE_FILES = 24


def version(cur: duckdb.DuckDBPyConnection, split: str | None) -> dict[str, Any]:
    """What the lists are counted from: the events table's version (rows, latest ingest ``seq``: ``seq``
    only grows) and the split's creation (a split made again has new cut-offs)."""
    rows, last = cur.execute("SELECT count(*), max(seq) FROM events").fetchone()
    created = None
    if split is not None:
        got = cur.execute("SELECT created_at FROM split_info WHERE split = ?", [split]).fetchone()
        created = None if got is None else str(got[0])
    return {
        "events": [int(rows), None if last is None else int(last)],
        "split": split,
        "split_created": created,
    }


def _key(version: dict[str, Any], options: dict[str, int], exclude: frozenset[str]) -> str:
    users = hashlib.sha256(json.dumps(sorted(exclude)).encode()).hexdigest()
    described = {"format": CACHE_FORMAT, **version, **options, "exclude_users": users}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]


def _read(path: Path) -> dict[str, list[str]] | None:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        return None
    except Exception as e:  # a damaged file is counted again and overwritten
        logger.debug("co-watch lists %s unreadable (%s): counting them again", path, e)
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used: kept by _prune
    return dict(zip(table["item_id"].to_pylist(), table["cowatched"].to_pylist(), strict=True))


def _write(path: Path, lists: dict[str, list[str]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "item_id": pa.array(list(lists), pa.string()),
            "cowatched": pa.array(list(lists.values()), pa.list_(pa.string())),
        }
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        write_file(path, sink.getvalue().to_pybytes())
    except OSError as e:
        logger.debug("co-watch lists not stored at %s: %s", path, e)


def prune_cached(directory: Path, pattern: str, keep: int) -> None:
    """Delete all but the ``keep`` most recently used files matching ``pattern`` in ``directory`` (counts of
    older events versions; reading a file marks it used)."""
    try:
        files = sorted(directory.glob(pattern), key=lambda f: f.stat().st_mtime, reverse=True)
        for old in files[keep:]:
            old.unlink(missing_ok=True)
    except OSError as e:
        logger.debug("%s in %s not pruned: %s", pattern, directory, e)


def _prune(directory: Path) -> None:
    prune_cached(directory, "cowatch-*.parquet", CACHE_FILES)


def training_folds(user_ids: Sequence[str], folds: int, seed: int) -> dict[str, int]:
    """Users dealt into ``folds`` groups: a training request of a user in fold f reads co-watch lists counted
    without fold f, so its own events never make its positive look co-watched with its history."""
    users = sorted(set(user_ids))
    random.Random(seed).shuffle(users)
    return {u: n % folds for n, u in enumerate(users)}


def shared_history(history: Sequence[str], item_id: str, lists: Mapping[str, Sequence[str]]) -> list[str]:
    """The history items (in history order) that are among ``item_id``'s co-watched items.

    Its length is the co-watch score stage 2 fuses: how many of the user's recent items are watched with
    the candidate by the same users. Pass the recent history only (``[text] history_size``); a re-watched
    item counts once.
    """
    watched_with = set(lists.get(item_id, ()))
    return [h for h in dict.fromkeys(history) if h in watched_with]
