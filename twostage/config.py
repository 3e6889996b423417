"""Typed configuration for every stage, read from one ``twostage.toml``.

Every default lives here, once. Precedence: these defaults < ``twostage.toml`` < explicit overrides
(keyword arguments or CLI flags). Unknown sections or keys are errors with a did-you-mean suggestion,
because a silently ignored typo is a silently wrong experiment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twostage.errors import ConfigError, did_you_mean

CONFIG_FILE = "twostage.toml"


@dataclass(frozen=True)
class TextConfig:
    """How items and users become text (DESIGN.md: every request is text).

    ``item_template`` fields: ``{item_id}``, ``{title}``, ``{body}``, ``{categories}`` (joined by ", ") and any
    key of the item's ``attrs``. ``user_template`` gets ``{history}``: the user's most recent
    ``history_size`` items before the cut-off, newest first, each rendered with ``history_item_template``.
    """

    item_template: str = "{title}. {categories}. {body}"
    user_template: str = "Recently: {history}"
    history_item_template: str = "{title}"
    history_size: int = 10
    history_separator: str = "; "


@dataclass(frozen=True)
class IngestConfig:
    """What ingestion accepts beyond the schema (``twostage ingest``).

    An event's ``ts`` may lie at most ``future_seconds`` past the current time (clock skew, time zones); a
    later one is refused, since it would become its user's held-out target in every split.
    """

    future_seconds: float = 86400.0


@dataclass(frozen=True)
class RelevanceConfig:
    """Maps behaviour to graded relevance (used for reranker labels and graded metrics).

    ``event_grades`` gives a grade per event type (e.g. purchase 3, click 1). Events of type
    ``rating_event`` are graded by ``rating_grades``: (threshold, grade) pairs, the first threshold the rating
    reaches wins; below all thresholds the grade is ``min_grade``. A held-out interaction always counts as
    relevant in evaluation (grade at least ``min_grade``), as in the standard implicit-feedback protocol.
    """

    event_grades: dict[str, float] = field(default_factory=dict)
    rating_event: str = "rating"
    rating_grades: tuple[tuple[float, float], ...] = ((4.5, 3.0), (4.0, 2.0))
    min_grade: float = 1.0


@dataclass(frozen=True)
class SplitConfig:
    """How events or judgments are divided into train / valid / test.

    ``strategy``: ``leave-last-out`` (per user: last event → test, the one before → valid, rest → train),
    ``ratio`` (``ratios`` over time, over users or over events at random, see ``by``) or ``given`` (the
    judgments' own parts, e.g. BEIR qrels train/dev/test). Users with fewer than ``min_events`` events stay in
    train only. ``by = "event"`` is the random split of rating-prediction benchmarks: each event is held out
    at random, so rankings trained on it see only each user's events before their first held-out one.
    """

    strategy: str = "leave-last-out"
    ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)
    by: str = "time"
    min_events: int = 3
    seed: int = 0


@dataclass(frozen=True)
class RetrieverConfig:
    """Stage 1 bi-encoder: which model, how to encode, how to fine-tune.

    ``popularity_weight`` β adds ``β · ln(1 + users(item))`` to the stage-1 score (recommendation): the logQ
    correction for the popularity bias of in-batch negatives. 0 turns it off; pick β on the validation part
    from ``popularity_grid`` (``tools/bench/bench_quality.py`` does). With β > 0 FAISS is searched
    ``max(popularity_pool_factor × depth, popularity_pool)`` deep and re-sorted, so popular items from below the
    cosine top-depth can come in.

    ``lexical_weight`` α fuses a BM25 channel over the item texts into stage 1 (search: hybrid recall; see
    :func:`twostage.ranker.fuse_channels`, ``lexical_fusion`` "convex" or "rrf"): the union of both channels'
    top lists goes on, scored ``(1 − α)·dense + α·BM25`` on min-max normalised scores. Unset, α is chosen on the
    validation queries from ``lexical_grid`` by ``train reranker`` (before its training lists, so stage 2
    trains on the candidates it will serve), 0 where BM25 does not help; recommendation splits keep 0.

    ``time_budget_minutes`` sizes fine-tuning to the machine: ``train retriever`` times one training step and
    one validation pass here, cuts the steps to what fits the budget and logs the plan with its estimate
    (stored in the model's ``training.json`` and the run's resolved config); None trains every step.
    """

    model: str = "default"
    max_seq_length: int = 256
    batch_size: int = 64
    epochs: int = 1
    train_batch_size: int = 32
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.1
    hard_negatives: int = 0
    max_train_pairs: int = 20000
    time_budget_minutes: float | None = 30.0
    eval_k: int = 100
    eval_requests: int = 300
    eval_corpus: int = 2000
    patience: int = 2
    popularity_weight: float = 0.0
    popularity_grid: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)
    lexical_weight: float | None = None
    lexical_grid: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7)
    lexical_fusion: str = "convex"
    popularity_pool: int = 1000
    popularity_pool_factor: int = 10
    seed: int = 0


@dataclass(frozen=True)
class IndexConfig:
    """The FAISS index: a named build config from ``indexes/`` (or a factory string) and the recall depth.

    ``exclude_seen`` drops a user's own history from recall (full-ranking protocol); turn it off where users
    re-consume items (groceries, music), or a repeated held-out item could never be hit.
    A ranking is at most ``max_k`` items (search, recommend, evaluation): a k of 100,000 would search and
    explain the whole catalogue, and is refused with a message instead. ``depth`` is at most ``max_k`` too.
    """

    name: str = "default"
    build: str = "flat"
    depth: int = 100
    max_k: int = 1000
    exclude_seen: bool = True
    use_gpu: bool | None = None


@dataclass(frozen=True)
class RerankerConfig:
    """Stage 2 cross-encoder: model, inference settings and listwise training.

    ``fusion_weight`` w mixes the scores: ``(1 - w) · z(rerank) + w · z(stage 1)``. Unset, it is the value
    chosen on the validation requests when the reranker was trained (saved in its ``training.json``).
    ``serve_depth`` is how many stage-1 candidates serving and evaluation rerank (cross-encoder time grows
    linearly with it); unset, it is the smallest depth up to ``depth`` whose validation nDCG@10 is within
    0.005 of reranking all ``depth`` candidates, also chosen at training. Training lists come only from
    requests whose positive stage 1 retrieved within ``depth``, so the reranker learns to order what it will
    actually see.

    ``max_length`` (tokens per request + item pair): unset, ``train reranker`` sizes it from the data, the 95th
    percentile of its training pairs' lengths (within 64 … 512), stores it with the model and serves with it;
    a cross-encoder not trained here gets 256.

    ``label_window`` (recommendation): a training request at event t counts the user's events t … t+window-1
    as its positives, graded. Next-item labels are one noisy positive per list (ratings within a session come
    in no meaningful order); a window gives the listwise loss several. Held-out requests are unaffected.

    ``negatives``: a training list's negatives are stage 1's top candidates (``"top"``, hard negatives) or a
    uniform sample of the top ``depth`` (``"sampled"``). With lists much shorter than ``depth``, top-only
    negatives teach a shortcut: positives come from further down than their negatives (on ml-latest-small the
    reranker alone then ranked validation lists below chance).

    ``item_template`` is the item text the cross-encoder reads (unset: ``[text] item_template``). It may
    use ``{cowatched}``: the titles of the ``cowatched_size`` items most often watched by the same users,
    counted from the event log (see ``twostage.cowatch``). Stage 2 can match them against the user's
    recent titles; stage 1's item vectors cannot depend on the logs, so the field is for stage 2 only.

    ``cowatch_weight`` c adds the same lists as a score: ``+ c · z(cowatch)``, where an item's co-watch score
    is how many of the user's last ``[text] history_size`` items are among its co-watched items. Unset, it is
    chosen on validation with the fusion weight (recommendation splits; 0 for search). With ``w = 1`` and
    ``c > 0`` stage 2 reorders stage 1 by co-watch alone and the cross-encoder is not run. Co-watch counts use
    each user's ``cowatch_recent_items`` latest items and keep items with at least ``cowatch_min_users`` users;
    reranker training reads lists counted without the request's fold of users (``cowatch_folds`` folds).

    Tuning: the weights are chosen from ``fusion_grid`` × ``cowatch_grid``, then the rerank depth from
    ``depth_grid`` (up to ``depth``): the smallest whose nDCG@10 is within ``depth_tolerance`` (relative) of
    reranking all ``depth``.

    ``mmr_lambda`` λ diversifies every ranking (1 = none): MMR reorders the top ``mmr_depth`` of the final
    list. ``enabled = false`` serves and evaluates stage 1 alone.
    """

    model: str = "default"
    enabled: bool = True
    item_template: str | None = None
    cowatched_size: int = 8
    cowatch_min_users: int = 5
    cowatch_recent_items: int = 200
    cowatch_folds: int = 5
    max_length: int | None = None
    batch_size: int = 32
    depth: int = 50
    serve_depth: int | None = None
    fusion_weight: float | None = None
    cowatch_weight: float | None = None
    mmr_lambda: float | None = None
    mmr_depth: int = 50
    fusion_grid: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)
    cowatch_grid: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0)
    depth_grid: tuple[int, ...] = (10, 15, 20, 30, 50, 75, 100, 150, 200)
    depth_tolerance: float = 0.01
    loss: str = "listnet"
    list_size: int = 16
    epochs: int = 1
    train_batch_size: int = 4
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.1
    max_train_requests: int = 400
    label_window: int = 1
    negatives: str = "top"
    eval_requests: int = 100
    patience: int = 2
    lora: bool = False
    seed: int = 0


# the learned ranker's features, in column order (``twostage.features`` computes them)
FEATURES = (
    "stage1",
    "stage1_rank",
    "dense",
    "lexical",
    "items",
    "items_recent",
    "cowatch",
    "cowatch_recency",
    "popularity",
    "history_length",
    "category_overlap",
    "rerank",
)


@dataclass(frozen=True)
class PredictorConfig:
    """The behaviour predictor (``twostage train predictor``, ``twostage.predictor``): how a user will rate an
    item, and whether they will do each of ``events`` with it.

    A cross-encoder (``model``) reads the user's ``context_items`` latest training-side events as text beside
    the item's text, pairs truncated to ``max_length`` tokens (the longer text first). ``tasks`` names its heads,
    each with the weight of its loss in the sum the shared encoder is trained on (one loss per task):

    - ``rating``: regression on the value of ``[relevance] rating_event`` events (MSE), over user and item
      biases when ``residual`` (each training example's biases are fit without its fold of ratings,
      ``bias_folds``, so the head learns out-of-sample residuals);
    - ``listnet``: ranking — a training event's item among ``list_size − 1`` items the user never touched,
      softmax cross-entropy over the list (ListNet with one positive), ``lists_per_batch`` lists per step;
      evaluated as nDCG@10 over ``eval_lists`` such held-out lists;
    - any other name is an event type: a logistic head on its events against ``negatives`` items per event
      the user never touched (cross-entropy).

    Training: AdamW (``learning_rate`` for the encoder, ``head_learning_rate`` for the heads), batches of
    ``batch_size``, at most ``max_train_examples`` examples per epoch (a seeded sample) and ``epochs`` epochs,
    stopped early on the validation loss of ``eval_examples`` examples, measured every ``eval_every`` steps
    (``patience`` checks without a gain end it), and ended by ``time_budget_minutes``. The best checkpoint is
    kept. ``recommend_weight`` b reorders the final ``recommend_depth`` items of ``recommend`` by
    ``(1 − b)·z(ranking score) + b·z(predicted rating)`` (0: not at all; 1: by expected rating alone).
    """

    model: str = "default"
    tasks: dict[str, float] = field(default_factory=lambda: {"rating": 1.0})
    residual: bool = True
    bias_folds: int = 5
    context_items: int = 10
    max_length: int = 160
    batch_size: int = 32
    learning_rate: float = 5e-5
    head_learning_rate: float = 1e-3
    epochs: int = 1
    max_train_examples: int = 50_000
    eval_examples: int = 1000
    eval_every: int = 100
    patience: int = 3
    negatives: int = 1
    list_size: int = 16
    lists_per_batch: int = 2
    eval_lists: int = 200
    time_budget_minutes: float | None = 30.0
    recommend_weight: float = 0.0
    recommend_depth: int = 20
    seed: int = 0


@dataclass(frozen=True)
class RankerConfig:
    """Recommendation's learned stage 2 and its items recall channel (``twostage train ranker``).

    ``learned = "auto"`` trains a LightGBM LambdaMART ranker (``twostage.ltr``) over the features of
    ``twostage.features`` on recommendation splits, where it replaces the weight grid of ``[reranker]``; a
    search split keeps the grid (``"on"`` trains it there too; ``"off"`` never). Its training lists are
    ``max_train_requests`` requests from the split's train side, ranked ``depth`` deep by stage 1 and dealt
    into ``folds`` folds of users whose log features are counted without them, each request at one of its
    user's last ``request_tail`` training positions (None: anywhere), since held-out requests come at the end
    of a user's training sequence; early stopping on the lists
    of ``eval_requests`` validation requests (nDCG@10). ``cross_encoder = true`` adds the cross-encoder's score as a feature (it must be trained
    first, and each training candidate costs a model pass; kept only where validation says it helps).
    ``features`` limits the features it may use (unset: every one the pipeline can compute; see
    ``twostage.features``).

    ``items_channel = "ease"`` adds a second stage-1 channel for users: EASE item-to-item weights (cornac)
    fit on the log, fused with the bi-encoder's list by ``items_weight`` (unset: chosen on validation from
    ``items_grid``, by recall at ``depth``). ``ease_reg`` is EASE's λ; each item keeps its
    ``ease_neighbours`` largest weights; only the ``ease_max_items`` most popular items with at least
    ``ease_min_users`` users get weights (the inverse costs O(items³)); each user's ``ease_recent_items``
    latest items count.
    """

    learned: str = "auto"
    features: tuple[str, ...] | None = None
    cross_encoder: bool = False
    depth: int = 100
    max_train_requests: int = 3000
    request_tail: int | None = 20
    eval_requests: int = 1000
    folds: int = 3
    num_trees: int = 500
    learning_rate: float = 0.05
    num_leaves: int = 15
    min_data_in_leaf: int = 50
    early_stopping: int = 50
    items_channel: str = "ease"
    items_weight: float | None = None
    items_grid: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    ease_reg: float = 500.0
    ease_neighbours: int = 100
    ease_max_items: int = 10_000
    ease_min_users: int = 2
    ease_recent_items: int = 200
    seed: int = 0


@dataclass(frozen=True)
class EvalConfig:
    """Offline evaluation: cut-offs, which metrics, how many bootstrap resamples."""

    ks: tuple[int, ...] = (1, 5, 10, 100)
    metrics: tuple[str, ...] = ("recall", "precision", "ndcg", "mrr", "map", "hit")
    part: str = "test"
    bootstrap: int = 2000
    max_requests: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class ServeConfig:
    """Publishing snapshots and serving them over HTTP (``twostage publish``, ``twostage serve``).

    ``keep_snapshots`` published snapshots are kept (the current one always), so a rollback is one command.
    Requests over ``max_k`` hits, ``max_query_chars`` characters or ``max_batch`` requests are refused (413).
    An anonymous session's history is at most ``max_history`` items. A server checks every ``poll_seconds`` whether another snapshot was published and swaps it in (0: only on
    ``POST /admin/reload``).
    """

    keep_snapshots: int = 3
    max_k: int = 100
    max_query_chars: int = 2000
    max_batch: int = 64
    max_history: int = 1000
    poll_seconds: float = 5.0


@dataclass(frozen=True)
class ScaleConfig:
    """Where ``twostage index build`` encodes items and builds the index (``twostage.scale``).

    ``engine = "local"`` encodes in this process; ``"ray"`` encodes through Ray Data on the cluster at
    ``ray_address`` (unset: ``RAY_ADDRESS`` or a new local cluster; ``"auto"``: the running one) with a pool
    of ``actors`` encoder actors, each holding one copy of the bi-encoder and ``num_gpus_per_actor`` GPUs
    (unset: 1 when the cluster has GPUs, else 0), fed ``batch_size`` items per call. The vectors land in
    embedding shards of at most ``shard_rows`` items, and the index is built from them shard by shard; the
    result equals the local build's (``pip install 'twostage[scale]'``).
    """

    engine: str = "local"
    ray_address: str | None = None
    actors: int = 2
    batch_size: int = 1024
    num_gpus_per_actor: float | None = None
    shard_rows: int = 500_000


@dataclass(frozen=True)
class TuneConfig:
    """``twostage tune`` (``twostage.tune``): Optuna over the config keys in ``space`` (each
    ``{uniform = [lo, hi]}``, ``{log_uniform = [lo, hi]}``, ``{int = [lo, hi]}`` or ``{choice = [...]}``),
    maximising the validation part's ``metric``, for at most ``trials`` trials and ``timeout_seconds``."""

    space: dict[str, Any] = field(default_factory=dict)
    metric: str = "nDCG@10"
    trials: int = 20
    timeout_seconds: float | None = 600.0
    seed: int = 0


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration of a project."""

    text: TextConfig = field(default_factory=TextConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    relevance: RelevanceConfig = field(default_factory=RelevanceConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    reranker: RerankerConfig = field(default_factory=RerankerConfig)
    ranker: RankerConfig = field(default_factory=RankerConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain JSON-able data (stored with every run)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def hash(self, *sections: str) -> str:
        """A short stable hash of some sections (all when none named), for manifests and caches."""
        data = self.to_dict()
        picked = {s: data[s] for s in sections} if sections else data
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]

    def replace(self, overrides: Mapping[str, Any]) -> Config:
        """A copy with dotted-key overrides applied, e.g. ``{"reranker.depth": 20}``."""
        data = self.to_dict()
        for dotted, value in overrides.items():
            section, _, key = dotted.partition(".")
            if not key:
                raise ConfigError("overrides are 'section.key'", key=dotted)
            data.setdefault(section, {})[key] = value
        return from_dict(data)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the field's type hint, converting lists to tuples where the hint asks."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"expected a list, got {value!r}", key=key)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"expected {len(args)} values, got {len(value)}", key=key)
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"expected a table, got {value!r}", key=key)
        _, vtype = typing.get_args(hint)
        return {str(k): _coerce(v, vtype, f"{key}.{k}") for k, v in value.items()}
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"expected a number, got {value!r}", key=key)
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, got {value!r}", key=key)
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {value!r}", key=key)
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {value!r}", key=key)
        return value
    return value


def from_dict(data: Mapping[str, Any]) -> Config:
    """Build a validated Config from nested mappings (the parsed TOML)."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    built: dict[str, Any] = {}
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(
                "unknown section", key=section, suggestion=did_you_mean(section, list(sections))
            )
        if not isinstance(values, Mapping):
            raise ConfigError("expected a table", key=section)
        cls = sections[section].default_factory  # type: ignore[misc]
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for key, value in values.items():
            dotted = f"{section}.{key}"
            if key not in hints:
                raise ConfigError("unknown key", key=dotted, suggestion=did_you_mean(key, names))
            kwargs[key] = _coerce(value, hints[key], dotted)
        built[section] = cls(**kwargs)
    config = Config(**built)
    _validate(config)
    return config


_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def plain_name(name: str, what: str = "index name") -> str:
    """``name`` if it is a plain file name (letters, digits, ``.``, ``_``, ``-``; no path), else an error: a
    name becomes a directory under the project, and ``../x`` or ``/x`` would put it anywhere."""
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name):
        raise ConfigError(
            f"{what} {name!r} is not a plain name: use letters, digits, '.', '_' and '-' (at most 100, "
            "starting with a letter or digit); it names a directory inside the project"
        )
    return name


def _validate(config: Config) -> None:
    choices = {
        "split.strategy": (config.split.strategy, ["leave-last-out", "ratio", "given"]),
        "split.by": (config.split.by, ["time", "user", "event"]),
        "reranker.loss": (config.reranker.loss, ["listnet", "lambdaloss", "listmle"]),
        "reranker.negatives": (config.reranker.negatives, ["top", "sampled"]),
        "scale.engine": (config.scale.engine, ["local", "ray"]),
        "retriever.lexical_fusion": (config.retriever.lexical_fusion, ["convex", "rrf"]),
        "ranker.learned": (config.ranker.learned, ["auto", "on", "off"]),
        "ranker.items_channel": (config.ranker.items_channel, ["ease", "none"]),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(
                f"'{value}' is not one of {allowed}", key=key, suggestion=did_you_mean(value, allowed)
            )
    if abs(sum(config.split.ratios) - 1.0) > 1e-6:
        raise ConfigError(f"ratios must sum to 1, got {sum(config.split.ratios)}", key="split.ratios")
    if config.reranker.mmr_lambda is not None and not 0.0 <= config.reranker.mmr_lambda <= 1.0:
        raise ConfigError("must be between 0 and 1", key="reranker.mmr_lambda")
    for key, value in (
        ("reranker.fusion_weight", config.reranker.fusion_weight),
        ("retriever.lexical_weight", config.retriever.lexical_weight),
        ("ranker.items_weight", config.ranker.items_weight),
        ("predictor.recommend_weight", config.predictor.recommend_weight),
    ):
        if value is not None and not 0.0 <= value <= 1.0:
            raise ConfigError("must be between 0 and 1", key=key)
    tasks = config.predictor.tasks
    if any(not w >= 0.0 for w in tasks.values()) or not any(w > 0.0 for w in tasks.values()):
        raise ConfigError(
            f"needs at least one task with a weight above 0 and none below, got {tasks}",
            key="predictor.tasks",
        )
    if config.reranker.cowatch_weight is not None and not config.reranker.cowatch_weight >= 0.0:
        raise ConfigError("must be >= 0", key="reranker.cowatch_weight")
    for key, value in (("index.depth", config.index.depth), ("reranker.depth", config.reranker.depth)):
        if value < 1:
            raise ConfigError("must be at least 1", key=key)
    for key in ("index.depth", "reranker.depth"):
        section, name = key.split(".")
        if getattr(getattr(config, section), name) > config.index.max_k:
            raise ConfigError(f"must be at most [index] max_k ({config.index.max_k})", key=key)
    if max(config.eval.ks, default=0) > config.index.max_k:
        raise ConfigError(f"cut-offs must be at most [index] max_k ({config.index.max_k})", key="eval.ks")
    plain_name(config.index.name)
    if config.reranker.serve_depth is not None and config.reranker.serve_depth < 1:
        raise ConfigError("must be at least 1", key="reranker.serve_depth")
    if "{cowatched}" in config.text.item_template:
        raise ConfigError(
            "{cowatched} depends on the event log: use it in [reranker] item_template (stage 2 only)",
            key="text.item_template",
        )
    for key in ("cowatched_size", "label_window"):
        if getattr(config.reranker, key) < 1:
            raise ConfigError("must be at least 1", key=f"reranker.{key}")
    if config.scale.ray_address is not None and not config.scale.ray_address.strip():
        raise ConfigError(
            "empty address; leave it unset for a local cluster, or 'auto'", key="scale.ray_address"
        )
    _validate_ranges(config)


# Sizes, counts and budgets: a 0 or a negative value would fail deep inside a trainer, or silently do nothing.
_AT_LEAST_ONE = {
    "text": ("history_size",),
    "retriever": (
        "max_seq_length",
        "batch_size",
        "epochs",
        "train_batch_size",
        "max_train_pairs",
        "eval_k",
        "eval_corpus",
        "patience",
        "popularity_pool",
        "popularity_pool_factor",
    ),
    "reranker": (
        "max_length",
        "batch_size",
        "epochs",
        "train_batch_size",
        "max_train_requests",
        "patience",
        "cowatch_min_users",
        "cowatch_recent_items",
        "mmr_depth",
    ),
    "ranker": (
        "depth",
        "max_train_requests",
        "eval_requests",
        "num_trees",
        "num_leaves",
        "min_data_in_leaf",
        "early_stopping",
        "ease_neighbours",
        "ease_max_items",
        "ease_min_users",
        "ease_recent_items",
    ),
    "index": ("depth", "max_k"),
    "eval": ("max_requests", "bootstrap"),
    "serve": ("keep_snapshots", "max_k", "max_query_chars", "max_batch", "max_history"),
    "scale": ("actors", "batch_size", "shard_rows"),
}
_AT_LEAST_ZERO = {
    "split": ("min_events",),
    # 0 validation requests: train without validation (no early stopping, no tuned serving weights)
    "retriever": ("hard_negatives", "popularity_weight", "eval_requests", "time_budget_minutes"),
    "reranker": ("eval_requests",),
    "serve": ("poll_seconds",),
    "ingest": ("future_seconds",),
    "scale": ("num_gpus_per_actor",),
    "ranker": ("ease_reg",),
}


def _validate_ranges(config: Config) -> None:
    for section in dataclasses.fields(config):
        for f in dataclasses.fields(getattr(config, section.name)):
            value = getattr(getattr(config, section.name), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"must be a finite number, got {value}", key=f"{section.name}.{f.name}")
    for bound, table in ((1, _AT_LEAST_ONE), (0, _AT_LEAST_ZERO)):
        for section, keys in table.items():
            for key in keys:
                value = getattr(getattr(config, section), key)
                if value is not None and not value >= bound:
                    raise ConfigError(f"must be at least {bound}, got {value}", key=f"{section}.{key}")
    _validate_grids(config)
    if config.reranker.list_size < 2:
        raise ConfigError("a listwise loss needs lists of at least 2", key="reranker.list_size")
    if config.ranker.folds < 2:
        raise ConfigError(f"must be at least 2, got {config.ranker.folds}", key="ranker.folds")
    if not config.ranker.learning_rate > 0:
        raise ConfigError(f"must be above 0, got {config.ranker.learning_rate}", key="ranker.learning_rate")
    for name in config.ranker.features or ():
        if name not in FEATURES:
            raise ConfigError(
                f"unknown feature {name!r}; choose from {', '.join(FEATURES)}",
                key="ranker.features",
                suggestion=did_you_mean(name, list(FEATURES)),
            )
    if any(not 0.0 <= w <= 1.0 for w in config.ranker.items_grid):
        raise ConfigError("every weight must be in [0, 1]", key="ranker.items_grid")
    for section in ("retriever", "reranker"):
        cfg = getattr(config, section)
        if not cfg.learning_rate > 0:
            raise ConfigError(f"must be above 0, got {cfg.learning_rate}", key=f"{section}.learning_rate")
        if not 0 <= cfg.warmup_ratio < 1:
            raise ConfigError(f"must be in [0, 1), got {cfg.warmup_ratio}", key=f"{section}.warmup_ratio")
    if any(not 0 <= r <= 1 for r in config.split.ratios):
        raise ConfigError(
            f"each ratio must be in [0, 1], got {list(config.split.ratios)}", key="split.ratios"
        )
    if not config.eval.ks or any(k < 1 for k in config.eval.ks):
        raise ConfigError(f"cut-offs must be at least 1, got {list(config.eval.ks)}", key="eval.ks")
    from twostage.metrics import METRICS
    from twostage.text import template_fields

    for name in config.eval.metrics:
        if name not in METRICS:
            raise ConfigError(
                f"unknown ranking metric {name!r}; choose from {', '.join(METRICS)}",
                key="eval.metrics",
                suggestion=did_you_mean(name, list(METRICS)),
            )
    unknown = set(template_fields(config.text.user_template)) - {"history"}
    if unknown:
        raise ConfigError(
            f"the user template has only {{history}}, not {{{sorted(unknown)[0]}}}", key="text.user_template"
        )


def _validate_grids(config: Config) -> None:
    """The values tuning tries: each grid non-empty and inside the range its setting allows."""
    reranker, retriever = config.reranker, config.retriever
    grids = (
        ("reranker.fusion_grid", reranker.fusion_grid, lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
        ("reranker.cowatch_grid", reranker.cowatch_grid, lambda v: v >= 0.0, ">= 0"),
        ("reranker.depth_grid", reranker.depth_grid, lambda v: v >= 1, ">= 1"),
        ("retriever.popularity_grid", retriever.popularity_grid, lambda v: v >= 0.0, ">= 0"),
        ("retriever.lexical_grid", retriever.lexical_grid, lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    )
    for key, values, ok, allowed in grids:
        if not values:
            raise ConfigError("needs at least one value", key=key)
        bad = [v for v in values if not (math.isfinite(v) and ok(v))]
        if bad:
            raise ConfigError(f"values must be {allowed}, got {bad[0]}", key=key)
    if not 0.0 <= reranker.depth_tolerance < 1.0:
        raise ConfigError(
            f"must be in [0, 1), got {reranker.depth_tolerance}", key="reranker.depth_tolerance"
        )
    if reranker.cowatch_folds < 2:
        raise ConfigError(
            "needs at least 2 folds (a fold is left out of its own lists)", key="reranker.cowatch_folds"
        )


def load_config(path: str | Path | None = None) -> Config:
    """Load ``twostage.toml`` (a file, or a project directory containing one); defaults when absent.

    Example:
        >>> load_config().reranker.loss
        'listnet'
    """
    if path is None:
        return Config()
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE
    if not path.exists():
        return Config()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    try:
        return from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


DEFAULT_TOML = """\
# twostage project configuration. Every key is optional; the values shown are the defaults.
# See README.md ("Configuration") for what each key does.

[text]
item_template = "{title}. {categories}. {body}"
user_template = "Recently: {history}"
history_item_template = "{title}"
history_size = 10

[ingest]
future_seconds = 86400.0      # how far past now an event's timestamp may lie

[relevance]
rating_event = "rating"
rating_grades = [[4.5, 3.0], [4.0, 2.0]]
min_grade = 1.0
# event_grades = { purchase = 3.0, click = 1.0 }

[split]
strategy = "leave-last-out"   # or "ratio", "given"

[retriever]
model = "default"             # all-MiniLM-L6-v2 from the offline package; any HF name or local path
epochs = 1
# lexical_weight = 0.3        # search: weight of BM25 fused into stage 1 (hybrid recall); unset, chosen on
                              # the validation queries when the reranker is trained

[index]
build = "flat"                # a config in indexes/ (flat, hnsw, ivf, ivfpq)
depth = 100

[reranker]
model = "default"
depth = 50                    # candidates per request when training; serving reranks the depth tuned on
                              # validation (set serve_depth to fix it)
loss = "listnet"              # or "lambdaloss", "listmle"
# item_template = "{title}. {categories}. Watched with: {cowatched}"   # recommendation: the text stage 2
                              # reads; {cowatched} = titles most often watched by the same users
# negatives = "sampled"       # training negatives from the whole depth, not only stage 1's top ones
# label_window = 3            # recommendation: a training user's next 3 events are positives
# cowatch_weight = 0.5        # recommendation: weight of "how many recent items are co-watched with it";
                              # unset, chosen on validation with fusion_weight when the reranker is trained

[predictor]                   # twostage train predictor: how a user will rate an item (and act on it)
tasks = { rating = 1.0 }      # add listnet = 0.3 (ranking) or an event type (e.g. purchase = 1.0)
# recommend_weight = 0.3      # blend expected ratings into recommend's top recommend_depth

[eval]
ks = [1, 5, 10, 100]

[scale]
engine = "local"              # or "ray": encode items and build the index on a Ray cluster
# ray_address = "auto"        # unset: RAY_ADDRESS, else a new local cluster
actors = 2                    # encoder actors (one model each)
batch_size = 1024             # items per actor call
# num_gpus_per_actor = 1      # unset: 1 when the cluster has GPUs, else 0
shard_rows = 500000           # items per embedding shard
"""
