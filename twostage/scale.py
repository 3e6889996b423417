"""Scale-out: encode items and build the index across a Ray cluster, with the local path's result.

``[scale] engine = "ray"`` moves the two steps of ``twostage index build`` that grow with the catalogue off
the single process:

- :func:`encode_items_ray` streams ``(item_id, text)`` rows through Ray Data ``map_batches`` into a pool of
  encoder actors (each loads the bi-encoder once, from its path, on a GPU when it has one) and writes the
  vectors as **embedding shards**: ``shard-00000.npy`` (float32 ``(rows, dim)``, unit rows) with
  ``shard-00000.ids`` (JSON Lines, one item id per row, as the index's ``ids`` file), at most
  ``[scale] shard_rows`` rows each, in input order. ``manifest.json`` (written last) lists the shards, their
  rows, the dim and the bi-encoder's fingerprint, as every actor computed it. The shards are written by the
  workers into a hidden staging directory beside ``out_dir``, which replaces ``out_dir`` in one rename
  (:mod:`twostage.atomic`), so ``out_dir`` must be on a file system every node sees (NFS, a mounted bucket).
- :func:`build_index_from_shards` builds one :class:`~twostage.index.VectorIndex` from the shards: the
  vectors are copied shard by shard into one memory-mapped ``vectors.npy`` beside them (the index's stored
  vectors live on disk, not in RAM), the quantizer of an IVF/PQ type is trained on a seeded sample read across
  the shards (the same rows :meth:`VectorIndex.build` would draw), and the index is filled shard by shard. The
  result is the index the local build makes from the concatenated vectors.
- :func:`build_shard_indexes` makes one index per shard instead (sharing one trained quantizer) and
  :class:`ShardedIndex` searches several as one through FAISS ``IndexShards``, for catalogues whose index
  does not fit one machine's memory or one FAISS add.

An actor encodes with :meth:`BiEncoder.encode` (same normalisation, truncation and batching rules as the local
path), so on the same device type the vectors equal the local ones up to float rounding. Ray is imported
only here and only on this path (``pip install 'twostage[scale]'``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from twostage.atomic import replace_dir, staging_dir, write_file
from twostage.errors import IndexMismatchError, InputError, MissingDependencyError, NotFoundError
from twostage.index import (
    VectorIndex,
    _add,
    _as_matrix,
    _build_meta,
    _check_ids,
    _empty_index,
    _faiss,
    _gpu_wanted,
    _to_gpu,
    _train,
    _training_rows,
)

if TYPE_CHECKING:
    from twostage.config import ScaleConfig
    from twostage.index_spec import IndexSpec

__all__ = [
    "ShardSet",
    "ShardedIndex",
    "build_index_from_shards",
    "build_shard_indexes",
    "encode_items_ray",
    "write_shards",
]

logger = logging.getLogger(__name__)

SHARDS_FORMAT = 1
MANIFEST_FILE, VECTORS_FILE = "manifest.json", "vectors.npy"


# -- embedding shards ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSet:
    """A directory of embedding shards, read through its manifest (see the module doc for the layout)."""

    root: Path
    dim: int
    model_fingerprint: str
    shards: tuple[tuple[str, int], ...]  # (file stem, rows), in item order

    @property
    def rows(self) -> int:
        return sum(rows for _, rows in self.shards)

    def __len__(self) -> int:
        return len(self.shards)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ShardSet:
        """Open a shard directory written by :func:`encode_items_ray` or :func:`write_shards`.

        Raises:
            NotFoundError: no manifest there. InputError: an unreadable manifest or a missing shard file.
        """
        root = Path(path)
        if not (root / MANIFEST_FILE).is_file():
            raise NotFoundError(f"no embedding shards at {root}; encode the items first")
        try:
            manifest = json.loads((root / MANIFEST_FILE).read_text(encoding="utf-8"))
            shards = tuple((str(s["name"]), int(s["rows"])) for s in manifest["shards"])
            out = cls(root, int(manifest["dim"]), str(manifest["model_fingerprint"]), shards)
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(
                f"unreadable shard manifest ({e}); encode again", file=str(root / MANIFEST_FILE)
            ) from e
        for name, _ in shards:
            for suffix in (".npy", ".ids"):
                if not (root / f"{name}{suffix}").is_file():
                    raise InputError("shard file missing; encode again", file=str(root / f"{name}{suffix}"))
        return out

    def vectors(self, shard: int) -> np.ndarray:
        """The vectors of one shard, memory-mapped read-only."""
        name, rows = self.shards[shard]
        vecs = np.load(self.root / f"{name}.npy", mmap_mode="r", allow_pickle=False)
        if vecs.shape != (rows, self.dim):
            raise InputError(
                f"shard holds {vecs.shape} vectors but the manifest says ({rows}, {self.dim}); encode again",
                file=str(self.root / f"{name}.npy"),
            )
        return vecs

    def ids(self, shard: int) -> list[str]:
        name, rows = self.shards[shard]
        lines = (self.root / f"{name}.ids").read_text(encoding="utf-8").split("\n")[:-1]
        ids = [json.loads(line) for line in lines]
        if len(ids) != rows:
            raise InputError(
                f"{len(ids)} ids but the manifest says {rows}; encode again",
                file=str(self.root / f"{name}.ids"),
            )
        return ids

    def item_ids(self) -> list[str]:
        """Every item id, in shard order."""
        return [i for shard in range(len(self)) for i in self.ids(shard)]


def _write_shard_files(directory: Path, stem: str, ids: Sequence[str], vecs: np.ndarray) -> None:
    with (directory / f"{stem}.npy").open("wb") as f:
        np.save(f, np.ascontiguousarray(vecs, dtype=np.float32))
        f.flush()
        os.fsync(f.fileno())
    data = "".join(json.dumps(str(i)) + "\n" for i in ids).encode("utf-8")
    with (directory / f"{stem}.ids").open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _publish(
    staged: Path, target: Path, parts: Sequence[tuple[str, int]], dim: int, fingerprint: str
) -> ShardSet:
    """Name the parts ``shard-00000`` … in order, drop anything else (e.g. a retried task's first attempt),
    write the manifest last and move the directory into place."""
    keep = set()
    shards = []
    for n, (stem, rows) in enumerate(parts):
        name = f"shard-{n:05d}"
        for suffix in (".npy", ".ids"):
            os.replace(staged / f"{stem}{suffix}", staged / f"{name}{suffix}")
            keep.add(f"{name}{suffix}")
        shards.append({"name": name, "rows": rows})
    for entry in staged.iterdir():
        if entry.name not in keep:
            entry.unlink()
    manifest = {
        "format_version": SHARDS_FORMAT,
        "dim": dim,
        "rows": sum(rows for _, rows in parts),
        "model_fingerprint": fingerprint,
        "shards": shards,
    }
    write_file(staged / MANIFEST_FILE, json.dumps(manifest, indent=2))
    replace_dir(staged, target)
    return ShardSet.load(target)


def write_shards(
    item_ids: Sequence[str],
    item_vecs: np.ndarray,
    out_dir: str | os.PathLike[str],
    *,
    model_fingerprint: str,
    shard_rows: int,
) -> ShardSet:
    """Write vectors already in memory as embedding shards (the layout :func:`encode_items_ray` writes)."""
    vecs = _as_matrix(item_vecs, None, "item vectors", normalize=False)
    ids = _check_ids(item_ids, len(vecs))
    if shard_rows < 1:
        raise InputError(f"shard_rows must be at least 1, got {shard_rows}")
    target = Path(out_dir)
    staged = staging_dir(target)
    try:
        parts = []
        for start in range(0, len(ids), shard_rows):
            stem = uuid.uuid4().hex
            _write_shard_files(
                staged, stem, ids[start : start + shard_rows], vecs[start : start + shard_rows]
            )
            parts.append((stem, len(ids[start : start + shard_rows])))
        return _publish(staged, target, parts, vecs.shape[1], model_fingerprint)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


# -- encoding on Ray ---------------------------------------------------------------------------------------


def _ray(cfg: ScaleConfig) -> Any:
    """The ``ray`` module, connected to ``[scale] ray_address`` (or a new local cluster) unless already."""
    if cfg.ray_address is None and not os.environ.get("RAY_ADDRESS"):
        # A new cluster of this machine alone: its processes talk over loopback, not the machine's network
        # address (read by Ray when it is imported, so set first).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
        import ray.data  # the extra, not only ray core
    except ImportError as e:
        raise MissingDependencyError("scale", '[scale] engine = "ray"') from e
    if not ray.is_initialized():
        ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=False)
    return ray


class _EncoderActor:
    """One bi-encoder per Ray actor, loaded once from its path; encodes batches of ``{item_id, text}``."""

    def __init__(self, source: str, device: str, max_seq_length: int | None, batch_size: int):
        from twostage.encoders import BiEncoder

        self._encoder = BiEncoder(
            source, device=device, max_seq_length=max_seq_length, batch_size=batch_size, local_files_only=True
        )
        self._fingerprint = self._encoder.fingerprint

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vecs = self._encoder.encode([str(t) for t in batch["text"]])
        return {
            "item_id": batch["item_id"],
            "vector": vecs,
            "fingerprint": np.full(len(vecs), self._fingerprint),
        }


def _write_batch(batch: dict[str, np.ndarray], directory: str) -> dict[str, np.ndarray]:
    """Ray task: write one batch of encoded rows as one shard (a unique name; :func:`_publish` renames)."""
    stem = uuid.uuid4().hex
    vecs = np.asarray(batch["vector"], dtype=np.float32)
    _write_shard_files(Path(directory), stem, [str(i) for i in batch["item_id"]], vecs)
    fingerprints = sorted(set(batch["fingerprint"].tolist()))
    return {
        "stem": np.array([stem]),
        "rows": np.array([len(vecs)]),
        "dim": np.array([vecs.shape[1] if vecs.ndim == 2 else 0]),
        "fingerprints": np.array([",".join(fingerprints)]),
    }


def encode_items_ray(
    model_source: str | os.PathLike[str],
    items: Sequence[tuple[str, str]] | Mapping[str, str] | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    cfg: ScaleConfig,
    *,
    max_seq_length: int | None = None,
    encode_batch_size: int = 64,
    model_fingerprint: str | None = None,
) -> ShardSet:
    """Encode items on a Ray cluster into embedding shards at ``out_dir`` (replaced atomically).

    Args:
        model_source: the bi-encoder's directory or hub name (what :class:`BiEncoder` takes; every node must
            be able to load it without the network, e.g. a path on shared storage).
        items: ``(item_id, text)`` pairs, a mapping item_id → text, or the path of a Parquet file or
            directory with columns ``item_id`` and ``text`` (read by the workers in place).
        out_dir: the shard directory; on a file system every node sees.
        cfg: ``[scale]``: ``actors``, ``batch_size`` (items per actor call), ``num_gpus_per_actor``,
            ``shard_rows``, ``ray_address``.
        max_seq_length, encode_batch_size: as ``[retriever] max_seq_length`` and ``batch_size`` (tokens kept,
            texts per forward pass), so the actors encode exactly as the local path does.
        model_fingerprint: when given, every actor's model must have this fingerprint.

    Returns:
        The shards, in the order of ``items``.

    Raises:
        MissingDependencyError: Ray Data is not installed. IndexMismatchError: an actor loaded another model.
    """
    ray = _ray(cfg)
    source = str(model_source)
    if isinstance(items, str | os.PathLike):
        # Reading is I/O: like the write stage it takes no CPU slot, or with every slot held by an encoder
        # actor the read tasks would wait for ever.
        ds = ray.data.read_parquet(
            os.fspath(items), columns=["item_id", "text"], ray_remote_args={"num_cpus": 0}
        )
    else:
        import pyarrow as pa

        pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
        if not pairs:
            raise InputError("no items to encode; ingest items first")
        table = pa.table({"item_id": [str(i) for i, _ in pairs], "text": [str(t) for _, t in pairs]})
        # blocks are what the actors share out: a few per actor, none over a shard
        block = max(cfg.batch_size, min(cfg.shard_rows, math.ceil(len(pairs) / (4 * cfg.actors))))
        ds = ray.data.from_arrow([table.slice(s, block) for s in range(0, len(pairs), block)])
    gpus = cfg.num_gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    actors = cfg.actors
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if isinstance(items, str | os.PathLike) and gpus == 0 and actors >= cpus > 1:
        # Ray Data lists and reads files in tasks that need a CPU slot of their own: with every slot held
        # by an encoder actor they would wait for ever, so one slot is left to them.
        actors = cpus - 1
        logger.info("encoding with %d actors: one of the cluster's %d CPUs reads the files", actors, cpus)
    # shards in input order, as the local path; set on the dataset's own context (a copy of the current one
    # taken when it was made), so nothing global changes
    ds.context.execution_options.preserve_order = True
    target = Path(out_dir).absolute()
    staged = staging_dir(target)
    try:
        encoded = ds.map_batches(
            _EncoderActor,
            fn_constructor_kwargs={
                "source": source,
                "device": "cuda" if gpus > 0 else "cpu",
                "max_seq_length": max_seq_length,
                "batch_size": encode_batch_size,
            },
            batch_size=cfg.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=gpus,
        )
        # Writing is I/O: it takes no CPU slot, so it runs while the actors hold every CPU (at most one
        # shard per actor in flight, which bounds the memory of the write stage).
        written = encoded.map_batches(
            _write_batch,
            fn_kwargs={"directory": str(staged)},
            batch_size=cfg.shard_rows,
            batch_format="numpy",
            num_cpus=0,
            concurrency=actors,
        )
        parts = [row for row in written.take_all() if int(row["rows"]) > 0]
        if not parts:
            raise InputError("no items to encode; the input holds no rows")
        found = sorted({fp for row in parts for fp in str(row["fingerprints"]).split(",")})
        dims = {int(row["dim"]) for row in parts}
        if len(found) != 1 or (model_fingerprint is not None and found[0] != model_fingerprint):
            raise IndexMismatchError(
                "model_fingerprint", model_fingerprint or found[0], ", ".join(found), str(target)
            )
        logger.info("encoded %d items into %d shards on Ray", sum(int(r["rows"]) for r in parts), len(parts))
        return _publish(
            staged, target, [(str(r["stem"]), int(r["rows"])) for r in parts], dims.pop(), found[0]
        )
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


# -- building indexes from shards ---------------------------------------------------------------------------


def _open(shards: ShardSet | str | os.PathLike[str], model_fingerprint: str | None) -> ShardSet:
    shard_set = shards if isinstance(shards, ShardSet) else ShardSet.load(shards)
    if model_fingerprint is not None and shard_set.model_fingerprint != model_fingerprint:
        raise IndexMismatchError(
            "model_fingerprint", model_fingerprint, shard_set.model_fingerprint, str(shard_set.root)
        )
    if not shard_set.rows:
        raise InputError("cannot build an index from zero items; ingest items first")
    return shard_set


def _sample(shard_set: ShardSet, rows: np.ndarray | None, spec: IndexSpec) -> np.ndarray:
    """The training vectors: the given global rows (sorted), read shard by shard, normalised like the rest."""
    parts, start = [], 0
    for shard in range(len(shard_set)):
        vecs = shard_set.vectors(shard)
        if rows is None:
            parts.append(vecs)
        else:
            local = rows[(rows >= start) & (rows < start + len(vecs))] - start
            parts.append(vecs[local])
        start += len(vecs)
    return _as_matrix(np.concatenate(parts), shard_set.dim, "training vectors", normalize=spec.normalize)


def _progress(total: int, enabled: bool, what: str) -> Iterator[int]:
    if not enabled:
        return iter(range(total))
    from tqdm.auto import tqdm

    return iter(tqdm(range(total), desc=what, unit="shard"))


def build_index_from_shards(
    shards: ShardSet | str | os.PathLike[str],
    spec: IndexSpec,
    *,
    model_fingerprint: str | None = None,
    text_fingerprint: str | None = None,
    provenance: Mapping[str, str] | None = None,
    use_gpu: bool | None = None,
    progress: bool = False,
    vectors_path: str | os.PathLike[str] | None = None,
) -> VectorIndex:
    """One index over every shard, equal to ``VectorIndex.build`` on the concatenated vectors.

    At most one shard of vectors (plus the training sample) is in memory at a time; the index's stored
    vectors are a memory-mapped ``vectors_path`` (default ``vectors.npy`` in the shard directory, replaced
    by a rename, so an index still mapping the previous one keeps it). What FAISS itself holds in memory
    depends on the type: every vector for ``Flat``, ``IVF…,Flat``, HNSW and ``…,RFlat``; only the codes
    (``pq_m`` bytes) and ids (8 bytes) per item for ``IVF…,PQ…``.

    Args:
        shards: a :class:`ShardSet` or its directory.
        spec, model_fingerprint, text_fingerprint, provenance, use_gpu, progress: as
            :meth:`VectorIndex.build`; ``model_fingerprint`` defaults to the shards' and must match it.
        vectors_path: where the stored vectors go.
    """
    faiss = _faiss()
    shard_set = _open(shards, model_fingerprint)
    ids = _check_ids(shard_set.item_ids())
    n, dim = shard_set.rows, shard_set.dim
    gpu = _gpu_wanted(use_gpu)
    index, factory = _empty_index(spec, n=n, dim=dim)
    final = Path(vectors_path) if vectors_path is not None else shard_set.root / VECTORS_FILE
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        vecs = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
        start = 0
        for shard in _progress(len(shard_set), progress, "copy shards"):
            part = _as_matrix(shard_set.vectors(shard), dim, "item vectors", normalize=spec.normalize)
            vecs[start : start + len(part)] = part
            start += len(part)
        vecs.flush()
        work = (_to_gpu(index) if gpu else None) or index
        if not work.is_trained:
            rows = _training_rows(spec, n)
            _train(work, vecs if rows is None else np.ascontiguousarray(vecs[rows]), factory, n)
        start = 0
        for shard in _progress(len(shard_set), progress, "index add"):
            rows_in_shard = shard_set.shards[shard][1]
            part = np.ascontiguousarray(vecs[start : start + rows_in_shard])
            _add(work, part, np.arange(start, start + rows_in_shard, dtype=np.int64), progress=False)
            start += rows_in_shard
        if work is not index:
            index = faiss.index_gpu_to_cpu(work)
        del vecs  # flushed above; mapped again under its final name (a map keeps the name it was opened by)
        os.replace(tmp, final)
        vecs = np.load(final, mmap_mode="r", allow_pickle=False)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    meta = _build_meta(factory, shard_set.model_fingerprint, text_fingerprint, provenance)
    logger.info("built %s index of %d items from %d shards", factory, n, len(shard_set))
    return VectorIndex(index, ids, vecs, spec, meta, use_gpu=gpu)


def build_shard_indexes(
    shards: ShardSet | str | os.PathLike[str],
    spec: IndexSpec,
    *,
    model_fingerprint: str | None = None,
    text_fingerprint: str | None = None,
    provenance: Mapping[str, str] | None = None,
) -> list[VectorIndex]:
    """One CPU index per shard (each can be saved, loaded and served apart), for :class:`ShardedIndex`.

    An IVF/PQ type is trained once, on the sample :func:`build_index_from_shards` uses, and every shard gets a
    copy of that trained, empty index: the shards share their coarse lists, so probing ``nprobe`` lists in
    every shard visits what one index would.
    """
    faiss = _faiss()
    shard_set = _open(shards, model_fingerprint)
    template, factory = _empty_index(spec, n=shard_set.rows, dim=shard_set.dim)
    if not template.is_trained:
        _train(
            template, _sample(shard_set, _training_rows(spec, shard_set.rows), spec), factory, shard_set.rows
        )
    out = []
    for shard in range(len(shard_set)):
        ids = shard_set.ids(shard)
        vecs = _as_matrix(shard_set.vectors(shard), shard_set.dim, "item vectors", normalize=spec.normalize)
        index = faiss.clone_index(template)
        _add(index, vecs, np.arange(len(vecs), dtype=np.int64), progress=False)
        meta = _build_meta(factory, shard_set.model_fingerprint, text_fingerprint, provenance)
        out.append(VectorIndex(index, ids, vecs, spec, meta, use_gpu=False))
    return out


class ShardedIndex:
    """Several :class:`VectorIndex` shards searched as one through FAISS ``IndexShards``.

    The shards must hold disjoint items from the same model, with the same dim, metric and normalisation, and
    no free rows (a shard that had removals must be rebuilt), since ``IndexShards`` numbers the rows of shard
    ``s`` after those of shards ``0 … s-1``. Search behaves as :meth:`VectorIndex.search` (same ``k`` and
    ``exclude`` semantics); for exact types it returns what one index over all the items returns. The shards
    run their searches in parallel threads. Read-only: update and save the shards themselves.

    Example:
        >>> from twostage.index import load_spec
        >>> vecs = np.array([[1, 0], [0.8, 0.6], [0, 1]], dtype=np.float32)
        >>> a = VectorIndex.build(["a", "b"], vecs[:2], load_spec("flat"), model_fingerprint="demo")
        >>> c = VectorIndex.build(["c"], vecs[2:], load_spec("flat"), model_fingerprint="demo")
        >>> [item_id for item_id, _ in ShardedIndex([a, c]).search(vecs[2:], 2)[0]]
        ['c', 'b']
    """

    def __init__(self, shards: Sequence[VectorIndex], *, threaded: bool = True):
        faiss = _faiss()
        shards = list(shards)
        if not shards:
            raise InputError("a sharded index needs at least one shard")
        first = shards[0]
        for n, shard in enumerate(shards):
            for what, value, want in (
                ("dim", shard.dim, first.dim),
                ("metric", shard.spec.metric, first.spec.metric),
                ("normalize", shard.spec.normalize, first.spec.normalize),
                (
                    "model_fingerprint",
                    shard.manifest["model_fingerprint"],
                    first.manifest["model_fingerprint"],
                ),
            ):
                if value != want:
                    raise IndexMismatchError(what, want, value, f"shard {n}")
            if shard.manifest["rows"] != shard.count:
                raise InputError(
                    f"shard {n} has {shard.manifest['rows'] - shard.count} free rows (removed items); "
                    "rebuild it before sharding"
                )
        ids = [i for shard in shards for i in shard.item_ids]
        _check_ids(ids)
        merged = faiss.IndexShards(first.dim, threaded, True)  # successive_ids: shard s's rows come after
        for shard in shards:
            merged.add_shard(shard._index)
        merged.metric_type = first._index.metric_type
        self._shards = shards
        # A VectorIndex over the merged FAISS index runs the search (and its exclusion rules); it is never
        # updated or saved, so it needs no stored vectors of its own.
        self._view = VectorIndex(
            merged, ids, np.zeros((0, first.dim), np.float32), first.spec, dict(first._meta), use_gpu=False
        )

    @property
    def shards(self) -> list[VectorIndex]:
        return list(self._shards)

    @property
    def count(self) -> int:
        return self._view.count

    def __len__(self) -> int:
        return self.count

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._view

    @property
    def dim(self) -> int:
        return self._view.dim

    @property
    def item_ids(self) -> list[str]:
        return self._view.item_ids

    def search(
        self, query_vecs: np.ndarray, k: int, *, exclude: Sequence[Collection[str]] | None = None
    ) -> list[list[tuple[str, float]]]:
        """The top-``k`` items over all shards for each query, best first (see :meth:`VectorIndex.search`)."""
        return self._view.search(query_vecs, k, exclude=exclude)

    def vectors(self, item_ids: Iterable[str]) -> np.ndarray:
        """The stored vectors of ``item_ids``, from whichever shard holds each."""
        wanted = list(item_ids)
        out = np.empty((len(wanted), self.dim), dtype=np.float32)
        for row, item_id in enumerate(wanted):
            shard = next((s for s in self._shards if item_id in s), None)
            if shard is None:
                raise NotFoundError(f"item id {item_id!r} is not in any shard")
            out[row] = shard.vectors([item_id])[0]
        return out

    def __repr__(self) -> str:
        return f"ShardedIndex({len(self._shards)} shards, count={self.count}, dim={self.dim})"
