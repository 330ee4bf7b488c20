"""User activity data: a deterministic synthetic generator and a CSV loader.

Both produce a :class:`UserData`: one row of raw features per user, the items
each user interacted with, and (when known) the segment each user belongs to.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: The synthetic features, in the order the model expects them.
SYNTHETIC_FEATURES = (
    "sessions_30d",
    "page_views_30d",
    "orders_90d",
    "spend_90d",
    "avg_order_value",
    "days_since_last_order",
    "days_since_signup",
    "cart_abandon_rate",
    "discount_share",
    "returns_90d",
    "mobile_share",
    "reviews_written",
)

#: Planted segments: (name, activity, spend, recency_days, tenure_days,
#: abandon beta(a, b), discount beta(a, b), mobile beta(a, b), return rate).
_SEGMENTS = (
    ("bargain hunters", 8.0, 40.0, 12.0, 500.0, (4, 4), (8, 2), (3, 3), 0.05),
    ("loyal big spenders", 14.0, 400.0, 5.0, 1400.0, (2, 8), (1, 9), (3, 4), 0.15),
    ("window shoppers", 20.0, 15.0, 90.0, 300.0, (8, 2), (3, 3), (4, 3), 0.01),
    ("new users", 3.0, 60.0, 4.0, 20.0, (3, 5), (4, 4), (5, 3), 0.02),
    ("mobile impulse buyers", 10.0, 90.0, 8.0, 250.0, (3, 4), (3, 5), (12, 1), 0.08),
    ("lapsed customers", 1.0, 80.0, 240.0, 1800.0, (5, 5), (2, 5), (2, 4), 0.03),
)


@dataclass(frozen=True)
class UserData:
    """Raw user features and interactions.

    Attributes:
        features: float64 array of shape (n_users, n_features), raw (unscaled).
        feature_names: the name of each feature column, in order.
        interactions: for each user, the item ids it interacted with.
        n_items: size of the item catalogue; item ids are 0 .. n_items - 1.
        segments: the known segment of each user, or None.
    """

    features: np.ndarray
    feature_names: tuple[str, ...]
    interactions: tuple[np.ndarray, ...]
    n_items: int
    segments: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = self.features.shape[0]
        if self.features.ndim != 2 or self.features.shape[1] != len(self.feature_names):
            raise ValueError(
                f"features must have shape (n_users, {len(self.feature_names)}), "
                f"got {self.features.shape}"
            )
        if len(self.interactions) != n:
            raise ValueError(f"{len(self.interactions)} interaction lists for {n} users")
        if self.segments is not None and len(self.segments) != n:
            raise ValueError(f"{len(self.segments)} segment labels for {n} users")
        if not np.all(np.isfinite(self.features)):
            raise ValueError("features contain NaN or infinite values")

    @property
    def n_users(self) -> int:
        return self.features.shape[0]

    def subset(self, rows: np.ndarray) -> "UserData":
        return UserData(
            features=self.features[rows],
            feature_names=self.feature_names,
            interactions=tuple(self.interactions[i] for i in rows),
            n_items=self.n_items,
            segments=None if self.segments is None else self.segments[rows],
        )

    def interaction_matrix(self) -> np.ndarray:
        """Multi-hot float32 matrix (n_users, n_items) of interactions."""
        matrix = np.zeros((self.n_users, self.n_items), dtype=np.float32)
        for user, items in enumerate(self.interactions):
            matrix[user, items] = 1.0
        return matrix


def make_synthetic(
    n_users: int = 6000, n_items: int = 200, seed: int = 0
) -> UserData:
    """Users drawn from six planted segments, with heavy-tailed raw features.

    Counts are negative-binomial, money is log-normal, recency exponential:
    the long tails are what make quantile scaling worth its keep. Each segment
    prefers its own block of the catalogue, so interactions carry the segment.
    """
    rng = np.random.default_rng(seed)
    n_segments = len(_SEGMENTS)
    segments = rng.integers(0, n_segments, size=n_users)

    columns = {name: np.empty(n_users) for name in SYNTHETIC_FEATURES}
    for s, (_, activity, spend, recency, tenure, abandon, discount, mobile, returns) in enumerate(
        _SEGMENTS
    ):
        idx = np.flatnonzero(segments == s)
        m = idx.size
        sessions = rng.negative_binomial(2, 2.0 / (2.0 + activity), size=m)
        orders = rng.negative_binomial(1.5, 1.5 / (1.5 + activity * 0.3), size=m)
        columns["sessions_30d"][idx] = sessions
        columns["page_views_30d"][idx] = sessions * rng.lognormal(1.6, 0.5, size=m)
        columns["orders_90d"][idx] = orders
        aov = rng.lognormal(np.log(spend), 0.6, size=m)
        columns["avg_order_value"][idx] = np.round(aov, 2)
        columns["spend_90d"][idx] = np.round(orders * aov, 2)
        columns["days_since_last_order"][idx] = np.round(rng.exponential(recency, size=m))
        columns["days_since_signup"][idx] = np.round(rng.gamma(2.0, tenure / 2.0, size=m))
        columns["cart_abandon_rate"][idx] = rng.beta(*abandon, size=m)
        columns["discount_share"][idx] = rng.beta(*discount, size=m)
        columns["returns_90d"][idx] = rng.binomial(orders, returns)
        columns["mobile_share"][idx] = rng.beta(*mobile, size=m)
        columns["reviews_written"][idx] = rng.poisson(0.05 * orders * (1 + returns * 10))
    features = np.column_stack([columns[name] for name in SYNTHETIC_FEATURES])

    # Item preferences: a global popularity plus a block of favourites per segment.
    popularity = rng.normal(0.0, 0.7, size=n_items)
    block = np.array_split(rng.permutation(n_items), n_segments)
    preference = np.tile(popularity, (n_segments, 1))
    for s in range(n_segments):
        preference[s, block[s]] += 3.0
    interactions = []
    for user in range(n_users):
        logits = preference[segments[user]] + rng.normal(0.0, 0.5, size=n_items)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        count = int(np.clip(rng.poisson(12), 3, n_items // 2))
        interactions.append(np.sort(rng.choice(n_items, size=count, replace=False, p=p)))

    return UserData(
        features=features,
        feature_names=SYNTHETIC_FEATURES,
        interactions=tuple(interactions),
        n_items=n_items,
        segments=segments,
    )


def load_csv(
    path: str | Path,
    items_column: str = "items",
    label_column: str | None = "segment",
    n_items: int | None = None,
) -> UserData:
    """Read users from a CSV file with a header row.

    Every column is a numeric feature (in file order), except:

    * ``items_column`` (required): the item ids the user interacted with,
      separated by spaces, for example ``"3 17 42"``;
    * ``label_column`` (optional): a known segment label, used only to report
      how well the learned segments agree with it.

    Args:
        path: the CSV file.
        items_column: name of the interactions column.
        label_column: name of the optional label column (None to ignore).
        n_items: catalogue size; defaults to the largest item id + 1.

    Raises:
        ValueError: with the line number and column of the first bad value.
    """
    path = Path(path)
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames
        if not header:
            raise ValueError(f"{path}: empty file, expected a header row")
        if items_column not in header:
            raise ValueError(
                f"{path}: no '{items_column}' column; add one with the item ids each "
                "user interacted with, separated by spaces (e.g. \"3 17 42\")"
            )
        has_label = label_column is not None and label_column in header
        feature_names = tuple(c for c in header if c not in (items_column, label_column))
        if not feature_names:
            raise ValueError(f"{path}: no feature columns besides '{items_column}'")

        rows, interactions, labels = [], [], []
        for line, record in enumerate(reader, start=2):
            row = []
            for name in feature_names:
                raw = record[name]
                try:
                    value = float(raw)
                except (TypeError, ValueError):
                    raise ValueError(
                        f"{path}:{line}: column '{name}' must be a number, got {raw!r}"
                    ) from None
                if not np.isfinite(value):
                    raise ValueError(f"{path}:{line}: column '{name}' must be finite, got {raw!r}")
                row.append(value)
            rows.append(row)
            try:
                items = np.array(sorted({int(t) for t in (record[items_column] or "").split()}))
            except ValueError:
                raise ValueError(
                    f"{path}:{line}: column '{items_column}' must hold whole item ids "
                    f"separated by spaces, got {record[items_column]!r}"
                ) from None
            if items.size and items[0] < 0:
                raise ValueError(f"{path}:{line}: item ids must be >= 0, got {items[0]}")
            interactions.append(items.astype(np.int64))
            if has_label:
                labels.append(record[label_column])

    if not rows:
        raise ValueError(f"{path}: no data rows after the header")
    largest = max((int(i.max()) for i in interactions if i.size), default=-1)
    if n_items is None:
        n_items = largest + 1
    elif largest >= n_items:
        raise ValueError(f"{path}: item id {largest} is outside the catalogue of {n_items} items")
    if n_items < 2:
        raise ValueError(f"{path}: need at least two distinct items to learn a ranking")
    segments = None
    if has_label:
        _, segments = np.unique(np.array(labels), return_inverse=True)
    return UserData(
        features=np.array(rows, dtype=np.float64),
        feature_names=feature_names,
        interactions=tuple(interactions),
        n_items=n_items,
        segments=segments,
    )


def write_csv(data: UserData, path: str | Path) -> None:
    """Write users in the format :func:`load_csv` reads (handy as a template)."""
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        header = list(data.feature_names) + ["items"]
        if data.segments is not None:
            header.append("segment")
        writer.writerow(header)
        for user in range(data.n_users):
            row = [repr(float(v)) for v in data.features[user]]
            row.append(" ".join(str(int(i)) for i in data.interactions[user]))
            if data.segments is not None:
                row.append(int(data.segments[user]))
            writer.writerow(row)
