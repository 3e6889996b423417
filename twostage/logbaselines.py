"""Id-only recommendation baselines, trained on the same split as the pipeline: ItemKNN (implicit) beside
EASE (cornac, :mod:`twostage.itemitem`) and popularity. They read item ids and the log only, no text: what
twostage has to beat to be worth its models.

Both item-to-item baselines score a request from its whole history (item ids), as the pipeline does, so a
test request's history includes everything before its cut-off. ItemKNN comes from ``implicit`` rather than
cornac: cornac's ItemKNN gives every pair of items similarity 1 on binary (implicit-feedback) data.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from twostage.itemitem import ItemItem


def fit_itemknn(item_ids: Sequence[str], users: np.ndarray, items: np.ndarray, *, k: int = 100) -> ItemItem:
    """Item-based kNN: cosine over the binary users × items matrix, each item's ``k`` nearest other items
    (implicit's ``CosineRecommender``); a history's score for an item is the sum of its similarities to the
    history's items."""
    import scipy.sparse as sp
    from implicit.nearest_neighbours import CosineRecommender

    n_users = int(users.max()) + 1 if len(users) else 0
    matrix = sp.csr_matrix(
        (np.ones(len(users), dtype=np.float32), (users, items)), shape=(n_users, len(item_ids))
    )
    matrix.data[:] = 1.0  # a pair seen twice is still one
    model = CosineRecommender(K=k + 1)  # its neighbours include the item itself
    with warnings.catch_warnings():  # it converts a matrix of its own to CSR and says so
        warnings.simplefilter("ignore")
        model.fit(matrix, show_progress=False)
    weights = sp.csr_matrix(model.similarity, dtype=np.float32)
    weights.setdiag(0.0)
    weights.eliminate_zeros()
    return ItemItem(tuple(item_ids), weights)
