"""Snapshots: everything serving needs, frozen into files that need no write lock.

``twostage publish`` writes ``snapshots/<id>/`` under the project: the items, every user's history, the log
counts the serving pipeline reads (popularity, co-watch lists, stage-2 item texts), the FAISS index, the
trained models (hard links where the file system allows, else copies: training replaces model and index
directories by renaming, so a published file is never changed in place), the serving settings and a
``manifest.json`` with every file's size and SHA-256, written last. The directory is built under a temporary
name and renamed; ``snapshots/current`` names the current one and is switched last. A server
(:mod:`twostage.serve`) loads a snapshot read-only, so training, ingestion and evaluation keep the project's
DuckDB store to themselves, and any number of server processes can read the same snapshot.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twostage.atomic import file_sha256, write_file
from twostage.config import TextConfig
from twostage.errors import InputError, NotFoundError
from twostage.itemitem import read_item_model, write_item_model
from twostage.ltr import LearnedRanker
from twostage.pipeline import LogCounts, Pipeline, Settings
from twostage.requests import Catalogue

if TYPE_CHECKING:
    from twostage.predictor import Predictor
    from twostage.project import Project

logger = logging.getLogger(__name__)

SNAPSHOTS = "snapshots"
CURRENT = "current"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Served:
    """A loaded snapshot: the pipeline that ranks (its ``version`` is the snapshot id) and each user's history."""

    snapshot_id: str
    pipeline: Pipeline
    histories: dict[str, tuple[str, ...]]
    manifest: dict[str, Any]
    predictor: Predictor | None = None
    latest_events: dict[str, list[tuple[str, str, float]]] = field(default_factory=dict)

    def predict(
        self, user_id: str | None, history: Sequence[str | tuple[str, float]] | None, item_ids: Sequence[str]
    ) -> dict[str, list[float]]:
        """What ``Engine.predict`` returns, from the snapshot's predictor and each user's latest events."""
        if self.predictor is None:
            raise NotFoundError(
                f"snapshot {self.snapshot_id} has no behaviour predictor; run 'twostage train predictor' and publish"
            )
        if history is not None:
            events = self.predictor.history_events(history)
            return self.predictor.respond("", events, item_ids, self.pipeline.catalogue)
        user = str(user_id).strip()
        events = self.latest_events.get(user)
        if not events:
            raise NotFoundError(f"unknown user '{user}' (no events in snapshot {self.snapshot_id})")
        return self.predictor.respond(user, events, item_ids, self.pipeline.catalogue)

    def history(self, user_id: str) -> tuple[str, ...]:
        found = self.histories.get(user_id)
        if not found:
            raise NotFoundError(f"unknown user '{user_id}' (no events in snapshot {self.snapshot_id})")
        return found


def snapshots_dir(project_root: str | Path) -> Path:
    return Path(project_root) / SNAPSHOTS


def current_id(project_root: str | Path) -> str | None:
    """The id in ``snapshots/current``, or None before the first publish."""
    pointer = snapshots_dir(project_root) / CURRENT
    return pointer.read_text(encoding="utf-8").strip() or None if pointer.exists() else None


def list_snapshots(project_root: str | Path) -> list[str]:
    """Published snapshot ids, oldest first (ids sort by publishing time)."""
    root = snapshots_dir(project_root)
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).exists()
    )


# ---------------------------------------------------------------------- publishing
def publish(project: Project) -> dict[str, Any]:
    """Freeze what the project's serving pipeline reads into a new snapshot and make it current.

    Returns its manifest. Older snapshots beyond ``[serve] keep_snapshots`` are deleted (never the current).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    pipe = project.pipeline()  # what serving ranks with: every event counts
    root = snapshots_dir(project.root)
    root.mkdir(parents=True, exist_ok=True)
    # UTC to the microsecond, so ids sort by publishing time; the suffix keeps concurrent publishers apart
    snapshot_id = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S-%f") + "-" + uuid.uuid4().hex[:4]
    staged = root / f".{snapshot_id}.tmp"
    staged.mkdir()
    try:
        items = project.store.items()
        pq.write_table(
            pa.table(
                {
                    "item_id": [r["item_id"] for r in items],
                    "title": [r["title"] for r in items],
                    "body": [r["body"] for r in items],
                    "categories": [list(r["categories"] or []) for r in items],
                    "attrs": [json.dumps(r["attrs"] or {}) for r in items],
                }
            ),
            staged / "items.parquet",
        )
        project.store.export_histories(staged / "histories.parquet")
        counts = pipe.counts
        _write_map(
            staged / "popularity.parquet", "users", {i: float(v) for i, v in counts.popularity.items()}
        )
        _write_map(
            staged / "cowatched.parquet", "cowatched", {i: list(v) for i, v in counts.cowatched.items()}
        )
        if counts.rerank_texts is not None:
            _write_map(staged / "rerank_texts.parquet", "text", dict(counts.rerank_texts))
        if counts.items is not None:
            write_item_model(staged / "ease.npz", counts.items)
        if pipe.learned is not None:
            pipe.learned.save(staged / "ranker")
        if project.models_dir("predictor").exists():  # /predict, and the expected-rating blend
            from twostage.outcomes import LATEST_EVENTS, export_latest_events

            predictor = project.predictor()  # loaded, so its manifest is checked before it is published
            _link_tree(project.models_dir("predictor"), staged / "predictor")
            export_latest_events(
                project.store, staged / "events.parquet", LATEST_EVENTS * predictor.context_items
            )
        if pipe.predictor is not None and counts.ratings is not None:
            _write_ratings(staged / "ratings.parquet", counts.ratings)
        _link_tree(project.index_dir(), staged / "index")
        models = {
            "retriever": _freeze_model(
                project.models_dir("retriever"), project.config.retriever.model, staged / "retriever"
            )
        }
        reranker_source = project.reranker_source()
        if reranker_source is not None:
            models["reranker"] = _freeze_model(Path(reranker_source), reranker_source, staged / "reranker")
        config = project.config
        settings = {
            "settings": dataclasses.asdict(pipe.settings),
            "text": dataclasses.asdict(config.text),
            "item_template": config.text.item_template,
            "retriever": {
                "max_seq_length": config.retriever.max_seq_length,
                "batch_size": config.retriever.batch_size,
            },
            "reranker": {
                "max_length": project.reranker_max_length(reranker_source),
                "batch_size": config.reranker.batch_size,
            },
            "serve": dataclasses.asdict(config.serve),
        }
        write_file(staged / "settings.json", json.dumps(settings, indent=2))
        manifest = {
            "format_version": FORMAT_VERSION,
            "snapshot_id": snapshot_id,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "models": models,
            "index": json.loads((staged / "index" / "manifest.json").read_text()),
            "counts": {
                "items": len(items),
                "popularity": len(counts.popularity),
                "cowatched": len(counts.cowatched),
            },
            "files": _file_table(staged),
        }
        write_file(staged / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
        os.rename(staged, root / snapshot_id)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    switch(project.root, snapshot_id)
    _prune(project.root, project.config.serve.keep_snapshots)
    logger.info("published snapshot %s (%d items)", snapshot_id, len(items))
    return manifest


def switch(project_root: str | Path, snapshot_id: str) -> None:
    """Make ``snapshot_id`` current (a rollback is a switch to an older one); servers pick it up on their next
    poll or ``POST /admin/reload``."""
    path = snapshots_dir(project_root) / snapshot_id
    if not (path / MANIFEST).exists():
        have = ", ".join(list_snapshots(project_root)) or "none"
        raise NotFoundError(
            f"no snapshot '{snapshot_id}' (snapshots: {have}); publish one with 'twostage publish'"
        )
    write_file(snapshots_dir(project_root) / CURRENT, snapshot_id + "\n")


def _prune(project_root: Path, keep: int) -> None:
    current = current_id(project_root)
    published = list_snapshots(project_root)
    for old in published[: max(len(published) - keep, 0)]:
        if old != current:
            shutil.rmtree(snapshots_dir(project_root) / old, ignore_errors=True)


def _freeze_model(trained: Path, configured: str, target: Path) -> dict[str, str]:
    """The model's directory (trained, or a configured local path) linked into the snapshot, so nothing outside
    it can change what it serves; else the name to load (the packaged default, a hub name), whose weights the
    index manifest's model fingerprint pins."""
    for source in (trained, Path(configured)):
        if source.is_dir():
            _link_tree(source, target)
            return {"path": target.name}
    return {"name": configured}


def _link_tree(source: Path, target: Path) -> None:
    """Hard-link every file of ``source`` under ``target`` (copy across file systems)."""
    if not source.is_dir():
        raise NotFoundError(f"no {source.name} at {source}; build it before publishing")

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link)


def _write_map(path: Path, column: str, values: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"item_id": list(values), column: list(values.values())}), path)


def _write_ratings(path: Path, ratings: Mapping[str, Mapping[str, float]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [(u, i, v) for u, rated in ratings.items() for i, v in rated.items()]
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array([r[0] for r in rows], pa.string()),
                "item_id": pa.array([r[1] for r in rows], pa.string()),
                "value": pa.array([r[2] for r in rows], pa.float64()),
            }
        ),
        path,
    )


def _read_ratings(path: Path) -> dict[str, dict[str, float]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path).to_pydict()
    out: dict[str, dict[str, float]] = {}
    for u, i, v in zip(table["user_id"], table["item_id"], table["value"], strict=True):
        out.setdefault(u, {})[i] = v
    return out


def _file_table(root: Path) -> dict[str, dict[str, Any]]:
    return {
        str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(root.rglob("*"))
        if p.is_file() and p != root / MANIFEST
    }


# ---------------------------------------------------------------------- loading
def check(project_root: str | Path, snapshot_id: str | None = None) -> str:
    """The id of the snapshot that :func:`load` would serve, after checking its files against the manifest
    (without loading the models). Raises as :func:`load` does."""
    snapshot_id = snapshot_id or current_id(project_root)
    if snapshot_id is None:
        raise NotFoundError(f"{project_root}: no snapshot published yet; run 'twostage publish'")
    _checked_manifest(snapshots_dir(project_root) / snapshot_id)
    return snapshot_id


def load(project_root: str | Path, snapshot_id: str | None = None) -> Served:
    """Load a snapshot (the current one by default) read-only, after checking every file against its manifest.

    Raises:
        NotFoundError: nothing published, or no such snapshot.
        InputError: a file is missing, changed or corrupt (naming it); the snapshot must not serve.
    """
    import pyarrow.parquet as pq

    from twostage.encoders import BiEncoder
    from twostage.index import VectorIndex
    from twostage.rerank import Reranker

    snapshot_id = snapshot_id or current_id(project_root)
    if snapshot_id is None:
        raise NotFoundError(f"{project_root}: no snapshot published yet; run 'twostage publish'")
    root = snapshots_dir(project_root) / snapshot_id
    manifest = _checked_manifest(root)
    settings = json.loads((root / "settings.json").read_text(encoding="utf-8"))
    items = pq.read_table(root / "items.parquet").to_pylist()
    records = [
        {**r, "attrs": json.loads(r["attrs"] or "{}"), "categories": r["categories"] or []} for r in items
    ]
    catalogue = Catalogue(records, settings["item_template"])
    retriever = settings["retriever"]
    encoder = BiEncoder(_model_source(root, manifest["models"]["retriever"]), **retriever)
    index = VectorIndex.load(
        root / "index", expect={"model_fingerprint": encoder.fingerprint, "dim": encoder.dim}
    )
    reranker = None
    if "reranker" in manifest["models"]:
        reranker = Reranker(_model_source(root, manifest["models"]["reranker"]), **settings["reranker"])
    rerank_texts = (
        _read_map(root / "rerank_texts.parquet", "text") if (root / "rerank_texts.parquet").exists() else None
    )
    ease = None
    if (root / "ease.npz").exists():
        ease = read_item_model(root / "ease.npz")
        if ease is None:
            raise InputError("unreadable EASE weights; publish again", file=str(root / "ease.npz"))
    learned = LearnedRanker.load(root / "ranker") if (root / "ranker").exists() else None
    predictor, latest = None, {}
    if (root / "predictor").exists():
        from twostage.outcomes import read_latest_events
        from twostage.predictor import Predictor

        predictor = Predictor.load(root / "predictor")
        latest = read_latest_events(root / "events.parquet")
    blend = (root / "ratings.parquet").exists()
    counts = LogCounts(
        popularity=_read_map(root / "popularity.parquet", "users"),
        cowatched={i: tuple(v) for i, v in _read_map(root / "cowatched.parquet", "cowatched").items()},
        rerank_texts=rerank_texts,
        items=ease,
        ratings=_read_ratings(root / "ratings.parquet") if blend else None,
    )
    served = Settings(**settings["settings"])
    lexical = None
    if served.lexical_weight > 0:  # hybrid recall: BM25 indexed from the snapshot's own item texts
        from twostage.baselines import BM25

        lexical = BM25.of_catalogue(catalogue)
    pipeline = Pipeline(
        encoder=encoder,
        index=index,
        catalogue=catalogue,
        text=TextConfig(**settings["text"]),
        settings=served,
        reranker=reranker,
        counts=counts,
        lexical=lexical,
        learned=learned,
        predictor=predictor if blend else None,
        version=snapshot_id,
    )
    table = pq.read_table(root / "histories.parquet").to_pydict()
    histories = {u: tuple(h) for u, h in zip(table["user_id"], table["history"], strict=True)}
    return Served(snapshot_id, pipeline, histories, manifest, predictor, latest)


def _checked_manifest(root: Path) -> dict[str, Any]:
    if not (root / MANIFEST).is_file():
        raise NotFoundError(f"no snapshot at {root}; publish one with 'twostage publish'")
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except ValueError as e:
        raise InputError(f"unreadable manifest ({e})", file=str(root / MANIFEST)) from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise InputError(
            f"snapshot format {manifest.get('format_version')!r} is not {FORMAT_VERSION}",
            file=str(root / MANIFEST),
        )
    for name, expected in manifest["files"].items():
        path = root / name
        if not path.is_file():
            raise InputError("file missing from the snapshot; publish again", file=str(path))
        if path.stat().st_size != expected["bytes"] or file_sha256(path) != expected["sha256"]:
            raise InputError(
                "file changed since the snapshot was published (checksum mismatch); publish again",
                file=str(path),
            )
    return manifest


def _model_source(root: Path, model: dict[str, str]) -> str | None:
    if "path" in model:
        return str(root / model["path"])
    return None if model["name"] == "default" else model["name"]


def _read_map(path: Path, column: str) -> dict[str, Any]:
    import pyarrow.parquet as pq

    table = pq.read_table(path).to_pydict()
    return dict(zip(table["item_id"], table[column], strict=True))
