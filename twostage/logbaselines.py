"""Id-only recommendation baselines from cornac, trained on the same split as the pipeline: ItemKNN, EASE
and SASRec. They read item ids and the log only, no text: what twostage has to beat to be worth its models.

All three score a request from its history (item ids, newest first), as the pipeline does, so a test
request's history includes everything before its cut-off. ItemKNN and EASE are item × item weights
(:class:`twostage.itemitem.ItemItem`); SASRec (Kang & McAuley 2018) is a self-attentive sequence model,
trained with cornac's best-on-validation checkpoint selection (next-item nDCG@10 on the validation users,
every ``check_every`` epochs), which is how it is trained to convergence here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from twostage.itemitem import ItemItem

logger = logging.getLogger(__name__)

ID_BASELINES = ("itemknn", "ease", "sasrec")


def fit_itemknn(item_ids: Sequence[str], users: np.ndarray, items: np.ndarray, *, k: int = 100) -> ItemItem:
    """Item-based kNN (cosine over the binary users × items matrix, each item's ``k`` nearest) by cornac;
    a history's score for an item is the sum of its similarities to the history's items."""
    import scipy.sparse as sp
    from cornac.data import Dataset
    from cornac.models import ItemKNN

    if not len(items):
        return ItemItem((), sp.csr_matrix((0, 0), dtype=np.float32))
    triples = [(str(u), str(i), 1.0) for u, i in zip(users.tolist(), items.tolist(), strict=True)]
    data = Dataset.from_uir(triples, seed=0)
    model = ItemKNN(k=k, similarity="cosine", verbose=False, seed=0).fit(data)
    raw_of = {n: int(raw) for raw, n in data.iid_map.items()}
    ids = tuple(item_ids[raw_of[n]] for n in range(len(raw_of)))
    weights = sp.csr_matrix(model.sim_mat, dtype=np.float32)
    weights.setdiag(0.0)
    weights.eliminate_zeros()
    return ItemItem(ids, weights)


@dataclass(frozen=True, eq=False)
class SequenceModel:
    """A trained cornac SASRec and the item ids of its outputs."""

    model: Any
    item_ids: tuple[str, ...]
    index: Mapping[str, int]

    def top(
        self, history: Sequence[str], k: int, exclude: Sequence[str] | frozenset[str] = ()
    ) -> list[tuple[str, float]]:
        """The ``k`` best next items after a history (newest first), none of ``exclude`` or the history."""
        sequence = [self.index[h] for h in reversed(history) if h in self.index]
        if not sequence:
            return []
        scores = np.asarray(self.model.score(0, sequence), dtype=np.float64).ravel()[: len(self.item_ids)]
        skip = set(exclude) | set(history)
        order = np.argsort(-scores, kind="stable")
        out = []
        for n in order:
            item = self.item_ids[n]
            if item not in skip:
                out.append((item, float(scores[n])))
                if len(out) == k:
                    break
        return out


def fit_sasrec(
    sequences: Mapping[str, Sequence[str]],
    validation: Sequence[tuple[Sequence[str], str]],
    *,
    epochs: int = 40,
    check_every: int = 2,
    max_len: int = 200,
    seed: int = 0,
) -> SequenceModel:
    """SASRec on each user's training sequence (oldest first), keeping the epoch with the best validation
    nDCG@10 on ``validation`` ((history oldest first, next item) pairs)."""
    from cornac.data import SequentialDataset
    from cornac.models import SASRec

    rows = [(u, u, item, float(t)) for u, items in sequences.items() for t, item in enumerate(items)]
    train = SequentialDataset.build(rows, fmt="USIT", seed=seed)
    val_rows = [
        (f"valid-{n}", f"valid-{n}", item, float(t))
        for n, (history, target) in enumerate(validation)
        for t, item in enumerate([*history, target])
        if item in train.iid_map
    ]
    val = (
        SequentialDataset.build(
            val_rows,
            fmt="USIT",
            global_uid_map=train.uid_map,
            global_sid_map=train.sid_map,
            global_iid_map=train.iid_map,
            seed=seed,
            exclude_unknowns=True,
        )
        if val_rows
        else None
    )
    model = SASRec(
        n_epochs=epochs,
        max_len=max_len,
        model_selection="best" if val is not None else "last",
        val_eval_every=check_every,
        val_k=10,
        val_metric="ndcg",
        seed=seed,
        verbose=False,
    ).fit(train, val)
    ids = [None] * len(train.iid_map)
    for raw, n in train.iid_map.items():
        ids[n] = raw
    return SequenceModel(model, tuple(ids), dict(train.iid_map))
