"""The item-to-item recall channel for users: EASE weights learned from the event log.

Stage 1's text channel (the bi-encoder) knows what items are about; it cannot know that the people who
watched *Heat* also watched *Ronin*. EASE (Steck, WWW 2019) learns exactly that: an item × item weight
matrix B that reconstructs each user's items from their other items, in closed form,
``B = I − P·diag(1/diag(P))`` with ``P = (XᵀX + λI)⁻¹``. A user's score for item j is ``Σ_h B[h, j]`` over
their history h. It is fit by cornac (``cornac.models.EASE``, the maintained implementation the evaluation's
EASE baseline also uses), on the binary users × items matrix of the events before a split's cut-offs.

Each row of B is cut to its ``neighbours`` largest weights, so a request reads a few sparse rows and the
channel serves in microseconds; the cut B is the model (evaluation and serving read the same one). The
inverse costs O(n³) in the number of items, so only the ``max_items`` most popular items with at least
``min_users`` users get a row: the rest, and items nobody has seen, come from the text channel.

Like co-watch lists, weights are stored in ``counts/`` keyed by the events' version and the split, and
training folds fit without the fold's users, so no training request's own events shape its features.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from twostage.atomic import write_file
from twostage.cowatch import prune_cached, seen_matrix, snapshot, version

if TYPE_CHECKING:
    import scipy.sparse

    from twostage.store import Store

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2


@dataclass(frozen=True, eq=False)
class ItemItem:
    """Sparse item × item weights: ``weights[h, j]`` is how much having item h says about item j; and the
    users per item (``popularity``) counted from the same users, for stage 2's popularity feature."""

    item_ids: tuple[str, ...]
    weights: scipy.sparse.csr_matrix
    popularity: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_row", {item: n for n, item in enumerate(self.item_ids)})
        # the ids as an array once, for the tie-break of every request's sort (a hot path when serving)
        object.__setattr__(self, "_ids", np.asarray(self.item_ids, dtype=object))

    def __len__(self) -> int:
        return len(self.item_ids)

    def _vector(self, history: Sequence[str]) -> np.ndarray:
        rows = [self._row[h] for h in dict.fromkeys(history) if h in self._row]  # type: ignore[attr-defined]
        if not rows:
            return np.zeros(len(self.item_ids), dtype=np.float32)
        return np.asarray(self.weights[rows].sum(axis=0), dtype=np.float32).ravel()

    def top(self, history: Sequence[str], k: int, exclude: Iterable[str] = ()) -> list[tuple[str, float]]:
        """The ``k`` best items for a history (item ids), best first, ties by item id; only items with a
        positive score, none of ``exclude`` or the history."""
        scores = self._vector(history)
        hit = np.flatnonzero(scores > 0)
        skip = set(exclude) | set(history)
        order = hit[np.lexsort((self._ids[hit], -scores[hit]))]  # type: ignore[attr-defined]
        out = []
        for n in order:
            item = self.item_ids[n]
            if item not in skip:
                out.append((item, float(scores[n])))
                if len(out) == k:
                    break
        return out

    def scores(self, history: Sequence[str], item_ids: Sequence[str]) -> np.ndarray:
        """The score of each of ``item_ids`` for a history (0 for items without a row)."""
        vector = self._vector(history)
        row = self._row  # type: ignore[attr-defined]
        return np.asarray([vector[row[i]] if i in row else 0.0 for i in item_ids], dtype=np.float64)


@dataclass(frozen=True)
class EaseOptions:
    """How the weights are fit (``[ranker] ease_*``)."""

    reg: float = 500.0
    neighbours: int = 100
    max_items: int = 10_000
    min_users: int = 2
    recent_items: int = 200

    def to_dict(self) -> dict[str, Any]:
        return {
            "reg": float(self.reg),
            "neighbours": int(self.neighbours),
            "max_items": int(self.max_items),
            "min_users": int(self.min_users),
            "recent_items": int(self.recent_items),
        }


def fit_ease(item_ids: Sequence[str], users: np.ndarray, items: np.ndarray, options: EaseOptions) -> ItemItem:
    """EASE over the (user, item) pairs ``users``/``items`` (indices into ``item_ids``), by cornac, each row
    of B cut to its ``neighbours`` largest positive weights."""
    import scipy.sparse as sp
    from cornac.data import Dataset
    from cornac.models import EASE

    counts = np.bincount(items, minlength=len(item_ids)) if len(items) else np.zeros(len(item_ids), int)
    popularity = {item_ids[n]: int(counts[n]) for n in np.flatnonzero(counts)}
    eligible = np.flatnonzero(counts >= options.min_users)
    if len(eligible) > options.max_items:  # the most popular, ties by item index (item id order)
        eligible = eligible[np.lexsort((eligible, -counts[eligible]))][: options.max_items]
    keep = np.isin(items, eligible)
    if not keep.any() or len(eligible) < 2:
        return ItemItem((), sp.csr_matrix((0, 0), dtype=np.float32), popularity)
    triples = [(str(u), str(i), 1.0) for u, i in zip(users[keep].tolist(), items[keep].tolist(), strict=True)]
    data = Dataset.from_uir(triples, seed=0)
    model = EASE(lamb=float(options.reg), posB=True, verbose=False, seed=0).fit(data)
    raw_of = {n: int(raw) for raw, n in data.iid_map.items()}
    ids = tuple(item_ids[raw_of[n]] for n in range(len(raw_of)))
    return ItemItem(ids, _cut_rows(np.asarray(model.B, dtype=np.float32), options.neighbours), popularity)


def _cut_rows(dense: np.ndarray, top: int) -> scipy.sparse.csr_matrix:
    """Each row's ``top`` largest positive entries as a CSR matrix (the rest are dropped)."""
    import scipy.sparse as sp

    n = dense.shape[0]
    top = min(top, n)
    cols = np.argpartition(-dense, top - 1, axis=1)[:, :top] if top < n else np.tile(np.arange(n), (n, 1))
    values = np.take_along_axis(dense, cols, axis=1)
    rows = np.repeat(np.arange(n), cols.shape[1])
    keep = values.ravel() > 0
    return sp.csr_matrix((values.ravel()[keep], (rows[keep], cols.ravel()[keep])), shape=dense.shape)


def cached_item_models(
    store: Store,
    directory: str | os.PathLike[str],
    folds: Sequence[Iterable[str]],
    options: EaseOptions,
    *,
    split: str | None,
) -> list[ItemItem]:
    """EASE weights for each of the disjoint user sets ``folds`` left out (``()``: every user), read from
    ``directory`` where stored (``ease-<key>.npz``; the key hashes the events' version, the split, the fold's
    users and the options), else fit and stored."""
    directory = Path(directory)
    folds = [frozenset(f) for f in folds]
    with snapshot(store) as cur:
        described = {"format": CACHE_FORMAT, **version(cur, split), **options.to_dict()}
        paths = [directory / f"ease-{_key(described, fold)}.npz" for fold in folds]
        models: list[ItemItem | None] = [read_item_model(path) for path in paths]
        missing = [n for n, m in enumerate(models) if m is None]
        seen = (
            seen_matrix(cur, split, options.recent_items, folds=[folds[n] for n in missing])
            if missing
            else None
        )
    for position, n in enumerate(missing):
        assert seen is not None
        keep = seen.fold[seen.users] != position  # users of this fold left out (fold -1: in no fold)
        models[n] = fit_ease(seen.item_ids, seen.users[keep], seen.items[keep], options)
        try:
            write_item_model(paths[n], models[n])  # type: ignore[arg-type]
        except OSError as e:  # a read-only project fits in memory
            logger.debug("EASE weights not stored at %s: %s", paths[n], e)
    if missing:
        _prune(directory)
    return models  # type: ignore[return-value]


def _key(described: dict[str, Any], exclude: frozenset[str]) -> str:
    users = hashlib.sha256(json.dumps(sorted(exclude)).encode()).hexdigest()
    return hashlib.sha256(json.dumps({**described, "exclude": users}, sort_keys=True).encode()).hexdigest()[
        :32
    ]


def read_item_model(path: Path) -> ItemItem | None:
    import scipy.sparse as sp

    try:
        with np.load(path, allow_pickle=False) as got:
            weights = sp.csr_matrix(
                (got["data"], got["indices"], got["indptr"]), shape=tuple(int(x) for x in got["shape"])
            )
            ids = tuple(str(i) for i in got["item_ids"])
            popularity = dict(
                zip((str(i) for i in got["popular_ids"]), got["popular_counts"].tolist(), strict=True)
            )
    except FileNotFoundError:
        return None
    except Exception as e:  # a damaged file is fit again and overwritten
        logger.debug("EASE weights %s unreadable (%s): fitting them again", path, e)
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used: kept by _prune
    return ItemItem(ids, weights, popularity)


def write_item_model(path: Path, model: ItemItem) -> None:
    buffer = io.BytesIO()
    w = model.weights
    np.savez(
        buffer,
        data=w.data,
        indices=w.indices,
        indptr=w.indptr,
        shape=np.asarray(w.shape),
        item_ids=np.asarray(model.item_ids, dtype=str),
        popular_ids=np.asarray(list(model.popularity), dtype=str),
        popular_counts=np.asarray(list(model.popularity.values()), dtype=np.int64),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, buffer.getvalue())


CACHE_FILES = 12


def _prune(directory: Path) -> None:
    prune_cached(directory, "ease-*.npz", CACHE_FILES)
