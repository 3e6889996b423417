"""A project on disk and what is loaded from it, each thing once.

A project is a directory: ``twostage.toml`` (config), ``twostage.duckdb`` (store), ``models/`` (fine-tuned
models), ``indexes/`` (FAISS artifacts), ``cache/`` (item embeddings) and ``counts/`` (co-watch lists, keyed
by what they are counted from). :class:`Project` knows the layout,
loads the catalogue, models, index and log counts, and assembles them into pipelines.

Loaded values are memoised by what they are read from (items, events, splits, models, the reranker's tuning
record, the index), and :meth:`Project.changed` drops exactly the values read from what changed. A value
being computed blocks only the threads that want that same value, so a co-watch count for an evaluation never
stalls a request.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twostage.atomic import clean_leftovers, replace_dir
from twostage.config import plain_name
from twostage.cowatch import FIELD, cached_co_watched
from twostage.errors import IndexMismatchError, NotFoundError
from twostage.pipeline import LogCounts, Pipeline, Settings
from twostage.requests import Catalogue
from twostage.store import Store
from twostage.text import template_fields

if TYPE_CHECKING:
    import numpy as np

    from twostage.baselines import BM25
    from twostage.config import Config
    from twostage.encoders import BiEncoder
    from twostage.index import VectorIndex
    from twostage.itemitem import ItemItem
    from twostage.ltr import LearnedRanker
    from twostage.predictor import Predictor
    from twostage.rerank import Reranker

logger = logging.getLogger(__name__)

STORE_FILE = "twostage.duckdb"
TRAINING_RECORD = "training.json"
DEFAULT_PAIR_LENGTH = 256  # tokens per pair for a cross-encoder that was not trained here

# what each kind of loaded value is read from; Project.changed(source) drops the kinds read from it
_READS = {
    "catalogue": {"items"},
    "lexical": {"items"},
    "rerank_texts": {"items", "events", "splits"},
    "cowatch": {"events", "splits"},
    "items": {"events", "splits"},
    "learned": {"models"},
    "predictor": {"models"},
    "popularity": {"events", "splits"},
    "ratings": {"events", "splits"},
    "encoder": {"models"},
    "reranker": {"models"},
    "record": {"models", "record"},
    "index": {"models", "index"},
}
SOURCES = frozenset().union(*_READS.values())
# directories whose hidden entries are our temporary artifacts (cleaned when the write lock is taken)
ARTIFACT_DIRS = ("indexes", "models", "snapshots", "counts")


class _Memo:
    """Values computed once per key (a tuple whose first element is its kind). A key being computed blocks
    only callers of that key; a value computed while :meth:`drop` ran is returned but not kept."""

    def __init__(self) -> None:
        self._values: dict[tuple, Any] = {}
        self._locks: dict[tuple, threading.Lock] = {}
        self._guard = threading.Lock()
        self._epoch = 0

    def get(self, key: tuple, compute: Callable[[], Any]) -> Any:
        with self._guard:
            if key in self._values:
                return self._values[key]
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            with self._guard:
                if key in self._values:
                    return self._values[key]
                epoch = self._epoch
            value = compute()
            with self._guard:
                if self._epoch == epoch:
                    self._values[key] = value
            return value

    def drop(self, kinds: Iterable[str], *, where: Callable[[tuple], bool] = lambda key: True) -> None:
        """Forget the values of ``kinds`` (those whose key passes ``where``)."""
        kinds = set(kinds)
        with self._guard:
            self._epoch += 1
            for key in [k for k in self._values if k[0] in kinds and where(k)]:
                del self._values[key]

    def put(self, key: tuple, value: Any) -> None:
        with self._guard:
            self._values[key] = value


class Project:
    """One project directory: paths, the store, and the artifacts loaded from them (memoised)."""

    def __init__(self, root: str | Path, config: Config, *, progress: bool = False, read_only: bool = False):
        self.root = Path(root)
        self.read_only = read_only
        self.config = config
        self.progress = progress
        self._store: Store | None = None
        self._store_lock = threading.Lock()
        self._memo = _Memo()
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ layout
    def models_dir(self, which: str) -> Path:
        return self.root / "models" / which

    def index_dir(self, name: str | None = None) -> Path:
        return self.root / "indexes" / plain_name(self.config.index.name if name is None else name)

    @property
    def embeddings_dir(self) -> Path:
        return self.root / "cache" / "embeddings"

    @property
    def store(self) -> Store:
        with self._store_lock:
            if self._store is None:
                self._store = Store(self.root / STORE_FILE, read_only=self.read_only)
                if not self.read_only:
                    self._clean_leftovers()
            return self._store

    def _clean_leftovers(self) -> None:
        """Holding the store's write lock, no other process is writing: whatever temporary artifacts lie in
        the project are left by a crash."""
        for name in ARTIFACT_DIRS:
            for line in clean_leftovers(self.root / name):
                logger.warning("cleaned up after an interrupted write: %s", line)

    def close(self) -> None:
        with self._store_lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    def changed(self, *sources: str) -> None:
        """Forget what was read from ``sources`` (items, events, splits, models, record, index). A new split
        changes only what is counted up to a split's cut-offs, not the counts over every event."""
        unknown = set(sources) - SOURCES
        if unknown:
            raise ValueError(f"unknown sources {sorted(unknown)}; use {sorted(SOURCES)}")
        rest = set(sources) - {"splits"}
        self._memo.drop(kind for kind, read in _READS.items() if read & rest)
        if "splits" in sources:
            split_kinds = [kind for kind, read in _READS.items() if "splits" in read]
            self._memo.drop(split_kinds, where=lambda key: key[1] is not None)

    def default_split(self) -> str:
        """The split to use when none is named: the config's strategy, if it was made, else the only one."""
        names = self.store.split_names()
        if self.config.split.strategy in names:
            return self.config.split.strategy
        if len(names) == 1:
            return names[0]
        if not names:
            raise NotFoundError("no split yet; run 'twostage split' first")
        raise NotFoundError(f"several splits ({', '.join(names)}); name one with --split")

    def record_run(
        self, kind: str, fingerprint: str | None = None, extra: dict[str, Any] | None = None
    ) -> str:
        return self.store.new_run(kind, {**self.config.to_dict(), **(extra or {})}, fingerprint)

    def replace_model(self, which: str, staged: Path) -> Path:
        """Move a freshly trained model directory into place atomically (then forget the models: ``changed``)."""
        target = replace_dir(staged, self.models_dir(which))
        logger.info("%s saved to %s", which, target)
        return target

    # ------------------------------------------------------------------ items
    def catalogue(self) -> Catalogue:
        """All items with their texts (item template), templates checked against the items' fields."""

        def load() -> Catalogue:
            catalogue = Catalogue.from_store(self.store, self.config.text.item_template)
            if not len(catalogue):
                raise NotFoundError("the store has no items; ingest items first")
            text, rerank_template = self.config.text, self.config.reranker.item_template
            catalogue.check_templates(
                {
                    "text.item_template": text.item_template,
                    "text.history_item_template": text.history_item_template,
                    **({"reranker.item_template": rerank_template} if rerank_template is not None else {}),
                }
            )
            return catalogue

        return self._memo.get(("catalogue",), load)

    def lexical(self) -> BM25:
        """BM25 over every item's text (the item template): stage 1's lexical channel for hybrid recall."""
        from twostage.baselines import BM25

        return self._memo.get(("lexical",), lambda: BM25.of_catalogue(self.catalogue()))

    def lexical_channel(self, weight: float) -> BM25 | None:
        """The lexical channel a pipeline fusing BM25 with ``weight`` needs: none at weight 0."""
        return self.lexical() if weight > 0 else None

    def text_fingerprint(self) -> str:
        """What item vectors depend on in ``[text]``: the item template only (user settings do not)."""
        template = self.config.text.item_template
        return hashlib.sha256(f"item_template={template}".encode()).hexdigest()[:16]

    def item_vectors(
        self, encoder: BiEncoder, item_ids: list[str] | None = None
    ) -> tuple[list[str], np.ndarray]:
        """Embeddings of catalogue items, through the embedding cache (only new and changed texts are encoded)."""
        from twostage.encoders import EmbeddingCache, encode_cached

        catalogue = self.catalogue()
        ids = item_ids if item_ids is not None else catalogue.item_ids
        cache = EmbeddingCache(self.embeddings_dir)
        vecs = encode_cached(encoder, [catalogue.text(i) for i in ids], cache, progress=self.progress)
        return ids, vecs

    def item_shards(self, encoder: BiEncoder) -> Path:
        """``[scale] engine = "ray"``: every catalogue item encoded on the Ray cluster (the model loaded from
        ``encoder``'s path) into embedding shards under ``cache/shards``; the embedding cache is not used."""
        from twostage.scale import encode_items_ray

        catalogue, cfg = self.catalogue(), self.config.retriever
        target = self.root / "cache" / "shards"
        encode_items_ray(
            encoder.name_or_path,
            [(i, catalogue.text(i)) for i in catalogue.item_ids],
            target,
            self.config.scale,
            max_seq_length=encoder.max_seq_length,
            encode_batch_size=cfg.batch_size,
            model_fingerprint=encoder.fingerprint,
        )
        return target

    # ------------------------------------------------------------------ models and index
    def retriever(self, *, base: bool = False) -> BiEncoder:
        """The bi-encoder: the project's fine-tuned one when it exists (unless ``base``), else the configured model."""
        from twostage.encoders import BiEncoder

        source = self.config.retriever.model if base else self.retriever_source()
        cfg = self.config.retriever

        def load() -> BiEncoder:
            name = None if source == "default" else source
            return BiEncoder(name, max_seq_length=cfg.max_seq_length, batch_size=cfg.batch_size)

        return self._memo.get(("encoder", source), load)

    def reranker(self, *, base: bool = False) -> Reranker | None:
        """The cross-encoder: the project's trained one, or a configured non-default model; None if neither or
        ``[reranker] enabled = false``. The default base has an untrained head: only ``base=True`` gives it."""
        if base:
            return self.load_reranker(self.config.reranker.model)
        source = self.reranker_source()
        return self.load_reranker(source) if source is not None else None

    def reranker_source(self) -> str | None:
        """The path or name of the cross-encoder that serves (see :meth:`reranker`), or None."""
        cfg, trained = self.config.reranker, self.models_dir("reranker")
        if not cfg.enabled:
            return None
        if trained.exists():
            return str(trained)
        return cfg.model if cfg.model != "default" else None

    def load_reranker(self, source: str) -> Reranker:
        """A cross-encoder from a path or name (``default``: MiniLM with a fresh head), loaded once."""
        from twostage.rerank import Reranker

        cfg = self.config.reranker

        def load() -> Reranker:
            name = None if source == "default" else source
            return Reranker(name, max_length=self.reranker_max_length(source), batch_size=cfg.batch_size)

        return self._memo.get(("reranker", source), load)

    def reranker_max_length(self, source: str | None) -> int:
        """Tokens per pair for the cross-encoder at ``source``: ``[reranker] max_length`` when set, else the
        length it was trained with (its ``training.json``, sized from the data), else 256."""
        if self.config.reranker.max_length is not None:
            return self.config.reranker.max_length
        record = Path(source) / TRAINING_RECORD if source not in (None, "default") else None
        if record is not None and record.is_file():
            trained = json.loads(record.read_text()).get("max_length")
            if trained:
                return int(trained)
        return DEFAULT_PAIR_LENGTH

    def index_expect(self, encoder: BiEncoder) -> dict[str, Any]:
        """The manifest fields an index must have to serve with ``encoder`` and this config."""
        return {
            "model_fingerprint": encoder.fingerprint,
            "dim": encoder.dim,
            "text_fingerprint": self.text_fingerprint(),
        }

    def load_index_copy(self, name: str | None = None) -> VectorIndex:
        """A private copy of the saved index (to change and save without touching the one serving)."""
        from twostage.index import VectorIndex

        path = self.index_dir(name)
        if not path.exists():
            raise NotFoundError(f"no index at {path}; build one with 'twostage index build'")
        try:
            return VectorIndex.load(path, expect=self.index_expect(self.retriever()))
        except IndexMismatchError as e:
            raise IndexMismatchError(
                e.field, e.expected, e.found, str(path), reason=self._mismatch(path, e.field)
            ) from e

    def index_provenance(self) -> dict[str, str]:
        """What the index's fingerprints stand for, in words (stored in its manifest)."""
        return {"model": self.retriever_source(), "item_template": self.config.text.item_template}

    def retriever_source(self) -> str:
        """The bi-encoder's path or name: the project's fine-tuned one when it exists, else the configured."""
        trained = self.models_dir("retriever")
        return str(trained) if trained.exists() else self.config.retriever.model

    def _mismatch(self, path: Path, field: str) -> str | None:
        """Why a saved index does not fit the current setup, in words (None for an index built before its
        manifest recorded them, or a field without words)."""
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        built = manifest.get("provenance") or {}
        now = self.index_provenance()
        if field == "text_fingerprint" and "item_template" in built:
            return (
                f"the index was built with [text] item_template {built['item_template']!r}, "
                f"which is now {now['item_template']!r}"
            )
        if field == "model_fingerprint" and "model" in built:
            same = built["model"] == now["model"]
            return f"the index was built with the bi-encoder {built['model']}" + (
                ", which has changed since (retrained?)"
                if same
                else f", but the retriever is now {now['model']}"
            )
        if field == "dim" and "model" in built:
            return (
                f"the index holds {manifest.get('dim')}-dimensional vectors of {built['model']}, "
                f"but {now['model']} makes {self.retriever().dim}-dimensional ones"
            )
        return None

    def index(self, name: str | None = None) -> VectorIndex:
        """The saved index, checked against the current bi-encoder and text config."""
        return self._memo.get(("index", str(self.index_dir(name))), lambda: self.load_index_copy(name))

    def save_index(self, index: VectorIndex, name: str | None = None) -> None:
        """Write ``index`` atomically as the project's index ``name`` and serve that copy from now on (the copy
        a pipeline in flight holds is never changed)."""
        index.save(self.index_dir(name))
        self.changed("index")
        self._memo.put(("index", str(self.index_dir(name))), index)

    def reranker_record(self) -> dict[str, Any]:
        """The trained reranker's ``training.json`` (with the serving settings chosen on validation), or {}."""

        def load() -> dict[str, Any]:
            path = self.models_dir("reranker") / TRAINING_RECORD
            return json.loads(path.read_text()) if path.exists() else {}

        return self._memo.get(("record",), load)

    # ------------------------------------------------------------------ log counts
    def _at(self, split: str | None) -> str | None:
        """The split whose cut-offs counts stop at: ``split`` for a recommendation split, else all events."""
        return split if split is not None and self.store.require_split(split) == "user" else None

    def reads_cowatched(self) -> bool:
        return FIELD in template_fields(self._rerank_template())

    def _rerank_template(self) -> str:
        return self.config.reranker.item_template or self.config.text.item_template

    def cowatch_lists(
        self, split: str | None = None, *, exclude_users: Iterable[str] = ()
    ) -> dict[str, list[str]]:
        """Each item's ``[reranker] cowatched_size`` most co-watched items, counted from the events before
        ``split``'s cut-offs (all events when None), leaving out ``exclude_users`` (training folds; not kept in
        memory). Stored in ``counts/`` and read back by later processes while the events and split are unchanged."""
        exclude = frozenset(exclude_users)
        if exclude:
            return self.cowatch_fold_lists(split, [exclude])[0]
        return self._memo.get(("cowatch", split), lambda: self.cowatch_fold_lists(split, [()])[0])

    def cowatch_fold_lists(
        self, split: str | None, folds: Sequence[Iterable[str]]
    ) -> list[dict[str, list[str]]]:
        """:meth:`cowatch_lists` without each of the disjoint user sets ``folds``: those not stored yet are
        counted together in one pass over the events (reranker training's folds) and stored."""
        cfg = self.config.reranker
        return cached_co_watched(
            self.store,
            self.root / "counts",
            folds,
            top=cfg.cowatched_size,
            split=split,
            min_users=cfg.cowatch_min_users,
            recent_items=cfg.cowatch_recent_items,
        )

    def rerank_texts(
        self, split: str | None = None, *, exclude_users: Iterable[str] = ()
    ) -> Mapping[str, str]:
        """The item texts stage 2 reads (``[reranker] item_template``); with ``{cowatched}`` the lists are those
        of :meth:`cowatch_lists` for ``split`` and ``exclude_users``."""
        exclude, cowatched = frozenset(exclude_users), self.reads_cowatched()

        def render() -> Mapping[str, str]:
            lists = self.cowatch_lists(split, exclude_users=exclude) if cowatched else None
            return self.catalogue().texts_with(self._rerank_template(), lists)

        if exclude and cowatched:
            return render()
        return self._memo.get(("rerank_texts", split if cowatched else None), render)

    def _ease_options(self) -> Any:
        from twostage.itemitem import EaseOptions

        cfg = self.config.ranker
        return EaseOptions(
            reg=cfg.ease_reg,
            neighbours=cfg.ease_neighbours,
            max_items=cfg.ease_max_items,
            min_users=cfg.ease_min_users,
            recent_items=cfg.ease_recent_items,
        )

    def item_model(self, split: str | None = None) -> ItemItem | None:
        """EASE item-to-item weights fit on the events before ``split``'s cut-offs (all events when None),
        stored in ``counts/``; None when ``[ranker] items_channel = "none"`` or the store has no events."""
        if self.config.ranker.items_channel == "none":
            return None

        def fit() -> ItemItem | None:
            return self.item_model_folds(split, [()])[0] if self.store.count("events") else None

        return self._memo.get(("items", split), fit)

    def item_model_folds(self, split: str | None, folds: Sequence[Iterable[str]]) -> list[ItemItem]:
        """:meth:`item_model` without each of the disjoint user sets ``folds`` (learned ranker training)."""
        from twostage.itemitem import cached_item_models

        return cached_item_models(self.store, self.root / "counts", folds, self._ease_options(), split=split)

    def learned_ranker(self) -> LearnedRanker | None:
        """The trained learned ranker (``models/ranker``), or None (not trained, or ``[ranker] learned = "off"``)."""
        from twostage.ltr import LearnedRanker

        path = self.models_dir("ranker")
        if self.config.ranker.learned == "off" or not path.exists():
            return None
        return self._memo.get(("learned",), lambda: LearnedRanker.load(path))

    def predictor(self) -> Predictor:
        """The trained behaviour predictor (``models/predictor``), loaded once."""
        from twostage.predictor import Predictor

        path = self.models_dir("predictor")
        return self._memo.get(("predictor",), lambda: Predictor.load(path))

    def popularity(self, split: str | None = None) -> dict[str, int]:
        return self._memo.get(("popularity", split), lambda: self.store.popularity(split))

    # ------------------------------------------------------------------ pipelines
    def settings(self, *, with_reranker: bool, learned: LearnedRanker | None = None) -> Settings:
        """Serving settings: the config's, else those tuned when the reranker (or the learned ranker) was
        trained, else the defaults."""
        cfg, record = self.config.reranker, self.reranker_record() if with_reranker else {}
        tuned_depth = record.get("rerank_depth")
        if cfg.serve_depth is not None:
            depth = cfg.serve_depth
        else:
            depth = min(int(tuned_depth), cfg.depth) if tuned_depth else cfg.depth
        fusion = (
            cfg.fusion_weight if cfg.fusion_weight is not None else float(record.get("fusion_weight") or 0.0)
        )
        cowatch = (
            cfg.cowatch_weight
            if cfg.cowatch_weight is not None
            else float(record.get("cowatch_weight") or 0.0)
        )
        retriever = self.config.retriever
        lexical = retriever.lexical_weight
        if lexical is None:  # chosen on validation when the reranker was trained (its record), else none
            lexical = float((record or self.reranker_record()).get("lexical_weight") or 0.0)
        items = self.config.ranker.items_weight
        if learned is not None:  # the learned ranker's stage 1 and depth are those it was trained on
            depth = min(int(learned.record.get("depth") or self.config.ranker.depth), self.config.index.depth)
            if items is None:
                items = float(learned.record.get("items_weight") or 0.0)
            if retriever.lexical_weight is None:
                lexical = float(learned.record.get("lexical_weight") or 0.0)
        if self.config.ranker.items_channel == "none":
            items = 0.0
        return Settings(
            recall_depth=self.config.index.depth,
            rerank_depth=depth,
            items_weight=items or 0.0,
            fusion_weight=fusion,
            lexical_weight=lexical,
            lexical_fusion=retriever.lexical_fusion,
            cowatch_weight=cowatch if with_reranker else 0.0,
            popularity_weight=retriever.popularity_weight,
            popularity_pool=retriever.popularity_pool,
            popularity_pool_factor=retriever.popularity_pool_factor,
            mmr_lambda=cfg.mmr_lambda,
            mmr_depth=cfg.mmr_depth,
            exclude_seen=self.config.index.exclude_seen,
            max_k=self.config.index.max_k,
            predict_weight=self.config.predictor.recommend_weight,
            predict_depth=self.config.predictor.recommend_depth,
        )

    def blend_predictor(self) -> Predictor | None:
        """The behaviour predictor when ``[predictor] recommend_weight`` > 0 asks ``recommend`` to blend in
        expected ratings (a warning, and None, when it is not trained)."""
        if self.config.predictor.recommend_weight <= 0.0:
            return None
        if not self.models_dir("predictor").exists():
            self._warn_once(
                "[predictor] recommend_weight is set but there is no predictor: run 'twostage train predictor'"
            )
            return None
        return self.predictor()

    def user_ratings(self, split: str | None = None) -> dict[str, dict[str, float]]:
        """Each user's ratings as of ``split``'s cut-offs (all when None): the expected-rating blend's context."""
        from twostage.outcomes import user_ratings

        rating_event = self.config.relevance.rating_event
        return self._memo.get(("ratings", split), lambda: user_ratings(self.store, split, rating_event))

    def pipeline(self, split: str | None = None, *, all_counts: bool = False) -> Pipeline:
        """The project's models, index and settings, reading the log as of ``split`` (see :meth:`counted`)."""
        reranker, learned = self.reranker(), self.learned_ranker()
        if reranker is None and self.config.reranker.cowatch_weight and self.config.reranker.enabled:
            self._warn_once(
                "[reranker] cowatch_weight is set but there is no reranker: co-watch scores are fused in "
                "stage 2, which needs a trained reranker (twostage train reranker)"
            )
        settings = self.settings(with_reranker=reranker is not None, learned=learned)
        pipe = Pipeline(
            encoder=self.retriever(),
            index=self.index(),
            catalogue=self.catalogue(),
            text=self.config.text,
            settings=settings,
            reranker=reranker,
            lexical=self.lexical_channel(settings.lexical_weight),
            learned=learned,
            predictor=self.blend_predictor(),
        )
        return self.counted(pipe, split, all_counts=all_counts)

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            logger.warning(message)

    def counted(self, pipe: Pipeline, split: str | None = None, *, all_counts: bool = False) -> Pipeline:
        """``pipe`` reading the log as of ``split``'s cut-offs (a recommendation split; otherwise, and when None,
        every event): what its settings use of popularity, co-watch lists and stage-2 texts. ``all_counts``
        counts everything even when unused (training a reranker, tuning settings)."""
        at, settings, learned = self._at(split), pipe.settings, pipe.learned
        reads = set(learned.features) if learned is not None else set()
        stage2 = all_counts or pipe.reranker is not None
        cowatch = (
            all_counts
            or (stage2 and settings.cowatch_weight > 0)
            or bool(reads & {"cowatch", "cowatch_recency"})
        )
        popularity = all_counts or settings.popularity_weight > 0
        items = all_counts or settings.items_weight > 0 or bool(reads & {"items", "popularity"})
        return pipe.replace(
            counts=LogCounts(
                popularity=self.popularity(at) if popularity else {},
                cowatched=self.cowatch_lists(at) if cowatch else {},
                rerank_texts=self.rerank_texts(at) if stage2 else None,
                items=self.item_model(at) if items else None,
                ratings=self.user_ratings(at)
                if pipe.predictor is not None and settings.predict_weight > 0
                else None,
            )
        )

    def zero_shot(self) -> Pipeline | None:
        """The untuned base bi-encoder over an exact index, served as stage 1 is (same depth and MMR, no
        popularity prior): what fine-tuning has to beat. None when the project has no fine-tuned retriever,
        since stage 1 then is the base model."""
        from twostage.index import IndexSpec, VectorIndex

        if not self.models_dir("retriever").exists():
            return None
        base = self.retriever(base=True)
        ids, vecs = self.item_vectors(base)
        index = VectorIndex.build(ids, vecs, IndexSpec(factory="Flat"), model_fingerprint=base.fingerprint)
        settings = dataclasses.replace(self.settings(with_reranker=False), popularity_weight=0.0)
        return Pipeline(
            encoder=base,
            index=index,
            catalogue=self.catalogue(),
            text=self.config.text,
            settings=settings,
            lexical=self.lexical_channel(settings.lexical_weight),  # only the bi-encoder differs
        )
