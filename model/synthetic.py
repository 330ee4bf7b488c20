"""Synthetic e-commerce users: heavy-tailed features, planted segments, sparse interactions.

    python -m model.synthetic --users 1000000 --items 20000 --per-user 20 --out data/
        writes data/users.csv and data/interactions.csv, the two files `python -m model.train`
        reads with --data and --interactions (see model/csv_input.py)

The generator is vectorised per segment (no loop over users), so a million users take
seconds and memory stays proportional to the interactions.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from model.data import UserData, from_pairs
from transformer.helpformat import HelpFormatter

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


def make_synthetic(
    n_users: int = 6000, n_items: int = 200, seed: int = 0, *, per_user: float = 12.0,
    item_prefix: str | None = None,
) -> UserData:
    """Users drawn from six planted segments, with heavy-tailed raw features.

    Counts are negative-binomial, money is log-normal, recency exponential: the long
    tails are what make quantile scaling worth its keep. Each segment prefers its own
    block of the catalogue, so interactions carry the segment.

    Args:
        per_user: mean interactions per user (Poisson, at least 3; repeats are merged).
        item_prefix: give items string ids (``f"{item_prefix}{index:05d}"``) instead of 0 .. n_items - 1.
    """
    rng = np.random.default_rng(seed)
    n_segments = len(_SEGMENTS)
    segments = rng.integers(0, n_segments, size=n_users)

    columns = {name: np.empty(n_users) for name in SYNTHETIC_FEATURES}
    members = [np.flatnonzero(segments == s) for s in range(n_segments)]
    for idx, (_, activity, spend, recency, tenure, abandon, discount, mobile, returns) in zip(members, _SEGMENTS):
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

    # Item preferences: a global popularity plus a block of favourites per segment. Each user
    # draws its items from its segment's preferences (with repeats, merged below).
    popularity = rng.normal(0.0, 0.7, size=n_items)
    blocks = np.array_split(rng.permutation(n_items), n_segments)
    counts = np.clip(rng.poisson(per_user, size=n_users), 3, max(3, n_items // 2))
    users, items = [], []
    for s, idx in enumerate(members):
        logits = popularity.copy()
        logits[blocks[s]] += 3.0
        p = np.exp(logits - logits.max())
        users.append(np.repeat(idx, counts[idx]))
        items.append(rng.choice(n_items, size=int(counts[idx].sum()), p=p / p.sum()))
    item_ids = (np.arange(n_items, dtype=np.int64) if item_prefix is None
                else np.array([f"{item_prefix}{i:05d}" for i in range(n_items)]))
    data, _ = from_pairs(features, SYNTHETIC_FEATURES, np.concatenate(users), np.concatenate(items), item_ids,
                         segments=segments, user_ids=np.array([f"u{u}" for u in range(n_users)]))
    return data


def main(argv: list[str] | None = None) -> int:
    from model.csv_input import write_one_file, write_two_files

    parser = argparse.ArgumentParser(
        prog="python -m model.synthetic",
        description="Write synthetic users as CSV files that `python -m model.train` reads: users.csv "
                    "(user_id, features, segment) and interactions.csv (user_id, item_id), or one users.csv "
                    "with an 'items' column (--one-file).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--users", type=int, default=6000, help="users to generate")
    parser.add_argument("--items", type=int, default=200, help="catalogue size")
    parser.add_argument("--per-user", type=float, default=12.0, help="mean interactions per user")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything generated: the same seed, the same files")
    parser.add_argument("--item-prefix", help="string item ids with this prefix (e.g. 'sku-') instead of integers")
    parser.add_argument("--one-file", action="store_true", help="write one users.csv with an 'items' column")
    parser.add_argument("--out", type=Path, default=Path("data"), help="folder to write into")
    args = parser.parse_args(argv)
    if args.users < 1 or args.items < 2 or args.per_user <= 0:
        parser.error("need --users >= 1, --items >= 2 and --per-user > 0")
    started = time.monotonic()
    data = make_synthetic(args.users, args.items, args.seed, per_user=args.per_user, item_prefix=args.item_prefix)
    args.out.mkdir(parents=True, exist_ok=True)
    written = ([write_one_file(data, args.out / "users.csv")] if args.one_file
               else write_two_files(data, args.out / "users.csv", args.out / "interactions.csv"))
    print(f"wrote {', '.join(map(str, written))}: {data.n_users} users, {data.n_items} items, "
          f"{data.n_interactions} interactions in {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
