"""Deterministic stand-ins for the two models, for tests of the ranking path that need no training.

``FakeEncoder`` embeds a text as its hashed bag of words (cosine = shared words); ``FakeReranker`` scores a pair
by the words the two texts share, weighting rarer-looking (longer) words more. Both are exact functions of
their input, so a ranking can be recomputed by hand, and both count their calls.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from twostage.index import IndexSpec, VectorIndex
from twostage.pipeline import LogCounts, Pipeline, Settings
from twostage.requests import Catalogue

DIM = 64
_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class FakeEncoder:
    """Hashed bag-of-words unit vectors, plus a small per-text component so no two texts score exactly alike
    (real embeddings have no exact ties; a tie at a list's cut would make which item FAISS keeps arbitrary)."""

    fingerprint = "fake-encoder"
    dim = DIM

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in words(text):
                out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % (DIM - 1)] += 1.0
            out[row, DIM - 1] = int(hashlib.md5(text.encode()).hexdigest(), 16) % 997 / 997 * 0.05
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)


class FakeReranker:
    """Score = Σ over shared words of len(word), plus a tiny term from the item text's hash (no ties)."""

    def __init__(self) -> None:
        self.pairs = 0

    def score(self, pairs: Sequence[tuple[str, str]], *, progress: bool = False) -> np.ndarray:
        self.pairs += len(pairs)
        out = []
        for request, item in pairs:
            shared = set(words(request)) & set(words(item))
            tiebreak = int(hashlib.md5(item.encode()).hexdigest(), 16) % 1000 / 1e6
            out.append(sum(len(w) for w in shared) + tiebreak)
        return np.asarray(out, dtype=np.float32)


class Forbidden:
    """A reranker that must not run."""

    def score(self, pairs: Sequence[tuple[str, str]], *, progress: bool = False) -> np.ndarray:
        raise AssertionError("the cross-encoder ran although it cannot change the order")


class Text:
    """The user template settings (``TextConfig``'s fields)."""

    user_template = "Recently: {history}"
    history_item_template = "{title}"
    history_size = 5
    history_separator = "; "


def catalogue(items: Mapping[str, str], categories: Mapping[str, list[str]] | None = None) -> Catalogue:
    records = [
        {"item_id": i, "title": t, "categories": (categories or {}).get(i, [])} for i, t in items.items()
    ]
    return Catalogue(records, "{title}")


def pipeline(
    items: Mapping[str, str] | Catalogue,
    *,
    reranker: Any = None,
    counts: LogCounts | None = None,
    categories: Mapping[str, list[str]] | None = None,
    **settings: Any,
) -> Pipeline:
    """A pipeline over ``items`` (id → title, or a catalogue) with the fake encoder, an exact index and
    ``settings``."""
    cat = items if isinstance(items, Catalogue) else catalogue(items, categories)
    encoder = FakeEncoder()
    ids = cat.item_ids
    index = VectorIndex.build(
        ids, encoder.encode([cat.text(i) for i in ids]), IndexSpec(factory="Flat"), model_fingerprint="fake"
    )
    return Pipeline(
        encoder=encoder,
        index=index,
        catalogue=cat,
        text=Text(),
        settings=Settings(**settings),
        reranker=reranker,
        counts=counts or LogCounts(),
    )


GENRES = ("space", "robot", "love", "war", "crime", "horse")


def movie_titles(n: int = 60) -> dict[str, str]:
    """Titles that share words in patterns: genre words and a few common ones, so rankings have structure."""
    common = ("night", "city", "story", "day")
    return {
        f"m{i}": f"{GENRES[i % 6]} {GENRES[(i * 7) % 6]} {common[i % 4]} {'film' if i % 3 else 'saga'} {i}"
        for i in range(n)
    }
