"""FAISS candidate recall: build, search, update and persist the item-vector index.

Stage 1 must return the top-``depth`` items for many requests fast, follow catalog changes without a full
rebuild, and refuse to serve vectors from another model. FAISS ``index_factory`` strings choose the engine
(``Flat``, ``HNSW32``, ``IVF{nlist},Flat``, ``IVF{nlist},PQ{pq_m}x4fs,RFlat`` ...); this module adds what FAISS
leaves to the caller: string item ids, exclusion of already-seen items, updates for every index type,
an atomic on-disk format with a manifest, and checks on load.

Layout of a saved index directory (``indexes/<name>/``):

- ``index.faiss``: the FAISS index (always the CPU version), written by ``faiss.write_index``.
- ``ids``: row → item_id, JSON Lines: line ``r`` (0-based) is the JSON string of the item at FAISS label
  ``r``, or ``null`` for a free row (left by a removal, reused by the next add). JSON keeps arbitrary item
  ids (newlines, quotes) safe.
- ``vectors.npy``: the (normalised) item vectors by row, float32. They make removal possible for index types
  FAISS cannot delete from, and serve :meth:`VectorIndex.vectors` (MMR, diversity) without re-encoding.
  Loaded memory-mapped, so they cost disk rather than RAM until used.
- ``manifest.json``: model fingerprint, dim, metric, factory, count, config hash, search params, build time,
  twostage version, format version and the sha256 of ``ids``; written last.

Build configs (:class:`IndexSpec`, :func:`load_spec`, :data:`BUILTIN_SPECS`) live in
:mod:`twostage.index_spec`, since choosing an index is a concept apart from holding one; they are
re-exported here so ``from twostage.index import IndexSpec, load_spec`` keeps working.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from twostage.atomic import file_sha256, replace_dir, staging_dir
from twostage.errors import (
    ConfigError,
    IndexMismatchError,
    InputError,
    MissingDependencyError,
    NotFoundError,
    TwostageError,
)
from twostage.index_spec import BUILTIN_SPECS, IndexSpec, load_spec

if TYPE_CHECKING:
    import faiss

# The build-config names are re-exported from twostage.index_spec for existing callers.
__all__ = ["BUILTIN_SPECS", "FORMAT_VERSION", "GPU_MAX_K", "IndexSpec", "VectorIndex", "load_spec"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_FILE, IDS_FILE, VECTORS_FILE, MANIFEST_FILE = "index.faiss", "ids", "vectors.npy", "manifest.json"
GPU_MAX_K = 2048  # FAISS GPU indexes answer at most this many neighbours per query
_ADD_BATCH = 65536


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("twostage")
    except Exception:  # not installed (e.g. run from a source tree)
        return "0.1.0"


FAISS_BUILDS = ("faiss-cpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss-gpu")


def faiss_builds() -> list[str]:
    """The FAISS distributions installed: all provide the module ``faiss``, so more than one means the files of
    one overwrote the other's (an index may then load one build's Python code over another's library)."""
    from importlib.metadata import PackageNotFoundError, distribution

    found = []
    for name in FAISS_BUILDS:
        try:
            distribution(name)
        except PackageNotFoundError:
            continue
        found.append(name)
    return found


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as e:
        raise TwostageError(
            "the FAISS index needs one FAISS build: pip install 'twostage[cpu]' (or 'twostage[gpu]' on CUDA)"
        ) from e
    if _checked_builds:
        return faiss
    _checked_builds.append(True)
    builds = faiss_builds()
    if len(builds) > 1:
        logger.warning(
            "several FAISS builds are installed (%s) and share the module 'faiss'; keep one: "
            "pip uninstall -y %s && pip install --force-reinstall %s",
            ", ".join(builds),
            " ".join(builds),
            builds[-1],
        )
    return faiss


_checked_builds: list[bool] = []  # the installed builds are looked up once per process


def _metric(faiss: Any, metric: str) -> int:
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def _gpu_wanted(use_gpu: bool | None) -> bool:
    faiss = _faiss()
    has_gpu_build = hasattr(faiss, "StandardGpuResources")
    ngpu = faiss.get_num_gpus() if has_gpu_build else 0
    if use_gpu is None:
        return ngpu > 0
    if use_gpu and not has_gpu_build:
        raise MissingDependencyError("gpu", "use_gpu=True")
    if use_gpu and ngpu == 0:
        raise ConfigError("use_gpu=True but FAISS sees no GPU; pass use_gpu=None to pick automatically")
    return use_gpu


def _to_gpu(index: faiss.Index) -> faiss.Index | None:
    """A copy of ``index`` on all GPUs, or None when FAISS has no GPU version of this index type."""
    faiss = _faiss()
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except RuntimeError as e:  # e.g. HNSW: no GPU implementation
        logger.info("index stays on CPU: %s", str(e).splitlines()[0])
        return None


def _as_matrix(vecs: Any, dim: int | None, what: str, *, normalize: bool) -> np.ndarray:
    """Validated float32 C-contiguous (n, dim) copy, L2-normalised when asked."""
    arr = np.asarray(vecs)
    if arr.ndim != 2:
        raise InputError(
            f"{what} must be a 2-D (n, dim) array, got shape {arr.shape}; use vecs[None] for one"
        )
    if dim is not None and arr.shape[1] != dim:
        raise InputError(f"{what} have {arr.shape[1]} dimensions but the index has {dim}; use the same model")
    if not np.issubdtype(arr.dtype, np.number):
        raise InputError(f"{what} must be numeric, got dtype {arr.dtype}")
    out = np.array(arr, dtype=np.float32, order="C", copy=True)
    if not np.isfinite(out).all():
        raise InputError(f"{what} contain NaN or infinite values; check the encoder output")
    if normalize and len(out):
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
    return out


def _check_ids(item_ids: Sequence[str], n: int | None = None) -> list[str]:
    ids = list(item_ids)
    bad = next((i for i in ids if not isinstance(i, str)), None)
    if bad is not None:
        raise InputError(f"item ids must be strings, got {bad!r} ({type(bad).__name__}); convert with str()")
    if n is not None and len(ids) != n:
        raise InputError(f"{len(ids)} item ids but {n} vectors; pass one vector per item id")
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise InputError(f"item id {dup!r} appears more than once; pass each item once")
    return ids


def _fsync_write(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class VectorIndex:
    """Item vectors in a FAISS index, addressed by string item ids.

    Build with :meth:`build`, persist with :meth:`save` / :meth:`load`, query with :meth:`search`.
    Scores are higher-is-better (inner product, or negative L2 distance).

    Updates: FAISS labels are rows of the stored vectors. IVF indexes keep those labels natively and delete
    in place; other types are wrapped in ``IndexIDMap2``, where ``Flat`` (and other flat-code indexes)
    delete in place too. HNSW and refined indexes (``...,RFlat``) cannot delete in FAISS: :meth:`remove`
    then empties the index (``reset``, which keeps trained quantizers) and re-adds the remaining stored
    vectors, which costs about as much as adding them all again but needs no training and no re-encoding
    (:attr:`remove_in_place` tells which case applies). Removed items are never returned either way.
    Searching from several threads is fine; updates must not run concurrently with anything else.

    Example:
        >>> import numpy as np
        >>> vecs = np.array([[1, 0], [0.8, 0.6], [0, 1]], dtype=np.float32)
        >>> index = VectorIndex.build(["a", "b", "c"], vecs, load_spec("flat"), model_fingerprint="demo")
        >>> [item_id for item_id, score in index.search(vecs[:1], 2, exclude=[{"a"}])[0]]
        ['b', 'c']
    """

    def __init__(
        self,
        index: faiss.Index,
        ids: list[str | None],
        vecs: np.ndarray,
        spec: IndexSpec,
        meta: dict[str, Any],
        *,
        use_gpu: bool,
    ):
        """Internal: use :meth:`build` or :meth:`load`."""
        faiss = _faiss()
        self._index = index
        self._ids = ids
        self._vecs = vecs
        self._spec = spec
        self._meta = meta
        self._row = {item_id: row for row, item_id in enumerate(ids) if item_id is not None}
        self._free = sorted((row for row, item_id in enumerate(ids) if item_id is None), reverse=True)
        self._use_gpu = use_gpu
        self._gpu_index: Any = None
        if isinstance(index, faiss.IndexIDMap):  # IndexIDMap2 is a subclass
            in_place = isinstance(faiss.downcast_index(index.index), faiss.IndexFlatCodes)
        else:
            in_place = isinstance(index, faiss.IndexIVF)
        self.remove_in_place: bool = in_place
        self._apply_search_params()

    # -- construction --------------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        item_ids: Sequence[str],
        item_vecs: np.ndarray,
        spec: IndexSpec,
        *,
        model_fingerprint: str,
        text_fingerprint: str | None = None,
        provenance: Mapping[str, str] | None = None,
        use_gpu: bool | None = None,
        progress: bool = False,
    ) -> VectorIndex:
        """Train (when the type needs it) and fill a new index.

        Args:
            item_ids: one string id per row of ``item_vecs``, unique.
            item_vecs: (n, dim) embeddings; copied, and normalised when ``spec.normalize``.
            spec: the build config (see :func:`load_spec`).
            model_fingerprint: identifies the encoder; stored in the manifest and checked by :meth:`load`.
            text_fingerprint: identifies how items became text (the item template); stored and checked
                like ``model_fingerprint``, since changing the template changes every vector.
            provenance: what the fingerprints stand for in words (the model's path or name, the item
                template), stored so that a mismatch can say what changed rather than quote two hashes.
            use_gpu: ``None`` uses the GPU when FAISS sees one; ``True`` requires it; ``False`` stays on CPU.
            progress: show a progress bar while adding.

        Raises:
            InputError: bad ids or vectors. ConfigError: a factory FAISS rejects or too little training data.
        """
        faiss = _faiss()
        vecs = _as_matrix(item_vecs, None, "item vectors", normalize=spec.normalize)
        ids = _check_ids(item_ids, len(vecs))
        if not ids:
            raise InputError("cannot build an index from zero items; ingest items first")
        n, dim = vecs.shape
        gpu = _gpu_wanted(use_gpu)
        index, factory = _empty_index(spec, n=n, dim=dim)
        work = (_to_gpu(index) if gpu else None) or index
        if not work.is_trained:
            rows = _training_rows(spec, n)
            _train(work, vecs if rows is None else vecs[rows], factory, n)
        _add(work, vecs, np.arange(n, dtype=np.int64), progress=progress)
        if work is not index:
            index = faiss.index_gpu_to_cpu(work)
        meta = _build_meta(factory, model_fingerprint, text_fingerprint, provenance)
        out = cls(index, list(ids), vecs, spec, meta, use_gpu=gpu)
        logger.info("built %s index of %d items (dim %d, gpu=%s)", factory, n, dim, gpu)
        return out

    # -- properties ----------------------------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Number of items in the index."""
        return len(self._row)

    def __len__(self) -> int:
        return self.count

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._row

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def spec(self) -> IndexSpec:
        return self._spec

    @property
    def item_ids(self) -> list[str]:
        """The ids in row order."""
        return [item_id for item_id in self._ids if item_id is not None]

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest as :meth:`save` would write it (minus the ids checksum, known only once written)."""
        return {
            "format_version": FORMAT_VERSION,
            "twostage_version": _version(),
            "model_fingerprint": self._meta["model_fingerprint"],
            "text_fingerprint": self._meta.get("text_fingerprint"),
            "provenance": self._meta.get("provenance") or {},
            "dim": self.dim,
            "metric": self._spec.metric,
            "factory": self._spec.factory,
            "resolved_factory": self._meta["resolved_factory"],
            "count": self.count,
            "rows": len(self._ids),
            "config_hash": self._spec.config_hash(),
            "search_params": self._spec.search_params(),
            "spec": self._spec.to_dict(),
            "created_at": self._meta["created_at"],
        }

    def __repr__(self) -> str:
        return f"VectorIndex({self._meta['resolved_factory']!r}, count={self.count}, dim={self.dim})"

    # -- search --------------------------------------------------------------------------------------------

    def set_search_params(
        self, *, nprobe: int | None = None, ef_search: int | None = None, k_factor: int | None = None
    ) -> None:
        """Change search-time settings (those left ``None`` keep their value); saved with the index."""
        changes = {"nprobe": nprobe, "ef_search": ef_search, "k_factor": k_factor}
        self._spec = dataclasses.replace(self._spec, **{k: v for k, v in changes.items() if v is not None})
        self._apply_search_params()

    def search(
        self, query_vecs: np.ndarray, k: int, *, exclude: Sequence[Collection[str]] | None = None
    ) -> list[list[tuple[str, float]]]:
        """The top-``k`` items for each query, best first.

        Args:
            query_vecs: (m, dim) query embeddings from the same model as the items.
            k: results per query. Fewer come back only when the index holds fewer eligible items (or an
                approximate index finds fewer, e.g. IVF with tiny lists).
            exclude: one collection of item ids per query that must not be returned (items the user
                already has); the search goes deeper by the number of those ids present in the index.

        Returns:
            One list of ``(item_id, score)`` per query, in input order.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"k must be a positive integer, got {k!r}")
        queries = _as_matrix(query_vecs, self.dim, "query vectors", normalize=self._spec.normalize)
        m = len(queries)
        if exclude is not None and len(exclude) != m:
            raise InputError(
                f"exclude has {len(exclude)} sets for {m} queries; pass one (maybe empty) per query"
            )
        banned = [
            {self._row[i] for i in ex if i in self._row}
            for ex in (exclude if exclude is not None else [()] * m)
        ]
        if m == 0 or self.count == 0:
            return [[] for _ in range(m)]
        depth = min(k + max(map(len, banned)), self.count)
        distances, labels = self._searcher(depth).search(queries, depth)
        sign = 1.0 if self._spec.metric == "ip" else -1.0
        results = []
        for row_d, row_l, ban in zip(distances, labels, banned, strict=True):
            hits: list[tuple[str, float]] = []
            for dist, label in zip(row_d.tolist(), row_l.tolist(), strict=True):
                if label < 0 or label in ban:
                    continue
                hits.append((self._ids[label], sign * dist))  # type: ignore[arg-type]
                if len(hits) == k:
                    break
            results.append(hits)
        return results

    def vectors(self, item_ids: Sequence[str]) -> np.ndarray:
        """The stored (normalised) vectors of ``item_ids`` as a float32 (n, dim) array.

        Raises:
            NotFoundError: an id is not in the index.
        """
        missing = [i for i in item_ids if i not in self._row]
        if missing:
            raise NotFoundError(f"{len(missing)} item ids not in the index, e.g. {missing[0]!r}")
        rows = np.fromiter((self._row[i] for i in item_ids), dtype=np.int64, count=len(item_ids))
        return np.ascontiguousarray(self._vecs[rows], dtype=np.float32)

    # -- updates -------------------------------------------------------------------------------------------

    def add(self, item_ids: Sequence[str], item_vecs: np.ndarray, *, progress: bool = False) -> None:
        """Add new items (no retraining: IVF/PQ quantizers stay as trained).

        Raises:
            InputError: an id is already in the index (use :meth:`upsert`), or bad vectors.
        """
        vecs = _as_matrix(item_vecs, self.dim, "item vectors", normalize=self._spec.normalize)
        ids = _check_ids(item_ids, len(vecs))
        present = next((i for i in ids if i in self._row), None)
        if present is not None:
            raise InputError(f"item {present!r} is already in the index; use upsert() to replace it")
        if not ids:
            return
        reuse = [self._free.pop() for _ in range(min(len(ids), len(self._free)))]
        start = len(self._ids)
        rows = np.array(reuse + list(range(start, start + len(ids) - len(reuse))), dtype=np.int64)
        grown = np.zeros((start + len(ids) - len(reuse), self.dim), dtype=np.float32)
        grown[:start] = self._vecs
        grown[rows] = vecs
        self._vecs = grown
        self._ids.extend([None] * (len(grown) - start))
        for row, item_id in zip(rows.tolist(), ids, strict=True):
            self._ids[row] = item_id
            self._row[item_id] = row
        _add(self._index, vecs, rows, progress=progress)
        self._gpu_index = None

    def remove(self, item_ids: Iterable[str]) -> None:
        """Remove items; in place where FAISS allows it, else by re-adding the rest (see the class doc).

        Raises:
            NotFoundError: an id is not in the index (then nothing is removed).
        """
        ids = list(dict.fromkeys(item_ids))
        missing = [i for i in ids if i not in self._row]
        if missing:
            raise NotFoundError(
                f"{len(missing)} item ids not in the index, e.g. {missing[0]!r}; nothing removed"
            )
        if not ids:
            return
        faiss = _faiss()
        rows = np.array([self._row.pop(i) for i in ids], dtype=np.int64)
        for row in rows.tolist():
            self._ids[row] = None
        self._free = sorted([*self._free, *rows.tolist()], reverse=True)
        if not self._vecs.flags.writeable:
            self._vecs = np.array(self._vecs)
        self._vecs[rows] = 0.0
        if self.remove_in_place:
            removed = self._index.remove_ids(faiss.IDSelectorBatch(rows))
            if removed != len(rows):
                raise RuntimeError(f"FAISS removed {removed} of {len(rows)} rows")
        else:
            live = np.fromiter(self._row.values(), dtype=np.int64, count=len(self._row))
            live.sort()
            logger.info(
                "re-adding %d vectors after removing %d (index type cannot delete)", len(live), len(rows)
            )
            self._index.reset()
            _add(self._index, np.ascontiguousarray(self._vecs[live]), live, progress=False)
        self._gpu_index = None

    def upsert(self, item_ids: Sequence[str], item_vecs: np.ndarray, *, progress: bool = False) -> None:
        """Add items, replacing the vectors of those already present."""
        vecs = _as_matrix(item_vecs, self.dim, "item vectors", normalize=False)  # validate before removing
        ids = _check_ids(item_ids, len(vecs))
        present = [i for i in ids if i in self._row]
        if present:
            self.remove(present)
        self.add(ids, vecs, progress=progress)

    # -- persistence ---------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the index directory atomically.

        Everything is written into a temporary sibling directory first; then an existing ``path`` is
        renamed aside, the new directory renamed in, and the old one deleted. A failure before the swap
        leaves the old index untouched and no temporary directory behind; a crash between the two renames
        (microseconds) leaves both complete copies as hidden siblings ``.<name>.old-*`` / ``.<name>.tmp-*``.

        Returns:
            The directory written.
        """
        faiss = _faiss()
        target = Path(path)
        tmp = staging_dir(target)
        try:
            faiss.write_index(self._index, str(tmp / INDEX_FILE))
            ids_bytes = "".join(json.dumps(i) + "\n" for i in self._ids).encode("utf-8")
            _fsync_write(tmp / IDS_FILE, ids_bytes)
            with (tmp / VECTORS_FILE).open("wb") as f:
                np.save(f, np.ascontiguousarray(self._vecs, dtype=np.float32))
                f.flush()
                os.fsync(f.fileno())
            manifest = {**self.manifest, "ids_sha256": hashlib.sha256(ids_bytes).hexdigest()}
            _fsync_write(tmp / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8"))
            replace_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("saved index of %d items to %s", self.count, target)
        return target

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        expect: Mapping[str, object] | None = None,
        use_gpu: bool | None = None,
    ) -> VectorIndex:
        """Open a saved index and check it.

        Args:
            path: the directory written by :meth:`save`.
            expect: manifest fields the caller requires, e.g.
                ``{"model_fingerprint": fp, "dim": 384, "factory": spec.factory}``.
            use_gpu: as in :meth:`build` (the search copy goes to the GPU).

        Raises:
            NotFoundError: no such directory.
            IndexMismatchError: a field differs from ``expect``.
            InputError: a file is missing, corrupt, or fails its checksum.
        """
        faiss = _faiss()
        root = Path(path)
        if not root.is_dir():
            raise NotFoundError(f"no index at {root}; build it first (twostage index build)")
        for name in (MANIFEST_FILE, IDS_FILE, INDEX_FILE, VECTORS_FILE):
            if not (root / name).is_file():
                raise InputError(
                    "index file missing; rebuild the index (twostage index build)", file=str(root / name)
                )
        try:
            manifest = json.loads((root / MANIFEST_FILE).read_text(encoding="utf-8"))
            if not isinstance(manifest, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            raise InputError(
                f"unreadable manifest ({e}); rebuild the index", file=str(root / MANIFEST_FILE)
            ) from e
        version = manifest.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise InputError(
                f"index format {version!r} is not supported (this twostage reads <= {FORMAT_VERSION}); "
                "upgrade twostage or rebuild the index",
                file=str(root / MANIFEST_FILE),
            )
        required = ("model_fingerprint", "dim", "metric", "factory", "count", "rows", "ids_sha256", "spec")
        absent = [key for key in required if key not in manifest]
        if absent:
            raise InputError(f"manifest lacks {absent}; rebuild the index", file=str(root / MANIFEST_FILE))
        found_sha = file_sha256(root / IDS_FILE)
        if found_sha != manifest["ids_sha256"]:
            raise InputError(
                f"ids checksum mismatch (manifest {manifest['ids_sha256'][:12]}…, file {found_sha[:12]}…): "
                "the file changed after saving; rebuild the index",
                file=str(root / IDS_FILE),
            )
        for key, want in (expect or {}).items():
            want = json.loads(json.dumps(want))  # tuples → lists, as stored
            if manifest.get(key) != want:
                raise IndexMismatchError(key, want, manifest.get(key), str(root))
        try:
            lines = (
                (root / IDS_FILE).read_text(encoding="utf-8").split("\n")[:-1]
            )  # JSON escapes keep one per line
            ids = [json.loads(line) for line in lines]
        except (ValueError, UnicodeDecodeError) as e:
            raise InputError(f"unreadable ids ({e}); rebuild the index", file=str(root / IDS_FILE)) from e
        try:
            index = faiss.read_index(str(root / INDEX_FILE))
        except RuntimeError as e:
            msg = str(e).splitlines()[0]
            raise InputError(
                f"corrupt FAISS index ({msg}); rebuild the index", file=str(root / INDEX_FILE)
            ) from e
        try:
            vecs = np.load(root / VECTORS_FILE, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise InputError(
                f"corrupt vectors ({e}); rebuild the index", file=str(root / VECTORS_FILE)
            ) from e
        count = sum(i is not None for i in ids)
        checks = (
            (
                count == manifest["count"] == index.ntotal,
                f"{count} ids, {index.ntotal} vectors in index.faiss",
            ),
            (len(ids) == manifest["rows"], f"{len(ids)} rows in ids"),
            (index.d == manifest["dim"], f"index dim {index.d}"),
            (vecs.shape == (len(ids), index.d), f"vectors.npy shape {vecs.shape}"),
        )
        for ok, what in checks:
            if not ok:
                raise InputError(
                    f"inconsistent index: {what} but the manifest says count {manifest['count']}, "
                    f"rows {manifest['rows']}, dim {manifest['dim']}; rebuild the index",
                    file=str(root),
                )
        try:
            spec = IndexSpec.from_dict(manifest["spec"], source=str(root / MANIFEST_FILE))
        except (ConfigError, TypeError) as e:
            raise InputError(
                f"bad spec in manifest ({e}); rebuild the index", file=str(root / MANIFEST_FILE)
            ) from e
        meta = {
            "model_fingerprint": manifest["model_fingerprint"],
            "text_fingerprint": manifest.get("text_fingerprint"),
            "provenance": manifest.get("provenance") or {},
            "resolved_factory": manifest.get("resolved_factory", manifest["factory"]),
            "created_at": manifest.get("created_at"),
        }
        return cls(index, ids, vecs, spec, meta, use_gpu=_gpu_wanted(use_gpu))

    # -- internals -----------------------------------------------------------------------------------------

    def _apply_search_params(self) -> None:
        faiss = _faiss()
        space = faiss.ParameterSpace()
        for name, value in self._spec.search_params().items():
            try:
                space.set_index_parameter(self._index, name, value)
            except RuntimeError as e:
                key = {"efSearch": "ef_search", "k_factor_rf": "k_factor"}.get(name, name)
                raise ConfigError(
                    f"does not apply to {self._meta['resolved_factory']!r}; remove it", key=key
                ) from e
        self._gpu_index = None

    def _searcher(self, depth: int) -> faiss.Index:
        """The GPU copy when there is one and ``depth`` fits its limit, else the CPU index."""
        if not self._use_gpu or depth > GPU_MAX_K:
            return self._index
        if self._gpu_index is None:
            self._gpu_index = _to_gpu(self._index) or self._index
        return self._gpu_index


def _empty_index(spec: IndexSpec, *, n: int, dim: int) -> tuple[faiss.Index, str]:
    """The untrained CPU index ``spec`` asks for, for ``n`` vectors of ``dim``, and its resolved factory.

    Shared by :meth:`VectorIndex.build` and the shard-by-shard build of :mod:`twostage.scale`.
    """
    faiss = _faiss()
    factory = spec.resolve_factory(n_train=min(n, spec.train_size), dim=dim)
    try:
        base = faiss.index_factory(dim, factory, _metric(faiss, spec.metric))
    except RuntimeError as e:
        raise ConfigError(
            f"FAISS rejects factory {factory!r} for dim {dim}: {str(e).splitlines()[0]}", key="factory"
        ) from e
    # IVF keeps arbitrary labels and deletes them correctly; IndexIDMap2 around IVF would not (its
    # position bookkeeping assumes the sub-index renumbers on removal, which IVF does not).
    native = isinstance(base, faiss.IndexIVF | faiss.IndexIDMap)  # "IDMap2,..." factories wrap themselves
    index = base if native else faiss.IndexIDMap2(base)
    if spec.ef_construction is not None:
        hnsw = _find(index, "hnsw")
        if hnsw is None:
            raise ConfigError(f"ef_construction applies to HNSW, not {factory!r}", key="ef_construction")
        hnsw.efConstruction = spec.ef_construction
    return index, factory


def _training_rows(spec: IndexSpec, n: int) -> np.ndarray | None:
    """The sorted rows (of ``n``) that train a quantizer: a seeded sample of ``spec.train_size``, or None
    for all rows. A build from shards draws the same rows, so it trains the same quantizer."""
    if n <= spec.train_size:
        return None
    return np.sort(np.random.default_rng(spec.seed).choice(n, spec.train_size, replace=False))


def _train(index: faiss.Index, sample: np.ndarray, factory: str, n: int) -> None:
    logger.info("training %s on %d of %d vectors", factory, len(sample), n)
    try:
        index.train(sample)
    except RuntimeError as e:
        raise ConfigError(
            f"training {factory!r} on {len(sample)} vectors failed ({str(e).splitlines()[0]}); "
            "use a smaller nlist/PQ or the 'flat' or 'hnsw' config for a collection this small",
            key="factory",
        ) from e


def _build_meta(
    factory: str,
    model_fingerprint: str,
    text_fingerprint: str | None,
    provenance: Mapping[str, str] | None,
) -> dict[str, Any]:
    return {
        "model_fingerprint": model_fingerprint,
        "text_fingerprint": text_fingerprint,
        "provenance": dict(provenance or {}),
        "resolved_factory": factory,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def _add(index: faiss.Index, vecs: np.ndarray, rows: np.ndarray, *, progress: bool) -> None:
    starts = range(0, len(vecs), _ADD_BATCH)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="index add", unit="batch")
    for start in starts:
        index.add_with_ids(vecs[start : start + _ADD_BATCH], rows[start : start + _ADD_BATCH])


def _find(index: faiss.Index, attribute: str) -> Any:
    """The first attribute of that name among the index and the sub-indexes it wraps."""
    faiss = _faiss()
    current = faiss.downcast_index(index)
    while current is not None:
        if hasattr(current, attribute):
            return getattr(current, attribute)
        inner = getattr(current, "index", None) or getattr(current, "base_index", None)
        current = faiss.downcast_index(inner) if inner is not None else None
    return None
