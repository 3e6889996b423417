"""Index build configs: which FAISS factory to build and how to train and search it.

A build config is data a user names (``ivf``) or writes (``indexes/ivf.toml``); it is validated once, here,
before any vectors exist, so a typo fails fast with a suggestion rather than deep inside FAISS. Kept apart
from :mod:`twostage.index`, which owns the vectors, so the config has no FAISS or NumPy dependency and the
index module stays about one thing. :mod:`twostage.index` re-exports everything public here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tomllib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twostage.errors import ConfigError, NotFoundError, did_you_mean

# The bundled build configs. ``indexes/<name>.toml`` in the repository holds the same values for users to read
# and copy (a test keeps the two equal); keeping them in code means an installed package needs no data files.
# The non-flat search params reach recall@100 >= 0.95 against exact search both on clustered synthetic
# vectors (tests/test_index.py) and on real MiniLM embeddings of SciFact (tools/bench/bench_ann.py, where
# nprobe 32 gave only 0.92), with a margin.
BUILTIN_SPECS: dict[str, dict[str, Any]] = {
    "flat": {"factory": "Flat"},
    "hnsw": {"factory": "HNSW32", "ef_construction": 80, "ef_search": 256},
    "ivf": {"factory": "IVF{nlist},Flat", "nprobe": 64},
    "ivfpq": {"factory": "IVF{nlist},PQ{pq_m}x4fs,RFlat", "nprobe": 64, "k_factor": 16},
}


@dataclass(frozen=True)
class IndexSpec:
    """How to build and search one index: a FAISS factory string plus training and search parameters.

    ``factory`` may hold two placeholders filled at build time: ``{nlist}`` (IVF lists; default
    ``round(4 * sqrt(n))``, capped so each list gets >= 39 training vectors) and ``{pq_m}`` (PQ
    sub-quantizers; default the largest divisor of dim <= dim / 8, i.e. 48 for 384-d).

    Attributes:
        factory: FAISS ``index_factory`` string, e.g. ``"Flat"``, ``"HNSW32"``, ``"IVF{nlist},Flat"``.
        metric: ``"ip"`` (inner product; cosine on normalised vectors) or ``"l2"`` (score = -distance).
        normalize: L2-normalise item and query vectors (copies; the caller's arrays are untouched).
        train_size: at most this many vectors (a seeded random sample) train IVF/PQ quantizers.
        seed: seed of that sample.
        nlist, pq_m: fixed values for the placeholders (``None``: derived from the data as above).
        nprobe: IVF lists visited per query.
        ef_search: HNSW candidate-list size at search time (FAISS uses ``max(ef_search, depth)``).
        ef_construction: HNSW candidate-list size while adding.
        k_factor: refinement (``RFlat``): the base index returns ``k_factor * depth`` candidates that are
            rescored exactly.
    """

    factory: str = "Flat"
    metric: str = "ip"
    normalize: bool = True
    train_size: int = 100_000
    seed: int = 0
    nlist: int | None = None
    pq_m: int | None = None
    nprobe: int | None = None
    ef_search: int | None = None
    ef_construction: int | None = None
    k_factor: int | None = None

    def __post_init__(self) -> None:
        if self.metric not in ("ip", "l2"):
            raise ConfigError(f"unknown metric {self.metric!r}; use 'ip' or 'l2'", key="metric")
        if not self.factory.strip():
            raise ConfigError("empty factory string; e.g. 'Flat' or 'HNSW32'", key="factory")
        for key in ("train_size", "nlist", "pq_m", "nprobe", "ef_search", "ef_construction", "k_factor"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"expected a positive integer, got {value!r}", key=key)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | None = None) -> IndexSpec:
        """A validated spec from a mapping (parsed TOML); unknown keys raise ConfigError with a suggestion."""
        hints = typing.get_type_hints(cls)
        for key, value in data.items():
            where = f"{source}:{key}" if source else key
            if key not in hints:
                raise ConfigError("unknown index setting", key=where, suggestion=did_you_mean(key, hints))
            hint = hints[key]
            allowed = typing.get_args(hint) or (hint,)
            ok = any(
                (t is type(None) and value is None)
                or (t is int and isinstance(value, int) and not isinstance(value, bool))
                or (t in (str, bool) and isinstance(value, t))
                for t in allowed
            )
            if not ok:
                raise ConfigError(f"expected {hint}, got {value!r}", key=where)
        try:
            return cls(**data)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}" if source else str(e)) from e

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> IndexSpec:
        """Read a build config such as ``indexes/ivf.toml`` (top-level keys = the attributes above)."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise NotFoundError(
                f"index config not found: {path}; check the path or use a bundled name"
            ) from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML ({e}); fix the file") from e
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """A short stable hash of every setting (stored in the manifest)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def search_params(self) -> dict[str, int]:
        """The search-time settings that are set, by FAISS ParameterSpace name."""
        pairs = (("nprobe", self.nprobe), ("efSearch", self.ef_search), ("k_factor_rf", self.k_factor))
        return {name: value for name, value in pairs if value is not None}

    def resolve_factory(self, *, n_train: int, dim: int) -> str:
        """The concrete factory string for ``n_train`` training vectors of ``dim`` dimensions."""
        nlist = self.nlist or max(1, min(round(4 * math.sqrt(n_train)), n_train // 39))
        pq_m = self.pq_m or max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)
        try:
            return self.factory.format(nlist=nlist, pq_m=pq_m)
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(
                f"bad placeholder in {self.factory!r} ({e}); only {{nlist}} and {{pq_m}} exist", key="factory"
            ) from e


def load_spec(
    name_or_path: str | os.PathLike[str], *, dirs: Sequence[str | os.PathLike[str]] = ()
) -> IndexSpec:
    """Resolve a build config by name or path.

    A path to a ``.toml`` file is read directly. A bare name is looked up as ``<dir>/<name>.toml`` in ``dirs``
    (e.g. a project's own ``indexes/``), then among the bundled configs ``flat``, ``hnsw``, ``ivf``,
    ``ivfpq`` (:data:`BUILTIN_SPECS`, mirrored by the repository's ``indexes/*.toml``).

    Example:
        >>> load_spec("ivf").nprobe
        64

    Raises:
        NotFoundError: an unknown name (with a suggestion) or a missing file.
        ConfigError: a bad setting in the file.
    """
    text = os.fspath(name_or_path)
    if text.endswith(".toml") or os.sep in text or Path(text).is_file():
        return IndexSpec.from_toml(text)
    for folder in dirs:
        candidate = Path(folder) / f"{text}.toml"
        if candidate.is_file():
            return IndexSpec.from_toml(candidate)
    if text in BUILTIN_SPECS:
        return IndexSpec.from_dict(BUILTIN_SPECS[text], source=f"builtin:{text}")
    hint = did_you_mean(text, BUILTIN_SPECS)
    raise NotFoundError(
        f"no index config named {text!r}; use one of {sorted(BUILTIN_SPECS)} or a path to a .toml file"
        + (f" (did you mean '{hint}'?)" if hint else "")
    )
