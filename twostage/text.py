"""Items and users become text: DESIGN.md's one idea ("every request is text").

Pure functions over plain dicts, so templates can be tested and previewed without a model. A leaf module:
it imports nothing of ours but the errors.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from twostage.errors import ConfigError


class UserTemplate(Protocol):
    """How a user's history becomes text (``twostage.config.TextConfig`` is one)."""

    user_template: str
    history_item_template: str
    history_size: int
    history_separator: str


_DOUBLED_SEPARATORS = re.compile(r"([.;:,])(\s*[.;:,])+")
_SPACES = re.compile(r"\s+")
_EMPTY_LABEL = re.compile(r"(?:^|(?<=[.;]))\s*[A-Z][\w ]{0,20}:\s*(?=[.;]|$)")


def template_fields(template: str) -> list[str]:
    """The ``{field}`` names a template uses."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError as e:
        raise ConfigError(f"bad template {template!r}: {e}") from e


def _tidy(text: str) -> str:
    """Drop the separators left behind by empty fields ("Heat. . " → "Heat") and squeeze spaces."""
    text = _EMPTY_LABEL.sub("", _SPACES.sub(" ", text))
    text = _DOUBLED_SEPARATORS.sub(r"\1", text)
    return _SPACES.sub(" ", text).strip().lstrip(".;:, ").strip()


def item_fields(item: Mapping[str, Any]) -> dict[str, str]:
    """The values an item template can use: columns plus every ``attrs`` key (lists joined by ", ")."""
    values: dict[str, str] = {}
    attrs = item.get("attrs") or {}
    for key, value in {**attrs, **{k: v for k, v in item.items() if k != "attrs"}}.items():
        if value is None:
            values[key] = ""
        elif isinstance(value, list | tuple):
            values[key] = ", ".join(str(v) for v in value)
        else:
            values[key] = str(value)
    return values


class _Blank(dict):
    def __missing__(self, key: str) -> str:
        return ""


def render_item(item: Mapping[str, Any], template: str) -> str:
    """Item text from the item template; missing fields render empty and their separators disappear.

    Example:
        >>> render_item({"title": "Heat (1995)", "categories": ["Action", "Crime"]}, "{title}. {categories}. {body}")
        'Heat (1995). Action, Crime.'
    """
    return _tidy(template.format_map(_Blank(item_fields(item))))


def render_user(history: Sequence[Mapping[str, Any]], config: UserTemplate) -> str:
    """User context text from their history items, newest first, at most ``history_size`` of them.

    Example:
        >>> from twostage.config import TextConfig
        >>> render_user([{"title": "Heat (1995)"}, {"title": "Casino (1995)"}], TextConfig())
        'Recently: Heat (1995); Casino (1995)'
    """
    parts = [render_item(item, config.history_item_template) for item in history[: config.history_size]]
    joined = config.history_separator.join(p for p in parts if p)
    return _tidy(config.user_template.format_map(_Blank(history=joined)))
