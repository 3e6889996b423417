"""Fine-tune the stage-2 cross-encoder with a listwise loss on candidate lists from stage 1.

The lists are plain data (request text, candidate texts, graded labels) so this module never touches the store;
the lead's dataset builder fills them. Training is sentence-transformers' ``CrossEncoderTrainer`` with its
``ListNetLoss`` (default), ``LambdaLoss`` or ``ListMLELoss``, early-stopped on validation NDCG@10.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from twostage.errors import ConfigError, InputError, MissingDependencyError, did_you_mean

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder
    from torch import nn

logger = logging.getLogger(__name__)

LOSSES = ("listnet", "lambdaloss", "listmle")
EVAL_AT_K = 10
_EVAL_NAME = "val"
METRIC_FOR_BEST = f"eval_{_EVAL_NAME}_ndcg@{EVAL_AT_K}"


@dataclass(frozen=True)
class RerankList:
    """One training/validation list: a request, its candidate texts and one graded label per text (0 = not
    relevant, higher = more relevant)."""

    request: str
    docs: list[str]
    labels: list[float]

    def __post_init__(self) -> None:
        if len(self.docs) != len(self.labels):
            raise InputError(f"RerankList has {len(self.docs)} docs but {len(self.labels)} labels")
        if not self.docs:
            raise InputError(f"RerankList for request {self.request[:40]!r} has no docs")


@dataclass(frozen=True)
class RerankerTrainingResult:
    """What :func:`train_reranker` produced: the saved model dir and how training went.

    ``best_metric`` is the best validation NDCG@10 (None without validation lists); ``metrics`` holds the
    validation metrics of the saved checkpoint (``ndcg@10``, ``mrr@10``, ``base_ndcg@10`` = stage-1 order)
    or, without validation, the final training loss.
    """

    model_path: Path
    best_metric: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    seconds: float = 0.0
    max_length: int | None = None  # the token limit per pair it was trained with (and is to be served with)


# Sizing the pair length from the data: the 95th percentile of the training pairs' token counts, rounded up to a
# multiple of 16, kept within [64, 512] (and the model's positions). A fixed 512 pays for padding on short texts
# (attention grows with the square of the length); a fixed 192 cuts long abstracts.
LENGTH_QUANTILE, LENGTH_FLOOR, LENGTH_CAP, LENGTH_SAMPLE = 0.95, 64, 512, 2000


def pair_length(
    tokenizer: Any, lists: Sequence[RerankList], *, limit: int = LENGTH_CAP, seed: int = 0
) -> int:
    """The token limit per (request, doc) pair that fits ``LENGTH_QUANTILE`` of the pairs of ``lists``
    (a seeded sample of at most ``LENGTH_SAMPLE``), within ``[LENGTH_FLOOR, limit]``."""
    pairs = [(rl.request, doc) for rl in lists for doc in rl.docs]
    if len(pairs) > LENGTH_SAMPLE:
        pairs = random.Random(seed).sample(pairs, LENGTH_SAMPLE)
    counts = [len(ids) for ids in tokenizer([a for a, _ in pairs], [b for _, b in pairs])["input_ids"]]
    wanted = int(np.quantile(counts, LENGTH_QUANTILE)) if counts else limit
    return min(limit, max(LENGTH_FLOOR, -(-wanted // 16) * 16))


def make_list(
    request: str,
    candidates: Sequence[tuple[str, str]],
    positives: Mapping[str, float],
    *,
    list_size: int,
    item_texts: Mapping[str, str] | None = None,
    rng: random.Random | None = None,
) -> RerankList:
    """Build one fixed-size list from stage-1 candidates, making sure the positives are in it.

    The list is the first ``list_size`` candidates in stage-1 order. Positives missing from that window take
    the places of the lowest-ranked negatives (highest grade first when there are more positives than slots),
    so hard negatives from the top of stage 1 are kept. Shorter candidate lists are not padded:
    sentence-transformers' listwise losses accept ragged lists and mask the padding themselves (ListNet and
    LambdaLoss fill missing labels with -inf, ListMLE uses a mask), while a padded fake doc with label 0 or -1
    would enter the loss as a real negative (ListNet softmaxes labels, so -1 still gets target mass).

    With ``rng`` the negatives are a uniform sample of all the candidates instead of the top ones: when
    training lists are shorter than the depth reranked at serving, top-only negatives make every positive
    from further down look "less like stage 1's top" than its negatives, a shortcut (e.g. "less popular")
    that ranks the whole depth wrongly.

    Args:
        request: the request text (query or user context).
        candidates: ``(item_id, text)`` in stage-1 order, best first.
        positives: ``item_id -> grade`` (grade > 0); other items are labelled 0.
        list_size: length of the list.
        item_texts: texts for positives that are not among the candidates.

    Returns:
        A :class:`RerankList` of length ``min(list_size, len(candidates ∪ positives))``.

    Raises:
        InputError: a positive is outside the candidates and has no text in ``item_texts``.
    """
    if list_size < 1:
        raise ConfigError(f"must be >= 1, got {list_size}", key="reranker.list_size")
    grades = {i: float(g) for i, g in positives.items() if float(g) > 0}
    seen: set[str] = set()
    window: list[tuple[str, str]] = []
    for item_id, text in candidates:
        if item_id not in seen:
            seen.add(item_id)
            window.append((item_id, text))
    if rng is not None:
        negatives = [n for n, (i, _) in enumerate(window) if i not in grades]
        slots = max(list_size - len(grades), 1)
        kept = set(rng.sample(negatives, min(slots, len(negatives))))
        window = [w for n, w in enumerate(window) if n in kept or w[0] in grades]
    window = window[:list_size]
    in_window = {i for i, _ in window}
    missing = sorted((i for i in grades if i not in in_window), key=lambda i: (-grades[i], i))
    texts = dict(candidates)
    extra: list[tuple[str, str]] = []
    for item_id in missing:
        text = texts.get(item_id) or (item_texts or {}).get(item_id)
        if text is None:
            raise InputError(f"positive item_id '{item_id}' has no text; pass it in item_texts")
        extra.append((item_id, text))
    n_neg = sum(1 for i, _ in window if i not in grades)
    free = max(list_size - len(window), 0)
    extra = extra[: free + n_neg]
    to_drop = max(len(extra) - free, 0)
    if to_drop:
        drop: set[int] = set()
        for pos in range(len(window) - 1, -1, -1):
            if len(drop) == to_drop:
                break
            if window[pos][0] not in grades:
                drop.add(pos)
        window = [w for pos, w in enumerate(window) if pos not in drop]
    final = window + extra
    return RerankList(
        request=request, docs=[t for _, t in final], labels=[grades.get(i, 0.0) for i, _ in final]
    )


def make_lists(
    examples: Iterable[tuple[str, Sequence[tuple[str, str]], Mapping[str, float]]],
    *,
    list_size: int,
    item_texts: Mapping[str, str] | None = None,
    sample_seed: int | None = None,
) -> list[RerankList]:
    """:func:`make_list` over many ``(request, candidates, positives)``; requests without a positive are
    skipped (a list with all labels 0 teaches a listwise loss nothing) and counted in a log line.
    ``sample_seed`` samples the negatives (see ``rng`` in :func:`make_list`)."""
    rng = random.Random(sample_seed) if sample_seed is not None else None
    lists, skipped = [], 0
    for request, candidates, positives in examples:
        if not any(float(g) > 0 for g in positives.values()):
            skipped += 1
            continue
        lists.append(
            make_list(request, candidates, positives, list_size=list_size, item_texts=item_texts, rng=rng)
        )
    if skipped:
        logger.info("make_lists: skipped %d request(s) without a positive", skipped)
    return lists


def list_metrics(labels: Sequence[float], scores: Sequence[float], k: int = EVAL_AT_K) -> tuple[float, float]:
    """nDCG@k and RR@k of one list sorted by score (ties keep list order), with the same formulas as the
    offline evaluation (:func:`twostage.metrics.ranking_metrics`: linear gain), so early stopping optimises
    what is reported."""
    from twostage.metrics import ranking_metrics

    rel = np.asarray(labels, dtype=np.float64)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    values = ranking_metrics(rel[order][None, :], [rel[rel > 0]], ks=(k,), metrics=("ndcg", "mrr"))
    return float(values[("ndcg", k)][0]), float(values[("mrr", k)][0])


def ndcg_at_k(labels: Sequence[float], scores: Sequence[float], k: int = EVAL_AT_K) -> float:
    """nDCG@k of one list (see :func:`list_metrics`); 0 when no label is positive."""
    return list_metrics(labels, scores, k)[0]


@functools.cache
def _evaluator_class() -> type:
    """Built lazily so importing this module does not import sentence-transformers."""
    import torch
    from sentence_transformers.base.evaluation import BaseEvaluator

    class ListNDCGEvaluator(BaseEvaluator):
        """Graded NDCG@10 / MRR@10 of the reranked validation lists (all pairs scored in one predict call).

        sentence-transformers' ``CrossEncoderRerankingEvaluator`` only knows binary relevance and matches
        positives by text, so graded labels need this small evaluator.
        """

        def __init__(self, lists: Sequence[RerankList], *, at_k: int, batch_size: int, name: str):
            super().__init__()
            self.lists, self.at_k, self.batch_size, self.name = list(lists), at_k, batch_size, name
            self.primary_metric = f"ndcg@{at_k}"
            # Stage-1 order = list order: score position i as -i.
            self.base_ndcg = float(
                np.mean([ndcg_at_k(rl.labels, -np.arange(len(rl.docs)), at_k) for rl in self.lists])
            )

        def __call__(self, model: Any, output_path: str | None = None, epoch: int = -1, steps: int = -1):
            pairs = [[rl.request, d] for rl in self.lists for d in rl.docs]
            scores = model.predict(
                pairs, batch_size=self.batch_size, activation_fn=torch.nn.Identity(), show_progress_bar=False
            )
            ndcgs, mrrs, start = [], [], 0
            for rl in self.lists:
                s = scores[start : start + len(rl.docs)]
                start += len(rl.docs)
                ndcg, rr = list_metrics(rl.labels, s, self.at_k)
                ndcgs.append(ndcg)
                mrrs.append(rr)
            metrics = {
                f"ndcg@{self.at_k}": float(np.mean(ndcgs)),
                f"mrr@{self.at_k}": float(np.mean(mrrs)),
                f"base_ndcg@{self.at_k}": self.base_ndcg,
            }
            metrics = self.prefix_name_to_metrics(metrics, self.name)
            self.store_metrics_in_model_card_data(model, metrics, epoch, steps)
            return metrics

        def get_config_dict(self) -> dict[str, Any]:
            return {"at_k": self.at_k}

    return ListNDCGEvaluator


def _loss_key(name: str) -> str:
    key = name.strip().lower()
    if key not in LOSSES:
        raise ConfigError(
            f"unknown loss '{name}'; choose one of {', '.join(LOSSES)}",
            key="reranker.loss",
            suggestion=did_you_mean(key, LOSSES),
        )
    return key


def build_loss(name: str, model: CrossEncoder, *, mini_batch_size: int | None = None) -> nn.Module:
    """The sentence-transformers listwise loss called ``name`` (``listnet``, ``lambdaloss``, ``listmle``).

    All use raw logits (identity activation). ListMLE is told the lists are not pre-sorted
    (``respect_input_order=False``), so it orders the documents by label itself.

    Raises:
        ConfigError: unknown name, with a did-you-mean suggestion.
    """
    key = _loss_key(name)
    from sentence_transformers.cross_encoder import losses

    if key == "listnet":
        return losses.ListNetLoss(model, mini_batch_size=mini_batch_size)
    if key == "lambdaloss":
        return losses.LambdaLoss(model, mini_batch_size=mini_batch_size)
    return losses.ListMLELoss(model, mini_batch_size=mini_batch_size, respect_input_order=False)


def lists_to_dataset(lists: Sequence[RerankList]) -> Any:
    """A ``datasets.Dataset`` with the columns the listwise losses read: ``query``, ``docs``, ``labels``."""
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "query": [rl.request for rl in lists],
            "docs": [list(rl.docs) for rl in lists],
            "labels": [[float(x) for x in rl.labels] for rl in lists],
        }
    )


# what sequence-classification heads are called (BERT/RoBERTa/ELECTRA, DistilBERT, decoder LMs)
_HEAD_MODULES = frozenset({"classifier", "pre_classifier", "score"})


def _add_lora(model: CrossEncoder) -> Any:
    """Inject LoRA adapters into the attention of ``model`` in place; the fresh head stays trainable.

    peft's own tuner is used rather than transformers' adapter integration, whose peft version check
    can run ahead of the peft releases on the index.
    """
    try:
        from peft import LoraConfig, LoraModel
    except ImportError as e:
        raise MissingDependencyError("lora", "LoRA training") from e
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"])
    tuner = LoraModel(model.model, config, "default")
    for name, param in model.model.named_parameters():
        if name.split(".")[0] in _HEAD_MODULES:
            param.requires_grad = True
    return tuner


def _best_adapter_keeper(model: Any, patience: int) -> Any:
    """Early stopping for LoRA runs that keeps the best adapter and head weights in memory.

    The trainer's own best-checkpoint reload rebuilds a plain CrossEncoder, whose keys do not match an
    adapted model's: it would restore the head from the best step and leave the adapters at the last one.
    """
    from transformers import TrainerCallback

    class BestAdapter(TrainerCallback):
        def __init__(self) -> None:
            self.best: float | None = None
            self.best_step = 0
            self.waited = 0
            self.weights: dict[str, Any] = {}

        def on_evaluate(
            self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any
        ) -> None:
            value = (metrics or {}).get(METRIC_FOR_BEST)
            if value is None:
                return
            if self.best is None or value > self.best:
                self.best, self.best_step, self.waited = float(value), int(state.global_step), 0
                self.weights = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
            else:
                self.waited += 1
                if self.waited >= patience:
                    control.should_training_stop = True

        def restore(self) -> None:
            if self.weights:
                unexpected = model.load_state_dict(self.weights, strict=False).unexpected_keys
                assert not unexpected, unexpected

    return BestAdapter()


def _merge_lora(tuner: Any) -> None:
    """Fold the adapters into the base weights so the saved dir loads as a plain CrossEncoder."""
    tuner.merge_and_unload()


def train_reranker(
    train_lists: Sequence[RerankList],
    *,
    output_dir: str | Path,
    base_model: str | Path | None = None,
    val_lists: Sequence[RerankList] | None = None,
    loss: str = "listnet",
    epochs: int = 1,
    batch_size: int = 4,
    learning_rate: float = 2e-5,
    warmup_ratio: float = 0.1,
    max_length: int | None = 256,
    eval_steps: int | None = None,
    patience: int = 2,
    seed: int = 0,
    lora: bool = False,
    mini_batch_size: int | None = None,
    device: str | None = None,
    progress: bool = False,
) -> RerankerTrainingResult:
    """Fine-tune a cross-encoder on candidate lists with a listwise loss and save the best checkpoint.

    With ``val_lists`` the model is evaluated (graded NDCG@10 of the reranked lists) every ``eval_steps``
    steps, or once per epoch when ``eval_steps`` is None; training stops after ``patience`` evaluations
    without improvement and the best checkpoint is the one saved. Trainer checkpoints go to a temporary
    directory that is removed afterwards. ``output_dir`` gets the model (identity activation stored in its
    config, so ``CrossEncoder(output_dir).predict`` returns raw logits) and ``training.json`` (config,
    best validation metrics, steps, seconds).

    Args:
        train_lists: training lists (see :func:`make_list`).
        output_dir: where the trained model and ``training.json`` go.
        base_model: CrossEncoder name/path; ``None``/``"default"`` = MiniLM with a fresh 1-logit head.
        val_lists: validation lists for early stopping and model selection.
        loss: ``listnet`` (default), ``lambdaloss`` or ``listmle``.
        epochs: passes over ``train_lists``.
        batch_size: lists per optimiser step.
        learning_rate: peak AdamW learning rate.
        warmup_ratio: fraction of steps with linear warm-up, in [0, 1).
        max_length: token limit per (request, doc) pair; None sizes it from ``train_lists`` (:func:`pair_length`).
        eval_steps: evaluate every this many steps; None = once per epoch.
        patience: evaluations without improvement before stopping.
        seed: seeds the fresh head, data order and dropout.
        lora: train LoRA adapters (needs the ``lora`` extra) and merge them into the saved model.
        mini_batch_size: pairs per forward pass inside the loss; None = all pairs of a batch at once.
        device: torch device; None picks CUDA when available.
        progress: show the trainer's progress bars.

    Returns:
        A :class:`RerankerTrainingResult`.

    Raises:
        ConfigError: unknown loss or out-of-range option.
        InputError: no training lists.
        MissingDependencyError: ``lora=True`` without peft installed.

    Example:
        >>> lists = [RerankList("heat", ["Heat (1995)", "Toy Story (1995)"], [1.0, 0.0])]  # doctest: +SKIP
        >>> train_reranker(lists, output_dir="models/reranker").model_path  # doctest: +SKIP
    """
    loss_key = _loss_key(loss)
    if not train_lists:
        raise InputError("train_reranker got no training lists; build them with make_lists")
    for key, value, ok in (
        ("reranker.epochs", epochs, epochs >= 1),
        ("reranker.train_batch_size", batch_size, batch_size >= 1),
        ("reranker.learning_rate", learning_rate, learning_rate > 0),
        ("reranker.warmup_ratio", warmup_ratio, 0.0 <= warmup_ratio < 1.0),
        ("reranker.max_length", max_length, max_length is None or max_length >= 8),
        ("reranker.patience", patience, patience >= 1),
        ("eval_steps", eval_steps, eval_steps is None or eval_steps >= 1),
    ):
        if not ok:
            raise ConfigError(f"value {value!r} is out of range", key=key)
    if lora:
        try:
            import peft  # noqa: F401
        except ImportError as e:
            raise MissingDependencyError("lora", "LoRA training") from e

    import torch
    from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments
    from transformers import EarlyStoppingCallback, set_seed

    from twostage.rerank import load_cross_encoder
    from twostage.train import keep_stdout_clean

    set_seed(seed)
    model, fresh_head = load_cross_encoder(
        base_model, device=device, max_length=max_length or LENGTH_CAP, for_training=True
    )
    if max_length is None:
        positions = getattr(model.model.config, "max_position_embeddings", LENGTH_CAP)
        max_length = pair_length(model.tokenizer, train_lists, limit=min(LENGTH_CAP, positions), seed=seed)
        model.max_seq_length = max_length
        logger.info("reranker pairs cut at %d tokens (95th percentile of the training pairs)", max_length)
    tuner = _add_lora(model) if lora else None
    loss_fn = build_loss(loss, model, mini_batch_size=0 if mini_batch_size is None else mini_batch_size)
    train_dataset = lists_to_dataset(train_lists)
    evaluator = (
        _evaluator_class()(val_lists, at_k=EVAL_AT_K, batch_size=64, name=_EVAL_NAME) if val_lists else None
    )
    steps_per_epoch = math.ceil(len(train_lists) / batch_size)
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # inside the project (beside output_dir), so a crash leaves nothing in /tmp and the next open cleans it
    workdir = tempfile.mkdtemp(prefix=".work-", dir=output_dir.parent)
    started = time.perf_counter()
    trainer_keeps_best = evaluator is not None and tuner is None
    try:
        strategy = "no" if evaluator is None else ("epoch" if eval_steps is None else "steps")
        args = CrossEncoderTrainingArguments(
            output_dir=workdir,
            num_train_epochs=epochs,
            per_device_train_batch_size=batch_size,
            per_device_eval_batch_size=batch_size,
            learning_rate=learning_rate,
            warmup_steps=warmup_ratio,
            seed=seed,
            data_seed=seed,
            eval_strategy=strategy,
            eval_steps=eval_steps,
            save_strategy="best" if trainer_keeps_best else "no",
            save_only_model=True,
            save_total_limit=1,
            load_best_model_at_end=trainer_keeps_best,
            metric_for_best_model=METRIC_FOR_BEST if evaluator is not None else None,
            greater_is_better=True,
            logging_steps=max(1, min(50, steps_per_epoch)),
            report_to="none",
            disable_tqdm=not progress,
            dataloader_num_workers=0,
            # pinning only helps host-to-GPU copies (and warns without one)
            dataloader_pin_memory=torch.cuda.is_available() and device != "cpu",
            use_cpu=device == "cpu",
        )
        # LoRA runs keep their best weights themselves (see _best_adapter_keeper)
        best_adapter = _best_adapter_keeper(model.model, patience) if evaluator and tuner else None
        if best_adapter is not None:
            callbacks = [best_adapter]
        else:
            callbacks = (
                [EarlyStoppingCallback(early_stopping_patience=patience)] if trainer_keeps_best else []
            )
        trainer = CrossEncoderTrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            loss=loss_fn,
            evaluator=evaluator,
            callbacks=callbacks,
        )
        keep_stdout_clean(trainer)
        output = trainer.train()
        seconds = time.perf_counter() - started
        steps = int(trainer.state.global_step)
        best_metric = None if evaluator is None else trainer.state.best_metric
        best_checkpoint = trainer.state.best_model_checkpoint
        if best_adapter is not None:
            best_adapter.restore()
            best_metric, best_checkpoint = best_adapter.best, f"checkpoint-{best_adapter.best_step}"
        metrics = _best_metrics(trainer.state.log_history, best_checkpoint)
        if evaluator is None:
            metrics = {"train_loss": float(output.training_loss)}
        if tuner is not None:
            _merge_lora(tuner)
        model.activation_fn = torch.nn.Identity()
        output_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(output_dir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    record = {
        "base_model": "default" if base_model is None else str(base_model),
        "fresh_head": fresh_head,
        "loss": loss_key,
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "warmup_ratio": warmup_ratio,
        "max_length": max_length,
        "eval_steps": eval_steps,
        "patience": patience,
        "seed": seed,
        "lora": lora,
        "train_lists": len(train_lists),
        "val_lists": len(val_lists or []),
        "list_size": max(len(rl.docs) for rl in train_lists),
        "metric_for_best_model": f"ndcg@{EVAL_AT_K}" if evaluator is not None else None,
        "best_metric": best_metric,
        "metrics": metrics,
        "steps": steps,
        "seconds": round(seconds, 3),
    }
    (output_dir / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    logger.info("reranker trained: %d steps, %.1fs, best %s", steps, seconds, best_metric)
    return RerankerTrainingResult(
        model_path=output_dir,
        best_metric=best_metric,
        metrics=metrics,
        steps=steps,
        seconds=seconds,
        max_length=max_length,
    )


def _best_metrics(log_history: list[dict[str, Any]], best_checkpoint: str | None) -> dict[str, float]:
    """Validation metrics logged at the best checkpoint's step, without the ``eval_val_`` prefix."""
    evals = [h for h in log_history if METRIC_FOR_BEST in h]
    if not evals:
        return {}
    chosen = evals[-1]
    if best_checkpoint:
        step = int(best_checkpoint.rsplit("-", 1)[-1])
        chosen = next((h for h in evals if h.get("step") == step), chosen)
    prefix = f"eval_{_EVAL_NAME}_"
    return {k[len(prefix) :]: float(v) for k, v in chosen.items() if k.startswith(prefix)}
