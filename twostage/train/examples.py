"""Training examples from the store: (request, positive) pairs for the bi-encoder and labelled requests for
the reranker, drawn only from the train side of a split.

Recommendation: every training event at time t gives (the user's context before t → the item at t), so
the model learns "what comes next" exactly as it is asked at serving time. Search: (query → judged item).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twostage.errors import NotFoundError
from twostage.requests import Catalogue, Request, split_requests, user_text

if TYPE_CHECKING:
    from twostage.config import Config
    from twostage.store import Store

VALID_PARTS = ("valid", "dev", "validation")


@dataclass(frozen=True)
class LabelledRequest:
    """A training request with its graded positives ({item_id: grade}), and whose it is (users only)."""

    request: Request
    positives: dict[str, float]
    user_id: str | None = None


@dataclass(frozen=True)
class Validation:
    """A held-out set for early stopping: request texts, the corpus, and relevant items per request."""

    requests: list[Request]
    relevant: dict[str, dict[str, float]]


def _train_queries(store: Store, split: str) -> dict[str, dict[str, float]]:
    return store.targets(split, "train")


def _validation_queries(store: Store, split: str, seed: int) -> tuple[dict[str, dict[str, float]], set[str]]:
    """Judged validation queries: a valid/dev part when the data has one, else 10% of train queries.

    Returns the validation targets and the train query ids to leave out of training.
    """
    for part in VALID_PARTS:
        targets = store.targets(split, part)
        if targets:
            return targets, set()
    train = _train_queries(store, split)
    ids = sorted(train)
    random.Random(seed).shuffle(ids)
    held = set(ids[: max(1, len(ids) // 10)]) if len(ids) >= 10 else set()
    return {q: train[q] for q in held}, held


def _user_event_sequences(store: Store, config: Config, split: str) -> dict[str, list[tuple[str, float]]]:
    sequences: dict[str, list[tuple[str, float]]] = {}
    for user_id, item_id, grade, _ts, _seq in store.train_events(split, config.relevance):
        sequences.setdefault(user_id, []).append((item_id, grade))
    return sequences


def retriever_pairs(
    store: Store, catalogue: Catalogue, config: Config, *, split: str
) -> list[tuple[str, str]]:
    """(request text, positive item text) pairs from the train side of ``split``, at most max_train_pairs."""
    cap, seed = config.retriever.max_train_pairs, config.retriever.seed
    kind = store.require_split(split)
    pairs: list[tuple[str, str]] = []
    if kind == "query":
        _, held = _validation_queries(store, split, seed)
        train = {q: t for q, t in _train_queries(store, split).items() if q not in held}
        if not train:
            raise NotFoundError(f"split '{split}' has no train judgments to fine-tune on")
        texts = store.query_texts(train)
        for q in sorted(train):
            for item_id in sorted(train[q]):
                if item_id in catalogue and q in texts:
                    pairs.append((texts[q], catalogue.text(item_id)))
    else:
        for _user, events in sorted(_user_event_sequences(store, config, split).items()):
            items = [i for i, _ in events]
            for t in range(1, len(items)):
                history = items[:t][::-1]
                pairs.append((user_text(history, catalogue, config.text), catalogue.text(items[t])))
    if not pairs:
        raise NotFoundError(f"split '{split}' gives no training pairs")
    if len(pairs) > cap:
        pairs = random.Random(seed).sample(pairs, cap)
    return pairs


def validation_set(
    store: Store, catalogue: Catalogue, config: Config, *, split: str, max_requests: int
) -> Validation:
    """The requests early stopping is judged on (valid part for users; dev or held-out train queries)."""
    kind = store.require_split(split)
    if kind == "query":
        targets, _ = _validation_queries(store, split, config.retriever.seed)
        ids = sorted(targets)[:max_requests]
        texts = store.query_texts(ids)
        return Validation([Request(q, texts[q]) for q in ids if q in texts], {q: targets[q] for q in ids})
    requests = split_requests(
        store, catalogue, config.text, split=split, part="valid", max_requests=max_requests
    )
    targets = store.targets(split, "valid")
    return Validation(requests, {r.request_id: targets[r.request_id] for r in requests})


def validation_corpus(
    texts: Mapping[str, str], relevant: Mapping[str, Mapping[str, float]], size: int, seed: int
) -> dict[str, str]:
    """The items retriever early stopping searches: every relevant item plus a seeded sample of the rest, up
    to ``size``. Encoding a large catalogue at every evaluation would cost more than the training steps
    themselves; recall against a few thousand distractors ranks checkpoints the same way.
    """
    keep = {i for rel in relevant.values() for i in rel if i in texts}
    rest = sorted(i for i in texts if i not in keep)
    extra = random.Random(seed).sample(rest, max(0, min(len(rest), size - len(keep))))
    return {i: texts[i] for i in sorted(keep | set(extra))}


def reranker_requests(
    store: Store,
    catalogue: Catalogue,
    config: Config,
    *,
    split: str,
    max_requests: int,
    seed: int,
    tail: int | None = None,
) -> list[LabelledRequest]:
    """Training requests for the reranker, with graded positives, from the train side of ``split``.

    Users: a random point t in each sampled user's training sequence (among its last ``tail`` positions when
    set: where held-out requests come from under leave-last-out); the context is everything before t,
    the positives are the items at t … t + ``reranker.label_window`` - 1 with their grades; the history is
    excluded from candidates, as in serving, and so are the user's later items (they are not negatives).
    """
    rng = random.Random(seed)
    kind = store.require_split(split)
    out: list[LabelledRequest] = []
    if kind == "query":
        _, held = _validation_queries(store, split, config.retriever.seed)
        train = {q: t for q, t in _train_queries(store, split).items() if q not in held}
        ids = sorted(train)
        rng.shuffle(ids)
        texts = store.query_texts(ids[:max_requests])
        for q in ids[:max_requests]:
            if q in texts:
                out.append(LabelledRequest(Request(q, texts[q]), dict(train[q])))
        return out
    sequences = _user_event_sequences(store, config, split)
    users = sorted(u for u, events in sequences.items() if len(events) >= 2)
    rng.shuffle(users)
    per_user = max(1, -(-max_requests // max(len(users), 1)))
    for user in users:
        items = sequences[user]
        for _ in range(per_user):
            if len(out) >= max_requests:
                return out
            t = rng.randrange(max(1, len(items) - tail) if tail else 1, len(items))
            history = [i for i, _ in items[:t]][::-1]
            seen = frozenset(history)
            positives: dict[str, float] = {}
            for item_id, grade in items[t : t + config.reranker.label_window]:
                if item_id not in seen:
                    positives[item_id] = max(grade, positives.get(item_id, 0.0))
            # The user's later items are not negatives: kept as candidates they would be labelled 0, and
            # being the items closest to the user's taste, they teach the reranker to push taste down.
            later = {i for i, _ in items[t:]} - set(positives)
            request = Request(
                f"{user}@{t}", user_text(history, catalogue, config.text), seen | later, tuple(history)
            )
            out.append(LabelledRequest(request, positives, user))
    return out
