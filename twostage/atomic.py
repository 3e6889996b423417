"""Atomic writes: a reader sees the old file or directory or the new one, never half of either.

Indexes, trained models and their records are written to a temporary sibling first and moved into place with
renames (atomic on one file system), so a crash or a concurrent reader never meets a partial artifact.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path


def staging_dir(target: str | os.PathLike[str]) -> Path:
    """A new empty hidden directory beside ``target``, on the same file system, to build its next version in."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    staged.mkdir()
    return staged


def replace_dir(staged: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Put the directory ``staged`` at ``target``: the old ``target`` is renamed aside, ``staged`` renamed in,
    then the old one deleted. If the second rename fails the old one is put back. Only ``staged`` and the
    aside copy this call made are ever moved or deleted.

    A crash between the two renames (microseconds) leaves both complete copies as hidden siblings.
    """
    staged, target = Path(staged), Path(target)
    if staged.resolve().is_relative_to(target.resolve()):
        # moving target aside would carry staged (and whatever else target holds) with it
        raise ValueError(f"refusing to replace {target}: it contains the new version {staged}")
    aside = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    if target.exists():
        os.rename(target, aside)
    try:
        os.rename(staged, target)
    except OSError:
        if aside.exists():
            os.rename(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    return target


def clean_leftovers(directory: str | os.PathLike[str]) -> list[str]:
    """Tidy what a crashed write left in ``directory`` (one of the project's ``indexes/``, ``models/`` or
    ``snapshots/``, whose hidden entries are all ours): an aside copy ``.<name>.old-*`` is put back when
    ``<name>`` is missing (the crash fell between the two renames of :func:`replace_dir`) and deleted
    otherwise; every other hidden entry (staging directories, temporary files, training work directories) is
    deleted. Call it only while holding the project's write lock, when no write can be in progress.

    Returns what was restored or deleted, for the log.
    """
    root = Path(directory)
    if not root.is_dir():
        return []
    done = []
    for entry in sorted(root.iterdir()):
        if not entry.name.startswith("."):
            continue
        name, sep, _ = entry.name[1:].rpartition(".old-")
        if sep and entry.is_dir() and not (root / name).exists():
            os.rename(entry, root / name)
            done.append(f"restored {root / name}")
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        done.append(f"deleted {entry}")
    return done


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file, read in 1 MB blocks (manifests of indexes and snapshots)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_file(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a synced temporary sibling and one rename."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with tmp.open("wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
