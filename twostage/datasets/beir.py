"""The BEIR layout (corpus.jsonl, queries.jsonl, qrels/<part>.tsv) → items, queries, judgments by part."""

from __future__ import annotations

from pathlib import Path

from twostage.errors import InputError
from twostage.store import IngestReport, Store


def load_beir(store: Store, path: str | Path) -> list[IngestReport]:
    """Ingest a BEIR folder. Each ``qrels/<part>.tsv`` becomes judgments of that part (train, dev, test).

    Only queries that appear in some qrels file are kept out of nothing: all queries are ingested, since
    a query without judgments is simply never evaluated.
    """
    root = Path(path)
    for name in ("corpus.jsonl", "queries.jsonl"):
        if not (root / name).exists():
            raise InputError(f"not a BEIR folder: {name} is missing", file=str(root))
    qrels = sorted((root / "qrels").glob("*.tsv"))
    if not qrels:
        raise InputError("not a BEIR folder: no qrels/*.tsv", file=str(root))
    reports = [
        store.ingest(root / "corpus.jsonl", "items", mapping={"item_id": "_id", "body": "text"}),
        store.ingest(root / "queries.jsonl", "queries", mapping={"query_id": "_id"}),
    ]
    for file in qrels:
        reports.append(
            store.ingest(
                file,
                "judgments",
                mapping={"query_id": "query-id", "item_id": "corpus-id", "relevance": "score"},
                part=file.stem,
            )
        )
    return reports
