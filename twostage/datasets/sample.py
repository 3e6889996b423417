"""The bundled sample: a MovieLens latest-small subset shipped inside the package (licence alongside)."""

from __future__ import annotations

from pathlib import Path

from twostage.datasets.movielens import load_movielens
from twostage.store import IngestReport, Store

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"


def load_sample(store: Store, path: str | Path | None = None) -> list[IngestReport]:
    """Ingest the bundled sample (see ``sample/README.txt`` for what it holds and its licence)."""
    return load_movielens(store, path or SAMPLE_DIR)
