"""The Engine facade: the library API of twostage, and the only thing the CLI calls.

A project is a directory: ``twostage.toml`` (config), ``twostage.duckdb`` (store), ``models/`` (fine-tuned
models), ``indexes/`` (FAISS artifacts) and ``cache/`` (item embeddings).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twostage.config import CONFIG_FILE, DEFAULT_TOML, Config, load_config
from twostage.errors import NotFoundError, TwostageError
from twostage.requests import Catalogue, Request, live_user_request
from twostage.results import Hit, Ranking
from twostage.store import IngestReport, Store

if TYPE_CHECKING:
    from twostage.encoders import BiEncoder
    from twostage.evaluate import EvalReport
    from twostage.index import VectorIndex
    from twostage.pipeline import Pipeline
    from twostage.rerank import Reranker

logger = logging.getLogger(__name__)

STORE_FILE = "twostage.duckdb"
DEPTH_GRID = (10, 15, 20, 30, 50, 75, 100, 150, 200)  # rerank depths tried on validation
DEPTH_TOLERANCE = 0.01  # share of nDCG@10 a shallower rerank may lose and still count as "no loss"
FUSION_GRID = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)  # stage-1 weights tried on validation
COWATCH_GRID = (0.0, 0.25, 0.5, 1.0, 2.0)  # co-watch weights tried on validation (recommendation)


class Engine:
    """One project: its config, store, models and indexes.

    Example:
        >>> engine = Engine.init("/tmp/my-project")      # doctest: +SKIP
        >>> engine.load_dataset("sample")                  # doctest: +SKIP
        >>> engine.split()                                 # doctest: +SKIP
    """

    def __init__(self, project_dir: str | Path, config: Config, *, progress: bool = False):
        self.project_dir = Path(project_dir)
        self.config = config
        self.progress = progress
        self._store: Store | None = None
        self._lock = threading.RLock()
        self._catalogue: Catalogue | None = None
        self._encoders: dict[str, BiEncoder] = {}
        self._rerankers: dict[str, Reranker] = {}
        self._indexes: dict[str, VectorIndex] = {}
        self._pipeline: Pipeline | None = None
        self._reranker_record: dict[str, Any] | None = None
        self._rerank_texts: dict[str | None, dict[str, str]] = {}
        self._cowatch_lists: dict[str | None, dict[str, list[str]]] = {}

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        project_dir: str | Path = ".",
        *,
        overrides: Mapping[str, Any] | None = None,
        progress: bool = False,
    ) -> Engine:
        """Open an existing project (a directory with ``twostage.toml`` or a store)."""
        root = Path(project_dir)
        if not (root / CONFIG_FILE).exists() and not (root / STORE_FILE).exists():
            raise NotFoundError(f"{root}: not a twostage project; create one with 'twostage init {root}'")
        config = load_config(root)
        if overrides:
            config = config.replace(overrides)
        return cls(root, config, progress=progress)

    @classmethod
    def init(cls, project_dir: str | Path, *, progress: bool = False) -> Engine:
        """Create a project directory with a commented default ``twostage.toml`` and an empty store."""
        root = Path(project_dir)
        root.mkdir(parents=True, exist_ok=True)
        if not (root / CONFIG_FILE).exists():
            (root / CONFIG_FILE).write_text(DEFAULT_TOML, encoding="utf-8")
        engine = cls(root, load_config(root), progress=progress)
        engine.store  # noqa: B018  (creates the schema)
        return engine

    @property
    def store(self) -> Store:
        with self._lock:
            if self._store is None:
                self._store = Store(self.project_dir / STORE_FILE)
            return self._store

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ data
    def ingest(self, path: str | Path, kind: str, **options: Any) -> IngestReport:
        """Ingest one file; see :meth:`twostage.store.Store.ingest` for the options."""
        report = self.store.ingest(path, kind, **options)
        self._forget_items()
        return report

    def load_dataset(self, layout: str, path: str | Path | None = None) -> list[IngestReport]:
        """Ingest a known layout: ``movielens`` or ``beir`` folder, or the bundled ``sample``."""
        from twostage.datasets import LOADERS

        if layout not in LOADERS:
            raise TwostageError(f"unknown dataset layout '{layout}'; use one of {', '.join(LOADERS)}")
        if path is None and layout != "sample":
            raise TwostageError(f"the {layout} layout needs a PATH to its folder")
        reports = LOADERS[layout](self.store, path)
        self._forget_items()
        return reports

    def _forget_items(self) -> None:
        with self._lock:
            self._catalogue = None
            self._pipeline = None
            self._rerank_texts.clear()
            self._cowatch_lists.clear()

    def split(self, strategy: str | None = None, *, name: str | None = None) -> dict[str, int]:
        """Make the train/valid/test split (config ``[split]``, or ``strategy`` to override it)."""
        config = self.config if strategy is None else self.config.replace({"split.strategy": strategy})
        made = self.store.split(config.split, config.relevance, name=name)
        with self._lock:  # lists counted before the old cut-offs would leak or miss events
            self._rerank_texts.clear()
            self._cowatch_lists.clear()
        return made

    def stats(self) -> dict[str, Any]:
        return self.store.stats()

    def sql(self, query: str) -> tuple[list[str], list[tuple]]:
        """Run SQL against the project's store (results, metrics and logs stay queryable)."""
        return self.store.sql(query)

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

    # ------------------------------------------------------------------ models and index
    def models_dir(self, which: str) -> Path:
        return self.project_dir / "models" / which

    def catalogue(self) -> Catalogue:
        """All items with their texts (item template), loaded once per engine."""
        with self._lock:
            if self._catalogue is None:
                catalogue = Catalogue.from_store(self.store, self.config.text.item_template)
                if not len(catalogue):
                    raise NotFoundError("the store has no items; ingest items first")
                text, rerank_template = self.config.text, self.config.reranker.item_template
                catalogue.check_templates(
                    {
                        "text.item_template": text.item_template,
                        "text.history_item_template": text.history_item_template,
                        **(
                            {"reranker.item_template": rerank_template} if rerank_template is not None else {}
                        ),
                    }
                )
                self._catalogue = catalogue
            return self._catalogue

    def _rerank_template(self) -> str:
        return self.config.reranker.item_template or self.config.text.item_template

    def _reads_cowatched(self) -> bool:
        from twostage.cowatch import FIELD
        from twostage.text import template_fields

        return FIELD in template_fields(self._rerank_template())

    def cowatch_lists(
        self, split: str | None = None, *, exclude_users: Iterable[str] = ()
    ) -> dict[str, list[str]]:
        """Each item's ``[reranker] cowatched_size`` most co-watched items, counted from the events before
        ``split``'s cut-offs (all events when None), leaving out ``exclude_users`` (training folds; not cached)."""
        from twostage.cowatch import co_watched

        exclude = frozenset(exclude_users)

        def count() -> dict[str, list[str]]:
            top = self.config.reranker.cowatched_size
            return co_watched(self.store, top=top, split=split, exclude_users=exclude)

        if exclude:
            return count()
        with self._lock:
            if split not in self._cowatch_lists:
                self._cowatch_lists[split] = count()
            return self._cowatch_lists[split]

    def rerank_texts(self, split: str | None = None, *, exclude_users: Iterable[str] = ()) -> dict[str, str]:
        """The item texts stage 2 reads (``[reranker] item_template``).

        With ``{cowatched}`` the lists are those of :meth:`cowatch_lists` for ``split`` and ``exclude_users``
        (training folds; not cached).
        """
        exclude = frozenset(exclude_users)
        cowatched = self._reads_cowatched()
        key = split if cowatched else None  # without the field the texts do not depend on the split

        def render() -> dict[str, str]:
            lists = self.cowatch_lists(split, exclude_users=exclude) if cowatched else None
            return self.catalogue().texts_with(self._rerank_template(), lists)

        if exclude and cowatched:
            return render()
        with self._lock:
            if key not in self._rerank_texts:
                self._rerank_texts[key] = render()
            return self._rerank_texts[key]

    def retriever(self, *, base: bool = False) -> BiEncoder:
        """The bi-encoder: the project's fine-tuned one when it exists (unless ``base``), else the configured model."""
        from twostage.encoders import BiEncoder

        trained = self.models_dir("retriever")
        source = str(trained) if trained.exists() and not base else self.config.retriever.model
        with self._lock:
            if source not in self._encoders:
                self._encoders[source] = BiEncoder(
                    None if source == "default" else source,
                    max_seq_length=self.config.retriever.max_seq_length,
                    batch_size=self.config.retriever.batch_size,
                )
            return self._encoders[source]

    def reranker(self, *, base: bool = False) -> Reranker | None:
        """The cross-encoder: the project's trained one, or a configured non-default model; None if neither.

        The default base has an untrained head, so it is only used when asked for with ``base=True``.
        """
        from twostage.rerank import Reranker

        cfg = self.config.reranker
        trained = self.models_dir("reranker")
        if base:
            source = cfg.model
        elif trained.exists():
            source = str(trained)
        elif cfg.model != "default":
            source = cfg.model
        else:
            return None
        with self._lock:
            if source not in self._rerankers:
                self._rerankers[source] = Reranker(
                    None if source == "default" else source,
                    max_length=cfg.max_length,
                    batch_size=cfg.batch_size,
                )
            return self._rerankers[source]

    def index_dir(self, name: str | None = None) -> Path:
        return self.project_dir / "indexes" / (name or self.config.index.name)

    def _index_expect(self, encoder: BiEncoder) -> dict[str, Any]:
        return {
            "model_fingerprint": encoder.fingerprint,
            "dim": encoder.dim,
            "text_fingerprint": self._text_fingerprint(),
        }

    def _text_fingerprint(self) -> str:
        """What item vectors depend on in ``[text]``: the item template only (user settings do not)."""
        import hashlib

        template = self.config.text.item_template
        return hashlib.sha256(f"item_template={template}".encode()).hexdigest()[:16]

    def item_vectors(self, encoder: BiEncoder, item_ids: list[str] | None = None) -> tuple[list[str], Any]:
        """Embeddings of catalogue items, through the project's embedding cache (only changed texts re-encode)."""
        from twostage.encoders import EmbeddingCache, encode_cached

        catalogue = self.catalogue()
        ids = item_ids if item_ids is not None else catalogue.item_ids
        cache = EmbeddingCache(self.project_dir / "cache" / "embeddings")
        vecs = encode_cached(encoder, [catalogue.text(i) for i in ids], cache, progress=self.progress)
        return ids, vecs

    def build_index(self, name: str | None = None, *, build: str | None = None) -> dict[str, Any]:
        """Encode every item with the current bi-encoder and write a FAISS index atomically; returns its manifest."""
        from twostage.index import VectorIndex, load_spec

        encoder = self.retriever()
        ids, vecs = self.item_vectors(encoder)
        spec = load_spec(build or self.config.index.build, dirs=[self.project_dir / "indexes"])
        index = VectorIndex.build(
            ids,
            vecs,
            spec,
            model_fingerprint=encoder.fingerprint,
            text_fingerprint=self._text_fingerprint(),
            use_gpu=self.config.index.use_gpu,
            progress=self.progress,
        )
        index.save(self.index_dir(name))
        with self._lock:
            self._indexes.pop(str(self.index_dir(name)), None)
            self._pipeline = None
        return dict(index.manifest)

    def update_index(
        self, item_ids: list[str] | None = None, *, remove: list[str] | None = None, name: str | None = None
    ) -> dict[str, Any]:
        """Add or re-encode ``item_ids`` and drop ``remove``, without a full rebuild. With ``item_ids`` None,
        every item missing from the index or whose text changed since it was indexed.

        Copy-on-write: a private copy is changed and saved, then swapped in, so searches running in other
        threads never see a half-updated index.
        """
        from twostage.index import VectorIndex

        path = self.index_dir(name)
        if not path.exists():
            raise NotFoundError(f"no index at {path}; build one with 'twostage index build'")
        encoder = self.retriever()
        index = VectorIndex.load(path, expect=self._index_expect(encoder))
        catalogue = self.catalogue()
        if remove:
            index.remove(remove)
        if item_ids is None:
            ids, vecs = self._stale_vectors(encoder, index, skip=set(remove or ()))
        else:
            unknown = [i for i in item_ids if i not in catalogue]
            if unknown:
                raise NotFoundError(f"unknown item_id '{unknown[0]}'; ingest it first")
            ids, vecs = self.item_vectors(encoder, item_ids) if item_ids else ([], None)
        if ids:
            index.upsert(ids, vecs)
            logger.info("index: %d items added or re-encoded", len(ids))
        index.save(path)
        with self._lock:
            self._indexes[str(path)] = index
            self._pipeline = None
        return dict(index.manifest)

    def _stale_vectors(
        self, encoder: BiEncoder, index: VectorIndex, *, skip: set[str] = frozenset()
    ) -> tuple[list[str], Any]:
        """Items missing from ``index`` or whose text changed since they were indexed, with their vectors.

        Every item goes through the embedding cache, so only new and changed texts are encoded; a changed
        text shows as a vector that differs from the indexed one.
        """
        import numpy as np

        ids, vecs = self.item_vectors(encoder, [i for i in self.catalogue().item_ids if i not in skip])
        present = [n for n, i in enumerate(ids) if i in index]
        stale = sorted(set(range(len(ids))) - set(present))
        if present:
            indexed = index.vectors([ids[n] for n in present])
            moved = np.abs(indexed - vecs[present]).max(axis=1) > 1e-3
            stale = sorted(stale + [present[j] for j in np.flatnonzero(moved)])
        return [ids[n] for n in stale], vecs[stale]

    def index(self, name: str | None = None) -> VectorIndex:
        """The saved index, checked against the current bi-encoder and text config."""
        from twostage.index import VectorIndex

        path = self.index_dir(name)
        key = str(path)
        with self._lock:
            if key not in self._indexes:
                if not path.exists():
                    raise NotFoundError(f"no index at {path}; build one with 'twostage index build'")
                self._indexes[key] = VectorIndex.load(path, expect=self._index_expect(self.retriever()))
            return self._indexes[key]

    def pipeline(self) -> Pipeline:
        """Recall + rerank with the project's current models and index (built once, shared by threads)."""
        from twostage.pipeline import Pipeline

        with self._lock:
            if self._pipeline is None:
                reranker = self.reranker()
                cowatch_weight = self.cowatch_weight() if reranker is not None else 0.0
                if reranker is None and self.config.reranker.cowatch_weight:
                    logger.warning(
                        "[reranker] cowatch_weight is set but there is no reranker: co-watch scores are fused "
                        "in stage 2, which needs a trained reranker (twostage train reranker)"
                    )
                self._pipeline = Pipeline(
                    encoder=self.retriever(),
                    index=self.index(),
                    catalogue=self.catalogue(),
                    reranker=reranker,
                    rerank_texts=self.rerank_texts() if reranker is not None else None,
                    fusion_weight=self.fusion_weight(),
                    cowatched=self.cowatch_lists() if cowatch_weight > 0 else None,
                    cowatch_weight=cowatch_weight,
                    history_size=self.config.text.history_size,
                    popularity=self.store.popularity()
                    if self.config.retriever.popularity_weight > 0
                    else None,
                    popularity_weight=self.config.retriever.popularity_weight,
                )
            return self._pipeline

    # ------------------------------------------------------------------ serving
    def search(self, text: str, k: int = 10, *, stage: str = "rerank", explain: bool = False) -> Ranking:
        """Answer a text query with both stages (``stage="recall"`` stops after stage 1).

        Example:
            >>> engine.search("protein folding in yeast", k=5).hits[0].item_id  # doctest: +SKIP
        """
        if not isinstance(text, str) or not text.strip():
            raise TwostageError("empty query; give some text to search for")
        return self._serve(Request("query", text.strip()), k, stage=stage, explain=explain, diversify=None)

    def recommend(
        self,
        user_id: str,
        k: int = 10,
        *,
        stage: str = "rerank",
        explain: bool = False,
        diversify: float | None = None,
    ) -> Ranking:
        """Recommend items for a known user from their history (items they have are never returned).

        Args:
            user_id: a user with events in the store.
            k: number of items.
            stage: "rerank" (both stages) or "recall" (stage 1 only).
            explain: attach to each hit the history items that drove it (leave-one-out on the context).
            diversify: MMR λ in [0, 1] (1 = no diversification); None uses the config's ``reranker.mmr_lambda``.
        """
        if diversify is not None and not 0.0 <= diversify <= 1.0:
            raise TwostageError(f"diversify is an MMR λ in [0, 1] (1 = none), got {diversify}")
        request = live_user_request(
            self.store,
            self.catalogue(),
            self.config.text,
            str(user_id),
            exclude_seen=self.config.index.exclude_seen,
        )
        lam = self.config.reranker.mmr_lambda if diversify is None else diversify
        return self._serve(request, k, stage=stage, explain=explain, diversify=lam)

    def _serve(
        self, request: Request, k: int, *, stage: str, explain: bool, diversify: float | None
    ) -> Ranking:
        if k < 1:
            raise TwostageError(f"k must be at least 1, got {k}")
        if stage not in ("recall", "rerank"):
            raise TwostageError(f"unknown stage '{stage}'; use 'recall' or 'rerank'")
        pipe = self.pipeline()
        catalogue = self.catalogue()
        depth = max(self.config.index.depth, k)
        candidates = pipe.recall([request], depth)[0]
        recall_scores = dict(candidates)
        # stage 2 runs when it can change the order; the cross-encoder only when its weight is above 0
        use_stage2 = stage == "rerank" and pipe.reorders(request)
        use_rerank = use_stage2 and pipe.runs_reranker
        if use_stage2:
            rerank_depth = max(self.rerank_depth(), k)
            reranked = pipe.rerank([request], [candidates], rerank_depth)[0]
            ordered = [(h.item_id, h.score, h.rerank_score if use_rerank else None) for h in reranked]
        else:
            ordered = [(i, s, None) for i, s in candidates]
        if diversify is not None and diversify < 1.0 and len(ordered) > k:
            ordered = self._diversify(ordered, k, diversify)
        ordered = ordered[:k]
        explanations = self._explain(pipe, request, ordered, use_rerank, use_stage2) if explain else {}
        hits = tuple(
            Hit(
                item_id=i,
                score=float(s),
                rank=n,
                stage="rerank" if use_stage2 else "recall",
                title=catalogue.title(i),
                recall_score=float(recall_scores.get(i, float("nan"))),
                rerank_score=None if r is None else float(r),
                explanation=explanations.get(i),
            )
            for n, (i, s, r) in enumerate(ordered, start=1)
        )
        return Ranking(request.request_id, request.text, hits)

    def _diversify(self, ordered: list[tuple[str, float, float | None]], k: int, lam: float) -> list:
        import numpy as np

        from twostage.rerank import mmr

        vecs = self.index().vectors([i for i, _, _ in ordered])
        picked = mmr(vecs, np.asarray([s for _, s, _ in ordered], dtype=np.float32), k=k, lam=lam)
        return [ordered[p] for p in picked]

    def _explain(
        self, pipe: Pipeline, request: Request, ordered: list, use_rerank: bool, use_stage2: bool
    ) -> dict[str, dict[str, Any]]:
        from twostage.explain import explain_hits

        ids = [i for i, _, _ in ordered]
        cowatch = use_stage2 and pipe.cowatch_weight > 0
        return explain_hits(self, pipe, request, ids, use_rerank=use_rerank, cowatch=cowatch)

    # ------------------------------------------------------------------ training
    def _record_run(self, kind: str, fingerprint: str | None, extra: dict[str, Any] | None = None) -> str:
        return self.store.new_run(kind, {**self.config.to_dict(), **(extra or {})}, fingerprint)

    def _replace_model_dir(self, which: str, trained: Path) -> Path:
        """Move a freshly trained model into place atomically (old one aside, new one in, old one removed)."""
        import shutil

        target = self.models_dir(which)
        old = target.with_name(target.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            target.rename(old)
        trained.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        with self._lock:
            self._encoders.clear()
            self._rerankers.clear()
            self._indexes.clear()
            self._pipeline = None
            self._reranker_record = None
        logger.info("%s saved to %s", which, target)
        return target

    def train_retriever(self, *, split: str | None = None) -> Any:
        """Fine-tune the bi-encoder on the train side of a split (MultipleNegativesRankingLoss, early stopping
        on validation recall@K); saves it as the project's retriever. Rebuild the index afterwards."""
        import tempfile

        from twostage.train.examples import retriever_pairs, validation_set
        from twostage.train.retriever import train_retriever

        split = split or self.default_split()
        cfg = self.config.retriever
        catalogue = self.catalogue()
        pairs = retriever_pairs(self.store, catalogue, self.config, split=split)
        val = validation_set(self.store, catalogue, self.config, split=split, max_requests=cfg.eval_requests)
        self.models_dir("retriever").parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".retriever-", dir=self.models_dir("retriever").parent))
        result = train_retriever(
            pairs,
            output_dir=work / "model",
            base_model=None if cfg.model == "default" else cfg.model,
            val_queries={r.request_id: r.text for r in val.requests} or None,
            val_corpus=_validation_corpus(catalogue.texts, val.relevant, cfg.eval_corpus, cfg.seed)
            if val.requests
            else None,
            val_relevant={q: set(rel) for q, rel in val.relevant.items()} if val.requests else None,
            epochs=cfg.epochs,
            batch_size=cfg.train_batch_size,
            learning_rate=cfg.learning_rate,
            warmup_ratio=cfg.warmup_ratio,
            hard_negatives=cfg.hard_negatives,
            negative_corpus=list(catalogue.texts.values()) if cfg.hard_negatives else None,
            eval_k=cfg.eval_k,
            patience=cfg.patience,
            max_seq_length=cfg.max_seq_length,
            seed=cfg.seed,
            progress=self.progress,
        )
        target = self._replace_model_dir("retriever", work / "model")
        work.rmdir()
        self._record_run(
            "train-retriever",
            result.fingerprint,
            {"split": split, "pairs": len(pairs), "metrics": dict(result.metrics)},
        )
        return _with_path(result, target)

    def _tuned(self, key: str) -> Any:
        """A serving setting chosen on validation when the project's reranker was trained, else None.

        The reranker's ``training.json`` is read once (serving asks on every request) and forgotten when a
        new reranker is moved into place.
        """
        with self._lock:
            if self._reranker_record is None:
                record = self.models_dir("reranker") / "training.json"
                self._reranker_record = json.loads(record.read_text()) if record.exists() else {}
            return self._reranker_record.get(key)

    def fusion_weight(self) -> float:
        """The configured fusion weight, else the one tuned when the project's reranker was trained, else 0."""
        if self.config.reranker.fusion_weight is not None:
            return self.config.reranker.fusion_weight
        return float(self._tuned("fusion_weight") or 0.0)

    def cowatch_weight(self) -> float:
        """The configured co-watch weight, else the one tuned when the project's reranker was trained, else 0."""
        if self.config.reranker.cowatch_weight is not None:
            return self.config.reranker.cowatch_weight
        return float(self._tuned("cowatch_weight") or 0.0)

    def rerank_depth(self) -> int:
        """How many stage-1 candidates to rerank: ``reranker.serve_depth``, else the depth tuned at training
        (see :func:`shallowest_depth`), else ``reranker.depth``."""
        cfg = self.config.reranker
        if cfg.serve_depth is not None:
            return cfg.serve_depth
        tuned = self._tuned("rerank_depth")
        return min(int(tuned), cfg.depth) if tuned else cfg.depth

    def split_pipeline(self, split: str, pipeline: Pipeline | None = None) -> Pipeline:
        """The pipeline as it must run on a split: popularity and co-watch lists counted only from events
        before the cut-offs."""
        pipe = pipeline or self.pipeline()
        if self.store.require_split(split) != "user":
            return pipe
        if pipe.popularity_weight > 0:
            pipe = pipe.with_popularity(self.store.popularity(split))
        if pipe.reranker is not None and self._reads_cowatched():
            pipe = pipe.with_rerank_texts(self.rerank_texts(split))
        if pipe.reranker is not None and pipe.cowatch_weight > 0:
            pipe = pipe.with_cowatched(self.cowatch_lists(split))
        return pipe

    def tune_popularity_weight(
        self,
        *,
        split: str | None = None,
        grid: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2),
        k: int = 100,
    ) -> dict[str, Any]:
        """Pick the stage-1 popularity prior β on the validation part (highest Recall@k); returns the sweep.

        Set the result as ``[retriever] popularity_weight``. Only the validation part is used, so the test
        part stays untouched by the choice.
        """
        from twostage.metrics import mean_metric
        from twostage.requests import split_requests

        split = split or self.default_split()
        if self.store.require_split(split) != "user":
            raise TwostageError("the popularity prior applies to recommendation splits (users), not search")
        requests = split_requests(
            self.store,
            self.catalogue(),
            self.config.text,
            split=split,
            part="valid",
            exclude_seen=self.config.index.exclude_seen,
        )
        targets = self.store.targets(split, "valid")
        pipe = self.pipeline().with_popularity(self.store.popularity(split))
        judged = [targets[r.request_id] for r in requests]
        sweep = {}
        for beta in grid:
            lists = pipe.with_popularity(pipe.popularity, beta).recall(requests, k)
            sweep[beta] = mean_metric([[i for i, _ in hits] for hits in lists], judged, "recall", k)
        best = max(sweep, key=lambda b: (sweep[b], -b))
        return {"best": best, f"valid_recall@{k}": sweep}

    def _tune_serving(self, model_dir: Path, val: Any, split: str) -> dict[str, Any]:
        """Choose the fusion and co-watch weights, then the rerank depth, on the validation requests (nDCG@10).

        The candidates are scored once at ``reranker.depth``; each (weights, depth) setting only re-fuses
        them. Co-watch weights are tried on recommendation splits (queries have no history to overlap). The
        depth is :func:`shallowest_depth` of the sweep.
        """
        import numpy as np

        from twostage.metrics import mean_metric
        from twostage.pipeline import with_reranked_head
        from twostage.rerank import Candidate, Reranker, fuse

        cfg = self.config.reranker
        reranker = Reranker(str(model_dir), max_length=cfg.max_length, batch_size=cfg.batch_size)
        recommending = self.store.require_split(split) == "user"
        # the split's stage-2 texts even when the project has no reranker yet (the pipeline then has none)
        pipe = self.split_pipeline(split).with_rerank_texts(self.rerank_texts(split))
        if recommending:
            pipe = pipe.with_cowatched(self.cowatch_lists(split))
        stage1 = pipe.recall(val.requests, cfg.depth)
        lists = [
            [Candidate(i, pipe.rerank_text(i), s, len(pipe.watched_with(r, i))) for i, s in cands]
            for r, cands in zip(val.requests, stage1, strict=True)
        ]
        judged = [val.relevant[r.request_id] for r in val.requests]
        # a request with no positive among its candidates scores nDCG@10 = 0 whatever stage 2 does, so the
        # cross-encoder scores only the others (on next-item recommendation most requests are such)
        reachable = [_retrieved(cands, judged[n]) for n, cands in enumerate(stage1)]
        pairs = [
            (r.text, c.text)
            for r, cands, ok in zip(val.requests, lists, reachable, strict=True)
            if ok
            for c in cands
        ]
        scores = np.zeros(sum(len(c) for c in lists))
        if pairs:
            scores[np.repeat(reachable, [len(c) for c in lists])] = reranker.score(pairs)
        starts = np.cumsum([0] + [len(c) for c in lists])
        logger.info(
            "tuning stage 2 on %d validation requests (%d with a positive in reach)",
            len(lists),
            sum(reachable),
        )

        def ndcg10(weight: float, cowatch: float, depth: int) -> float:
            heads = [
                fuse(
                    head,
                    scores[start : start + len(head)],
                    k=depth,
                    fusion_weight=weight,
                    cowatch_weight=cowatch,
                )
                for start, head in zip(starts[:-1], (cands[:depth] for cands in lists), strict=True)
            ]
            final = with_reranked_head(stage1, heads)
            return mean_metric([[i for i, _ in hits] for hits in final], judged, "ndcg", 10)

        # a weight set in the config is the one served: only the other is searched
        fusion = FUSION_GRID if cfg.fusion_weight is None else (cfg.fusion_weight,)
        cowatch = (
            (COWATCH_GRID if cfg.cowatch_weight is None else (cfg.cowatch_weight,))
            if recommending
            else (0.0,)
        )
        grid = {(w, c): ndcg10(w, c, cfg.depth) for w in fusion for c in cowatch}
        # ties go to more cross-encoder (smaller w) and less co-watch
        best_w, best_c = max(grid, key=lambda wc: (grid[wc], -wc[0], -wc[1]))
        depths = {d: ndcg10(best_w, best_c, d) for d in sorted({*DEPTH_GRID, cfg.depth}) if d <= cfg.depth}
        chosen = shallowest_depth(depths, cfg.depth)
        return {
            "fusion_weight": best_w,
            "cowatch_weight": best_c,
            "weight_grid": [[w, c, v] for (w, c), v in grid.items()],
            "fusion_sweep": {w: v for (w, c), v in grid.items() if c == best_c},
            "cowatch_sweep": {c: v for (w, c), v in grid.items() if w == best_w},
            "rerank_depth": chosen,
            "depth_sweep": depths,
        }

    def tune_reranker(self, *, split: str | None = None) -> dict[str, Any]:
        """Choose the serving settings of the project's trained reranker again (fusion and co-watch weights,
        rerank depth) on the split's validation requests, without retraining; saved in its ``training.json``.

        For when the logs have grown (co-watch lists change) or another split is used.
        """
        from twostage.train.examples import validation_set

        split = split or self.default_split()
        model_dir = self.models_dir("reranker")
        record = model_dir / "training.json"
        if not record.exists():
            raise NotFoundError(f"no trained reranker at {model_dir}; run 'twostage train reranker' first")
        cfg = self.config.reranker
        val = validation_set(
            self.store, self.catalogue(), self.config, split=split, max_requests=cfg.eval_requests
        )
        if not val.requests:
            raise NotFoundError(f"split '{split}' has no validation requests to tune on")
        tuned = self._tune_serving(model_dir, val, split)
        staged = record.with_suffix(".json.tmp")
        staged.write_text(json.dumps({**json.loads(record.read_text()), **tuned}, indent=2))
        staged.replace(record)  # atomic: a serving process never reads half a file
        with self._lock:
            self._reranker_record = None
            self._pipeline = None
        self._record_run("tune-reranker", None, {"split": split, **tuned})
        return tuned

    def _candidate_lists(
        self, requests: list[Request], depth: int, split: str, texts: Mapping[str, str]
    ) -> list[list[tuple[str, str]]]:
        found = self.split_pipeline(split).recall(requests, depth, progress=self.progress)
        return [[(i, texts[i]) for i, _ in cands] for cands in found]

    def _training_groups(self, labelled: list[Any], split: str) -> list[tuple[dict[str, str], list[Any]]]:
        """The training requests grouped by the stage-2 item texts they read. With ``{cowatched}``, users are
        dealt into folds and a fold's requests read lists counted without its users: their own events would
        otherwise make a positive look co-watched with its history, a signal no held-out request has."""
        from twostage.cowatch import TRAIN_FOLDS, training_folds

        if not self._reads_cowatched() or self.store.require_split(split) != "user":
            return [(self.rerank_texts(split), labelled)]
        folds = training_folds([x.user_id for x in labelled], TRAIN_FOLDS, self.config.reranker.seed)
        return [
            (
                self.rerank_texts(split, exclude_users=[u for u, f in folds.items() if f == fold]),
                [x for x in labelled if folds[x.user_id] == fold],
            )
            for fold in sorted(set(folds.values()))
        ]

    def train_reranker(self, *, split: str | None = None) -> Any:
        """Fine-tune the cross-encoder listwise on stage-1 candidate lists (positives ensured in each list);
        early stopping on validation NDCG@10; saves it as the project's reranker."""
        import tempfile

        from twostage.train.examples import reranker_requests, validation_set
        from twostage.train.reranker import make_lists, train_reranker

        split = split or self.default_split()
        cfg = self.config.reranker
        catalogue = self.catalogue()
        labelled = reranker_requests(
            self.store,
            catalogue,
            self.config,
            split=split,
            max_requests=cfg.max_train_requests,
            seed=cfg.seed,
        )
        if not labelled:
            raise NotFoundError(f"split '{split}' gives no reranker training requests")
        window = max(cfg.depth, cfg.list_size)
        train_lists = []
        for texts, group in self._training_groups(labelled, split):
            reqs = [x.request for x in group]
            train_lists += make_lists(
                (
                    (r.text, c, x.positives)
                    for r, c, x in zip(
                        reqs, self._candidate_lists(reqs, window, split, texts), group, strict=True
                    )
                    if _retrieved(c, x.positives)
                ),
                list_size=cfg.list_size,
                item_texts=texts,
                sample_seed=cfg.seed if cfg.negatives == "sampled" else None,
            )
        if not train_lists:
            raise NotFoundError(
                f"stage 1 retrieves no training positive within depth {window}; raise reranker.depth"
            )
        val = validation_set(self.store, catalogue, self.config, split=split, max_requests=cfg.eval_requests)
        val_texts = self.rerank_texts(split)
        val_lists = (
            make_lists(
                (
                    (r.text, c, val.relevant[r.request_id])
                    for r, c in zip(
                        val.requests,
                        self._candidate_lists(val.requests, cfg.depth, split, val_texts),
                        strict=True,
                    )
                    if _retrieved(c, val.relevant[r.request_id])
                ),
                list_size=cfg.depth,
                item_texts=val_texts,
            )
            if val.requests
            else None
        )
        _warn_if_few("training lists", len(train_lists), len(labelled), window, "max_train_requests")
        if val.requests:
            _warn_if_few(
                "validation lists", len(val_lists or []), len(val.requests), cfg.depth, "eval_requests"
            )
        self.models_dir("reranker").parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".reranker-", dir=self.models_dir("reranker").parent))
        result = train_reranker(
            train_lists,
            output_dir=work / "model",
            base_model=None if cfg.model == "default" else cfg.model,
            val_lists=val_lists,
            loss=cfg.loss,
            epochs=cfg.epochs,
            batch_size=cfg.train_batch_size,
            learning_rate=cfg.learning_rate,
            warmup_ratio=cfg.warmup_ratio,
            max_length=cfg.max_length,
            patience=cfg.patience,
            seed=cfg.seed,
            lora=cfg.lora,
            progress=self.progress,
        )
        if val.requests:
            record = work / "model" / "training.json"
            data = {**json.loads(record.read_text()), **self._tune_serving(work / "model", val, split)}
            record.write_text(json.dumps(data, indent=2))
        target = self._replace_model_dir("reranker", work / "model")
        work.rmdir()
        self._record_run(
            "train-reranker",
            None,
            {"split": split, "lists": len(train_lists), "metrics": dict(result.metrics)},
        )
        return _with_path(result, target)

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
        """Evaluate baselines, stage 1 and the full pipeline on a held-out part, in one run.

        Every ranking is written to ``results`` and joined to the split's targets in DuckDB; per-request
        and mean metrics land in ``request_metrics``/``metrics``. Paired bootstrap comparisons are made of
        the pipeline against stage 1 and of stage 1 against each baseline. ``pipeline`` evaluates other
        models than the project's (e.g. an untrained reranker, for comparison).
        """
        from twostage.experiment import run_evaluation

        return run_evaluation(
            self,
            split=split or self.default_split(),
            part=part or self.config.eval.part,
            baselines=baselines,
            max_requests=max_requests if max_requests is not None else self.config.eval.max_requests,
            mmr_lambdas=mmr_lambdas,
            report=report,
            pipeline=pipeline,
        )


def shallowest_depth(ndcg_by_depth: Mapping[int, float], full: int) -> int:
    """The smallest rerank depth whose nDCG@10 is within ``DEPTH_TOLERANCE`` (relative) of reranking ``full``
    candidates: deeper reranking would cost time and buy nothing measurable. Relative, because nDCG@10 is
    0.7 on a search benchmark and 0.04 on next-item recommendation."""
    floor = ndcg_by_depth[full] * (1.0 - DEPTH_TOLERANCE)
    return min(d for d, v in ndcg_by_depth.items() if v >= floor)


def _validation_corpus(
    texts: Mapping[str, str], relevant: Mapping[str, Mapping[str, float]], size: int, seed: int
) -> dict[str, str]:
    """The items early stopping searches: every relevant item plus a seeded sample of the rest, up to ``size``.

    Encoding a large catalogue at every evaluation would cost more than the training steps themselves;
    recall against a few thousand distractors ranks checkpoints the same way.
    """
    import random

    keep = {i for rel in relevant.values() for i in rel if i in texts}
    rest = sorted(i for i in texts if i not in keep)
    extra = random.Random(seed).sample(rest, max(0, min(len(rest), size - len(keep))))
    return {i: texts[i] for i in sorted(keep | set(extra))}


# Below this many lists a listwise model, or the weights chosen on validation, rest on very little.
FEW_LISTS = 30


def _warn_if_few(what: str, kept: int, asked: int, depth: int, budget: str) -> None:
    """Say when reranker training or tuning runs on a handful of lists: a request only makes a list when
    stage 1 retrieves one of its positives within ``depth``, so few can survive a small budget."""
    if kept < FEW_LISTS:
        logger.warning(
            "reranker: only %d %s from %d requests (a request makes a list only when stage 1 retrieves one "
            "of its positives within its top %d); raise [reranker] %s or depth for results that rest on more",
            kept,
            what,
            asked,
            depth,
            budget,
        )


def _retrieved(candidates: list[tuple[str, Any]], positives: Mapping[str, float]) -> bool:
    """Whether stage 1 found at least one positive: only such lists teach the reranker what it will see,
    and only on such requests can stage 2 change nDCG@10."""
    ids = {i for i, _ in candidates}
    return any(g > 0 and i in ids for i, g in positives.items())


def _with_path(result: Any, path: Path) -> Any:
    import dataclasses

    return dataclasses.replace(result, model_path=path)
