"""Training the learned stage 2 (``twostage train ranker``): lists, features, LightGBM, and the items channel's
weight.

1. Stage 1 as it will serve: the items (EASE) channel's weight is chosen on the validation users, by
   recall at the ranker's depth (what stage 2 can reorder), unless the config sets it.
2. Training lists: requests drawn from the split's train side (a point in a user's history, the next
   items as positives), ranked ``depth`` deep by stage 1. Users are dealt into folds; a fold's requests read
   EASE weights, co-watch lists and popularity counted without that fold's users, so no feature sees the
   request's own future (the cut-offs already keep out everyone's held-out events).
3. Validation lists: the validation requests, ranked by the pipeline that serves (counts before the split's
   cut-offs), for early stopping and for dropping features that earn nothing (:func:`twostage.ltr.select_features`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from twostage.cowatch import training_folds
from twostage.errors import NotFoundError, TwostageError
from twostage.features import available, candidate_features
from twostage.ltr import BoostOptions, Group, LearnedRanker, select_features
from twostage.metrics import mean_metric
from twostage.pipeline import LogCounts
from twostage.train.examples import reranker_requests, validation_set

if TYPE_CHECKING:
    from twostage.pipeline import Pipeline
    from twostage.project import Project
    from twostage.requests import Request

logger = logging.getLogger(__name__)


def fit_ranker(project: Project, split: str) -> dict[str, Any]:
    """Train the learned ranker on ``split`` and save it as the project's (``models/ranker``); returns its
    record (features kept and dropped, importances, validation nDCG@10 against stage 1, the items weight)."""
    started = time.perf_counter()
    config, store = project.config, project.store
    cfg = config.ranker
    kind = store.require_split(split)
    if cfg.learned == "off" or (cfg.learned == "auto" and kind != "user"):
        raise TwostageError(
            f"[ranker] learned = {cfg.learned!r}: the learned ranker trains on recommendation splits "
            "(set it to 'on' to train one on a search split too)"
        )
    pipe = project.pipeline(split, all_counts=True).replace(learned=None)
    if not cfg.cross_encoder:
        pipe = pipe.replace(reranker=None)
    elif pipe.reranker is None:
        raise NotFoundError(
            "[ranker] cross_encoder = true needs a trained reranker; run 'twostage train reranker'"
        )
    pipe = pipe.with_settings(rerank_depth=cfg.depth, mmr_lambda=None)
    val = validation_set(store, pipe.catalogue, config, split=split, max_requests=cfg.eval_requests)
    judged = [val.relevant[r.request_id] for r in val.requests]
    chosen = (
        _choose_items_weight(pipe, val.requests, judged, cfg) if kind == "user" else {"items_weight": 0.0}
    )
    pipe = pipe.with_settings(items_weight=chosen["items_weight"])
    names = tuple(n for n in available(pipe) if cfg.features is None or n in cfg.features)
    if not names:
        raise NotFoundError(f"none of [ranker] features {list(cfg.features or ())} applies to this split")
    labelled = reranker_requests(
        store,
        pipe.catalogue,
        config,
        split=split,
        max_requests=cfg.max_train_requests,
        seed=cfg.seed,
        tail=cfg.request_tail,
    )
    if not labelled:
        raise NotFoundError(f"split '{split}' gives no training requests for the ranker")
    train: list[Group] = []
    for fold_pipe, group in _fold_pipelines(project, pipe, labelled, split, kind):
        train += _groups(fold_pipe, [x.request for x in group], [x.positives for x in group], names, project)
    valid = _groups(pipe, val.requests, judged, names, project)
    if not train:
        raise NotFoundError(
            f"stage 1 retrieves no training positive within depth {cfg.depth}; raise [ranker] depth"
        )
    logger.info(
        "learned ranker: %d training lists, %d validation lists, features %s",
        len(train),
        len(valid),
        ", ".join(names),
    )
    options = BoostOptions(
        num_trees=cfg.num_trees,
        learning_rate=cfg.learning_rate,
        num_leaves=cfg.num_leaves,
        min_data_in_leaf=cfg.min_data_in_leaf,
        early_stopping=cfg.early_stopping,
        seed=cfg.seed,
    )
    ranker, record = select_features(train, valid, names, options)
    stage1 = _stage1_ndcg(pipe, val.requests, judged)
    record = {
        **record,
        "features": list(ranker.features),
        **chosen,
        "depth": cfg.depth,
        "lexical_weight": pipe.settings.lexical_weight,
        "valid_stage1_ndcg@10": stage1,
        "valid_requests": len(val.requests),
        "seconds": round(time.perf_counter() - started, 1),
    }
    LearnedRanker(ranker.booster, ranker.features, record).save(project.models_dir("ranker"))
    project.changed("models")
    project.record_run(
        "train-ranker",
        None,
        {
            "split": split,
            "metrics": {"valid_ndcg@10": record["valid_ndcg@10"], "valid_stage1_ndcg@10": stage1},
            "resolved": {
                "ranker.items_weight": chosen["items_weight"],
                "ranker.features": list(ranker.features),
            },
        },
    )
    return record


def _choose_items_weight(
    pipe: Pipeline, requests: Sequence[Request], judged: Sequence[Mapping[str, float]], cfg: Any
) -> dict[str, Any]:
    """The items channel's weight: the config's, else the value of ``items_grid`` (0 always tried) with the
    highest validation recall at ``depth`` (ties to the smaller weight)."""
    if cfg.items_weight is not None or pipe.counts.items is None:
        return {"items_weight": float(cfg.items_weight or 0.0)}
    memo = pipe.replace(reranker=None).memoized()
    sweep = {}
    for weight in sorted({0.0, *cfg.items_grid}):
        ranked = memo.with_settings(items_weight=weight).rank(requests, cfg.depth, stage="recall")
        sweep[weight] = mean_metric([r.item_ids() for r in ranked], list(judged), "recall", cfg.depth)
    best = max(sweep, key=lambda w: (sweep[w], -w))
    logger.info(
        "items channel: weight %.2f (validation recall@%d %.4f; %.4f without it)",
        best,
        cfg.depth,
        sweep[best],
        sweep[0.0],
    )
    return {"items_weight": best, "items_sweep": sweep}


def _fold_pipelines(
    project: Project, pipe: Pipeline, labelled: Sequence[Any], split: str, kind: str
) -> list[tuple[Pipeline, list[Any]]]:
    """Each fold's pipeline (log counts without the fold's users) and its requests; one group for queries."""
    if kind != "user":
        return [(pipe, list(labelled))]
    cfg = project.config.ranker
    folds = training_folds([str(x.user_id) for x in labelled], cfg.folds, cfg.seed)
    users = [sorted(u for u, f in folds.items() if f == fold) for fold in range(cfg.folds)]
    models = project.item_model_folds(split, users) if pipe.counts.items is not None else [None] * len(users)
    lists = project.cowatch_fold_lists(split, users) if pipe.counts.cowatched else [{}] * len(users)
    whole = pipe.counts.items
    out = []
    for fold, (model, cowatched) in enumerate(zip(models, lists, strict=True)):
        popularity = dict(pipe.counts.popularity)
        if whole is not None and model is not None:  # the fold's users' own counts taken out
            for item, n in whole.popularity.items():
                own = n - model.popularity.get(item, 0)
                if own:
                    popularity[item] = max(0, popularity.get(item, 0) - own)
        counts = LogCounts(
            popularity=popularity, cowatched=cowatched, rerank_texts=pipe.counts.rerank_texts, items=model
        )
        out.append((pipe.replace(counts=counts), [x for x in labelled if folds[str(x.user_id)] == fold]))
    return out


def _groups(
    pipe: Pipeline,
    requests: Sequence[Request],
    positives: Sequence[Mapping[str, float]],
    names: Sequence[str],
    project: Project,
) -> list[Group]:
    """One feature group per request whose positive stage 1 retrieves within the ranker's depth."""
    if not requests:
        return []
    depth = pipe.settings.rerank_depth
    recalled = pipe.recall(requests, depth, progress=project.progress)
    groups = []
    batch = [
        (r, rec, p)
        for r, rec, p in zip(requests, recalled, positives, strict=True)
        if any(p.get(i, 0.0) > 0 for i, _ in rec.hits[:depth])
    ]
    scores = None
    if "rerank" in names and pipe.reranker is not None and batch:
        pairs = [(r.text, pipe.rerank_text(i)) for r, rec, _ in batch for i, _ in rec.hits[:depth]]
        scores = np.asarray(pipe.reranker.score(pairs, progress=project.progress), dtype=np.float64)
    start = 0
    for request, rec, pos in batch:
        head = rec.hits[:depth]
        rerank = scores[start : start + len(head)] if scores is not None else None
        start += len(head)
        rows = candidate_features(pipe, request, head, rec.vector, names, rerank)
        # LambdaMART's labels are integer grades; a fractional grade above 0 stays a positive
        labels = np.ceil([max(pos.get(i, 0.0), 0.0) for i, _ in head]).astype(np.int32)
        groups.append(Group(rows, labels))
    return groups


def _stage1_ndcg(pipe: Pipeline, requests: Sequence[Request], judged: Sequence[Mapping[str, float]]) -> float:
    if not requests:
        return 0.0
    ranked = pipe.rank(requests, 10, stage="recall")
    return mean_metric([r.item_ids() for r in ranked], list(judged), "ndcg", 10)
