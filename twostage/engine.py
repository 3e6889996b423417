"""The Engine facade: the library API of twostage, one method per CLI command, with the same names.

``twostage search`` is :meth:`Engine.search`, ``twostage index add`` :meth:`Engine.index_add`, ``twostage train
reranker --tune-only`` :meth:`Engine.train_reranker` with ``tune_only=True``. Every ranking goes through one
immutable :class:`~twostage.pipeline.Pipeline`; the Engine holds the one it serves with and swaps in a new one,
by one reference, when a change (ingest, index update, training) alters what it would rank: a request in
flight finishes on the pipeline it started on.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twostage.config import CONFIG_FILE, DEFAULT_TOML, Config, load_config
from twostage.errors import IndexMismatchError, NotFoundError, TwostageError
from twostage.project import STORE_FILE, Project
from twostage.requests import Request
from twostage.results import Ranking
from twostage.store import IngestReport, Store

if TYPE_CHECKING:
    from twostage.evaluate import EvalReport
    from twostage.pipeline import Pipeline
    from twostage.train.reranker import RerankerTrainingResult
    from twostage.train.retriever import RetrieverTrainingResult

logger = logging.getLogger(__name__)

# what each kind of file changes in a project (see Project.changed)
_INGESTED = {"items": ("items",), "events": ("events",), "queries": (), "judgments": ()}


class Engine:
    """One project: its config, store, models and indexes.

    Example:
        >>> engine = Engine.init("/tmp/my-project")      # doctest: +SKIP
        >>> engine.datasets_load("sample")                 # doctest: +SKIP
        >>> engine.split()                                 # doctest: +SKIP
    """

    def __init__(
        self, project_dir: str | Path, config: Config, *, progress: bool = False, read_only: bool = False
    ):
        self.project_dir = Path(project_dir)
        self.config = config
        self.progress = progress
        self.project = Project(self.project_dir, config, progress=progress, read_only=read_only)
        self._serving: Pipeline | None = None
        self._swap = threading.Lock()
        self._index_writes = threading.Lock()  # one read-modify-write of the saved index at a time

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        project_dir: str | Path = ".",
        *,
        overrides: Mapping[str, Any] | None = None,
        progress: bool = False,
        read_only: bool = False,
    ) -> Engine:
        """Open an existing project (a directory with ``twostage.toml`` or a store). ``read_only`` opens the
        store without DuckDB's write lock, so several readers (``search``, ``recommend``, ``stats``) can run at
        once; anything that writes then fails with DuckDB's own error."""
        root = Path(project_dir)
        if not (root / CONFIG_FILE).exists() and not (root / STORE_FILE).exists():
            raise NotFoundError(f"{root}: not a twostage project; create one with 'twostage init {root}'")
        config = load_config(root)
        return cls(
            root, config.replace(overrides) if overrides else config, progress=progress, read_only=read_only
        )

    @classmethod
    def init(cls, project_dir: str | Path, *, progress: bool = False) -> Engine:
        """``twostage init``: a project directory with a commented default ``twostage.toml`` and an empty store."""
        root = Path(project_dir)
        root.mkdir(parents=True, exist_ok=True)
        if not (root / CONFIG_FILE).exists():
            (root / CONFIG_FILE).write_text(DEFAULT_TOML, encoding="utf-8")
        engine = cls(root, load_config(root), progress=progress)
        engine.store  # noqa: B018  (creates the schema)
        return engine

    @property
    def store(self) -> Store:
        return self.project.store

    def close(self) -> None:
        self.project.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pipeline(self, split: str | None = None) -> Pipeline:
        """The pipeline that serves (``split`` None: every event counts), or the one that evaluates ``split``
        (popularity and co-watch lists counted before its cut-offs)."""
        if split is not None:
            return self.project.pipeline(split)
        current = self._serving
        if current is None:
            with self._swap:
                if self._serving is None:
                    self._serving = self.project.pipeline()
                current = self._serving
        return current

    def _changed(self, *sources: str) -> None:
        """Forget what was read from ``sources``; if a pipeline is serving, build its successor and swap it in."""
        if sources:
            self.project.changed(*sources)
            self._rebuild()

    def _rebuild(self) -> None:
        with self._swap:
            if self._serving is None:
                return
            try:
                self._serving = self.project.pipeline()
            except TwostageError as e:  # e.g. no index yet: the next request says so
                logger.info("serving pipeline not rebuilt: %s", e)
                self._serving = None

    def default_split(self) -> str:
        return self.project.default_split()

    # ------------------------------------------------------------------ data
    def ingest(self, path: str | Path, kind: str, **options: Any) -> IngestReport:
        """``twostage ingest``: one file; see :meth:`twostage.store.Store.ingest` for the options."""
        options.setdefault("future_seconds", self.config.ingest.future_seconds)
        report = self.store.ingest(path, kind, **options)
        self._changed(*_INGESTED.get(kind, ()))
        return report

    def datasets_load(self, layout: str, path: str | Path | None = None) -> list[IngestReport]:
        """``twostage datasets load``: a known layout, ``movielens`` or ``beir`` folder, or the bundled ``sample``."""
        from twostage.datasets import LOADERS

        if layout not in LOADERS:
            raise TwostageError(f"unknown dataset layout '{layout}'; use one of {', '.join(LOADERS)}")
        if path is None and layout != "sample":
            raise TwostageError(f"the {layout} layout needs a PATH to its folder")
        reports = LOADERS[layout](self.store, path)
        self._changed("items", "events")
        return reports

    def split(self, strategy: str | None = None, *, name: str | None = None) -> dict[str, int]:
        """``twostage split``: train/valid/test (config ``[split]``, or ``strategy`` to override it). A store
        with judgments and no events (a search data set, e.g. a BEIR layout) gets the ``given`` split unless a
        strategy is named: the configured one needs events."""
        configured = self.config.split.strategy
        if strategy is None and configured != "given" and not self.store.count("events"):
            judged = self.store.count("judgments")
            if judged:
                logger.warning(
                    "no events but %d judgments: making the 'given' split (the judgments' own parts) instead of "
                    "[split] strategy '%s'",
                    judged,
                    configured,
                )
                strategy = "given"
        config = self.config if strategy is None else self.config.replace({"split.strategy": strategy})
        made = self.store.split(config.split, config.relevance, name=name)
        self.project.changed("splits")  # counts made under the old cut-offs would leak or miss events
        return made

    def stats(self) -> dict[str, Any]:
        """``twostage stats``: row counts, users, event types, splits and runs."""
        return self.store.stats()

    def sql(self, query: str, *, write: bool = False) -> tuple[list[str], list[tuple]]:
        """``twostage sql``: one statement against the project's store (results, metrics and logs stay
        queryable); reads only unless ``write``. See :meth:`twostage.store.Store.sql` for what is refused.

        This runs on the Engine's own connection, so the guard is DuckDB's statement types and a read-only
        transaction: DuckDB opens a file with one configuration per process and cannot switch external access
        back on, so a sandbox here would stop this Engine ingesting files. The CLI, whose process does nothing
        else, runs the statement on a store opened read-only (unless ``--write``) with external access off.
        """
        result = self.store.sql(query, write=write)
        if write:  # what was read from the tables may have changed
            self._changed("items", "events", "splits")
        return result

    # ------------------------------------------------------------------ index
    def index_build(self, name: str | None = None, *, build: str | None = None) -> dict[str, Any]:
        """``twostage index build``: encode every item and write a FAISS index atomically; returns its manifest."""
        from twostage.index import VectorIndex, load_spec

        encoder = self.project.retriever()
        spec = load_spec(build or self.config.index.build, dirs=[self.project_dir / "indexes"])
        built = {
            "model_fingerprint": encoder.fingerprint,
            "text_fingerprint": self.project.text_fingerprint(),
            "provenance": self.project.index_provenance(),
            "use_gpu": self.config.index.use_gpu,
            "progress": self.progress,
        }
        if self.config.scale.engine == "ray":  # encoded on the cluster, built shard by shard: same index
            from twostage.scale import build_index_from_shards

            index = build_index_from_shards(self.project.item_shards(encoder), spec, **built)
        else:
            ids, vecs = self.project.item_vectors(encoder)
            index = VectorIndex.build(ids, vecs, spec, **built)
        with self._index_writes:
            self.project.save_index(index, name)
        self._rebuild()
        return dict(index.manifest)

    def index_add(self, item_ids: Sequence[str] | None = None, *, name: str | None = None) -> dict[str, Any]:
        """``twostage index add``: add or re-encode ``item_ids`` without a rebuild; with None, every catalogue item
        missing from the index or whose text changed since it was indexed (only those are encoded)."""
        import numpy as np

        encoder, catalogue = self.project.retriever(), self.project.catalogue()
        unknown = [i for i in item_ids or () if i not in catalogue]
        if unknown:
            raise NotFoundError(f"unknown item_id '{unknown[0]}'; ingest it first")
        with self._index_writes:  # a private copy is changed and saved, then served
            index = self.project.load_index_copy(name)
            ids, vecs = self.project.item_vectors(encoder, list(item_ids) if item_ids is not None else None)
            if item_ids is None:
                present = [n for n, i in enumerate(ids) if i in index]
                stale = sorted(set(range(len(ids))) - set(present))
                if present:  # a changed text shows as a vector that differs from the indexed one
                    moved = (
                        np.abs(index.vectors([ids[n] for n in present]) - vecs[present]).max(axis=1) > 1e-3
                    )
                    stale = sorted(stale + [present[j] for j in np.flatnonzero(moved)])
                ids, vecs = [ids[n] for n in stale], vecs[stale]
            if ids:
                index.upsert(ids, vecs)
                logger.info("index: %d items added or re-encoded", len(ids))
            self.project.save_index(index, name)
        self._rebuild()
        return dict(index.manifest)

    def index_remove(self, item_ids: Sequence[str], *, name: str | None = None) -> dict[str, Any]:
        """``twostage index remove``: drop items from the index without a rebuild."""
        with self._index_writes:
            index = self.project.load_index_copy(name)
            index.remove(list(item_ids))
            self.project.save_index(index, name)
        self._rebuild()
        return dict(index.manifest)

    def index_info(self, name: str | None = None) -> dict[str, Any]:
        """``twostage index info``: the index manifest, and whether it fits the current model and config
        (``mismatch`` says what differs: the manifest is worth reading exactly when it does not fit)."""
        try:
            return {**self.project.index(name).manifest, "mismatch": None}
        except IndexMismatchError as e:
            path = self.project.index_dir(name) / "manifest.json"
            return {**json.loads(path.read_text(encoding="utf-8")), "mismatch": str(e)}

    # ------------------------------------------------------------------ serving
    def publish(self, *, switch: str | None = None) -> dict[str, Any]:
        """``twostage publish``: freeze what serving reads into a new snapshot under ``snapshots/`` and make it
        current (see :mod:`twostage.snapshot`); with ``switch``, make that published snapshot current again (a
        rollback). Servers swap to the current snapshot on their next poll or ``POST /admin/reload``."""
        from twostage import snapshot

        if switch is not None:
            snapshot.switch(self.project_dir, switch)
            return {"snapshot_id": switch, "snapshots": snapshot.list_snapshots(self.project_dir)}
        return {**snapshot.publish(self.project), "snapshots": snapshot.list_snapshots(self.project_dir)}

    def search(
        self,
        text: str,
        k: int = 10,
        *,
        stage: str = "rerank",
        explain: bool = False,
        diversify: float | None = None,
    ) -> Ranking:
        """``twostage search``: answer a text query with both stages (``stage="recall"`` stops after stage 1).

        Example:
            >>> engine.search("protein folding in yeast", k=5).hits[0].item_id  # doctest: +SKIP
        """
        if not isinstance(text, str) or not text.strip():
            raise TwostageError("empty query; give some text to search for")
        request = Request("query", text.strip())
        return self.pipeline().rank([request], k, stage=stage, explain=explain, diversify=diversify)[0]

    def recommend(
        self,
        user_id: str | None = None,
        k: int = 10,
        *,
        history: Sequence[str] | None = None,
        stage: str = "rerank",
        explain: bool = False,
        diversify: float | None = None,
        split: str | None = None,
        part: str = "test",
    ) -> Ranking:
        """``twostage recommend``: items for a known user from their history, or for an anonymous ``history``
        (item ids, newest first); items in the history are never returned.

        Args:
            user_id: a user with events in the store (or None with ``history``).
            k: number of items.
            history: an anonymous session's items instead of a stored user.
            stage: "rerank" (both stages) or "recall" (stage 1 only).
            explain: attach to each hit the history items that drove it (leave-one-out on the context).
            diversify: MMR λ in [0, 1] (1 = none); None uses ``[reranker] mmr_lambda``.
            split, part: recommend as evaluation saw it: the user's history before ``split/part``'s cut-off,
                popularity and co-watch counted before the split's cut-offs. The result is exactly the
                ranking ``evaluate`` scores for that user.
        """
        if (user_id is None) == (history is None):
            raise TwostageError("give either a user id or a history of item ids")
        pipe = self.pipeline(split)
        if history is not None:
            request = pipe.session_request(history)
        else:
            request = pipe.user_request(
                str(user_id).strip(), self._history(str(user_id).strip(), split, part)
            )
        return pipe.rank([request], k, stage=stage, explain=explain, diversify=diversify)[0]

    def _history(self, user_id: str, split: str | None, part: str) -> list[str]:
        cutoffs = None
        if split is not None:
            cutoffs = self.store.cutoffs(split, part, [user_id])
            if user_id not in cutoffs:
                raise NotFoundError(f"user '{user_id}' has no '{part}' target in split '{split}'")
        history = self.store.histories([user_id], cutoffs=cutoffs)[user_id]
        if not history and split is None:  # at a cut-off an empty history is what evaluation ranked for
            raise NotFoundError(f"unknown user '{user_id}' (no events); check the id or ingest their events")
        return history

    # ------------------------------------------------------------------ training
    def train_retriever(self, *, split: str | None = None) -> RetrieverTrainingResult:
        """``twostage train retriever``: fine-tune the bi-encoder on the train side of a split
        (MultipleNegativesRankingLoss, early stopping on validation recall@K); rebuild the index afterwards."""
        from twostage.train.jobs import fit_retriever

        result = fit_retriever(self.project, split or self.default_split())
        self._changed("models")
        return result

    def train_reranker(
        self, *, split: str | None = None, tune_only: bool = False
    ) -> RerankerTrainingResult | dict[str, Any]:
        """``twostage train reranker``: fine-tune the cross-encoder listwise on stage-1 candidate lists, then
        choose its serving settings on validation (see :mod:`twostage.train.jobs`).

        ``tune_only`` keeps the trained model and only chooses its settings again (e.g. after new events);
        it returns them, training returns a :class:`~twostage.train.reranker.RerankerTrainingResult`.
        """
        from twostage.train.jobs import fit_reranker, retune_reranker

        split = split or self.default_split()
        if tune_only:
            tuned = retune_reranker(self.project, split)
            self._changed("record")
            return tuned
        result = fit_reranker(self.project, split)
        self._changed("models")
        return result

    def train_ranker(self, *, split: str | None = None) -> dict[str, Any]:
        """``twostage train ranker``: train the learned stage 2 and choose the items channel's weight (see
        :mod:`twostage.train.learned`); returns what it recorded."""
        from twostage.train.learned import fit_ranker

        record = fit_ranker(self.project, split or self.default_split())
        self._changed("models")
        return record

    def train_predictor(self, *, split: str | None = None) -> dict[str, Any]:
        """``twostage train predictor``: fine-tune the behaviour predictor (rating and event heads over a
        cross-encoder of the user's behaviour text and the item's text; see :mod:`twostage.train.predictor`)."""
        from twostage.train.predictor import fit_predictor

        record = fit_predictor(self.project, split or self.default_split(), progress=self.progress)
        self._changed("models")
        return record

    def predict(
        self,
        user_id: str | None = None,
        item_ids: Sequence[str] = (),
        *,
        history: Sequence[str | tuple[str, float]] | None = None,
    ) -> dict[str, list[float]]:
        """``twostage predict``: how a user would respond to each item — per target, the predicted rating or
        the probability of the event — from the user's events in the store, or from an anonymous ``history``
        (item ids, or (item id, rating) pairs, newest first).

        Example:
            >>> engine.predict("42", ["318", "296"])["rating"]  # doctest: +SKIP
            [4.41, 4.12]
        """
        from twostage.outcomes import LATEST_EVENTS, user_log

        if (user_id is None) == (history is None):
            raise TwostageError("give either a user id or a history of item ids")
        predictor = self.project.predictor()
        if history is not None:
            return predictor.respond(
                "", predictor.history_events(history), item_ids, self.project.catalogue()
            )
        user = str(user_id).strip()
        events = user_log(self.store, user, LATEST_EVENTS * predictor.context_items)
        if not events:
            raise NotFoundError(f"unknown user '{user}' (no events); check the id or pass a history")
        return predictor.respond(user, events, item_ids, self.project.catalogue())

    def evaluate_predictions(
        self, *, split: str | None = None, part: str | None = None, max_examples: int | None = None
    ) -> dict[str, Any]:
        """The behaviour predictor against the rating baselines (global mean, biases, biased MF) on a held-out
        part: RMSE/MAE, AUC/log-loss, paired comparisons (see :mod:`twostage.prediction_eval`)."""
        from twostage.prediction_eval import evaluate_predictions

        catalogue = self.project.catalogue()
        return evaluate_predictions(
            self.store,
            self.project.predictor(),
            texts=catalogue.texts,
            titles={i: catalogue.title(i) for i in catalogue.texts},
            split=split or self.default_split(),
            part=part or self.config.eval.part,
            config=self.config.to_dict(),
            n_resamples=self.config.eval.bootstrap,
            seed=self.config.eval.seed,
            max_examples=max_examples,
            negatives=self.config.predictor.negatives,
            list_size=self.config.predictor.list_size,
            eval_lists=self.config.predictor.eval_lists,
            progress=self.progress,
        )

    # ------------------------------------------------------------------ evaluation
    def evaluate(
        self,
        *,
        split: str | None = None,
        part: str | None = None,
        baselines: bool = True,
        max_requests: int | None = None,
        mmr_lambdas: tuple[float, ...] = (),
        report: str | Path | None = None,
        pipeline: Pipeline | None = None,
    ) -> EvalReport:
        """``twostage evaluate``: baselines, stage 1 and the full pipeline on a held-out part, in one run.

        Every ranking is written to ``results`` and joined to the split's targets in DuckDB; per-request
        and mean metrics land in ``request_metrics``/``metrics``. Paired bootstrap comparisons are made of
        the pipeline against stage 1 and of stage 1 against each baseline. ``pipeline`` evaluates other
        models or settings than the project's (e.g. an untrained reranker, for comparison); it reads the log
        as of the split's cut-offs like the project's own.
        """
        from twostage.experiment import run_evaluation

        split = split or self.default_split()
        pipe = self.project.counted(pipeline, split) if pipeline is not None else self.project.pipeline(split)
        return run_evaluation(
            self.store,
            pipe,
            config=self.config,
            split=split,
            part=part or self.config.eval.part,
            baselines=baselines,
            zero_shot=self.project.zero_shot if baselines else None,
            max_requests=max_requests if max_requests is not None else self.config.eval.max_requests,
            mmr_lambdas=mmr_lambdas,
            report=report,
            progress=self.progress,
        )
