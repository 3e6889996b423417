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
from twostage.outcomes import Columns, Outcomes, held_outcomes, sample_negatives, train_outcomes
from twostage.predictor import LISTNET, RATING, Biases, Predictor, build_net, render_contexts

if TYPE_CHECKING:
    from twostage.config import PredictorConfig
    from twostage.project import Project

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Examples(Columns):
    """Training or validation pairs: who, what, which target, the label, and the bias offset of ratings."""

    users: np.ndarray
    items: np.ndarray
    targets: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray

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
    if config.tasks.get(RATING, 0.0) > 0:
        rated = outcomes.of(rating_event)
        keep = np.isfinite(rated.values)
        rated = rated.take(np.flatnonzero(keep))
        n = len(rated)
        parts.append(
            Examples(rated.users, rated.items, np.full(n, RATING, dtype=object), rated.values, np.zeros(n))
        )
    for k, event in enumerate(event_tasks(config)):
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


def event_tasks(config: PredictorConfig) -> list[str]:
    """The event types with a binary head: every task that is neither the rating nor the ranking one."""
    return [t for t, w in config.tasks.items() if w > 0 and t not in (RATING, LISTNET)]


@dataclass(frozen=True)
class Lists(Columns):
    """Ranking lists: per list a user, its positive item (column 0 of ``items``) and sampled negatives."""

    users: np.ndarray
    items: np.ndarray  # (lists, list_size) of item ids


def make_lists(
    outcomes: Outcomes, catalogue_ids: np.ndarray, seen: Mapping[str, set[str]], size: int, seed: int
) -> Lists:
    """One list per (user, item) of ``outcomes``: the item, then ``size − 1`` items the user never touched."""
    pairs = sorted(
        {(u, i) for u, i in zip(outcomes.users, outcomes.items, strict=True) if i in set(catalogue_ids)}
    )
    if not pairs:
        return Lists(np.zeros(0, dtype=object), np.zeros((0, size), dtype=object))
    users = np.asarray([u for u, _ in pairs], dtype=object)
    positives = Outcomes(users, np.asarray([i for _, i in pairs], dtype=object), users, np.zeros(len(users)))
    neg_users, neg_items = sample_negatives(positives, catalogue_ids, dict(seen), size - 1, seed)
    by_user: dict[str, list[str]] = {}
    for u, i in zip(neg_users, neg_items, strict=True):
        by_user.setdefault(u, []).append(i)
    rows, kept = [], []
    cursor: dict[str, int] = {}
    for n, (u, i) in enumerate(pairs):
        start = cursor.get(u, 0)
        negs = by_user.get(u, [])[start : start + size - 1]
        cursor[u] = start + size - 1
        if len(negs) == size - 1:
            rows.append([i, *negs])
            kept.append(n)
    return Lists(users[kept], np.asarray(rows, dtype=object).reshape(len(rows), size))


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

    def contexts(self, users: Sequence[str], skips: Sequence[str]) -> list[str]:
        return render_contexts(
            self.events, self.titles, users, skips, rating_event=self.rating_event, size=self.size
        )

    def render(self, ex: Examples) -> tuple[list[str], list[str]]:
        return self.contexts(ex.users, ex.items), [self.texts[i] for i in ex.items]


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


def _list_loss(predictor: Predictor, batches: _Batches, lists: Lists) -> Any:
    """ListNet with one positive: softmax cross-entropy of each list's logits against its first item."""
    from torch.nn import functional as F

    size = lists.items.shape[1]
    users = np.repeat(lists.users, size)
    items = lists.items.reshape(-1)
    # every pair of a list reads the same context: the user's events without the list's positive
    skips = np.repeat(lists.items[:, 0], size)
    contexts = batches.contexts(users, skips)
    logits = predictor.net(**predictor.encode(contexts, [batches.texts[i] for i in items]))[LISTNET].view(
        -1, size
    )
    return F.cross_entropy(logits, logits.new_zeros(len(lists), dtype=int))


def validation_losses(
    predictor: Predictor, batches: _Batches, ex: Examples, lists: Lists | None = None
) -> dict[str, float]:
    """Mean loss per target over ``ex`` (RMSE for ratings, log-loss for events) and ``lists`` (ListNet's
    cross-entropy), without gradients."""
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
        if lists is not None and len(lists):
            step = max(1, predictor.batch_size // lists.items.shape[1])
            for start in range(0, len(lists), step):
                part = lists.take(np.arange(start, min(start + step, len(lists))))
                sums[LISTNET] = sums.get(LISTNET, 0.0) + float(_list_loss(predictor, batches, part)) * len(
                    part
                )
                counts[LISTNET] = counts.get(LISTNET, 0) + len(part)
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
    weights = {t: w for t, w in cfg.tasks.items() if w > 0}
    targets = tuple(weights)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    catalogue = project.catalogue()
    catalogue_ids = np.asarray(sorted(catalogue.texts), dtype=object)
    known = np.vectorize(lambda i: i in catalogue.texts, otypes=[bool])
    train = train_outcomes(store, split)
    present = set(train.events.tolist())
    missing = [
        t for t in event_tasks(cfg) + ([rating_event] if RATING in weights else []) if t not in present
    ]
    if missing:
        raise NotFoundError(
            f"[predictor] tasks: no '{missing[0]}' events on the training side of split '{split}' "
            f"(event types there: {', '.join(sorted(present)) or 'none'})"
        )
    seen = _seen(store)
    events = user_events(train)
    held = held_outcomes(store, split, "valid")
    train_ex = make_examples(
        train, cfg, rating_event=rating_event, catalogue_ids=catalogue_ids, seen=seen, seed=cfg.seed
    )
    train_ex = train_ex.take(np.flatnonzero(known(train_ex.items))) if len(train_ex) else train_ex
    valid_ex = make_examples(
        held, cfg, rating_event=rating_event, catalogue_ids=catalogue_ids, seen=seen, seed=cfg.seed + 1000
    )
    valid_ex = valid_ex.take(np.flatnonzero(known(valid_ex.items))) if len(valid_ex) else valid_ex
    valid_ex = valid_ex.sample(cfg.eval_examples, rng)
    train_lists = valid_lists = None
    if LISTNET in weights:
        train_lists = make_lists(train, catalogue_ids, seen, cfg.list_size, cfg.seed + 2000)
        valid_lists = make_lists(held, catalogue_ids, seen, cfg.list_size, cfg.seed + 3000).sample(
            cfg.eval_lists, rng
        )
    if not len(train_ex) and not (train_lists is not None and len(train_lists)):
        raise NotFoundError(
            f"split '{split}' has no training events for the predictor's tasks {list(targets)}"
        )
    biases = None
    if RATING in weights and cfg.residual and (train_ex.targets == RATING).any():
        offsets, biases = oof_offsets(train_ex, cfg.bias_folds, cfg.seed)
        train_ex = Examples(train_ex.users, train_ex.items, train_ex.targets, train_ex.labels, offsets)
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

    # a step takes batch_size pointwise examples and lists_per_batch lists; the epoch is the longer of the two
    per_epoch = -(-min(len(train_ex), cfg.max_train_examples) // cfg.batch_size)
    if train_lists is not None:
        per_epoch = max(per_epoch, -(-min(len(train_lists), cfg.max_train_examples) // cfg.lists_per_batch))
    by_data = cfg.epochs * per_epoch
    budget = cfg.time_budget_minutes * 60 if cfg.time_budget_minutes else None

    def batch_loss(n: int, epoch_ex: Examples, epoch_lists: Lists | None) -> Any:
        """The weighted sum of the task losses of the step-``n`` batch of an epoch."""
        losses: dict[str, Any] = {}
        if len(epoch_ex):
            chunk = np.arange(n * cfg.batch_size, (n + 1) * cfg.batch_size) % len(epoch_ex)
            losses.update(_losses(predictor, batches, epoch_ex.take(chunk)))
        if epoch_lists is not None and len(epoch_lists):
            chunk = np.arange(n * cfg.lists_per_batch, (n + 1) * cfg.lists_per_batch) % len(epoch_lists)
            losses[LISTNET] = _list_loss(predictor, batches, epoch_lists.take(chunk))
        return sum(weights[t] * v for t, v in losses.items())

    def validate() -> dict[str, float]:
        return validation_losses(predictor, batches, valid_ex, valid_lists)

    timer = time.perf_counter()
    start_losses = validate()
    eval_seconds = time.perf_counter() - timer
    epoch_ex = train_ex.sample(cfg.max_train_examples, rng)
    epoch_lists = train_lists.sample(cfg.max_train_examples, rng) if train_lists is not None else None
    # Size the run to the budget before the learning-rate schedule is fixed: two forward and backward passes
    # (no update) time a step, so warm-up and decay span the steps that will run, not the data's epochs.
    net.train()
    for n in range(2):
        timer = time.perf_counter()
        batch_loss(n, epoch_ex, epoch_lists).backward()
        net.zero_grad()
        step_seconds = time.perf_counter() - timer
    total = by_data
    if budget is not None:
        left = budget - (time.perf_counter() - started)
        total = max(1, min(by_data, int(left / (step_seconds + eval_seconds / cfg.eval_every))))
    optimizer = torch.optim.AdamW(
        [
            {"params": list(net.encoder.parameters()), "lr": cfg.learning_rate},
            {"params": list(net.heads.parameters()), "lr": cfg.head_learning_rate},
        ],
        weight_decay=0.01,
    )
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, total // 10), total)

    def score(losses: Mapping[str, float]) -> float:  # each task's loss relative to where it started
        return float(sum(weights[t] * losses[t] / max(start_losses[t], 1e-9) for t in losses))

    best = {"step": 0, "losses": start_losses, "score": score(start_losses) if start_losses else float("inf")}
    best_state = copy.deepcopy(net.state_dict())
    logger.info(
        "predictor: tasks %s; %d pointwise examples, %s lists; %d steps (%d by the data; %.1f s a step, "
        "%.0f s a validation)%s; validation %d examples, %s lists; at start %s",
        weights,
        len(train_ex),
        len(train_lists) if train_lists is not None else 0,
        total,
        by_data,
        step_seconds,
        eval_seconds,
        f" to fit the {budget / 60:.0f}-minute budget" if budget else "",
        len(valid_ex),
        len(valid_lists) if valid_lists is not None else 0,
        _fmt(start_losses),
    )
    step, waited, stopped = 0, 0, "completed"
    history: list[dict[str, Any]] = [{"step": 0, **start_losses}]
    loop_started = time.perf_counter()
    for epoch in range(cfg.epochs):
        if epoch:
            epoch_ex = train_ex.sample(cfg.max_train_examples, rng)
            epoch_lists = train_lists.sample(cfg.max_train_examples, rng) if train_lists is not None else None
        for n in range(per_epoch):
            net.train()
            loss = batch_loss(n, epoch_ex, epoch_lists)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            if step % cfg.eval_every == 0 or step == total:
                now = validate()
                history.append({"step": step, **now})
                if now and score(now) < best["score"] - 1e-6:
                    best, waited = {"step": step, "losses": now, "score": score(now)}, 0
                    best_state = copy.deepcopy(net.state_dict())
                else:
                    waited += 1
                elapsed = time.perf_counter() - loop_started
                logger.info(
                    "predictor step %d/%d: valid %s (best at %d); ETA %.0f s",
                    step,
                    total,
                    _fmt(now),
                    best["step"],
                    elapsed / step * (total - step),
                )
                if waited >= cfg.patience and now:
                    stopped = "early stopping"
                    break
            if step >= total:
                stopped = "completed" if total == by_data else "time budget"
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
        "tasks": weights,
        "targets": list(targets),
        "examples": {
            "train": len(train_ex),
            "valid": len(valid_ex),
            "train_lists": len(train_lists) if train_lists is not None else 0,
            "valid_lists": len(valid_lists) if valid_lists is not None else 0,
        },
        "steps": step,
        "planned_steps": total,
        "steps_by_data": by_data,
        "seconds_per_step": round(step_seconds, 2),
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


def loss_label(target: str) -> str:
    """How a validation loss is named in logs and output."""
    return {RATING: "RMSE", LISTNET: "list cross-entropy"}.get(target, f"{target} log-loss")


def _fmt(losses: Mapping[str, float]) -> str:
    return ", ".join(f"{loss_label(t)} {v:.4f}" for t, v in losses.items()) or "-"
