"""Users and their interactions, as training holds them: features dense, interactions sparse.

A :class:`UserData` is one row of raw features per user and, per user, the catalogue
indices of the items it interacted with, in compressed sparse row form (``indptr``,
``indices``, optional ``weights``). Memory grows with users x features plus the number of
interactions, never with users x items: 1,000,000 users with 20,000,000 interactions hold
about 260 MB here, where a dense users x items matrix of 20,000 items would take 80 GB.

Items are numbered 0 .. n_items - 1 inside training and the model; ``item_ids`` holds the
users' own id of each (integers or strings), which the bundle records so that answers
carry those ids. The readers are in ``model/csv_input.py``, the generator in
``model/synthetic.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class UserData:
    """Raw user features and sparse interactions.

    Attributes:
        features: float64 (n_users, n_features), raw (unscaled).
        feature_names: the name of each feature column, in order.
        indptr: int64 (n_users + 1,): user u's interactions are ``indices[indptr[u]:indptr[u + 1]]``.
        indices: int32 catalogue indices, sorted and unique within each user.
        item_ids: the catalogue: item index -> the item's own id (int64 or str array).
        weights: float32 weight per interaction, or None (every interaction weighs 1).
        segments: the known segment of each user, or None.
        user_ids: each user's own id (str array), or None.
    """

    features: np.ndarray
    feature_names: tuple[str, ...]
    indptr: np.ndarray
    indices: np.ndarray
    item_ids: np.ndarray
    weights: np.ndarray | None = None
    segments: np.ndarray | None = None
    user_ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = self.features.shape[0]
        if self.features.ndim != 2 or self.features.shape[1] != len(self.feature_names):
            raise ValueError(f"features must have shape (n_users, {len(self.feature_names)}), "
                             f"got {self.features.shape}")
        if self.indptr.shape != (n + 1,) or self.indptr[0] != 0 or self.indptr[-1] != self.indices.size:
            raise ValueError(f"indptr must have {n + 1} offsets from 0 to {self.indices.size}")
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= self.n_items):
            raise ValueError(f"item indices must lie in [0, {self.n_items})")
        if self.weights is not None and self.weights.shape != self.indices.shape:
            raise ValueError(f"{self.weights.size} weights for {self.indices.size} interactions")
        for name, column in (("segment labels", self.segments), ("user ids", self.user_ids)):
            if column is not None and len(column) != n:
                raise ValueError(f"{len(column)} {name} for {n} users")
        if not np.all(np.isfinite(self.features)):
            raise ValueError("features contain NaN or infinite values")

    @property
    def n_users(self) -> int:
        return self.features.shape[0]

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_interactions(self) -> int:
        return int(self.indices.size)

    def items_of(self, user: int) -> np.ndarray:
        """The catalogue indices user ``user`` interacted with."""
        return self.indices[self.indptr[user]:self.indptr[user + 1]]

    def counts(self) -> np.ndarray:
        """Interactions per user."""
        return np.diff(self.indptr)

    def item_counts(self) -> np.ndarray:
        """Users per item (the popularity baseline's ranking)."""
        return np.bincount(self.indices, minlength=self.n_items)

    def subset(self, rows: np.ndarray) -> "UserData":
        """The users ``rows`` (in that order), with their interactions; the catalogue is kept whole."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, counts = self.indptr[rows], np.diff(self.indptr)[rows]
        indptr = np.zeros(rows.size + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        # The positions of the chosen users' interactions, without a Python loop over users.
        take = np.repeat(starts - indptr[:-1], counts) + np.arange(indptr[-1], dtype=np.int64)
        return UserData(
            features=self.features[rows],
            feature_names=self.feature_names,
            indptr=indptr,
            indices=self.indices[take],
            item_ids=self.item_ids,
            weights=None if self.weights is None else self.weights[take],
            segments=None if self.segments is None else self.segments[rows],
            user_ids=None if self.user_ids is None else self.user_ids[rows],
        )

    def ids_fingerprint(self) -> str:
        """The sha256 of the users' ids, sorted (row numbers when the data has no ids): which users these are,
        whatever their order, as the held-out folder and the manifest both record them."""
        import hashlib

        ids = self.user_ids if self.user_ids is not None else np.arange(self.n_users)
        return hashlib.sha256("\n".join(sorted(str(i) for i in ids)).encode()).hexdigest()

    def user_of_each_interaction(self) -> np.ndarray:
        """The user row of every interaction (int64, aligned with ``indices``)."""
        return np.repeat(np.arange(self.n_users, dtype=np.int64), self.counts())


def from_pairs(
    features: np.ndarray,
    feature_names: tuple[str, ...],
    users: np.ndarray,
    items: np.ndarray,
    item_ids: np.ndarray,
    *,
    weights: np.ndarray | None = None,
    segments: np.ndarray | None = None,
    user_ids: np.ndarray | None = None,
) -> tuple[UserData, int]:
    """Build :class:`UserData` from (user row, item index) pairs in any order.

    A pair seen more than once is kept once, its weights summed. Returns the data and how many
    repeated pairs were merged.
    """
    n_users, n_items = features.shape[0], len(item_ids)
    key = users.astype(np.int64) * n_items + items.astype(np.int64)
    order = np.argsort(key, kind="stable")
    key = key[order]
    first = np.ones(key.size, dtype=bool)
    first[1:] = key[1:] != key[:-1]
    unique = key[first]
    merged = int(key.size - unique.size)
    if weights is not None:
        starts = np.flatnonzero(first)
        weights = np.add.reduceat(weights[order].astype(np.float64), starts).astype(np.float32) \
            if starts.size else weights[:0].astype(np.float32)
    del key, order, first
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(unique // n_items, minlength=n_users), out=indptr[1:])
    data = UserData(
        features=features, feature_names=feature_names, indptr=indptr,
        indices=(unique % n_items).astype(np.int32), item_ids=item_ids, weights=weights,
        segments=segments, user_ids=user_ids,
    )
    return data, merged
