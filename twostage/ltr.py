"""Stage 2 as a learned ranker: LightGBM LambdaMART over the features of :mod:`twostage.features`.

This is how production two-stage systems rank (Vespa's second phase, LambdaMART at web scale): the scores
that each know one thing (the cross-encoder's reading of the texts, stage 1's cosine, EASE, co-watch counts,
popularity, the user's history) are combined by a model trained to order lists, rather than by a grid of
z-score weights. LightGBM's ``lambdarank`` objective optimises nDCG directly, with early stopping on the
validation lists' nDCG@10.

A trained ranker is a directory: LightGBM's own text model (``model.txt``) and ``ranker.json`` with the
feature list, the importances and what training measured; written atomically, checked on load.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from twostage.atomic import staging_dir, write_file
from twostage.errors import IndexMismatchError, NotFoundError
from twostage.features import COSTLY, FEATURES

logger = logging.getLogger(__name__)

MODEL_FILE, RECORD_FILE = "model.txt", "ranker.json"
FORMAT = 1


@dataclass(frozen=True)
class Group:
    """One training or validation list: its candidates' feature rows and graded labels (0 = not relevant)."""

    features: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True, eq=False)
class LearnedRanker:
    """A trained LightGBM ranker and the features it reads, in order."""

    booster: Any
    features: tuple[str, ...]
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def uses_reranker(self) -> bool:
        """Whether the cross-encoder must run to rank: its score is one of the features."""
        return "rerank" in self.features

    def score(self, rows: np.ndarray) -> np.ndarray:
        """One score per feature row (higher is better)."""
        if not len(rows):
            return np.zeros(0)
        return np.asarray(self.booster.predict(rows, num_threads=1), dtype=np.float64)

    def save(self, target: Path) -> Path:
        """Write the ranker atomically to ``target`` (a directory)."""
        from twostage.atomic import replace_dir

        staged = staging_dir(target)
        self.booster.save_model(str(staged / MODEL_FILE))
        record = {"format": FORMAT, **self.record, "features": list(self.features)}
        write_file(staged / RECORD_FILE, json.dumps(record, indent=2))
        return replace_dir(staged, target)

    @classmethod
    def load(cls, path: Path) -> LearnedRanker:
        import lightgbm as lgb

        record_path = path / RECORD_FILE
        if not record_path.is_file():
            raise NotFoundError(f"no learned ranker at {path}; run 'twostage train ranker'")
        record = json.loads(record_path.read_text())
        if record.get("format") != FORMAT:
            raise IndexMismatchError("format", FORMAT, record.get("format"), str(path))
        features = tuple(record["features"])
        unknown = [f for f in features if f not in FEATURES]
        if unknown:
            raise IndexMismatchError("features", list(FEATURES), unknown, str(path))
        booster = lgb.Booster(model_file=str(path / MODEL_FILE))
        if booster.num_feature() != len(features):
            raise IndexMismatchError("features", len(features), booster.num_feature(), str(path))
        return cls(booster, features, record)


@dataclass(frozen=True)
class BoostOptions:
    """LightGBM settings (``[ranker]``): small trees and strong leaf minimums, since lists are few."""

    num_trees: int = 500
    learning_rate: float = 0.05
    num_leaves: int = 15
    min_data_in_leaf: int = 50
    feature_fraction: float = 0.9
    early_stopping: int = 50
    seed: int = 0


def fit(
    train: Sequence[Group], valid: Sequence[Group], names: Sequence[str], options: BoostOptions
) -> tuple[Any, dict[str, Any]]:
    """A LambdaMART booster over ``names`` (early stopping on ``valid``'s nDCG@10; ``train`` when there are
    no validation lists), and what training measured."""
    import lightgbm as lgb

    def dataset(groups: Sequence[Group], reference: Any = None) -> Any:
        rows = np.vstack([g.features for g in groups])
        labels = np.concatenate([g.labels for g in groups])
        return lgb.Dataset(
            rows,
            label=labels,
            group=[len(g.labels) for g in groups],
            feature_name=list(names),
            reference=reference,
            free_raw_data=False,
        )

    params = {
        "objective": "lambdarank",
        "metric": "ndcg",
        "eval_at": [10],
        "learning_rate": options.learning_rate,
        "num_leaves": options.num_leaves,
        "min_data_in_leaf": options.min_data_in_leaf,
        "feature_fraction": options.feature_fraction,
        "lambdarank_truncation_level": 20,
        "seed": options.seed,
        "deterministic": True,
        "num_threads": 2,
        "verbosity": -1,
    }
    train_set = dataset(train)
    valid_set = dataset(valid, train_set) if valid else train_set
    evals: dict[str, Any] = {}
    booster = lgb.train(
        params,
        train_set,
        num_boost_round=options.num_trees,
        valid_sets=[valid_set],
        valid_names=["valid"],
        callbacks=[lgb.record_evaluation(evals)]
        + ([lgb.early_stopping(options.early_stopping, verbose=False)] if valid else []),
    )
    curve = evals["valid"]["ndcg@10"]
    best = booster.best_iteration or len(curve)
    gains = booster.feature_importance(importance_type="gain", iteration=best)
    return booster, {
        "trees": int(best),
        "valid_ndcg@10": float(curve[best - 1]),
        "importance": {n: float(g) for n, g in zip(names, gains, strict=True)},
    }


def select_features(
    train: Sequence[Group],
    valid: Sequence[Group],
    names: Sequence[str],
    options: BoostOptions,
    *,
    tolerance: float = 0.01,
) -> tuple[LearnedRanker, dict[str, Any]]:
    """Train on every feature, then try each without it (the costly ones first), and retrain.

    A costly feature (the cross-encoder's score) is dropped when removing it does not lower validation
    nDCG@10: one that earns nothing is then not run at all. A cheap feature costs nothing to serve, and a
    few hundred validation lists move nDCG@10 by more than most single features earn, so it is dropped only
    when removing it raises validation nDCG@10 by more than ``tolerance`` (relative); otherwise each drop
    would be a coin flip on the validation set's noise. Every trial's difference is recorded."""
    keep = list(names)
    booster, report = fit(train, valid, keep, options)
    trials: dict[str, float] = {}
    if valid:
        order = [n for n in names if n in COSTLY] + [n for n in names if n not in COSTLY]
        for name in order:
            if len(keep) == 1:
                break
            rest = [n for n in keep if n != name]
            candidate, without = fit(
                _columns(train, names, rest), _columns(valid, names, rest), rest, options
            )
            trials[name] = without["valid_ndcg@10"] - report["valid_ndcg@10"]
            bar = report["valid_ndcg@10"] * (1.0 if name in COSTLY else 1.0 + tolerance)
            if without["valid_ndcg@10"] >= bar:
                keep, booster, report = rest, candidate, without
                logger.info(
                    "learned ranker: dropped %s (validation nDCG@10 %.4f without it)",
                    name,
                    without["valid_ndcg@10"],
                )
    record = {
        **report,
        "dropped": [n for n in names if n not in keep],
        "drop_gain": trials,
        "train_lists": len(train),
        "valid_lists": len(valid),
    }
    return LearnedRanker(booster, tuple(keep), record), record


def _columns(groups: Sequence[Group], names: Sequence[str], keep: Sequence[str]) -> list[Group]:
    picked = [list(names).index(n) for n in keep]
    return [Group(g.features[:, picked], g.labels) for g in groups]
