"""What the learned stage 2 knows about each (request, candidate): one row of numbers per candidate.

Every feature is computed here, from the pipeline that ranks (its models, index, catalogue and log counts),
so a training list, a validation list and a served request get exactly the same columns. A feature a
pipeline cannot compute (no lexical channel, no cross-encoder, a query with no history) is NaN, which
LightGBM treats as missing.

- ``stage1``, ``stage1_rank``: the fused stage-1 score and the candidate's rank in stage 1's list;
- ``dense``: the bi-encoder's cosine of request and item;
- ``lexical``: the candidate's BM25 score (hybrid search);
- ``items``, ``items_recent``: the EASE item-to-item score from the request's whole history and from its
  recent items only (``[text] history_size``; what comes next follows the latest items most);
- ``cowatch``: how many recent history items are co-watched with it; ``cowatch_recency``: 1/position of the
  newest such history item (1 = the latest one), the interactions since the user last took a similar item;
- ``popularity``: ln(1 + users) of the item, counted from the same users as ``items``;
- ``history_length``: ln(1 + history length) of the request;
- ``category_overlap``: the share of the item's categories found in the recent history's items;
- ``rerank``: the cross-encoder's score (the one feature that costs a model pass per candidate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from twostage.config import FEATURES

if TYPE_CHECKING:
    from twostage.requests import Request


class Ranking(Protocol):
    """What the features read of the pipeline that ranks (``twostage.pipeline.Pipeline`` is one; named by
    its parts so this module does not import the pipeline that imports it)."""

    index: Any
    lexical: Any
    counts: Any
    catalogue: Any
    text: Any
    reranker: Any

    def watched_with(self, request: Request, item_id: str) -> list[str]: ...


# the features that need a model pass beyond stage 1's (dropped first when they earn nothing)
COSTLY = ("rerank",)


def available(pipe: Ranking) -> tuple[str, ...]:
    """The features ``pipe`` can compute for some request: those whose source it has."""
    have = {
        "lexical": pipe.lexical is not None,
        "items": pipe.counts.items is not None,
        "items_recent": pipe.counts.items is not None,
        "cowatch": bool(pipe.counts.cowatched),
        "cowatch_recency": bool(pipe.counts.cowatched),
        "popularity": pipe.counts.items is not None or bool(pipe.counts.popularity),
        "category_overlap": any(pipe.catalogue.categories().values()),
        "rerank": pipe.reranker is not None,
    }
    return tuple(f for f in FEATURES if have.get(f, True))


def candidate_features(
    pipe: Ranking,
    request: Request,
    candidates: Sequence[tuple[str, float]],
    vector: np.ndarray | None,
    names: Sequence[str],
    rerank_scores: np.ndarray | None = None,
) -> np.ndarray:
    """A ``len(candidates) × len(names)`` float matrix (NaN where a feature does not apply).

    ``candidates`` are stage 1's (item id, score), best first; ``vector`` is the request's bi-encoder vector
    (for ``dense``); ``rerank_scores`` the cross-encoder's scores of the candidates, when ``rerank`` is asked.
    """
    ids = [i for i, _ in candidates]
    n = len(ids)
    out = np.full((n, len(names)), np.nan, dtype=np.float64)
    if not n:
        return out
    history = request.history
    recent = history[: pipe.text.history_size]
    column = {name: c for c, name in enumerate(names)}

    def put(name: str, values: Sequence[float] | np.ndarray) -> None:
        if name in column:
            out[:, column[name]] = values

    stage1 = np.asarray([s for _, s in candidates], dtype=np.float64)
    put("stage1", stage1)
    put("stage1_rank", 1 + np.searchsorted(np.sort(-stage1), -stage1, side="left"))
    if "dense" in column and vector is not None:
        put("dense", pipe.index.vectors(ids) @ np.asarray(vector, dtype=np.float32))
    if "lexical" in column and pipe.lexical is not None:
        put("lexical", pipe.lexical.scores(request.text, ids))
    items = pipe.counts.items
    if "items" in column and items is not None and history:
        put("items", items.scores(history, ids))
    if "items_recent" in column and items is not None and recent:
        put("items_recent", items.scores(recent, ids))
    if pipe.counts.cowatched and recent and ("cowatch" in column or "cowatch_recency" in column):
        position = {h: p for p, h in reversed(list(enumerate(dict.fromkeys(recent), start=1)))}
        shared = [pipe.watched_with(request, i) for i in ids]
        put("cowatch", [len(s) for s in shared])
        put("cowatch_recency", [1.0 / position[s[0]] if s else 0.0 for s in shared])
    if "popularity" in column:
        counts = items.popularity if items is not None else pipe.counts.popularity
        put("popularity", [math.log1p(counts.get(i, 0)) for i in ids])
    if "history_length" in column:
        put("history_length", np.full(n, math.log1p(len(history))))
    if "category_overlap" in column and recent:
        categories = pipe.catalogue.categories()
        seen = set().union(*(categories.get(h, set()) for h in recent))
        put(
            "category_overlap",
            [
                len(categories.get(i, set()) & seen) / len(categories[i]) if categories.get(i) else 0.0
                for i in ids
            ],
        )
    if "rerank" in column and rerank_scores is not None:
        put("rerank", rerank_scores)
    return out
