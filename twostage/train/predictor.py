"""Training the behaviour predictor (``twostage train predictor``): examples, out-of-fold biases, the loop.

Examples come from the split's training side (``twostage.outcomes``): every rating event (target: its value)
and, per configured event type, its events (label 1) and as many sampled items the user never touched
(label 0). Each example's context is the user's other training-side events. Validation examples are built the
same way from the split's ``valid`` part, with the context of the training side only.

The loop is written here rather than through the Hugging Face ``Trainer`` because each target has its own
loss (MSE for ratings, cross-entropy for events) over a model with several heads and a per-example bias
offset; the loop is what those need and no more: AdamW, linear warm-up and decay, early stopping on the
validation loss with the best weights kept, a time budget, progress with an ETA.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from twostage.errors import NotFoundError
from twostage.outcomes import Outcomes, held_outcomes, sample_negatives, train_outcomes
from twostage.predictor import RATING, Biases, Predictor, build_net, render_context

if TYPE_CHECKING:
    from twostage.config import PredictorConfig
    from twostage.project import Project

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Examples:
    """Training or validation pairs: who, what, which target, the label, and the bias offset of ratings."""

    users: np.ndarray
    items: np.ndarray
    targets: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.users)

    def take(self, index: np.ndarray) -> Examples:
        return Examples(
            *(a[index] for a in (self.users, self.items, self.targets, self.labels, self.offsets))
        )

    @classmethod
    def concat(cls, parts: Sequence[Examples]) -> Examples:
        return cls(
            *(
                np.concatenate([getattr(p, f) for p in parts])
                for f in ("users", "items", "targets", "labels", "offsets")
            )
        )


def user_events(outcomes: Outcomes) -> dict[str, list[tuple[str, str, float]]]:
    """Per user, their (item, event, value) events in the order given (newest first)."""
    out: dict[str, list[tuple[str, str, float]]] = {}
    for u, i, e, v in zip(outcomes.users, outcomes.items, outcomes.events, outcomes.values, strict=True):
        out.setdefault(u, []).append((i, e, float(v)))
    return out


def make_examples(
    outcomes: Outcomes,
    config: PredictorConfig,
    *,
    rating_event: str,
    catalogue_ids: np.ndarray,
    seen: Mapping[str, set[str]],
    seed: int,
) -> Examples:
    """The examples of every target from ``outcomes`` (bias offsets left at 0; see :func:`oof_offsets`)."""
    parts: list[Examples] = []
    if config.rating:
        rated = outcomes.of(rating_event)
        keep = np.isfinite(rated.values)
        rated = rated.take(np.flatnonzero(keep))
        n = len(rated)
        parts.append(
            Examples(rated.users, rated.items, np.full(n, RATING, dtype=object), rated.values, np.zeros(n))
        )
    for k, event in enumerate(config.events):
        pos = outcomes.of(event)
        users, items = sample_negatives(pos, catalogue_ids, dict(seen), config.negatives, seed + k)
        n_pos, n_neg = len(pos), len(users)
        parts.append(
            Examples(
                np.concatenate([pos.users, users]),
                np.concatenate([pos.items, items]),
                np.full(n_pos + n_neg, event, dtype=object),
                np.concatenate([np.ones(n_pos), np.zeros(n_neg)]),
                np.zeros(n_pos + n_neg),
            )
        )
    if not parts:
        return Examples(*(np.zeros(0, dtype=object),) * 3, np.zeros(0), np.zeros(0))
    return Examples.concat(parts)


def oof_offsets(examples: Examples, folds: int, seed: int) -> tuple[np.ndarray, Biases]:
    """Each training rating's biases fit without its own fold of ratings (so the head learns the residual a
    held-out rating will show, not the smaller in-sample one), and the biases fit on all of them (served)."""
    rated = np.flatnonzero(examples.targets == RATING)
    users, items, values = examples.users[rated], examples.items[rated], examples.labels[rated]
    full = Biases.fit(users, items, values, seed=seed)
    offsets = np.zeros(len(examples))
    if folds < 2:
        offsets[rated] = full.predict(users, items)
        return offsets, full
    fold = np.random.default_rng(seed).integers(0, folds, size=len(rated))
    for f in range(folds):
        held, rest = fold == f, fold != f
        part = Biases.fit(users[rest], items[rest], values[rest], seed=seed)
        offsets[rated[held]] = part.predict(users[held], items[held])
    return offsets, full


def _sample(examples: Examples, limit: int | None, rng: np.random.Generator) -> Examples:
    if limit is None or len(examples) <= limit:
        return examples.take(rng.permutation(len(examples)))
    return examples.take(rng.choice(len(examples), size=limit, replace=False))


class _Batches:
    """Contexts and item texts of examples, rendered on demand (one batch at a time)."""

    def __init__(
        self,
        events: Mapping[str, list],
        titles: Mapping[str, str],
        texts: Mapping[str, str],
        rating_event: str,
        size: int,
    ):
        self.events, self.titles, self.texts = events, titles, texts
        self.rating_event, self.size = rating_event, size

    def render(self, ex: Examples) -> tuple[list[str], list[str]]:
        contexts = [
            render_context(
                self.events.get(u, []), self.titles, rating_event=self.rating_event, size=self.size, skip=i
            )
            for u, i in zip(ex.users, ex.items, strict=True)
        ]
        return contexts, [self.texts[i] for i in ex.items]


def _losses(predictor: Predictor, batches: _Batches, ex: Examples) -> dict[str, Any]:
    """Per target present in ``ex``: its loss tensor (MSE on ratings over their offsets, BCE on events)."""
    import torch
    from torch.nn import functional as F

    contexts, texts = batches.render(ex)
    heads = predictor.net(**predictor.encode(contexts, texts))
    out: dict[str, Any] = {}
    for target in predictor.targets:
        mask = torch.as_tensor(ex.targets == target)
        if not bool(mask.any()):
            continue
        labels = torch.as_tensor(ex.labels, dtype=torch.float32)[mask]
        pred = heads[target][mask]
        if target == RATING:
            pred = pred + torch.as_tensor(ex.offsets, dtype=torch.float32)[mask]
            out[target] = F.mse_loss(pred, labels)
        else:
            out[target] = F.binary_cross_entropy_with_logits(pred, labels)
    return out


def validation_losses(predictor: Predictor, batches: _Batches, ex: Examples) -> dict[str, float]:
    """Mean loss per target over ``ex`` (RMSE for ratings, log-loss for events), without gradients."""
    import torch

    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    predictor.net.eval()
    with torch.inference_mode():
        for start in range(0, len(ex), predictor.batch_size):
            part = ex.take(np.arange(start, min(start + predictor.batch_size, len(ex))))
            for target, loss in _losses(predictor, batches, part).items():
                n = int((part.targets == target).sum())
                sums[target] = sums.get(target, 0.0) + float(loss) * n
                counts[target] = counts.get(target, 0) + n
    means = {t: sums[t] / counts[t] for t in sums}
    return {t: (float(np.sqrt(v)) if t == RATING else v) for t, v in means.items()}


def fit_predictor(project: Project, split: str, *, progress: bool = False) -> dict[str, Any]:
    """Train the behaviour predictor on ``split`` and save it as the project's (``models/predictor``)."""
    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.optimization import get_linear_schedule_with_warmup

    from twostage.encoders import resolve_model

    started = time.perf_counter()
    cfg = project.config.predictor
    rating_event = project.config.relevance.rating_event
    store = project.store
    store.require_split(split)
    targets = ((RATING,) if cfg.rating else ()) + tuple(cfg.events)
    if not targets:
        raise NotFoundError("[predictor] has no target: set rating = true or list event types in events")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    catalogue = project.catalogue()
    catalogue_ids = np.asarray(sorted(catalogue.texts), dtype=object)
    train = train_outcomes(store, split)
    seen = _seen(store)
    events = user_events(train)
    train_ex = make_examples(
        train, cfg, rating_event=rating_event, catalogue_ids=catalogue_ids, seen=seen, seed=cfg.seed
    )
    train_ex = train_ex.take(np.flatnonzero([i in catalogue.texts for i in train_ex.items]))
    if not len(train_ex):
        raise NotFoundError(
            f"split '{split}' has no training events for the predictor's targets {list(targets)}"
        )
    biases = None
    if cfg.rating and cfg.residual and (train_ex.targets == RATING).any():
        offsets, biases = oof_offsets(train_ex, cfg.bias_folds, cfg.seed)
        train_ex = Examples(train_ex.users, train_ex.items, train_ex.targets, train_ex.labels, offsets)
    valid_ex = make_examples(
        held_outcomes(store, split, "valid"),
        cfg,
        rating_event=rating_event,
        catalogue_ids=catalogue_ids,
        seen=seen,
        seed=cfg.seed + 1000,
    )
    valid_ex = valid_ex.take(np.flatnonzero([i in catalogue.texts for i in valid_ex.items]))
    valid_ex = _sample(valid_ex, cfg.eval_examples, rng)
    if biases is not None:
        valid_ex = Examples(
            valid_ex.users,
            valid_ex.items,
            valid_ex.targets,
            valid_ex.labels,
            np.where(valid_ex.targets == RATING, biases.predict(valid_ex.users, valid_ex.items), 0.0),
        )

    path = resolve_model(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    net = build_net(AutoModel.from_pretrained(path), targets)
    predictor = Predictor(
        net,
        tokenizer,
        targets,
        rating_event,
        cfg.max_length,
        cfg.context_items,
        biases,
        batch_size=cfg.batch_size,
    )
    batches = _Batches(
        events,
        {i: catalogue.title(i) for i in catalogue.texts},
        catalogue.texts,
        rating_event,
        cfg.context_items,
    )

    per_epoch = min(len(train_ex), cfg.max_train_examples)
    total = cfg.epochs * -(-per_epoch // cfg.batch_size)
    encoder_params = list(net.encoder.parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": encoder_params, "lr": cfg.learning_rate},
            {"params": net.heads.parameters(), "lr": cfg.head_learning_rate},
        ],
        weight_decay=0.01,
    )
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, total // 10), total)
    budget = cfg.time_budget_minutes * 60 if cfg.time_budget_minutes else None

    def score(losses: Mapping[str, float]) -> float:
        return float(sum(losses[t] / max(start_losses[t], 1e-9) for t in losses))

    start_losses = validation_losses(predictor, batches, valid_ex) if len(valid_ex) else {}
    best = {"step": 0, "losses": start_losses, "score": score(start_losses) if start_losses else float("inf")}
    best_state = copy.deepcopy(net.state_dict())
    logger.info(
        "predictor: %d training examples (%d per epoch, %d steps), %d validation; at start %s%s",
        len(train_ex),
        per_epoch,
        total,
        len(valid_ex),
        _fmt(start_losses),
        f"; budget {budget / 60:.0f} min" if budget else "",
    )
    step, waited, stopped = 0, 0, "completed"
    history: list[dict[str, Any]] = [{"step": 0, **start_losses}]
    loop_started = time.perf_counter()
    for _epoch in range(cfg.epochs):
        epoch_ex = _sample(train_ex, cfg.max_train_examples, rng)
        for start in range(0, per_epoch, cfg.batch_size):
            net.train()
            losses = _losses(
                predictor, batches, epoch_ex.take(np.arange(start, min(start + cfg.batch_size, per_epoch)))
            )
            loss = sum(losses.values())
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            elapsed = time.perf_counter() - loop_started
            if step % cfg.eval_every == 0 or step == total:
                if len(valid_ex):
                    now = validation_losses(predictor, batches, valid_ex)
                    history.append({"step": step, **now})
                    if score(now) < best["score"] - 1e-6:
                        best, waited = {"step": step, "losses": now, "score": score(now)}, 0
                        best_state = copy.deepcopy(net.state_dict())
                    else:
                        waited += 1
                    eta = elapsed / step * (total - step)
                    logger.info(
                        "predictor step %d/%d: valid %s (best at %d); ETA %.0f s",
                        step,
                        total,
                        _fmt(now),
                        best["step"],
                        eta,
                    )
                if waited >= cfg.patience:
                    stopped = "early stopping"
                    break
            if budget is not None and time.perf_counter() - started > budget:
                stopped = "time budget"
                break
        else:
            continue
        break
    net.load_state_dict(best_state)
    predictor.record = {
        "split": split,
        "model": cfg.model,
        "targets": list(targets),
        "examples": {"train": len(train_ex), "valid": len(valid_ex)},
        "steps": step,
        "planned_steps": total,
        "best_step": best["step"],
        "stopped": stopped,
        "valid_at_start": start_losses,
        "valid_best": best["losses"],
        "history": history,
        "residual": biases is not None,
        "seconds": round(time.perf_counter() - started, 1),
    }
    predictor.save(project.models_dir("predictor"))
    project.record_run("train-predictor", extra={"split": split, "resolved": predictor.record})
    logger.info(
        "predictor trained: %d steps (%s), best at step %d: %s",
        step,
        stopped,
        best["step"],
        _fmt(best["losses"]),
    )
    return predictor.record


def _seen(store: Any) -> dict[str, set[str]]:
    """Every item each user has any event with (negatives are drawn outside it)."""
    with store.cursor() as cur:
        rows = cur.execute("SELECT user_id, list(DISTINCT item_id) FROM events GROUP BY 1").fetchall()
    return {u: set(items) for u, items in rows}


def _fmt(losses: Mapping[str, float]) -> str:
    return (
        ", ".join(f"{'RMSE' if t == RATING else t + ' log-loss'} {v:.4f}" for t, v in losses.items()) or "-"
    )
