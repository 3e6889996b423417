"""Training jobs of a project: the work behind ``twostage train retriever`` and ``twostage train reranker``.

Each job reads its examples from the project's store, ranks candidates with the project's pipeline, trains,
and puts the result in place atomically, recording a run. It receives the :class:`~twostage.project.Project`,
never the Engine; the Engine swaps in a new serving pipeline afterwards.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

from twostage.atomic import staging_dir, write_file
from twostage.errors import NotFoundError
from twostage.project import TRAINING_RECORD
from twostage.train.examples import (
    Validation,
    reranker_requests,
    retriever_pairs,
    validation_corpus,
    validation_set,
)
from twostage.train.lists import training_lists, validation_lists

if TYPE_CHECKING:
    from twostage.pipeline import PairScorer, Pipeline
    from twostage.project import Project
    from twostage.train.reranker import RerankerTrainingResult
    from twostage.train.retriever import RetrieverTrainingResult


def fit_retriever(project: Project, split: str) -> RetrieverTrainingResult:
    """Fine-tune the bi-encoder on ``split``'s train side (MultipleNegativesRankingLoss, early stopping on
    validation recall@K) and save it as the project's retriever."""
    from twostage.train.retriever import read_training_record, train_retriever

    config, store, catalogue = project.config, project.store, project.catalogue()
    cfg = config.retriever
    pairs = retriever_pairs(store, catalogue, config, split=split)
    val = validation_set(store, catalogue, config, split=split, max_requests=cfg.eval_requests)
    result = train_retriever(
        pairs,
        output_dir=project.models_dir("retriever"),  # written atomically
        base_model=None if cfg.model == "default" else cfg.model,
        val_queries={r.request_id: r.text for r in val.requests} or None,
        val_corpus=validation_corpus(catalogue.texts, val.relevant, cfg.eval_corpus, cfg.seed)
        if val.requests
        else None,
        val_relevant={q: set(rel) for q, rel in val.relevant.items()} if val.requests else None,
        epochs=cfg.epochs,
        batch_size=cfg.train_batch_size,
        learning_rate=cfg.learning_rate,
        warmup_ratio=cfg.warmup_ratio,
        hard_negatives=cfg.hard_negatives,
        negative_corpus=list(catalogue.texts.values()) if cfg.hard_negatives else None,
        eval_k=cfg.eval_k,
        patience=cfg.patience,
        max_seq_length=cfg.max_seq_length,
        seed=cfg.seed,
        time_budget_seconds=None if cfg.time_budget_minutes is None else cfg.time_budget_minutes * 60,
        progress=project.progress,
    )
    project.changed("models")
    budget = read_training_record(result.model_path).get("time_budget") or {}
    project.record_run(
        "train-retriever",
        result.fingerprint,
        {
            "split": split,
            "pairs": len(pairs),
            "metrics": dict(result.metrics),
            "resolved": {"retriever.steps": budget.get("steps"), "time_budget": budget},
        },
    )
    return result


def fit_reranker(project: Project, split: str) -> RerankerTrainingResult:
    """Fine-tune the cross-encoder listwise on stage-1 candidate lists (positives ensured in each list; early
    stopping on validation NDCG@10), choose its serving settings on validation, and save both as the
    project's reranker."""
    from twostage.rerank import Reranker
    from twostage.train.reranker import train_reranker

    config, store = project.config, project.store
    cfg = config.reranker
    pipe = project.pipeline(split, all_counts=True)  # the split's stage-2 texts, also before a first reranker
    val = validation_set(store, pipe.catalogue, config, split=split, max_requests=cfg.eval_requests)
    # stage 1 as it will serve (hybrid or not) first: stage 2 trains and is tuned on the candidates it will see
    stage1 = _choose_stage1(project, pipe, val, split)
    pipe = _with_stage1(project, pipe, stage1)
    labelled = reranker_requests(
        store, pipe.catalogue, config, split=split, max_requests=cfg.max_train_requests, seed=cfg.seed
    )
    if not labelled:
        raise NotFoundError(f"split '{split}' gives no reranker training requests")
    folds = project.reads_cowatched() and store.require_split(split) == "user"
    train = training_lists(
        pipe,
        labelled,
        cfg,
        fold_texts=(lambda users: project.rerank_texts(split, exclude_users=users)) if folds else None,
        progress=project.progress,
    )
    if not train:
        raise NotFoundError(
            f"stage 1 retrieves no training positive within depth {max(cfg.depth, cfg.list_size)}; "
            "raise reranker.depth"
        )
    target = project.models_dir("reranker")
    staged = staging_dir(target)
    result = train_reranker(
        train,
        output_dir=staged,
        base_model=None if cfg.model == "default" else cfg.model,
        val_lists=validation_lists(pipe, val, cfg, progress=project.progress),
        loss=cfg.loss,
        epochs=cfg.epochs,
        batch_size=cfg.train_batch_size,
        learning_rate=cfg.learning_rate,
        warmup_ratio=cfg.warmup_ratio,
        max_length=cfg.max_length,
        patience=cfg.patience,
        seed=cfg.seed,
        lora=cfg.lora,
        progress=project.progress,
    )
    if val.requests:
        trained = Reranker(str(staged), max_length=result.max_length, batch_size=cfg.batch_size)
        _add_to_record(staged, {**stage1, **_choose_stage2(project, pipe, trained, val, split)})
    project.replace_model("reranker", staged)
    project.changed("models")
    # the settings chosen from the data, beside the configured ones (which leave them unset)
    resolved = {"reranker.max_length": result.max_length}
    if stage1:
        resolved["retriever.lexical_weight"] = stage1["lexical_weight"]
    project.record_run(
        "train-reranker",
        None,
        {"split": split, "lists": len(train), "metrics": dict(result.metrics), "resolved": resolved},
    )
    return dataclasses.replace(result, model_path=target)


def retune_reranker(project: Project, split: str) -> dict[str, Any]:
    """Choose the serving settings of the project's trained reranker again on ``split``'s validation requests
    (fusion and co-watch weights, rerank depth), without retraining; saved in its ``training.json``."""
    config, target = project.config, project.models_dir("reranker")
    if not (target / TRAINING_RECORD).exists():
        raise NotFoundError(f"no trained reranker at {target}; run 'twostage train reranker' first")
    pipe = project.pipeline(split, all_counts=True)
    val = validation_set(
        project.store, pipe.catalogue, config, split=split, max_requests=config.reranker.eval_requests
    )
    if not val.requests:
        raise NotFoundError(f"split '{split}' has no validation requests to tune on")
    stage1 = _choose_stage1(project, pipe, val, split)
    pipe = _with_stage1(project, pipe, stage1)
    tuned = {**stage1, **_choose_stage2(project, pipe, project.load_reranker(str(target)), val, split)}
    _add_to_record(target, tuned)  # atomic: a serving process never reads half a file
    project.changed("record")
    project.record_run("tune-reranker", None, {"split": split, **tuned})
    return tuned


def _choose_stage1(project: Project, pipe: Pipeline, val: Validation, split: str) -> dict[str, Any]:
    """Hybrid recall's BM25 weight when the config leaves it unset: chosen on the validation queries of a
    search split, else 0 (recommendation, or no validation queries); {} when the config sets it."""
    from twostage.tuning import choose_lexical_weight

    cfg = project.config.retriever
    if cfg.lexical_weight is not None:
        return {}
    if not val.requests or project.store.require_split(split) != "query":
        return {"lexical_weight": 0.0}  # not an earlier reranker's choice: what this one trains on is served
    judged = [val.relevant[r.request_id] for r in val.requests]
    return choose_lexical_weight(pipe, project.lexical(), val.requests, judged, cfg)


def _with_stage1(project: Project, pipe: Pipeline, stage1: dict[str, Any]) -> Pipeline:
    if not stage1:
        return pipe
    alpha = float(stage1["lexical_weight"])
    return pipe.with_settings(lexical_weight=alpha).replace(lexical=project.lexical_channel(alpha))


def _choose_stage2(
    project: Project, pipe: Pipeline, reranker: PairScorer, val: Validation, split: str
) -> dict[str, Any]:
    from twostage.tuning import choose_stage2

    judged = [val.relevant[r.request_id] for r in val.requests]
    recommending = project.store.require_split(split) == "user"
    candidate = pipe.replace(reranker=reranker)
    return choose_stage2(candidate, val.requests, judged, project.config.reranker, recommending=recommending)


def _add_to_record(model_dir: Any, values: dict[str, Any]) -> None:
    path = model_dir / TRAINING_RECORD
    write_file(path, json.dumps({**json.loads(path.read_text()), **values}, indent=2))
