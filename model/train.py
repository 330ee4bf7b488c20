"""Train the embedding model, fit the scikit-learn steps, export everything.

    python -m model.train                                   # synthetic data, writes build/
    python -m model.train --data users.csv --interactions interactions.csv
                                                            # your users and their interactions
    python -m model.train --data users.csv                  # one file with an 'items' column
                                                            # (both forms: model/csv_input.py)

Each run writes a new model version (never replacing an earlier one), in TF
Serving's layout with the transformer's bundle inside it:

    build/models/<name>/<version>/                  SavedModel (features -> embedding, scores)
        assets.extra/transformer-bundle/            manifest.json, fitted.npz (with the item ids), joblib files
    build/models/<name>-fused/<version>/            the fitted steps compiled into the graph (model/fuse.py)

and prints a quality summary: agreement of the learned segments with known
segments (adjusted Rand index) and recall@k on held-out users.

Memory grows with users x features and with the interactions, never with users x items:
interactions stay sparse from the file to the loss (``model/embedder.py``), training reads
them back from TFRecord shards through ``tf.data`` (``model/input_pipeline.py``), and
quality is computed in batches (``model/quality.py``).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from model.csv_input import DataError, load_one_file, load_two_files, write_two_files
from model.data import UserData
from model.distributed import (
    TF_CONFIG, ClusterConfigError, cluster_strategy, finish, role_from_environment, run_local_workers,
)
from model.options import HelpFormatter, add_options, from_args, problems
from model.progress import progress
from model.quality import Quality, popularity_top, recall_at_k
from model.synthetic import make_synthetic
from transformer.store.bundle import (
    BUNDLE_SUBDIR, MANIFEST_FILE, BundleError, ModelSpec, Rules, load_bundle, model_versions, sha256_of, write_bundle,
)
from transformer.store.interface import (
    Interface, InterfaceFileError, differences, interface_file, read_interface, write_interface,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m model.train",
        description=__doc__.split("\n\n")[0],
        epilog="Example: python -m model.train --data users.csv --segments 5 --top-k 20",
        formatter_class=HelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path, help="CSV of users: numeric feature columns, optionally a user id "
                      "column and a label column; with --interactions, one row per user; without it, also an "
                      "'items' column of space-separated item ids. Without --data, synthetic users are generated.")
    data.add_argument("--interactions", type=Path, help="CSV of interactions, one row per (user, item): the user "
                      "id column, the item id column, optionally a weight column; other columns are ignored")
    data.add_argument("--items-column", default="items", help="the one-file form's column of item ids")
    data.add_argument("--users", type=int, default=6000, help="synthetic users to generate (without --data)")
    data.add_argument("--items", type=int, default=200, help="synthetic catalogue size (without --data)")
    add_options(parser, {"data": data})

    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("build"), help="build folder: the version goes into its "
                     "models/<name>/<version>/ and models/<name>-fused/<version>/")
    out.add_argument("--model-name", default="embedder", help="model name on TF Serving; a new name starts a new "
                     "model beside the others (the way to change the features, top-k, segments or item ids)")
    out.add_argument("--new-model", action="store_true", help="train even when the model's served interface "
                     "(its features by name and order, top-k, segments, item id type) differs: the version starts "
                     "that interface anew and every client must change (a running transformer keeps serving the old version while "
                     "TF Serving still loads it; one started later serves the new)")
    out.add_argument("--version", type=int, help="model version to write (default: the next free one); "
                     "an existing version is never overwritten")
    out.add_argument("--no-fused", action="store_true", help="skip the fused model (build/models/<name>-fused)")
    out.add_argument("--held-out", type=Path, metavar="DIR", help="also write the held-out users to DIR "
                     "(users.csv and interactions.csv, the two-file form) with the popularity baseline's items "
                     "(popularity.json): what the quality gate (model/gate.py) judges versions on")
    out.add_argument("--quiet", action="store_true", help="no progress bars and no summary; errors are still "
                     "printed, and the version written is in the build folder")
    args = parser.parse_args(argv)
    if args.distributed_workers > 1 and os.environ.get(TF_CONFIG):
        parser.error(f"--distributed-workers starts its own workers; this process already has {TF_CONFIG} "
                     "(it is one worker of a cluster): leave one of the two out")
    for problem in problems(from_args(args)):
        parser.error(problem)
    for flag, path in (("--data", args.data), ("--interactions", args.interactions)):
        if path is not None and not path.is_file():
            parser.error(f"{flag} {path}: no such file")
    if args.interactions is not None and args.data is None:
        parser.error("--interactions needs --data, the users file its user ids refer to")
    if args.data is None and (args.features or args.exclude_columns):
        parser.error("--features and --exclude-columns choose columns of --data; synthetic users have their own")
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


def read_data(args: argparse.Namespace) -> tuple[UserData, str]:
    """The users the flags name (raises DataError), and a description of where they came from."""
    progress = not args.quiet
    if args.interactions is not None:
        data, summary = load_two_files(
            args.data, args.interactions, user_column=args.user_column, item_column=args.item_column,
            weight_column=args.weight_column, label_column=args.label_column,
            skip_unknown_users=args.skip_unknown_users, features=args.features, exclude=args.exclude_columns,
            drop_users_without_interactions=args.drop_users_without_interactions, progress=progress)
        source = f"{args.data} + {args.interactions}"
    elif args.data is not None:
        data, summary = load_one_file(
            args.data, items_column=args.items_column, label_column=args.label_column, user_column=args.user_column,
            features=args.features, exclude=args.exclude_columns,
            drop_users_without_interactions=args.drop_users_without_interactions, progress=progress)
        source = str(args.data)
    else:
        return make_synthetic(n_users=args.users, n_items=args.items, seed=args.seed), f"synthetic (seed {args.seed})"
    if not args.quiet:
        print(summary.describe(), flush=True)
    return data, source


def segments_for(args: argparse.Namespace, data: UserData) -> int:
    """KMeans clusters: --segments, else as many as the data's known segments, else 6."""
    return args.segments or (int(data.segments.max()) + 1 if data.segments is not None else 6)


def served_interface(model_dir: Path) -> tuple[Interface | None, str]:
    """The interface the model in ``model_dir`` serves its clients, and where it was read: the recorded one
    (``interface.json``), else its newest version whose bundle verifies (None: a new model)."""
    recorded = read_interface(model_dir)  # InterfaceFileError: said by the caller
    if recorded is not None:
        return recorded, str(interface_file(model_dir))
    for version in reversed(model_versions(model_dir)):
        try:
            return Interface.of(load_bundle(model_dir / str(version))), f"version {version}"
        except BundleError:
            continue
    return None, ""


def interface_problem(args: argparse.Namespace, candidate: Interface) -> str:
    """Why training into ``--out`` would break the clients of the model served from there ("": it would not)."""
    model_dir = args.out / "models" / args.model_name
    try:
        served, where = served_interface(model_dir)
    except InterfaceFileError as exc:
        return str(exc)
    changes = differences(served, candidate) if served is not None else []
    if not changes or args.new_model:
        return ""
    keep = []
    if served.features != candidate.features:
        keep.append(served.features_flag())
    if served.top_k != candidate.top_k:
        keep.append(f"--top-k {served.top_k}")
    if served.n_segments != candidate.n_segments:
        keep.append(f"--segments {served.n_segments}")
    lines = [f"{model_dir} serves another interface ({where}), and every client of it would break:"]
    lines += [f"  {change}" for change in changes]
    lines.append("To keep it, train with:  " + "  ".join(keep) if keep else
                 "To keep it, train on item ids of the served type (the interactions' item column)")
    if served.features != candidate.features:
        lines.append("  (the users file must have those columns: rename a column back where it was renamed)")
    lines.append(f"To serve the change beside it:  --model-name {args.model_name}-v2  (a new model; move the "
                 "clients to it, then retire the old one)")
    lines.append("To replace this model's interface on purpose:  --new-model  (every client must change; a running "
                 "transformer keeps serving the old version while TF Serving still loads it)")
    return "\n".join(lines)


def batch_size_for(args: argparse.Namespace, n_train: int) -> int:
    """A twentieth of the users, as a power of two from 128 to 2048: the demo's 4,800 users train in
    batches of 256 (the same quality as 128 in 0.85x the time), 800,000 users in 390 steps of 2048."""
    return args.batch_size or int(np.clip(2 ** round(np.log2(max(n_train, 1) / 20)), 128, 2048))


def write_held_out(directory: Path, train: UserData, test: UserData, k: int) -> None:
    """The held-out users in the two-file form, and the k items most training users chose (by their ids)."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    write_two_files(test, directory / "users.csv", directory / "interactions.csv")
    best = popularity_top(train, 1, k)[0]
    (directory / "popularity.json").write_text(json.dumps({"k": k, "item_ids": [str(i) for i in train.item_ids[best]]}))


EXAMPLES_PREFIX = ".examples-"  # the training examples' shards, in --out while a run trains: .examples-<pid>-<random>


def remove_leftover_examples(out: Path) -> list[Path]:
    """Remove the example folders that runs which are gone (killed before their clean-up) left in ``out``; the
    folders removed. A folder of a process that still runs (another training into the same --out) is kept."""
    removed = []
    for folder in sorted(out.glob(f"{EXAMPLES_PREFIX}*")) if out.is_dir() else []:
        pid = folder.name[len(EXAMPLES_PREFIX):].split("-")[0]
        if folder.is_dir() and (not pid.isdigit() or not _running(int(pid))):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


class Terminated(SystemExit):
    """SIGTERM (a pod deleted, a pipeline task cancelled): exit 143, running every clean-up on the way out."""


def _terminate(signum, frame) -> None:
    raise Terminated(128 + signum)


def peak_memory_gib() -> float:
    """This process's peak resident memory (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def without_workers_flag(argv: list[str]) -> list[str]:
    """The command line minus ``--distributed-workers N`` (each worker gets the rest)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--distributed-workers":
            skip = True
        elif not arg.startswith("--distributed-workers="):
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    """Train, export, report; SIGTERM ends it with exit 143 after removing what it wrote so far (the examples'
    shards; a version is written under a temporary name and renamed into place last, so none is half there)."""
    import signal

    previous = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.distributed_workers > 1:
        return run_local_workers(args.distributed_workers, without_workers_flag(argv))
    try:
        role = role_from_environment()
    except ClusterConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = time.monotonic()
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))

    try:
        data, source = read_data(args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    say(f"data: {data.n_users} users x {len(data.feature_names)} features, {data.n_items} items, "
        f"{data.n_interactions} interactions, from {source}")
    if data.n_users < 20:
        print("error: need at least 20 users to train and evaluate", file=sys.stderr)
        return 2
    # Before any training: the header of the users' file is enough to tell a change that breaks the clients.
    n_segments = segments_for(args, data)
    interface = Interface.of_parts(data.feature_names, args.top_k, n_segments, data.item_ids)
    problem = interface_problem(args, interface)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score
    from sklearn.preprocessing import QuantileTransformer

    import tensorflow as tf

    # Before any other TensorFlow op: the strategy sets up this worker's collective runtime.
    strategy = None
    if role is not None:
        strategy = cluster_strategy()
        say(f"worker {role.index} of {role.workers}" + (" (chief: writes the version)" if role.is_chief else ""))

    from model.embedder import train_embedder
    from model.export import (
        CANDIDATE_IDS_OUTPUT, CANDIDATE_SCORES_OUTPUT, CANDIDATES_SIGNATURE, EMBEDDING_OUTPUT, INPUT_NAME,
        SCORES_OUTPUT, SIGNATURE_NAME, EmbedderGraph, VersionExists, export_embedder, next_version,
    )
    from model.input_pipeline import write_shards

    train_rows, test_rows = split_users(data.n_users, args.test_fraction, args.seed)
    train, test = data.subset(train_rows), data.subset(test_rows)
    del data  # the two parts hold everything from here on
    if args.held_out is not None and (role is None or role.is_chief):
        write_held_out(args.held_out, train, test, args.top_k)

    # 1. Quantile scaling, fitted on training users only; float64 in, float32 to the model.
    scaler = QuantileTransformer(
        n_quantiles=min(args.n_quantiles, train.n_users), output_distribution="normal", random_state=args.seed
    )
    X_train = scaler.fit_transform(train.features).astype(np.float32)
    X_test = scaler.transform(test.features).astype(np.float32)

    # 2. The two-tower model, from example shards on disk (what distributed workers would share out).
    batch_size = batch_size_for(args, train.n_users)
    bar = progress(total=args.epochs, desc="training", unit="epoch", disable=args.quiet, leave=True)

    def on_epoch(epoch, logs):
        bar.set_postfix(loss=f"{logs.get('loss', float('nan')):.4f}")
        bar.update(1)

    chief = role is None or role.is_chief
    workers = 1 if role is None else role.workers
    batch_size -= batch_size % workers  # each worker takes an equal share of every step's users
    if chief:
        args.out.mkdir(parents=True, exist_ok=True)
        for folder in remove_leftover_examples(args.out):
            say(f"removed {folder}, left by a run that was killed before it could clean up")
    # Every worker writes the same shards (same users, same seed) and reads only its own files of them.
    shards = Path(tempfile.mkdtemp(prefix=f"{EXAMPLES_PREFIX}{os.getpid()}-", dir=args.out if chief else None))
    steps_per_epoch = -(-train.n_users // batch_size)
    training_started = time.monotonic()
    try:
        weights = train_embedder(
            write_shards(X_train, train, shards, seed=args.seed, min_shards=workers), n_features=X_train.shape[1],
            n_items=train.n_items, weighted=train.weights is not None, embedding_dim=args.embedding_dim,
            epochs=args.epochs, batch_size=batch_size, negatives=args.negatives,
            item_prior=train.item_counts() / train.n_users, seed=args.seed, progress=on_epoch,
            strategy=strategy, steps_per_epoch=steps_per_epoch,
        )
    finally:
        shutil.rmtree(shards, ignore_errors=True)
    bar.close()
    training_seconds = time.monotonic() - training_started  # the shards and the epochs
    if not chief:
        finish(strategy)
        say(f"worker {role.index} of {role.workers}: trained; the chief writes the version")
        return 0

    # 3. Embed with the very graph that will be served, then fit the segments (on a sample of users).
    graph = EmbedderGraph(weights, n_candidates=args.top_k)
    sample = np.random.default_rng(args.seed + 2).permutation(train.n_users)[:args.kmeans_sample]
    segments = KMeans(n_clusters=n_segments, n_init=10, random_state=args.seed)
    segments.fit(graph.candidates_in_batches(X_train[np.sort(sample)])[0].astype(np.float64))

    # 4. Quality on held-out users, in batches (never a users x items matrix).
    test_embedding, test_top = graph.candidates_in_batches(X_test)
    quality = Quality(
        n_test_users=test.n_users,
        adjusted_rand_index=(
            float(adjusted_rand_score(test.segments, segments.predict(test_embedding.astype(np.float64))))
            if test.segments is not None else None
        ),
        recall_at_k=recall_at_k(test_top, test),
        popularity_recall_at_k=recall_at_k(popularity_top(train, test.n_users, args.top_k), test),
        k=args.top_k,
    )
    del X_train, X_test, test_embedding, test_top

    # 5. Export: the SavedModel in TF Serving's layout with its bundle inside, as one new version folder.
    model_dir = args.out / "models" / args.model_name
    # Numbers are shared by both folders, even with --no-fused: one number, one training.
    version = args.version or next_version(model_dir, args.out / "models" / f"{args.model_name}-fused")
    n_candidates = min(max(args.top_k, args.candidates), train.n_items)

    def add_bundle(version_dir: Path) -> None:
        write_bundle(
            version_dir,
            scaler=scaler,
            segments=segments,
            feature_names=train.feature_names,
            item_ids=train.item_ids,
            feature_min=tuple(train.features.min(axis=0)),
            feature_max=tuple(train.features.max(axis=0)),
            model=ModelSpec(
                name=args.model_name, version=version, signature_name=SIGNATURE_NAME, input_name=INPUT_NAME,
                embedding_output=EMBEDDING_OUTPUT, scores_output=SCORES_OUTPUT,
                n_features=len(train.feature_names), embedding_dim=weights.embedding_dim, n_items=train.n_items,
                candidates_signature=CANDIDATES_SIGNATURE, candidate_ids_output=CANDIDATE_IDS_OUTPUT,
                candidate_scores_output=CANDIDATE_SCORES_OUTPUT, n_candidates=n_candidates,
            ),
            rules=Rules(min_score=args.min_score, top_k=args.top_k),
            extra={
                "training": {
                    "data": source,
                    "seed": args.seed,
                    "test_fraction": args.test_fraction,
                    "n_train_users": train.n_users,
                    # Which users the quality figures (and the gate, through --held-out) are measured on.
                    "held_out": {"users": test.n_users, "ids_sha256": test.ids_fingerprint(),
                                 "train_ids_sha256": train.ids_fingerprint()},
                    "n_train_interactions": train.n_interactions,
                    "batch_size": batch_size,
                    "workers": workers,
                    "epochs": args.epochs,
                    "steps_per_epoch": steps_per_epoch,
                    "training_seconds": round(training_seconds, 2),
                    "parameters": weights.n_parameters,
                    "negatives": min(args.negatives, train.n_items),
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
    # What the model's clients call from now on (a first version, a store from before the record, --new-model):
    # transformers started later serve this interface whatever else lands in the folder.
    if args.new_model or read_interface(model_dir) is None:
        write_interface(model_dir, interface)

    # 6. Fused mode: the same fitted steps compiled into one graph TF Serving can answer alone.
    fused = None
    if not args.no_fused:
        from model.fuse import export_fused

        fused = export_fused(saved, args.out / "models" / f"{args.model_name}-fused", version)
    if strategy is not None:
        finish(strategy)

    say("")
    say(f"quality on {quality.n_test_users} held-out users:")
    if quality.adjusted_rand_index is not None:
        say(f"  segments  adjusted Rand index vs known segments: {quality.adjusted_rand_index:.3f}")
    say(f"  items     recall@{quality.k}: {quality.recall_at_k:.3f}  (popularity baseline {quality.popularity_recall_at_k:.3f})")
    say(f"wrote model version {version}: {saved} (with its transformer bundle in {BUNDLE_SUBDIR})"
        + (f" and {fused}" if fused else "") + f" in {time.monotonic() - started:.1f}s, "
        f"peak memory {peak_memory_gib():.2f} GiB")
    say(f"its manifest's sha256 (to pin with the transformer's --trusted_manifests): "
        f"{sha256_of(saved / BUNDLE_SUBDIR / MANIFEST_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
