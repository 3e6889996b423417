"""The TwostageError tree: every mistake a user can make maps to one of these, with a one-line message.

Only ``cli.py`` turns them into exit codes; the library raises and never prints.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def did_you_mean(name: str, choices: Iterable[str]) -> str | None:
    """The choice closest to a mistyped ``name``, if one is close enough to suggest (difflib's ratio ≥ 0.6)."""
    import difflib

    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return match[0] if match else None


class TwostageError(Exception):
    """Base of every error a user can act on."""


class InputError(TwostageError, ValueError):
    """A data file is bad: the message names file, row (1-based data row, header excluded) and column."""

    def __init__(
        self, message: str, *, file: str | None = None, row: int | None = None, column: str | None = None
    ):
        self.file, self.row, self.column = file, row, column
        where = ":".join(str(p) for p in (file, f"row {row}" if row is not None else None, column) if p)
        super().__init__(f"{where}: {message}" if where else message)


class ConfigError(TwostageError, ValueError):
    """A config key or value is wrong; carries a did-you-mean suggestion when one is close."""

    def __init__(self, message: str, *, key: str | None = None, suggestion: str | None = None):
        self.key, self.suggestion = key, suggestion
        text = f"{key}: {message}" if key else message
        if suggestion:
            text += f" (did you mean '{suggestion}'?)"
        super().__init__(text)


class IndexMismatchError(TwostageError):
    """A saved index was built for another model or config than the one in use."""

    def __init__(
        self, field: str, expected: Any, found: Any, path: str | None = None, *, reason: str | None = None
    ):
        self.field, self.expected, self.found = field, expected, found
        where = f"{path}: " if path else ""
        what = (
            reason
            or f"index manifest field '{field}' is {found!r} but the current setup expects {expected!r}"
        )
        super().__init__(f"{where}{what}; rebuild the index (twostage index build)")


class NotFoundError(TwostageError, LookupError):
    """Something the user named does not exist: a user, an item, an index, a model, a split."""


class MissingDependencyError(TwostageError, ImportError):
    """An optional extra is needed; the message says which pip command installs it."""

    def __init__(self, extra: str, what: str):
        super().__init__(f"{what} needs the '{extra}' extra: pip install 'twostage[{extra}]'")
