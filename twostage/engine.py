"""The Engine facade: the library API of twostage, and the only thing the CLI calls.

A project is a directory: ``twostage.toml`` (config), ``twostage.duckdb`` (store), ``models/`` (fine-tuned
models), ``indexes/`` (FAISS artifacts) and ``cache/`` (item embeddings).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twostage.config import CONFIG_FILE, DEFAULT_TOML, Config, load_config
from twostage.errors import NotFoundError, TwostageError
from twostage.store import IngestReport, Store

logger = logging.getLogger(__name__)

STORE_FILE = "twostage.duckdb"


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
        return self.store.ingest(path, kind, **options)

    def load_dataset(self, layout: str, path: str | Path | None = None) -> list[IngestReport]:
        """Ingest a known layout: ``movielens`` or ``beir`` folder, or the bundled ``sample``."""
        from twostage.datasets import LOADERS

        if layout not in LOADERS:
            raise TwostageError(f"unknown dataset layout '{layout}'; use one of {', '.join(LOADERS)}")
        if path is None and layout != "sample":
            raise TwostageError(f"the {layout} layout needs a PATH to its folder")
        return LOADERS[layout](self.store, path)

    def split(self, strategy: str | None = None, *, name: str | None = None) -> dict[str, int]:
        """Make the train/valid/test split (config ``[split]``, or ``strategy`` to override it)."""
        config = self.config if strategy is None else self.config.replace({"split.strategy": strategy})
        return self.store.split(config.split, config.relevance, name=name)

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
