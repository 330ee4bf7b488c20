"""Train the embedding model, fit the scikit-learn steps, export everything.

    python -m model.train                       # synthetic data, writes build/
    python -m model.train --data users.csv      # your own users (see model/data.py)

Each run writes a new model version (never replacing an earlier one), in TF
Serving's layout with the transformer's bundle inside it:

    build/models/<name>/<version>/                  SavedModel (features -> embedding, scores)
        assets.extra/transformer-bundle/            manifest.json, scaler.joblib, segments.joblib
    build/models/<name>-fused/<version>/            the fitted steps compiled into the graph (model/fuse.py)

and prints a quality summary: agreement of the learned segments with known
segments (adjusted Rand index) and recall@k on held-out users.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path


import numpy as np
from tqdm import tqdm

from model.data import UserData, load_csv, make_synthetic
from transformer.bundle import BUNDLE_SUBDIR, MANIFEST_FILE, ModelSpec, Rules, sha256_of, write_bundle


@dataclass(frozen=True)
class Quality:
    n_test_users: int
    adjusted_rand_index: float | None
    recall_at_k: float
    popularity_recall_at_k: float
    k: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m model.train",
        description=__doc__.split("\n\n")[0],
        epilog="Example: python -m model.train --data users.csv --segments 5 --top-k 20",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path, help="CSV of users: numeric feature columns, an 'items' column "
                      "of space-separated item ids, optionally a 'segment' label column. "
                      "Without it, synthetic users are generated.")
    data.add_argument("--label-column", default="segment", help="name of the optional label column in --data")
    data.add_argument("--users", type=int, default=6000, help="synthetic users to generate")
    data.add_argument("--items", type=int, default=200, help="synthetic catalogue size")
    data.add_argument("--seed", type=int, default=0, help="seed for data, split and training")
    data.add_argument("--test-fraction", type=float, default=0.2, help="share of users held out for the quality report")

    fit = parser.add_argument_group("model")
    fit.add_argument("--embedding-dim", type=int, default=32)
    fit.add_argument("--epochs", type=int, default=25)
    fit.add_argument("--segments", type=int, help="KMeans clusters (default: the number of known labels, else 6)")
    fit.add_argument("--n-quantiles", type=int, default=1000, help="QuantileTransformer quantiles (capped at the user count)")

    rules = parser.add_argument_group("rules")
    rules.add_argument("--top-k", type=int, default=10, help="items returned per user at most")
    rules.add_argument("--candidates", type=int, default=0,
                       help="best items the model's 'candidates' signature returns (at least --top-k); "
                            "raise it to allow a larger top-k later without retraining")
    rules.add_argument("--min-score", type=float, default=0.3, help="items scoring below this are not returned")

    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("build"), help="build folder (models/ and bundle/ go inside)")
    out.add_argument("--model-name", default="embedder", help="model name on TF Serving")
    out.add_argument("--version", type=int, help="model version to write (default: the next free one); "
                     "an existing version is never overwritten")
    out.add_argument("--no-fused", action="store_true", help="skip the fused model (build/models/<name>-fused)")
    out.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if not 0.0 < args.test_fraction < 1.0:
        parser.error("--test-fraction must be between 0 and 1")
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")
    if not 0.0 <= args.min_score <= 1.0:
        parser.error("--min-score must be within [0, 1] (scores are probabilities)")
    if args.data is not None and not args.data.is_file():
        parser.error(f"--data {args.data}: no such file")
    if args.version is not None:
        if args.version < 1:
            parser.error("--version must be at least 1")
        for folder in output_dirs(args):
            if (folder / str(args.version)).exists():
                parser.error(f"--version {args.version}: {folder / str(args.version)} exists already and model "
                             "versions are never overwritten; leave --version out to write the next free one")
    return args


def output_dirs(args: argparse.Namespace) -> list[Path]:
    """The model folders a training run writes a version into: the embedder's, and the fused model's."""
    dirs = [args.out / "models" / args.model_name]
    return dirs if args.no_fused else [*dirs, args.out / "models" / f"{args.model_name}-fused"]


def split_users(n_users: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed + 1).permutation(n_users)
    n_test = max(1, int(round(n_users * test_fraction)))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def recall_at_k(scores: np.ndarray, data: UserData, k: int) -> float:
    """Mean over users of |top-k ∩ relevant| / min(k, |relevant|)."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    recalls = []
    for row, items in zip(top, data.interactions):
        if items.size:
            recalls.append(np.intersect1d(row, items).size / min(k, items.size))
    return float(np.mean(recalls)) if recalls else float("nan")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))

    try:
        data = load_csv(args.data, label_column=args.label_column) if args.data else make_synthetic(
            n_users=args.users, n_items=args.items, seed=args.seed
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    source = str(args.data) if args.data else f"synthetic (seed {args.seed})"
    say(f"data: {data.n_users} users x {len(data.feature_names)} features, {data.n_items} items, from {source}")
    if data.n_users < 20:
        print("error: need at least 20 users to train and evaluate", file=sys.stderr)
        return 2

    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score
    from sklearn.preprocessing import QuantileTransformer

    import tensorflow as tf

    from model.embedder import train_embedder
    from model.export import (
        CANDIDATE_IDS_OUTPUT, CANDIDATE_SCORES_OUTPUT, CANDIDATES_SIGNATURE, EMBEDDING_OUTPUT, INPUT_NAME,
        SCORES_OUTPUT, SIGNATURE_NAME, EmbedderGraph, VersionExists, export_embedder, next_version,
    )

    train_rows, test_rows = split_users(data.n_users, args.test_fraction, args.seed)
    train, test = data.subset(train_rows), data.subset(test_rows)

    # 1. Quantile scaling, fitted on training users only; float64 in, float32 to the model.
    scaler = QuantileTransformer(
        n_quantiles=min(args.n_quantiles, train.n_users), output_distribution="normal", random_state=args.seed
    )
    X_train = scaler.fit_transform(train.features).astype(np.float32)
    X_test = scaler.transform(test.features).astype(np.float32)

    # 2. The two-tower model.
    bar = tqdm(total=args.epochs, desc="training", unit="epoch", disable=args.quiet, leave=True)

    def on_epoch(epoch, logs):
        bar.set_postfix(loss=f"{logs.get('loss', float('nan')):.4f}")
        bar.update(1)

    weights = train_embedder(
        X_train, train.interaction_matrix(), embedding_dim=args.embedding_dim, epochs=args.epochs,
        seed=args.seed, progress=on_epoch,
    )
    bar.close()

    # 3. Embed with the very graph that will be served, then fit the segments.
    graph = EmbedderGraph(weights)
    train_out = graph.serve(tf.constant(X_train))
    test_out = graph.serve(tf.constant(X_test))
    n_segments = args.segments or (int(data.segments.max()) + 1 if data.segments is not None else 6)
    segments = KMeans(n_clusters=n_segments, n_init=10, random_state=args.seed)
    segments.fit(train_out[EMBEDDING_OUTPUT].numpy().astype(np.float64))

    # 4. Quality on held-out users.
    test_embedding = test_out[EMBEDDING_OUTPUT].numpy().astype(np.float64)
    test_scores = test_out[SCORES_OUTPUT].numpy()
    popularity = np.tile(train.interaction_matrix().sum(axis=0), (test.n_users, 1))
    quality = Quality(
        n_test_users=test.n_users,
        adjusted_rand_index=(
            float(adjusted_rand_score(test.segments, segments.predict(test_embedding)))
            if test.segments is not None else None
        ),
        recall_at_k=recall_at_k(test_scores, test, args.top_k),
        popularity_recall_at_k=recall_at_k(popularity, test, args.top_k),
        k=args.top_k,
    )

    # 5. Export: the SavedModel in TF Serving's layout with its bundle inside, as one new version folder.
    model_dir = args.out / "models" / args.model_name
    # Numbers are shared by both folders, even with --no-fused: one number, one training.
    version = args.version or next_version(model_dir, args.out / "models" / f"{args.model_name}-fused")
    n_candidates = min(max(args.top_k, args.candidates), data.n_items)

    def add_bundle(version_dir: Path) -> None:
        write_bundle(
            version_dir,
            scaler=scaler,
            segments=segments,
            feature_names=data.feature_names,
            feature_min=tuple(train.features.min(axis=0)),
            feature_max=tuple(train.features.max(axis=0)),
            model=ModelSpec(
                name=args.model_name, version=version, signature_name=SIGNATURE_NAME, input_name=INPUT_NAME,
                embedding_output=EMBEDDING_OUTPUT, scores_output=SCORES_OUTPUT,
                n_features=len(data.feature_names), embedding_dim=weights.embedding_dim, n_items=data.n_items,
                candidates_signature=CANDIDATES_SIGNATURE, candidate_ids_output=CANDIDATE_IDS_OUTPUT,
                candidate_scores_output=CANDIDATE_SCORES_OUTPUT, n_candidates=n_candidates,
            ),
            rules=Rules(min_score=args.min_score, top_k=args.top_k),
            extra={
                "training": {
                    "data": source,
                    "seed": args.seed,
                    "n_train_users": train.n_users,
                    "quality": quality.__dict__,
                    "tensorflow": tf.__version__,
                }
            },
        )

    try:
        saved = export_embedder(weights, model_dir, version, n_candidates, complete=add_bundle)
    except VersionExists as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    # 6. Fused mode: the same fitted steps compiled into one graph TF Serving can answer alone.
    fused = None
    if not args.no_fused:
        from model.fuse import export_fused

        fused = export_fused(saved, args.out / "models" / f"{args.model_name}-fused", version)

    say("")
    say(f"quality on {quality.n_test_users} held-out users:")
    if quality.adjusted_rand_index is not None:
        say(f"  segments  adjusted Rand index vs known segments: {quality.adjusted_rand_index:.3f}")
    say(f"  items     recall@{quality.k}: {quality.recall_at_k:.3f}  (popularity baseline {quality.popularity_recall_at_k:.3f})")
    say(f"wrote model version {version}: {saved} (with its transformer bundle in {BUNDLE_SUBDIR})"
        + (f" and {fused}" if fused else "") + f" in {time.monotonic() - started:.1f}s")
    say(f"its manifest's sha256 (to pin with the transformer's --trusted_manifests): "
        f"{sha256_of(saved / BUNDLE_SUBDIR / MANIFEST_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
