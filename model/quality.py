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
        top: (n_users, k) catalogue indices, each user's k best items.
    """
    n_users, k = top.shape
    counts = data.counts()
    # A (user, item) pair as one int64 key; membership of the top-k keys among the relevant ones.
    relevant = data.user_of_each_interaction() * data.n_items + data.indices
    keys = np.arange(n_users, dtype=np.int64)[:, None] * data.n_items + top.astype(np.int64)
    hits = np.isin(keys, relevant).sum(axis=1)
    has = counts > 0
    return float(np.mean(hits[has] / np.minimum(k, counts[has]))) if has.any() else float("nan")


def popularity_top(train: UserData, n_users: int, k: int) -> np.ndarray:
    """The k items most training users chose (ties: lower index first), for each of ``n_users``."""
    best = np.argsort(-train.item_counts(), kind="stable")[:k]
    return np.broadcast_to(best, (n_users, best.size))
