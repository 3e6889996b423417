"""``twostage tune``: hyperparameter search over any config keys with Optuna, judged on the validation part.

The search space lives in ``twostage.toml``::

    [tune]
    trials = 20
    timeout_seconds = 600
    [tune.space]
    "retriever.learning_rate" = { log_uniform = [1e-5, 1e-4] }
    "ranker.num_leaves" = { int = [7, 63] }
    "reranker.loss" = { choice = ["listnet", "lambdaloss"] }

Each trial copies the project (store, models, index, caches) into ``.tune/trial-N``, retrains from the
earliest stage its keys touch (retriever → index → reranker → learned ranker, each only if the project has
that stage or the key belongs to it) and evaluates on the validation part: never the test part. Optuna's TPE
sampler proposes the values and its median pruner stops a trial whose stage-1 validation nDCG@10 is below the
median of earlier trials at that point, before its stage-2 training. The first trial is the project's current
configuration, so the best trial is measured against it. Every trial is a row in the project's ``runs``
table; the best values are written to ``tune-best.toml`` for the user to adopt.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twostage.errors import ConfigError, TwostageError

if TYPE_CHECKING:
    from twostage.engine import Engine

logger = logging.getLogger(__name__)

# what each config section's keys require retraining from (the later stages follow)
STAGE_OF_SECTION = {"retriever": 0, "text": 0, "index": 1, "reranker": 2, "ranker": 3}
STAGES = ("retriever", "index", "reranker", "ranker")
KINDS = ("uniform", "log_uniform", "int", "choice")
BEST_FILE = "tune-best.toml"


def check_space(space: Mapping[str, Any], config: Any) -> None:
    """Every key names a config value and every spec is one of :data:`KINDS` with valid bounds."""
    if not space:
        raise ConfigError("the search space is empty; add keys under [tune.space]", key="tune.space")
    for key, spec in space.items():
        if not isinstance(spec, Mapping) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise ConfigError(
                f"{key}: give one of {', '.join(KINDS)}, e.g. {{log_uniform = [1e-5, 1e-4]}}",
                key="tune.space",
            )
        kind, values = next(iter(spec.items()))
        if kind != "choice" and (len(values) != 2 or not values[0] < values[1]):
            raise ConfigError(f"{key}: {kind} needs [low, high] with low < high", key="tune.space")
        if kind == "log_uniform" and values[0] <= 0:
            raise ConfigError(f"{key}: log_uniform needs a low above 0", key="tune.space")
        if kind == "choice" and not values:
            raise ConfigError(f"{key}: choice needs at least one value", key="tune.space")
        sample = values[0]
        config.replace({key: int(sample) if kind == "int" else sample})  # names a real key, takes the type


def _suggest(trial: Any, key: str, spec: Mapping[str, Any]) -> Any:
    kind, values = next(iter(spec.items()))
    if kind == "uniform":
        return trial.suggest_float(key, values[0], values[1])
    if kind == "log_uniform":
        return trial.suggest_float(key, values[0], values[1], log=True)
    if kind == "int":
        return trial.suggest_int(key, int(values[0]), int(values[1]))
    return trial.suggest_categorical(key, list(values))


def _copy_project(source: Path, target: Path) -> None:
    """A trial's own project: the store copied (checkpointed first), artifacts copied, the config kept."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for name in ("twostage.toml", "twostage.duckdb"):
        if (source / name).exists():
            shutil.copy2(source / name, target / name)
    for name in ("models", "indexes", "counts", "cache"):
        if (source / name).exists():
            shutil.copytree(source / name, target / name, symlinks=True)


def run_tune(
    engine: Engine,
    *,
    trials: int | None = None,
    timeout_seconds: float | None = None,
    split: str | None = None,
    echo: Callable[[str], None] = logger.info,
) -> dict[str, Any]:
    """Search ``[tune] space`` on ``engine``'s project; returns the best trial and writes ``tune-best.toml``."""
    try:
        import optuna
    except ImportError as e:
        raise TwostageError("twostage tune needs Optuna: pip install 'twostage[tune]'") from e

    from twostage.engine import Engine

    config, root = engine.config, engine.project.root
    cfg = config.tune
    check_space(cfg.space, config)
    split = split or engine.default_split()
    trials = trials or cfg.trials
    timeout = timeout_seconds if timeout_seconds is not None else cfg.timeout_seconds
    has = {
        "retriever": True,
        "index": True,
        "reranker": engine.project.models_dir("reranker").exists(),
        "ranker": engine.project.models_dir("ranker").exists(),
    }
    first = min(STAGE_OF_SECTION.get(key.split(".")[0], 4) for key in cfg.space)
    wanted = {key.split(".")[0] for key in cfg.space}
    stages = [s for n, s in enumerate(STAGES) if n >= first and (has[s] or s in wanted)]
    work = root / ".tune"
    started = time.perf_counter()

    def objective(trial: optuna.Trial) -> float:
        values = {key: _suggest(trial, key, spec) for key, spec in cfg.space.items()}
        trial_dir = work / f"trial-{trial.number}"
        engine.store.checkpoint()  # the copy's store file then holds every committed row
        _copy_project(root, trial_dir)
        t0 = time.perf_counter()
        try:
            trial_engine = Engine.open(trial_dir, overrides=values)
            value = math.nan
            for stage in stages:
                getattr(trial_engine, _STEP[stage])(**({"split": split} if stage != "index" else {}))
                if stage == "index":  # stage 1 is final here: report it, and let the pruner judge
                    value = _validation_value(trial_engine, split, cfg.metric, stage="recall")
                    trial.report(value, 0)
                    if trial.should_prune():
                        raise optuna.TrialPruned()
            value = _validation_value(trial_engine, split, cfg.metric, stage=None)
            trial_engine.close()
        finally:
            shutil.rmtree(trial_dir, ignore_errors=True)
        engine.project.record_run(
            "tune-trial",
            None,
            {
                "trial": trial.number,
                "params": values,
                "value": value,
                "metric": cfg.metric,
                "split": split,
                "seconds": round(time.perf_counter() - t0, 1),
            },
        )
        echo(f"trial {trial.number}: {cfg.metric} {value:.4f} with {values}")
        return value

    sampler = optuna.samplers.TPESampler(seed=cfg.seed)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    current = {key: _current(config, key) for key in cfg.space}
    study.enqueue_trial(current, skip_if_exists=True)  # the configuration as it is: what tuning must beat
    study.optimize(objective, n_trials=trials, timeout=timeout, catch=(TwostageError,))
    shutil.rmtree(work, ignore_errors=True)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise TwostageError("no trial completed; raise the budget (--trials, --timeout)")
    best = study.best_trial
    baseline = study.trials[0].value if study.trials[0].state == optuna.trial.TrialState.COMPLETE else None
    _write_best(root / BEST_FILE, best.params, cfg.metric, best.value, baseline, len(study.trials))
    result = {
        "metric": cfg.metric,
        "split": split,
        "best_value": best.value,
        "current_value": baseline,
        "best_params": best.params,
        "trials": len(study.trials),
        "completed": len(done),
        "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
        "stages": stages,
        "seconds": round(time.perf_counter() - started, 1),
        "best_file": str(root / BEST_FILE),
    }
    engine.project.record_run("tune", None, result)
    return result


_STEP = {
    "retriever": "train_retriever",
    "index": "index_build",
    "reranker": "train_reranker",
    "ranker": "train_ranker",
}


def _current(config: Any, key: str) -> Any:
    section, name = key.split(".", 1)
    return getattr(getattr(config, section), name)


def _validation_value(engine: Engine, split: str, metric: str, *, stage: str | None) -> float:
    """The validation part's ``metric`` (e.g. ``nDCG@10``) of stage 1 (``stage="recall"``) or the full
    pipeline; a search split without a validation part is refused rather than tuned on test."""
    from twostage.train.examples import VALID_PARTS

    parts = [p for p in VALID_PARTS if engine.store.targets(split, p, limit=1)]
    if not parts:
        raise TwostageError(f"split '{split}' has no validation part to tune on (never the test part)")
    report = engine.evaluate(split=split, part=parts[0], baselines=False)
    names = [r.name for r in report.rows]
    row = (
        report.rows[names.index("recall")] if stage == "recall" or "rerank" not in names else report.rows[-1]
    )
    if metric not in row.means:
        raise ConfigError(f"unknown metric {metric!r}; use one of {', '.join(row.means)}", key="tune.metric")
    return float(row.means[metric])


def _write_best(
    path: Path, params: Mapping[str, Any], metric: str, value: float, baseline: float | None, n: int
) -> None:
    """The best values as TOML sections a user can paste into ``twostage.toml``."""
    by_section: dict[str, dict[str, Any]] = {}
    for key, v in params.items():
        section, name = key.split(".", 1)
        by_section.setdefault(section, {})[name] = v
    against = f" (the configuration before tuning: {baseline:.4f})" if baseline is not None else ""
    lines = [f"# twostage tune: best of {n} trials, validation {metric} {value:.4f}{against}"]
    for section, values in by_section.items():
        lines += ["", f"[{section}]"]
        lines += [f"{name} = {json.dumps(v)}" for name, v in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
