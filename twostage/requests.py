"""Requests as text: the catalogue's item texts, and split requests (users before their cut-off, or queries).

This is where "every request is text" happens for both stages, so training, evaluation and serving all
render items and users the same way, and a held-out item can never leak into a user's context.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twostage.cowatch import FIELD, SEPARATOR
from twostage.errors import ConfigError, NotFoundError, did_you_mean
from twostage.text import render_item, render_user, template_fields

if TYPE_CHECKING:
    from twostage.store import Store
    from twostage.text import UserTemplate


@dataclass(frozen=True)
class Request:
    """One request: its id, its text, and the items it must not be shown (a user's own history)."""

    request_id: str
    text: str
    exclude: frozenset[str] = frozenset()
    history: tuple[str, ...] = ()


class ItemTexts(Mapping[str, str]):
    """Every catalogue item's text through one template, each rendered the first time it is read and kept.

    Rendering a whole catalogue up front cost every process 22 µs and 2 KB per item (22 s and 1.9 GB at 1M
    items) before its first answer, though ranking reads only the candidates' and the history's texts;
    building an index still reads them all.
    """

    def __init__(self, records: Mapping[str, Mapping[str, Any]], render: Callable[[Mapping[str, Any]], str]):
        self._records = records
        self._render = render
        self._done: dict[str, str] = {}

    def __getitem__(self, item_id: str) -> str:
        text = self._done.get(item_id)
        if text is None:  # two threads may render the same item: same text, one kept
            text = self._done[item_id] = self._render(self._records[item_id])
        return text

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._records


class Catalogue:
    """All items, loaded once from the store, and their texts (rendered as they are read)."""

    def __init__(self, items: Sequence[Mapping[str, Any]], template: str):
        self.records = {str(i["item_id"]): i for i in items}
        self.item_ids = list(self.records)
        self.template = template
        self.texts = ItemTexts(self.records, lambda rec: render_item(rec, template))
        self._categories: dict[str, set[str]] | None = None

    @classmethod
    def from_store(cls, store: Store, template: str) -> Catalogue:
        return cls(store.items(), template)

    def check_templates(self, templates: Mapping[str, str]) -> None:
        """Refuse a template field that no item has (``templates``: config key → template): a typo
        (``{titel}``) would otherwise render every item as empty text and be indexed without a word."""
        known = {"item_id", "title", "body", "categories", FIELD}
        for rec in self.records.values():
            known.update(rec.get("attrs") or {})
        for key, template in templates.items():
            for name in template_fields(template):
                if name not in known:
                    raise ConfigError(
                        f"no item has the field {{{name}}}; fields: {', '.join(sorted(known - {FIELD}))}",
                        key=key,
                        suggestion=did_you_mean(name, sorted(known)),
                    )

    def __len__(self) -> int:
        return len(self.item_ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.records

    def text(self, item_id: str) -> str:
        return self.texts[item_id]

    def title(self, item_id: str) -> str:
        rec = self.records.get(item_id, {})
        return str(rec.get("title") or item_id)

    def texts_with(
        self, template: str, cowatched: Mapping[str, Sequence[str]] | None = None
    ) -> Mapping[str, str]:
        """Every item rendered with another template (stage 2's); ``{cowatched}`` filled from ``cowatched``
        (item id → co-watched item ids, rendered as their titles)."""
        if template == self.template and cowatched is None:
            return self.texts
        lists = cowatched or {}

        def render(rec: Mapping[str, Any]) -> str:
            watched = lists.get(str(rec["item_id"]), ())
            return render_item(
                {**rec, FIELD: SEPARATOR.join(self.title(i) for i in watched if i in self)}, template
            )

        return ItemTexts(self.records, render)

    def categories(self) -> dict[str, set[str]]:
        """Each item's categories (computed once: the catalogue never changes)."""
        if self._categories is None:
            self._categories = {i: set(r.get("categories") or []) for i, r in self.records.items()}
        return self._categories


def user_text(history: Sequence[str], catalogue: Catalogue, config: UserTemplate) -> str:
    """A user's context text from item ids, newest first."""
    recs = [catalogue.records[i] for i in history[: config.history_size] if i in catalogue.records]
    return render_user(recs, config)


def split_requests(
    store: Store,
    catalogue: Catalogue,
    config: UserTemplate,
    *,
    split: str,
    part: str,
    max_requests: int | None = None,
    exclude_seen: bool = True,
) -> list[Request]:
    """The requests of a held-out part, in request_id order, rendered as text.

    Users get their history strictly before the part's cut-off (the held-out event never leaks), and that
    history is what recall excludes (the standard full-ranking protocol; turn it off with ``exclude_seen``
    where users re-consume items, or a repeated target could never be hit). Queries get their text.
    """
    kind = store.require_split(split)
    targets = store.targets(split, part, limit=1 if max_requests == 0 else max_requests)
    if not targets:
        parts = sorted(
            {
                p
                for (p,) in store.cursor()
                .execute("SELECT DISTINCT part FROM splits WHERE split = ?", [split])
                .fetchall()
            }
        )
        raise NotFoundError(f"split '{split}' has no part '{part}' (parts: {', '.join(parts)})")
    if max_requests == 0:  # the part exists; none of it is asked for
        return []
    ids = sorted(targets)
    if kind == "query":
        texts = store.query_texts(ids)
        missing = [q for q in ids if q not in texts]
        if missing:
            raise NotFoundError(
                f"{len(missing)} judged queries have no text (e.g. '{missing[0]}'); ingest queries"
            )
        return [Request(q, texts[q]) for q in ids]
    histories = store.histories(ids, cutoffs=store.cutoffs(split, part, ids))
    return [
        Request(
            u,
            user_text(histories[u], catalogue, config),
            frozenset(histories[u]) if exclude_seen else frozenset(),
            tuple(histories[u]),
        )
        for u in ids
    ]
