"""Evaluating the behaviour predictor against rating baselines, on the same split, in one run.

Ratings: RMSE and MAE of the predictor and of three baselines fit on the same training events — the global
mean, user + item biases (cornac ``BaselineOnly``) and biased matrix factorisation (cornac ``MF`` with
biases; its factors, regularisation and epochs chosen on the validation ratings). Paired comparisons are made on
per-rating squared errors (the difference of MSE, a bootstrap interval and a t-test p-value).

Events: AUC and log-loss of each event head on the held-out events against as many sampled items the user
never touched (seeded), beside the base rate (log-loss) and item popularity (AUC), with a paired comparison of
per-example log-losses.

Every score goes to the store's ``metrics`` table under one run (kind ``eval-predict``).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from twostage.errors import NotFoundError
from twostage.metrics import paired_comparison
from twostage.outcomes import Outcomes, held_outcomes, sample_negatives, train_outcomes
from twostage.predictor import LISTNET, RATING, Biases, Predictor, render_contexts

if TYPE_CHECKING:
    from twostage.store import Store

logger = logging.getLogger(__name__)

METRICS = ("RMSE", "MAE", "AUC", "log-loss", "nDCG@10", "MRR")
MF_GRID = {"k": (10, 50), "lambda_reg": (0.02, 0.05, 0.1), "max_iter": (20, 50, 100)}


@dataclass(frozen=True)
class RatingModel:
    """A fitted rating baseline: predictions for any (user, item), 0 offsets for unknown ones."""

    name: str
    mean: float
    user_bias: Mapping[str, float]
    item_bias: Mapping[str, float]
    user_factors: Mapping[str, np.ndarray]
    item_factors: Mapping[str, np.ndarray]

    def predict(self, users: Sequence[str], items: Sequence[str]) -> np.ndarray:
        out = np.empty(len(users))
        for n, (u, i) in enumerate(zip(users, items, strict=True)):
            value = self.mean + self.user_bias.get(u, 0.0) + self.item_bias.get(i, 0.0)
            pu, qi = self.user_factors.get(u), self.item_factors.get(i)
            if pu is not None and qi is not None:
                value += float(pu @ qi)
            out[n] = value
        return out


def fit_rating_baselines(
    train: Outcomes, valid: Outcomes | None, *, seed: int = 0
) -> list[tuple[RatingModel, dict]]:
    """Global mean, biases and biased MF fit on ``train`` ratings (MF's settings chosen on ``valid``)."""
    from cornac.data import Dataset
    from cornac.models import MF

    users, items, values = train.users, train.items, train.values
    mean = float(values.mean())
    biases = Biases.fit(users, items, values, seed=seed)
    models = [
        (RatingModel("global-mean", mean, {}, {}, {}, {}), {}),
        (RatingModel("biases", biases.mean, biases.users, biases.items, {}, {}), {}),
    ]
    data = Dataset.from_uir(list(zip(users, items, values, strict=True)), seed=seed)
    user_ids, item_ids = list(data.uid_map), list(data.iid_map)

    def mf(k: int, lambda_reg: float, max_iter: int) -> RatingModel:
        model = MF(
            k=k, max_iter=max_iter, learning_rate=0.01, lambda_reg=lambda_reg, use_bias=True, seed=seed
        )
        model.fit(data)
        return RatingModel(
            "biased-mf",
            float(model.global_mean),
            dict(zip(user_ids, np.asarray(model.u_biases, dtype=float).tolist(), strict=True)),
            dict(zip(item_ids, np.asarray(model.i_biases, dtype=float).tolist(), strict=True)),
            dict(zip(user_ids, np.asarray(model.u_factors, dtype=float), strict=True)),
            dict(zip(item_ids, np.asarray(model.i_factors, dtype=float), strict=True)),
        )

    chosen: dict[str, Any] = {"k": 10, "lambda_reg": 0.02, "max_iter": 20}
    if valid is not None and len(valid):
        tried = []
        for k, reg, iters in itertools.product(*MF_GRID.values()):
            model = mf(k, reg, iters)
            rmse = float(np.sqrt(np.mean((model.predict(valid.users, valid.items) - valid.values) ** 2)))
            tried.append((rmse, {"k": k, "lambda_reg": reg, "max_iter": iters}))
        rmse, chosen = min(tried, key=lambda t: t[0])
        chosen = {**chosen, "valid_rmse": round(rmse, 4)}
    settings = {k: v for k, v in chosen.items() if k != "valid_rmse"}
    models.append((mf(**settings), chosen))
    return models


def _rated(outcomes: Outcomes, rating_event: str, known: Mapping[str, str]) -> Outcomes:
    rows = outcomes.of(rating_event)
    keep = np.isfinite(rows.values) & np.asarray([i in known for i in rows.items], dtype=bool)
    return rows.take(np.flatnonzero(keep))


@dataclass(frozen=True)
class _HeldOut:
    """What every head's evaluation reads: the model, the held-out events, each user's training-side events
    (their contexts), every item each user touched (negatives are drawn outside it), the catalogue's texts and
    titles, item popularity on the training side, and the catalogue's ids (negatives are drawn from them)."""

    predictor: Predictor
    held: Outcomes
    events: Mapping[str, list]
    seen: Mapping[str, set[str]]
    texts: Mapping[str, str]
    titles: Mapping[str, str]
    popularity: Mapping[str, int]
    catalogue_ids: np.ndarray

    def predict(self, users, items, skips=None, *, progress: bool = False) -> dict[str, np.ndarray]:
        """The predictor's outputs per (user, item), each context leaving out ``skips`` (default: the item)."""
        contexts = render_contexts(
            self.events,
            self.titles,
            users,
            items if skips is None else skips,
            rating_event=self.predictor.rating_event,
            size=self.predictor.context_items,
        )
        return self.predictor.predict(
            contexts, [self.texts[i] for i in items], users, items, progress=progress
        )


def evaluate_predictions(
    store: Store,
    predictor: Predictor,
    *,
    texts: Mapping[str, str],
    titles: Mapping[str, str],
    split: str,
    part: str,
    config: Mapping[str, Any],
    n_resamples: int = 10_000,
    seed: int = 0,
    max_examples: int | None = None,
    negatives: int = 1,
    list_size: int = 16,
    eval_lists: int = 200,
    progress: bool = False,
) -> dict[str, Any]:
    """Score the predictor and the baselines on ``split/part``; returns rows, comparisons and the run id."""
    from twostage.train.predictor import user_events

    started = time.perf_counter()
    train = train_outcomes(store, split)
    held = held_outcomes(store, split, part)
    events = user_events(train)
    seen = {u: {i for i, _, _ in evs} for u, evs in events.items()}
    for u, i in zip(held.users, held.items, strict=True):
        seen.setdefault(u, set()).add(i)
    popularity: dict[str, int] = {}
    for i in train.items:
        popularity[i] = popularity.get(i, 0) + 1
    catalogue_ids = np.asarray(sorted(texts), dtype=object)
    scoring = _HeldOut(predictor, held, events, seen, texts, titles, popularity, catalogue_ids)
    rng = np.random.default_rng(seed)
    run_id = store.new_run("eval-predict", {**config, "split": split, "part": part})
    out: dict[str, Any] = {"run_id": run_id, "split": split, "part": part, "rows": [], "comparisons": []}

    if RATING in predictor.targets:
        test = _rated(held, predictor.rating_event, texts)
        if max_examples is not None and len(test) > max_examples:
            test = test.take(np.sort(rng.choice(len(test), size=max_examples, replace=False)))
        if not len(test):
            raise NotFoundError(
                f"split '{split}' has no '{predictor.rating_event}' ratings in '{part}' to predict"
            )
        try:
            valid = (
                _rated(held_outcomes(store, split, "valid"), predictor.rating_event, texts)
                if part != "valid"
                else None
            )
        except NotFoundError:
            valid = None
        train_ratings = _rated(train, predictor.rating_event, texts)
        errors: dict[str, np.ndarray] = {}
        settings: dict[str, Any] = {}
        for model, chosen in fit_rating_baselines(train_ratings, valid, seed=seed):
            errors[model.name] = model.predict(test.users, test.items) - test.values
            if chosen:
                settings[model.name] = chosen
        timer = time.perf_counter()
        errors["predictor"] = scoring.predict(test.users, test.items, progress=progress)[RATING] - test.values
        seconds = time.perf_counter() - timer
        for name, err in errors.items():
            row = {
                "name": name,
                "target": RATING,
                "n": len(err),
                "RMSE": float(np.sqrt(np.mean(err**2))),
                "MAE": float(np.mean(np.abs(err))),
            }
            if name == "predictor":
                row["seconds"] = round(seconds, 1)
            out["rows"].append(row)
        for name in ("global-mean", "biases", "biased-mf"):
            c = paired_comparison(
                errors[name] ** 2, errors["predictor"] ** 2, metric="MSE", n_resamples=n_resamples, seed=seed
            )
            out["comparisons"].append({"a": name, "b": "predictor", "target": RATING, **c.__dict__})
        out["baseline_settings"] = settings
        cold = np.asarray([u not in events for u in test.users])
        out["cold_users"] = {
            "n": int(cold.sum()),
            **{name: float(np.sqrt(np.mean(err[cold] ** 2))) for name, err in errors.items() if cold.any()},
        }

    if LISTNET in predictor.targets:
        _evaluate_lists(
            scoring, list_size=list_size, n_lists=eval_lists, seed=seed, n_resamples=n_resamples, into=out
        )
    for k, event in enumerate(t for t in predictor.targets if t not in (RATING, LISTNET)):
        _evaluate_event(scoring, event, negatives=negatives, seed=seed + k, n_resamples=n_resamples, into=out)
    store_metrics(store, run_id, out["rows"])
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def _evaluate_event(
    scoring: _HeldOut,
    event: str,
    *,
    negatives: int,
    seed: int,
    n_resamples: int,
    into: dict[str, Any],
) -> None:
    """Append the event head's rows and its comparison with the base rate to ``into``."""
    from sklearn.metrics import roc_auc_score

    pos = scoring.held.of(event)
    pos = pos.take(np.flatnonzero([i in scoring.texts for i in pos.items]))
    if not len(pos):
        return
    neg_users, neg_items = sample_negatives(pos, scoring.catalogue_ids, scoring.seen, negatives, seed)
    users = np.concatenate([pos.users, neg_users])
    items = np.concatenate([pos.items, neg_items])
    labels = np.concatenate([np.ones(len(pos)), np.zeros(len(neg_users))])
    p = np.clip(scoring.predict(users, items)[event], 1e-7, 1 - 1e-7)
    base = np.full(len(p), len(pos) / len(p))
    pop = np.log1p([scoring.popularity.get(i, 0) for i in items])

    def logloss(q: np.ndarray) -> np.ndarray:
        return -(labels * np.log(q) + (1 - labels) * np.log(1 - q))

    into["rows"] += [
        {
            "name": "predictor",
            "target": event,
            "n": len(p),
            "AUC": float(roc_auc_score(labels, p)),
            "log-loss": float(logloss(p).mean()),
        },
        {
            "name": "base-rate",
            "target": event,
            "n": len(p),
            "AUC": 0.5,
            "log-loss": float(logloss(base).mean()),
        },
        {"name": "popularity", "target": event, "n": len(p), "AUC": float(roc_auc_score(labels, pop))},
    ]
    c = paired_comparison(logloss(base), logloss(p), metric="log-loss", n_resamples=n_resamples, seed=seed)
    into["comparisons"].append({"a": "base-rate", "b": "predictor", "target": event, **c.__dict__})


def _evaluate_lists(
    scoring: _HeldOut,
    *,
    list_size: int,
    n_lists: int,
    seed: int,
    n_resamples: int,
    into: dict[str, Any],
) -> None:
    """The ranking head on held-out lists (a held-out item among ``list_size − 1`` items the user never
    touched): nDCG@10 and reciprocal rank, beside item popularity on the same lists."""
    from twostage.train.predictor import make_lists

    lists = make_lists(scoring.held, scoring.catalogue_ids, scoring.seen, list_size, seed + 3000)
    if not len(lists):
        return
    rng = np.random.default_rng(seed)
    if len(lists) > n_lists:
        lists = lists.take(np.sort(rng.choice(len(lists), size=n_lists, replace=False)))
    users = np.repeat(lists.users, list_size)
    items = lists.items.reshape(-1)
    skips = np.repeat(lists.items[:, 0], list_size)
    scores = scoring.predict(users, items, skips)[LISTNET].reshape(-1, list_size)
    pop = np.log1p(np.asarray([scoring.popularity.get(i, 0) for i in items], dtype=float)).reshape(
        -1, list_size
    )

    def per_list(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # rank of the positive (column 0); ties counted against it, so a constant scorer earns nothing
        rank = (s[:, 1:] >= s[:, :1]).sum(axis=1) + 1
        return np.where(rank <= 10, 1.0 / np.log2(rank + 1), 0.0), 1.0 / rank

    ours, base = per_list(scores), per_list(pop)
    for name, (ndcg, rr) in (("predictor", ours), ("popularity", base)):
        into["rows"].append(
            {
                "name": name,
                "target": LISTNET,
                "n": len(ndcg),
                "nDCG@10": float(ndcg.mean()),
                "MRR": float(rr.mean()),
            }
        )
    c = paired_comparison(base[0], ours[0], metric="nDCG@10", n_resamples=n_resamples, seed=seed)
    into["comparisons"].append({"a": "popularity", "b": "predictor", "target": LISTNET, **c.__dict__})


def store_metrics(store: Store, run_id: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """One ``metrics`` row per (model, target, metric): stage is ``model:target``."""
    values = [
        (run_id, f"{r['name']}:{r['target']}", metric, None, float(r[metric]))
        for r in rows
        for metric in METRICS
        if metric in r
    ]
    if not values:
        return
    with store.transaction() as cur:
        cur.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?, ?)", values)


def table(result: Mapping[str, Any]) -> str:
    """The rows and comparisons as fixed-width text (the CLI's output)."""
    lines = []
    for r in result.get("rows", []):
        cells = [f"{m} {r[m]:.4f}" for m in METRICS if m in r]
        lines.append(f"{r['name']:<12} {r['target']:<8} n={r['n']:<6} " + "  ".join(cells))
    for c in result.get("comparisons", []):
        lines.append(
            f"{c['b']} vs {c['a']} ({c['target']}): {c['metric']} {c['mean_b']:.4f} vs {c['mean_a']:.4f}, "
            f"diff {c['diff']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}], p={c['p_value']:.3g}"
        )
    return "\n".join(lines)
