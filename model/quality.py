"""How good a trained model is, computed in batches from sparse interactions.

Recall@k compares each held-out user's k best items with the items it interacted with;
the popularity baseline ranks every user's items by how many training users chose them.
Nothing here builds a users x items matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.data import UserData


@dataclass(frozen=True)
class Quality:
    n_test_users: int
    adjusted_rand_index: float | None
    recall_at_k: float
    popularity_recall_at_k: float
    k: int


def recall_at_k(top: np.ndarray, data: UserData) -> float:
    """Mean over users with interactions of |top-k ∩ relevant| / min(k, |relevant|).

    Args:
        top: (n_users, k) catalogue indices, each user's k best items; -1 is an item the catalogue does
            not have (always a miss).
    """
    top = np.asarray(top).astype(np.int64, copy=False)
    counts = data.counts()
    # A (user, item) pair as one int64 key, with a spare slot per user for the unknown items (no
    # interaction has it); membership of the top-k keys among the relevant ones.
    stride = data.n_items + 1
    relevant = data.user_of_each_interaction() * stride + data.indices
    keys = np.arange(top.shape[0], dtype=np.int64)[:, None] * stride + np.where(top >= 0, top, data.n_items)
    hits = np.isin(keys, relevant).sum(axis=1)
    has = counts > 0
    return float(np.mean(hits[has] / np.minimum(top.shape[1], counts[has]))) if has.any() else float("nan")


def popularity_top(train: UserData, n_users: int, k: int) -> np.ndarray:
    """The k items most training users chose (ties: lower index first), for each of ``n_users``."""
    best = np.argsort(-train.item_counts(), kind="stable")[:k]
    return np.broadcast_to(best, (n_users, best.size))


def catalogue_indices(item_ids: np.ndarray, data: UserData) -> np.ndarray:
    """The catalogue indices of ``data`` for items given by their own ids (any shape); -1 for an id the
    catalogue does not have. Ids are matched as text, so the integer 17 and the string "17" are one item."""
    index = {str(item): i for i, item in enumerate(data.item_ids)}
    flat = np.fromiter((index.get(str(item), -1) for item in np.asarray(item_ids).ravel()), dtype=np.int64,
                       count=np.asarray(item_ids).size)
    return flat.reshape(np.shape(item_ids))


def recall_at_k_of_ids(top_ids: np.ndarray, data: UserData) -> float:
    """:func:`recall_at_k` for top items given by their own ids (a model version with another catalogue)."""
    return recall_at_k(catalogue_indices(top_ids, data), data)
