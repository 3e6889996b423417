"""Small frozen result types the library returns: what a caller embeds in an app or prints as JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Hit:
    """One returned item. ``score`` is the final (higher-is-better) score of the stage that produced it."""

    item_id: str
    score: float
    rank: int
    stage: str
    title: str = ""
    recall_score: float | None = None
    rerank_score: float | None = None
    explanation: dict[str, Any] | None = None


@dataclass(frozen=True)
class Ranking:
    """The answer to one request (a query or a user), best first; ``version`` names the pipeline (models,
    index, data and settings) that produced it."""

    request_id: str
    request_text: str
    hits: tuple[Hit, ...] = field(default_factory=tuple)
    version: str = ""

    def item_ids(self) -> list[str]:
        return [h.item_id for h in self.hits]
