"""Why an item was returned, computed from the models' own scores (faithful, not a story).

Recommendations: leave-one-out on the user context. Each history item in the context is removed in turn
and the pair (edited context, item) is scored again; the drop in score is that history item's share. The
bi-encoder similarity between the history item and the recommended item, and shared categories, are added.
When stage 2 fuses co-watch scores, the history items the recommended item is co-watched with are listed
too (they are exactly that score).
Search hits: the same with the query's content words (not stopwords) instead of history items.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from twostage.requests import user_text

if TYPE_CHECKING:
    from twostage.index import VectorIndex
    from twostage.requests import Catalogue, Request
    from twostage.text import UserTemplate


class Explained(Protocol):
    """What an explanation reads of the pipeline that ranked the hits (``twostage.pipeline.Pipeline``)."""

    catalogue: Catalogue
    index: VectorIndex
    text: UserTemplate

    def pair_scores(
        self, texts: Sequence[str], item_ids: Sequence[str], *, use_reranker: bool
    ) -> np.ndarray: ...

    def watched_with(self, request: Request, item_id: str) -> list[str]: ...


def raised_score(drivers: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The drivers (history items or query terms) without which the item scores lower: the ones worth a
    "because". A drop of zero or below means the item does not owe its rank to that driver."""
    return [d for d in drivers if d.get("score_drop") is not None and d["score_drop"] > 0]


def explain_hits(
    pipe: Explained,
    request: Request,
    item_ids: Sequence[str],
    *,
    use_reranker: bool,
    cowatch: bool = False,
    top: int = 3,
) -> dict[str, dict[str, Any]]:
    """An explanation per item: the top ``top`` drivers (history items or query terms) with their score drop.

    ``pipe`` is the pipeline that ranked the items; ``use_reranker`` says its cross-encoder ranked them (else
    its bi-encoder did), ``cowatch`` that its co-watch scores took part (the co-watched history items are then
    listed).
    """
    if not item_ids:
        return {}
    method = "reranker" if use_reranker else "bi-encoder"
    if request.history:
        return _explain_recommendation(pipe, request, item_ids, use_reranker, cowatch, top, method)
    return _explain_search(pipe, request, item_ids, use_reranker, top, method)


def _explain_recommendation(
    pipe: Explained,
    request: Request,
    item_ids: Sequence[str],
    use_reranker: bool,
    cowatch: bool,
    top: int,
    method: str,
) -> dict[str, dict[str, Any]]:
    catalogue, index = pipe.catalogue, pipe.index
    context = [h for h in request.history[: pipe.text.history_size] if h in catalogue and h in index]
    variants = [user_text([h for h in context if h != drop], catalogue, pipe.text) for drop in context]
    scores = pipe.pair_scores([request.text, *variants], item_ids, use_reranker=use_reranker)
    base, edited = scores[0], scores[1:]
    vecs = index.vectors(list(context) + list(item_ids)) if context else None
    out: dict[str, dict[str, Any]] = {}
    for col, item_id in enumerate(item_ids):
        drops = base[col] - edited[:, col] if len(context) else np.zeros(0)
        sims = vecs[: len(context)] @ vecs[len(context) + col] if vecs is not None else np.zeros(0)
        order = np.argsort(-drops, kind="stable")[:top]
        cats = set(catalogue.records[item_id].get("categories") or [])
        out[item_id] = {
            "method": f"leave-one-out on the user context, {method} score",
            "drivers": [
                {
                    "item_id": context[j],
                    "title": catalogue.title(context[j]),
                    "score_drop": round(float(drops[j]), 4),
                    "similarity": round(float(sims[j]), 4),
                    "shared_categories": sorted(
                        cats & set(catalogue.records[context[j]].get("categories") or [])
                    ),
                }
                for j in order
            ],
        }
        if cowatch:
            out[item_id]["watched_with"] = [
                {"item_id": h, "title": catalogue.title(h)} for h in pipe.watched_with(request, item_id)
            ]
    return out


def content_terms(text: str) -> tuple[list[str], list[int]]:
    """The query's whitespace tokens, and which of them are worth explaining: not English stopwords.

    Removing "with" or "the" moves a cross-encoder's score too, but a reader asks which words of their query
    mattered; stopwords stay in every edited query and are not scored on their own (all tokens are, when the
    query has nothing else). Punctuation around a word is ignored when matching and when shown.
    """
    from bm25s.stopwords import STOPWORDS_EN

    tokens = text.split()
    words = [t.strip(_PUNCTUATION).lower() for t in tokens]
    content = [n for n, w in enumerate(words) if w and w not in STOPWORDS_EN]
    return tokens, content or list(range(len(tokens)))


_PUNCTUATION = "\"'`.,;:!?()[]{}<>«»“”‘’"


def _explain_search(
    pipe: Explained, request: Request, item_ids: Sequence[str], use_reranker: bool, top: int, method: str
) -> dict[str, dict[str, Any]]:
    tokens, explained = content_terms(request.text)
    shown = [tokens[n].strip(_PUNCTUATION) or tokens[n] for n in explained]
    variants = [" ".join(t for n, t in enumerate(tokens) if n != drop) for drop in explained]
    scores = (
        pipe.pair_scores([request.text, *variants], item_ids, use_reranker=use_reranker)
        if len(tokens) > 1
        else None
    )
    out: dict[str, dict[str, Any]] = {}
    for col, item_id in enumerate(item_ids):
        if scores is None:
            out[item_id] = {
                "method": f"query-term removal, {method} score",
                "terms": [{"term": shown[0] if shown else "", "score_drop": None}],
            }
            continue
        drops = scores[0, col] - scores[1:, col]
        order = np.argsort(-drops, kind="stable")[:top]
        out[item_id] = {
            "method": f"query-term removal, {method} score",
            "terms": [{"term": shown[j], "score_drop": round(float(drops[j]), 4)} for j in order],
        }
    return out
