"""Fine-tune the stage-1 bi-encoder on (request text, positive item text) pairs.

In-batch negatives (``MultipleNegativesRankingLoss`` with a no-duplicates batch sampler) do most of the work;
hard negatives mined with the starting model are optional. With a validation set, training stops early on
validation recall@K and keeps the best checkpoint. The input is plain data, so this module knows nothing
about the store: the lead's dataset builders turn events and judgments into pairs.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twostage.atomic import replace_dir
from twostage.encoders import (
    load_sentence_transformer,
    model_fingerprint,
    resolve_model,
    transformers_progress,
)
from twostage.errors import ConfigError, InputError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

TRAINING_FILE = "training.json"
_EVAL_NAME = "val"


@dataclass(frozen=True)
class RetrieverTrainingResult:
    """What :func:`train_retriever` produced.

    Attributes:
        model_path: Directory of the saved model (loads with ``BiEncoder(model_path)``), holding ``training.json``.
        best_metric: Validation recall@K of the saved model, or None without a validation set.
        metrics: Validation metrics of the saved model, named like ``recall@100``, ``ndcg@10``, ``mrr@10``.
        steps: Optimiser steps taken.
        seconds: Wall time of the whole call.
        base_metrics: The same validation metrics for the starting model (empty without a validation set).
        fingerprint: :func:`~twostage.encoders.model_fingerprint` of the saved model.
    """

    model_path: Path
    best_metric: float | None
    metrics: Mapping[str, float]
    steps: int
    seconds: float
    base_metrics: Mapping[str, float] = field(default_factory=dict)
    fingerprint: str = ""


def train_retriever(
    train_pairs: Sequence[tuple[str, str]],
    *,
    output_dir: str | Path,
    base_model: str | Path | None = None,
    val_queries: Mapping[str, str] | None = None,
    val_corpus: Mapping[str, str] | None = None,
    val_relevant: Mapping[str, set[str]] | None = None,
    epochs: int = 1,
    batch_size: int = 32,
    learning_rate: float = 2e-5,
    warmup_ratio: float = 0.1,
    hard_negatives: int = 0,
    negative_corpus: Sequence[str] | None = None,
    eval_k: int = 100,
    eval_steps: int | None = None,
    patience: int = 2,
    max_seq_length: int | None = None,
    max_steps: int | None = None,
    time_budget_seconds: float | None = None,
    seed: int = 0,
    progress: bool = False,
) -> RetrieverTrainingResult:
    """Fine-tune a sentence-transformers bi-encoder and save the best model to ``output_dir``.

    Args:
        train_pairs: (anchor request text, positive item text) pairs; an anchor may repeat with other positives.
        output_dir: Where the model and ``training.json`` go; replaced atomically if it already exists.
        base_model: Starting model, resolved like :func:`~twostage.encoders.resolve_model` (None = default).
        val_queries: Validation request_id → request text. Give all three ``val_*`` arguments or none.
        val_corpus: Validation item_id → item text (the candidates ranked for every validation request).
        val_relevant: Validation request_id → relevant item_ids.
        epochs: Passes over the training pairs.
        batch_size: Pairs per batch; every other pair in the batch is a negative.
        learning_rate: Peak AdamW learning rate.
        warmup_ratio: Fraction of the steps spent warming up the learning rate.
        hard_negatives: Negatives mined per pair with the starting model (0 = in-batch negatives only).
            Known positives of an anchor are never mined as its negatives.
        negative_corpus: Extra item texts to mine negatives from (default: the positives of all pairs).
        eval_k: K of the validation recall@K that picks the best checkpoint and drives early stopping.
        eval_steps: Evaluate every this many steps; None evaluates once per epoch.
        patience: Evaluations without improvement before training stops.
        max_seq_length: Truncate inputs to this many tokens; None keeps the model's setting.
        max_steps: Stop after this many steps (overrides ``epochs``); None trains all epochs.
        time_budget_seconds: Size the run to end within this many seconds (None: no limit): the time of a
            step and of a validation pass are measured here first, and the steps cut to what fits; the plan
            is logged up front and stored in ``training.json``.
        seed: Seed for initialisation, shuffling and sampling.
        progress: Show progress bars.

    Returns:
        A :class:`RetrieverTrainingResult`.

    Raises:
        InputError: No training pairs, a pair that is not two strings, or an incomplete validation set.
        ConfigError: A hyperparameter is out of range.
        NotFoundError: The base model cannot be loaded.

    Example:
        >>> result = train_retriever(
        ...     [("Recently liked: Heat (1995)", "Casino (1995). Genres: Crime, Drama")],
        ...     output_dir="project/models/retriever",
        ... )  # doctest: +SKIP
        >>> BiEncoder(result.model_path).encode(["Heat"]).shape  # doctest: +SKIP
        (1, 384)
    """
    started = time.perf_counter()
    pairs = _check_pairs(train_pairs)
    validation = _check_validation(val_queries, val_corpus, val_relevant)
    _check_hyperparameters(
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_ratio=warmup_ratio,
        hard_negatives=hard_negatives,
        eval_k=eval_k,
        eval_steps=eval_steps,
        patience=patience,
        max_seq_length=max_seq_length,
        max_steps=max_steps,
    )
    config = {
        "base_model": resolve_model(base_model),
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "warmup_ratio": warmup_ratio,
        "hard_negatives": hard_negatives,
        "eval_k": eval_k,
        "eval_steps": eval_steps,
        "patience": patience,
        "max_seq_length": max_seq_length,
        "max_steps": max_steps,
        "seed": seed,
    }

    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from transformers import EarlyStoppingCallback, set_seed

    from twostage.train import keep_stdout_clean

    class _Trainer(SentenceTransformerTrainer):
        def add_model_card_callback(self, default_args_dict: dict[str, Any]) -> None:
            """No model card (training.json records the run), so no widget examples or hub look-ups."""

    set_seed(seed)
    cuda = torch.cuda.is_available()
    model = load_sentence_transformer(base_model, device="cuda" if cuda else "cpu")
    model.model_card_data.local_files_only = True  # no hub look-ups for the model card
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    base_fingerprint = model_fingerprint(model)

    train_dataset = Dataset.from_dict({"anchor": [a for a, _ in pairs], "positive": [p for _, p in pairs]})
    if hard_negatives:
        train_dataset = _mine(train_dataset, model, hard_negatives, negative_corpus, batch_size, len(pairs))

    evaluator, metric_key = None, None
    base_metrics: dict[str, float] = {}
    if validation is not None:
        evaluator = _make_evaluator(
            *validation, eval_k=eval_k, batch_size=max(batch_size, 64), progress=progress
        )
        metric_key = f"{_EVAL_NAME}_{model.similarity_fn_name}_recall@{eval_k}"
        eval_started = time.perf_counter()
        base_metrics = _short_names(evaluator(model), model)
        eval_seconds = time.perf_counter() - eval_started
    else:
        eval_seconds = 0.0
    planned = max_steps or epochs * -(-len(train_dataset) // batch_size)
    budget = _fit_budget(
        model,
        train_dataset,
        batch_size=batch_size,
        planned=planned,
        evaluations=0 if evaluator is None else epochs if eval_steps is None else -(-planned // eval_steps),
        eval_seconds=eval_seconds,
        time_budget_seconds=time_budget_seconds,
        spent=time.perf_counter() - started,
    )
    if budget["steps"] < planned:
        max_steps = budget["steps"]

    output_dir = Path(output_dir).expanduser().resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # Checkpoints and the new model live next to output_dir (same file system, so the final rename is
    # atomic) and are removed on exit, whatever happens.
    with tempfile.TemporaryDirectory(prefix=f".{output_dir.name}-", dir=output_dir.parent) as work:
        strategy = "no" if evaluator is None else ("epoch" if eval_steps is None else "steps")
        args = SentenceTransformerTrainingArguments(
            output_dir=str(Path(work) / "checkpoints"),
            num_train_epochs=epochs,
            max_steps=max_steps if max_steps is not None else -1,
            per_device_train_batch_size=batch_size,
            per_device_eval_batch_size=batch_size,
            learning_rate=learning_rate,
            warmup_steps=warmup_ratio,  # transformers 5: a float below 1 is a ratio of the total steps
            batch_sampler=BatchSamplers.NO_DUPLICATES,
            eval_strategy=strategy,
            save_strategy=strategy,
            eval_steps=eval_steps,
            save_steps=eval_steps,
            save_total_limit=1,  # plus the best checkpoint, which the trainer always keeps
            save_only_model=True,
            load_best_model_at_end=evaluator is not None,
            metric_for_best_model=metric_key,
            greater_is_better=True if evaluator is not None else None,
            logging_strategy="steps",
            logging_steps=max(1, eval_steps or 50),
            report_to="none",
            disable_tqdm=not progress,
            use_cpu=not cuda,
            bf16=cuda and torch.cuda.is_bf16_supported(),
            fp16=cuda and not torch.cuda.is_bf16_supported(),
            seed=seed,
            data_seed=seed,
            dataloader_num_workers=0,
            dataloader_pin_memory=cuda,  # pinning is for host-to-GPU copies
        )
        callbacks = [EarlyStoppingCallback(early_stopping_patience=patience)] if evaluator is not None else []
        trainer = _Trainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            loss=MultipleNegativesRankingLoss(model),
            evaluator=evaluator,
            callbacks=callbacks,
        )
        keep_stdout_clean(trainer)
        with transformers_progress(progress):
            trainer.train()

        metrics: dict[str, float] = {}
        best_metric = None
        if evaluator is not None:
            metrics = _best_metrics(trainer, metric_key, model) or _short_names(evaluator(model), model)
            best_metric = metrics.get(f"recall@{eval_k}")
            if best_metric is not None and best_metric < base_metrics.get(f"recall@{eval_k}", 0.0):
                logger.warning(
                    "fine-tuned retriever recall@%d %.4f is below the base model's %.4f",
                    eval_k,
                    best_metric,
                    base_metrics[f"recall@{eval_k}"],
                )
        steps = int(trainer.state.global_step)
        fingerprint = model_fingerprint(model)

        staged = Path(work) / "model"
        with transformers_progress(False):
            model.save(str(staged), create_model_card=False)
        seconds = time.perf_counter() - started
        record = {
            "config": config,
            "base_fingerprint": base_fingerprint,
            "fingerprint": fingerprint,
            "train_pairs": len(pairs),
            "train_rows": len(train_dataset),
            "validation": None
            if validation is None
            else {"queries": len(validation[0]), "corpus": len(validation[1]), "metric": f"recall@{eval_k}"},
            "best_metric": best_metric,
            "metrics": metrics,
            "base_metrics": base_metrics,
            "steps": steps,
            "time_budget": budget,
            "seconds": round(seconds, 3),
            "device": str(model.device),
            "versions": _versions(),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        (staged / TRAINING_FILE).write_text(json.dumps(record, indent=2, sort_keys=True), encoding="utf-8")
        replace_dir(staged, output_dir)

    logger.info("retriever trained: %d steps (%s)", steps, metrics or "no validation")
    return RetrieverTrainingResult(
        model_path=output_dir,
        best_metric=best_metric,
        metrics=metrics,
        steps=steps,
        seconds=time.perf_counter() - started,
        base_metrics=base_metrics,
        fingerprint=fingerprint,
    )


def _fit_budget(
    model: SentenceTransformer,
    dataset: Any,
    *,
    batch_size: int,
    planned: int,
    evaluations: int,
    eval_seconds: float,
    time_budget_seconds: float | None,
    spent: float,
) -> dict[str, Any]:
    """How many of the ``planned`` steps fit the time budget, from one step's time measured on this machine
    (forward and backward of the loss on a real batch, the second of two; the optimiser step is small next
    to it) and the validation passes still to come. Logs the plan with its estimate."""
    import torch
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    batch = dataset.select(range(min(batch_size, len(dataset))))
    columns = [c for c in batch.column_names]
    loss = MultipleNegativesRankingLoss(model)
    step_seconds = 0.0
    model.train()
    for _ in range(2):  # the first call warms up the kernels and allocations
        began = time.perf_counter()
        features = [
            {
                k: v.to(model.device) if isinstance(v, torch.Tensor) else v
                for k, v in _preprocess(model, list(batch[c])).items()
            }
            for c in columns
        ]
        value = loss(features, torch.empty(0))
        value.backward()
        model.zero_grad(set_to_none=True)
        step_seconds = time.perf_counter() - began
    model.eval()
    steps = planned
    if time_budget_seconds is not None:
        left = time_budget_seconds - spent - evaluations * eval_seconds
        steps = max(1, min(planned, int(left / max(step_seconds, 1e-6))))
    estimate = steps * step_seconds + evaluations * eval_seconds
    logger.info(
        "retriever training: %d of %d planned steps (%.2f s per step here, %d validation passes of %.0f s): "
        "about %.0f min%s",
        steps,
        planned,
        step_seconds,
        evaluations,
        eval_seconds,
        estimate / 60,
        f", within the {time_budget_seconds / 60:.0f}-minute budget" if time_budget_seconds else "",
    )
    return {
        "planned_steps": planned,
        "steps": steps,
        "step_seconds": round(step_seconds, 3),
        "eval_seconds": round(eval_seconds, 1),
        "budget_seconds": time_budget_seconds,
        "estimate_seconds": round(estimate, 1),
    }


def _preprocess(model: SentenceTransformer, texts: list[str]) -> dict[str, Any]:
    """Model inputs for ``texts`` (``preprocess`` in sentence-transformers 5.2+, ``tokenize`` before)."""
    method = getattr(model, "preprocess", None) or model.tokenize
    return method(texts)


def read_training_record(model_path: str | Path) -> dict[str, Any]:
    """The ``training.json`` that :func:`train_retriever` saved next to a model."""
    return json.loads((Path(model_path) / TRAINING_FILE).read_text(encoding="utf-8"))


def _check_pairs(train_pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for position, pair in enumerate(train_pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise InputError(
                f"train_pairs[{position}] is not an (anchor text, positive text) pair of strings"
            )
        pairs.append((pair[0], pair[1]))
    pairs = list(dict.fromkeys(pairs))  # a repeated pair would only duplicate the same in-batch example
    if not pairs:
        raise InputError("no training pairs: the split has no (request, positive item) pairs to learn from")
    return pairs


def _check_validation(
    queries: Mapping[str, str] | None,
    corpus: Mapping[str, str] | None,
    relevant: Mapping[str, set[str]] | None,
) -> tuple[dict[str, str], dict[str, str], dict[str, set[str]]] | None:
    if queries is None and corpus is None and relevant is None:
        return None
    if queries is None or corpus is None or relevant is None:
        raise InputError(
            "validation needs val_queries, val_corpus and val_relevant together; pass all or none"
        )
    relevant_known = {
        qid: {item_id for item_id in items if item_id in corpus}
        for qid, items in relevant.items()
        if qid in queries
    }
    relevant_known = {qid: items for qid, items in relevant_known.items() if items}
    if not relevant_known:
        raise InputError(
            "validation set has no request with a relevant item in val_corpus; check the validation split"
        )
    return dict(queries), dict(corpus), relevant_known


def _check_hyperparameters(**values: Any) -> None:
    rules = {
        "epochs": lambda v: v >= 1,
        "batch_size": lambda v: v >= 2,
        "learning_rate": lambda v: v > 0,
        "warmup_ratio": lambda v: 0 <= v < 1,
        "hard_negatives": lambda v: v >= 0,
        "eval_k": lambda v: v >= 1,
        "eval_steps": lambda v: v is None or v >= 1,
        "patience": lambda v: v >= 1,
        "max_seq_length": lambda v: v is None or v >= 1,
        "max_steps": lambda v: v is None or v >= 1,
    }
    config_keys = {"batch_size": "train_batch_size"}
    for name, ok in rules.items():
        if not ok(values[name]):
            hint = (
                "in [0, 1)"
                if name == "warmup_ratio"
                else "at least 2"
                if name == "batch_size"
                else "positive"
            )
            raise ConfigError(
                f"{values[name]!r} is out of range; use a value {hint}",
                key=f"retriever.{config_keys.get(name, name)}",
            )


def _mine(dataset, model, num_negatives, negative_corpus, batch_size, n_pairs):
    """Add mined hard negatives: (anchor, positive) pairs become (anchor, positive, negative) triplets.

    Every positive of an anchor (pairs sharing the anchor) is excluded from its negatives by
    ``mine_hard_negatives``; the 5% relative margin (NV-Retriever's TopK-PercPos) skips near-duplicates of the
    positive, which are often unlabelled positives.
    """
    from sentence_transformers.util import mine_hard_negatives

    mined = mine_hard_negatives(
        dataset,
        model,
        anchor_column_name="anchor",
        positive_column_name="positive",
        corpus=list(negative_corpus) if negative_corpus is not None else None,
        num_negatives=num_negatives,
        relative_margin=0.05,
        sampling_strategy="top",
        output_format="triplet",
        batch_size=max(batch_size, 64),
        verbose=False,
    )
    if len(mined) == 0:
        logger.warning("no hard negatives found; training on in-batch negatives only")
        return dataset
    covered = len(set(zip(mined["anchor"], mined["positive"], strict=True)))
    if covered < n_pairs:
        logger.warning("%d of %d pairs got no hard negative and are left out", n_pairs - covered, n_pairs)
    return mined


def _make_evaluator(queries, corpus, relevant, *, eval_k, batch_size, progress):
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    return InformationRetrievalEvaluator(
        queries=queries,
        corpus=corpus,
        relevant_docs=relevant,
        accuracy_at_k=sorted({1, 10, eval_k}),
        precision_recall_at_k=sorted({10, eval_k}),
        mrr_at_k=[10],
        ndcg_at_k=[10],
        map_at_k=[eval_k],
        batch_size=batch_size,
        show_progress_bar=progress,
        name=_EVAL_NAME,
        write_csv=False,
    )


def _short_names(raw: Mapping[str, Any], model: SentenceTransformer) -> dict[str, float]:
    """``eval_val_cosine_recall@100`` → ``recall@100``; other keys (loss, runtime) are dropped."""
    out = {}
    for prefix in (
        f"eval_{_EVAL_NAME}_{model.similarity_fn_name}_",
        f"{_EVAL_NAME}_{model.similarity_fn_name}_",
    ):
        for key, value in raw.items():
            if key.startswith(prefix) and "@" in key:
                out[key[len(prefix) :]] = float(value)
    return out


def _best_metrics(trainer, metric_key: str, model: SentenceTransformer) -> dict[str, float]:
    """Validation metrics logged at the best checkpoint's step (empty when they cannot be found)."""
    checkpoint = trainer.state.best_model_checkpoint
    if not checkpoint:
        return {}
    try:
        best_step = int(str(checkpoint).rsplit("-", 1)[-1])
    except ValueError:
        return {}
    for entry in trainer.state.log_history:
        if entry.get("step") == best_step and f"eval_{metric_key}" in entry:
            return _short_names(entry, model)
    return {}


def _versions() -> dict[str, str]:
    import sentence_transformers
    import torch
    import transformers

    return {
        "sentence_transformers": sentence_transformers.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
