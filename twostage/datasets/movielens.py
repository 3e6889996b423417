"""The MovieLens layout (movies.csv, ratings.csv, tags.csv) → items, rating events, item tags."""

from __future__ import annotations

from pathlib import Path

from twostage.errors import InputError
from twostage.store import IngestReport, Store


def load_movielens(store: Store, path: str | Path) -> list[IngestReport]:
    """Ingest a MovieLens folder: movies as items (genres as categories), ratings as ``rating`` events.

    ``tags.csv``, when present, goes into each movie's ``attrs.tags`` (its most frequent tags): tags describe
    the movie, so they enrich item text rather than count as extra interactions.
    """
    root = Path(path)
    for name in ("movies.csv", "ratings.csv"):
        if not (root / name).exists():
            raise InputError(f"not a MovieLens folder: {name} is missing", file=str(root))
    reports = [
        store.ingest(root / "movies.csv", "items", mapping={"item_id": "movieId", "categories": "genres"}),
        store.ingest(
            root / "ratings.csv",
            "events",
            mapping={"user_id": "userId", "item_id": "movieId", "value": "rating", "ts": "timestamp"},
            event="rating",
        ),
    ]
    if (root / "tags.csv").exists():
        store.attach_tags(root / "tags.csv", item_column="movieId", tag_column="tag")
    return reports
