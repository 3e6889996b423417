"""Reranker training and validation lists: each labelled request's stage-1 candidates, as the pipeline that will
serve them ranks them, with the positives ensured in the list.

Only requests whose positive stage 1 retrieves make a list, so the reranker learns to order what it will
actually see. With ``{cowatched}`` in stage 2's item template, users are dealt into folds and a fold's
requests read co-watch lists counted without its users: their own events would otherwise make a positive look
co-watched with its history, a signal no held-out request has.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from twostage.cowatch import training_folds
from twostage.train.reranker import RerankList, make_lists

if TYPE_CHECKING:
    from twostage.config import RerankerConfig
    from twostage.pipeline import Pipeline
    from twostage.train.examples import LabelledRequest, Validation

logger = logging.getLogger(__name__)

# Below this many lists a listwise model, or the weights chosen on validation, rest on very little.
FEW_LISTS = 30

# the stage-2 item texts a fold's requests read, given the users left out of the counts
FoldTexts = Callable[[Sequence[str]], Mapping[str, str]]


def _in_reach(candidates: Sequence[str], positives: Mapping[str, float]) -> bool:
    ids = set(candidates)
    return any(g > 0 and i in ids for i, g in positives.items())


def training_lists(
    pipe: Pipeline,
    labelled: Sequence[LabelledRequest],
    cfg: RerankerConfig,
    *,
    fold_texts: FoldTexts | None = None,
    progress: bool = False,
) -> list[RerankList]:
    """Lists of ``cfg.list_size`` from each request's top ``max(depth, list_size)`` stage-1 candidates.

    ``fold_texts`` (users with ``{cowatched}`` texts): the item texts for a fold's requests, counted without
    that fold's users; None reads ``pipe``'s own stage-2 texts.
    """
    window = max(cfg.depth, cfg.list_size)
    if fold_texts is None:
        groups = [(None, list(labelled))]
    else:
        folds = training_folds([str(x.user_id) for x in labelled], cfg.cowatch_folds, cfg.seed)
        groups = [
            (
                fold_texts([u for u, f in folds.items() if f == fold]),
                [x for x in labelled if folds[str(x.user_id)] == fold],
            )
            for fold in sorted(set(folds.values()))
        ]
    lists: list[RerankList] = []
    for texts, group in groups:
        read = texts if texts is not None else pipe.rerank_texts
        ranked = pipe.rank(
            [x.request for x in group], window, stage="recall", diversify=1.0, progress=progress
        )
        lists += make_lists(
            (
                (x.request.text, [(i, read[i]) for i in r.item_ids()], x.positives)
                for x, r in zip(group, ranked, strict=True)
                if _in_reach(r.item_ids(), x.positives)
            ),
            list_size=cfg.list_size,
            item_texts=read,
            sample_seed=cfg.seed if cfg.negatives == "sampled" else None,
        )
    _warn_if_few("training lists", len(lists), len(labelled), window, "max_train_requests")
    return lists


def validation_lists(
    pipe: Pipeline, val: Validation, cfg: RerankerConfig, *, progress: bool = False
) -> list[RerankList] | None:
    """Lists of each validation request's top ``cfg.depth`` candidates (all of them: early stopping measures
    the order the reranker will serve); None without validation requests."""
    if not val.requests:
        return None
    ranked = pipe.rank(val.requests, cfg.depth, stage="recall", diversify=1.0, progress=progress)
    texts = pipe.rerank_texts
    lists = make_lists(
        (
            (q.text, [(i, texts[i]) for i in r.item_ids()], val.relevant[q.request_id])
            for q, r in zip(val.requests, ranked, strict=True)
            if _in_reach(r.item_ids(), val.relevant[q.request_id])
        ),
        list_size=cfg.depth,
        item_texts=texts,
    )
    _warn_if_few("validation lists", len(lists), len(val.requests), cfg.depth, "eval_requests")
    return lists


def _warn_if_few(what: str, kept: int, asked: int, depth: int, budget: str) -> None:
    """Say when reranker training or tuning runs on a handful of lists: a request only makes a list when
    stage 1 retrieves one of its positives within ``depth``, so few can survive a small budget."""
    if kept < FEW_LISTS:
        logger.warning(
            "reranker: only %d %s from %d requests (a request makes a list only when stage 1 retrieves one "
            "of its positives within its top %d); raise [reranker] %s or depth for results that rest on more",
            kept,
            what,
            asked,
            depth,
            budget,
        )
