"""Atomic writes: a reader sees the old file or directory or the new one, never half of either.

Indexes, trained models and their records are written to a temporary sibling first and moved into place with
renames (atomic on one file system), so a crash or a concurrent reader never meets a partial artifact.
"""

from __future__ import annotations

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
