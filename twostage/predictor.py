"""The behaviour predictor: how a user will respond to an item (the rating they would give, whether they would
act on it), read by a fine-tuned language model from the user's behaviour text and the item's text.

One cross-encoder reads ``(user context, item text)``: the context is the user's latest training-side events
rendered as text ("Heat (1995): 4.5 | Casino (1995): click | ..."). Its mean-pooled output feeds one head
per target: a regression head for the rating event's value and a logistic head per binary event type.

The rating head predicts a residual over user and item biases (μ + b_u + b_i, fit by cornac's
``BaselineOnly``): a user's or item's mean rating is cheap to count and a text model learns it slowly, so
the model starts exactly at the biases (zero-initialised head) and learns what the texts add. A user or item
without training ratings has bias 0.

Saved as a directory: the encoder in Hugging Face format (``encoder/``), the heads (``heads.pt``), the biases
(``biases.npz``) and ``predictor.json`` (targets, lengths, what training measured, and a SHA-256 manifest of
every file, checked on load); written atomically.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from twostage.atomic import file_sha256, replace_dir, staging_dir, write_file
from twostage.errors import ConfigError, IndexMismatchError, InputError, NotFoundError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

FORMAT = 1
RECORD_FILE, HEADS_FILE, BIASES_FILE, ENCODER_DIR = "predictor.json", "heads.pt", "biases.npz", "encoder"
RATING = "rating"  # the regression target's name; binary targets are named by their event type
LISTNET = "listnet"  # the ranking head's name: a score per (user, item), trained listwise


@dataclass(frozen=True)
class Biases:
    """μ + b_u + b_i: the classic baseline predictor of a rating (Koren 2008), fit by cornac."""

    mean: float
    users: Mapping[str, float]
    items: Mapping[str, float]

    def predict(self, users: Sequence[str], items: Sequence[str]) -> np.ndarray:
        return np.asarray(
            [
                self.mean + self.users.get(u, 0.0) + self.items.get(i, 0.0)
                for u, i in zip(users, items, strict=True)
            ],
            dtype=np.float64,
        )

    @classmethod
    def fit(
        cls,
        users: Sequence[str],
        items: Sequence[str],
        values: Sequence[float],
        *,
        epochs: int = 20,
        seed: int = 0,
    ) -> Biases:
        """Fit by cornac's ``BaselineOnly`` (SGD on the regularised squared error)."""
        from cornac.data import Dataset
        from cornac.models import BaselineOnly

        data = Dataset.from_uir(
            list(zip(users, items, np.asarray(values, dtype=float), strict=True)), seed=seed
        )
        model = BaselineOnly(max_iter=epochs, seed=seed, verbose=False)
        model.fit(data)
        user_bias = np.asarray(model.u_biases, dtype=np.float64)
        item_bias = np.asarray(model.i_biases, dtype=np.float64)
        return cls(
            float(model.global_mean),
            {u: float(user_bias[ix]) for u, ix in data.uid_map.items()},
            {i: float(item_bias[ix]) for i, ix in data.iid_map.items()},
        )

    def save(self, path: Path) -> None:
        np.savez(
            path,
            mean=np.asarray([self.mean]),
            user_ids=np.asarray(list(self.users), dtype=str),
            user_bias=np.asarray(list(self.users.values()), dtype=np.float64),
            item_ids=np.asarray(list(self.items), dtype=str),
            item_bias=np.asarray(list(self.items.values()), dtype=np.float64),
        )

    @classmethod
    def load(cls, path: Path) -> Biases:
        with np.load(path, allow_pickle=False) as z:
            return cls(
                float(z["mean"][0]),
                dict(zip(z["user_ids"].tolist(), z["user_bias"].tolist(), strict=True)),
                dict(zip(z["item_ids"].tolist(), z["item_bias"].tolist(), strict=True)),
            )


def render_context(
    events: Sequence[tuple[str, str, float]],
    titles: Mapping[str, str],
    *,
    rating_event: str,
    size: int,
    skip: str,
) -> str:
    """The user's behaviour as text: their latest ``size`` events (newest first, ``skip`` left out), each
    "title: value" for a rating and "title: event" otherwise."""
    parts: list[str] = []
    for item, event, value in events:
        if item == skip:
            continue
        shown = f"{value:g}" if event == rating_event and value == value else event
        parts.append(f"{titles.get(item, item)}: {shown}")
        if len(parts) >= size:
            break
    return " | ".join(parts) if parts else "no history"


def render_contexts(
    events: Mapping[str, Sequence[tuple[str, str, float]]],
    titles: Mapping[str, str],
    users: Sequence[str],
    skips: Sequence[str],
    *,
    rating_event: str,
    size: int,
) -> list[str]:
    """:func:`render_context` for each (user, item to leave out) pair, from each user's events."""
    return [
        render_context(events.get(u, []), titles, rating_event=rating_event, size=size, skip=k)
        for u, k in zip(users, skips, strict=True)
    ]


def _net_class() -> type:
    from torch import nn

    class PredictorNet(nn.Module):
        """A transformer encoder, mean pooling (what sentence-transformers models are trained with) and one
        linear head per target, each initialised at zero so training starts from the biases (ratings) or
        from p = 0.5 (events)."""

        def __init__(self, encoder: nn.Module, targets: Sequence[str], dropout: float = 0.1):
            super().__init__()
            self.encoder = encoder
            hidden = int(encoder.config.hidden_size)
            self.dropout = nn.Dropout(dropout)
            self.heads = nn.ModuleDict({t: nn.Linear(hidden, 1) for t in targets})
            for head in self.heads.values():
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)

        def forward(self, **batch: torch.Tensor) -> dict[str, torch.Tensor]:
            out = self.encoder(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
            pooled = self.dropout((out * mask).sum(1) / mask.sum(1).clamp(min=1.0))
            return {t: head(pooled).squeeze(-1) for t, head in self.heads.items()}

    return PredictorNet


def build_net(encoder: Any, targets: Sequence[str]) -> Any:
    return _net_class()(encoder, targets)


@dataclass(eq=False)
class Predictor:
    """A trained behaviour predictor: ``predict`` gives, per target, a rating or a probability per pair."""

    net: Any
    tokenizer: Any
    targets: tuple[str, ...]
    rating_event: str
    max_length: int
    context_items: int
    biases: Biases | None
    record: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 64
    # one model pass at a time: a fast tokenizer refuses to be borrowed by two threads at once
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def encode(self, contexts: Sequence[str], item_texts: Sequence[str]) -> Mapping[str, Any]:
        """Tokenised pairs, the longer of the two texts cut first (a long context before a short item text;
        an item text longer than the limit never makes the pair fail)."""
        return self.tokenizer(
            list(contexts),
            list(item_texts),
            truncation="longest_first",
            max_length=self.max_length,
            padding=True,
            return_tensors="pt",
        )

    def outputs(self, batch: Mapping[str, Any], users: Sequence[str], items: Sequence[str]) -> dict[str, Any]:
        """Per target, the model's prediction as a tensor (with gradients when the net trains): the rating
        over its biases, a logit for events."""
        import torch

        heads = self.net(**batch)
        if RATING in heads and self.biases is not None:
            base = torch.as_tensor(self.biases.predict(users, items), dtype=heads[RATING].dtype)
            heads = {**heads, RATING: heads[RATING] + base}
        return heads

    def predict(
        self,
        contexts: Sequence[str],
        item_texts: Sequence[str],
        users: Sequence[str],
        items: Sequence[str],
        *,
        progress: bool = False,
    ) -> dict[str, np.ndarray]:
        """Per target, one value per (context, item) pair: the predicted rating, the ranking score (listnet)
        or the probability of the event."""

        with self._lock:
            return self._predict(contexts, item_texts, users, items, progress=progress)

    def _predict(self, contexts, item_texts, users, items, *, progress: bool) -> dict[str, np.ndarray]:
        import torch

        n = len(contexts)
        out: dict[str, list[np.ndarray]] = {t: [] for t in self.targets}
        self.net.eval()
        steps = range(0, n, self.batch_size)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="predict", unit="batch")
        with torch.inference_mode():
            for start in steps:
                stop = start + self.batch_size
                heads = self.outputs(
                    self.encode(contexts[start:stop], item_texts[start:stop]),
                    users[start:stop],
                    items[start:stop],
                )
                for t, value in heads.items():
                    value = value.float()
                    value = value if t in (RATING, LISTNET) else torch.sigmoid(value)
                    out[t].append(value.numpy().astype(np.float64))
        return {t: np.concatenate(v) if v else np.zeros(0) for t, v in out.items()}

    def respond(
        self, user_id: str, events: Sequence[tuple[str, str, float]], item_ids: Sequence[str], catalogue: Any
    ) -> dict[str, list[float]]:
        """``predict`` for one user: their latest events (item, event, value; newest first) and the items, each
        checked against the catalogue. What ``Engine.predict`` and the server's ``/predict`` both call."""
        items = [str(i).strip() for i in item_ids]
        if not items:
            raise InputError("give at least one item id to predict for")
        unknown = [i for i in items if i not in catalogue]
        if unknown:
            raise NotFoundError(f"unknown item '{unknown[0]}' (not in the items table); check the id")
        out = self._for_user(user_id, events, items, catalogue)
        return {target: [round(float(v), 6) for v in values] for target, values in out.items()}

    def _for_user(
        self, user_id: str, events: Sequence[tuple[str, str, float]], items: Sequence[str], catalogue: Any
    ) -> dict[str, np.ndarray]:
        titles = {i: catalogue.title(i) for i, _, _ in events[: 4 * self.context_items] if i in catalogue}
        contexts = render_contexts(
            {user_id: events},
            titles,
            [user_id] * len(items),
            items,
            rating_event=self.rating_event,
            size=self.context_items,
        )
        return self.predict(contexts, [catalogue.text(i) for i in items], [user_id] * len(items), list(items))

    def history_events(self, history: Sequence[str | tuple[str, float]]) -> list[tuple[str, str, float]]:
        """An anonymous history (item ids, or (item id, rating) pairs; newest first) as events."""
        return [
            (h, self.rating_event, float("nan"))
            if isinstance(h, str)
            else (str(h[0]), self.rating_event, float(h[1]))
            for h in history
        ]

    def expected_ratings(
        self, user_id: str, history: Sequence[tuple[str, float]], item_ids: Sequence[str], catalogue: Any
    ) -> np.ndarray:
        """Predicted ratings of ``item_ids`` for a user whose history is (item, rating or NaN), newest first:
        what the pipeline's expected-rating blend reads (see ``twostage.pipeline.RatingPredictor``)."""
        if RATING not in self.targets:
            raise ConfigError(
                "the behaviour predictor has no rating head; train it with [predictor] tasks including rating",
                key="predictor.recommend_weight",
            )
        events = [(i, self.rating_event, float(v)) for i, v in history]
        return self._for_user(user_id, events, item_ids, catalogue)[RATING]

    # ------------------------------------------------------------------ persistence
    def save(self, target: Path) -> Path:
        """Write atomically to ``target`` (a directory), with a manifest of every file's SHA-256."""
        import torch

        staged = staging_dir(target)
        self.net.encoder.save_pretrained(str(staged / ENCODER_DIR))
        self.tokenizer.save_pretrained(str(staged / ENCODER_DIR))
        torch.save(self.net.heads.state_dict(), staged / HEADS_FILE)
        if self.biases is not None:
            self.biases.save(staged / BIASES_FILE)
        files = sorted(p for p in staged.rglob("*") if p.is_file())
        record = {
            **self.record,
            "format": FORMAT,
            "targets": list(self.targets),
            "rating_event": self.rating_event,
            "max_length": self.max_length,
            "context_items": self.context_items,
            "manifest": {str(p.relative_to(staged)): file_sha256(p) for p in files},
        }
        write_file(staged / RECORD_FILE, json.dumps(record, indent=2))
        return replace_dir(staged, target)

    @classmethod
    def load(cls, path: Path, *, device: str = "cpu") -> Predictor:
        """Load and check a saved predictor: format and every file's SHA-256 against its manifest."""
        import torch
        from transformers import AutoModel, AutoTokenizer

        record_path = path / RECORD_FILE
        if not record_path.is_file():
            raise NotFoundError(f"no behaviour predictor at {path}; run 'twostage train predictor'")
        record = json.loads(record_path.read_text())
        if record.get("format") != FORMAT:
            raise IndexMismatchError("format", FORMAT, record.get("format"), str(path))
        for name, digest in record.get("manifest", {}).items():
            file = path / name
            if not file.is_file() or file_sha256(file) != digest:
                raise IndexMismatchError("manifest", name, "missing or changed", str(path))
        targets = tuple(record["targets"])
        encoder = AutoModel.from_pretrained(str(path / ENCODER_DIR))
        net = build_net(encoder, targets)
        net.heads.load_state_dict(torch.load(path / HEADS_FILE, map_location=device, weights_only=True))
        net.to(device).eval()
        biases = Biases.load(path / BIASES_FILE) if (path / BIASES_FILE).is_file() else None
        return cls(
            net,
            AutoTokenizer.from_pretrained(str(path / ENCODER_DIR)),
            targets,
            record["rating_event"],
            int(record["max_length"]),
            int(record["context_items"]),
            biases,
            record,
        )
