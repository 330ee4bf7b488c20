"""Retrain, gate, check, publish and roll out the model: a Kubeflow Pipelines v2 pipeline.

    python -m model.pipeline compile --out embedder-retrain.yaml      # for a Kubeflow Pipelines cluster
    python -m model.pipeline run-local --data users.csv --interactions interactions.csv \\
        --model-store build/models [--transformer-url http://127.0.0.1:8080]

Tasks, in order (each a component; its outputs show in the KFP UI):

    train      the next version from the two CSV files (paths: on a cluster, on the model store's volume,
               /mnt/model-store/data/ by default), with the held-out users -> candidate (Model), held-out, metrics
    evaluate   the quality gate against the served version        -> metrics, report (Markdown); fails the run
    verify     the transformer's bundle checks, TF Serving's ops, fused parity      -> report; fails the run
    publish    into the model store, atomically                  -> the version number
    rollout    cluster: patch the InferenceService, wait for both Deployments, smoke, roll back on failure;
               local: wait until the transformer at --transformer-url answers with the new version

``run-local`` runs the same pipeline with KFP's local runner (``SubprocessRunner``: each task a process on
this machine, no cluster, no container engine). On a cluster the components run in the training image
(``model/Dockerfile``) with the model store's volume mounted at ``/mnt/model-store`` (README, "Retrain with
Kubeflow Pipelines").
"""


import argparse
import sys
import time
from pathlib import Path

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

TRAINING_IMAGE = "docker.io/library/kserve-embedder-training:dev"
STORE_CLAIM = "embedder-model-store"  # the PersistentVolumeClaim of the model store (manifests/pipeline/)
STORE_MOUNT = "/mnt/model-store"
CLUSTER_STORE = f"{STORE_MOUNT}/models"  # the store's <name>/<version> folders inside the claim
# The users' files, on the same claim. Kubeflow Pipelines' launcher reads artifacts from gs://, s3://, minio:// and
# mem:// only and returns without error when no object matches, so an importer of files nobody uploaded fails later
# with a missing file; a path on the mounted claim is checked by the train task itself (kind: build/data/).
CLUSTER_DATA = f"{STORE_MOUNT}/data"
CLUSTER_USERS, CLUSTER_INTERACTIONS = f"{CLUSTER_DATA}/users.csv", f"{CLUSTER_DATA}/interactions.csv"

component = dsl.component(base_image=TRAINING_IMAGE, install_kfp_package=False)


@component
def train(users_path: str, interactions_path: str, model_store: str, model_name: str, epochs: int,
          embedding_dim: int, segments: int, top_k: int, min_score: float, seed: int, test_fraction: float,
          user_column: str, item_column: str, weight_column: str, distributed_workers: int,
          candidate: Output[Model], held_out: Output[Dataset], metrics: Output[Metrics]) -> int:
    """Train the model store's next version from the users and their interactions (files the task can read: on a
    cluster, on the model store's volume)."""
    from model.release import input_digests, train_candidate

    version, quality = train_candidate(
        users_path, interactions_path, candidate.path, held_out.path, model_store, model_name,
        dict(epochs=epochs, embedding_dim=embedding_dim, segments=segments, top_k=top_k, min_score=min_score,
             seed=seed, test_fraction=test_fraction, user_column=user_column, item_column=item_column,
             weight_column=weight_column, distributed_workers=distributed_workers))
    candidate.metadata["version"] = version
    candidate.metadata.update(input_digests(users_path, interactions_path))  # which files it was trained on
    for name, value in quality.items():
        if isinstance(value, (int, float)):
            metrics.log_metric(name, value)
    print(f"trained version {version}: {quality}")
    return version


@component
def evaluate(candidate: Input[Model], held_out: Input[Dataset], model_store: str, model_name: str,
             min_lift_over_popularity: float, max_drop_from_served: float, metrics: Output[Metrics],
             report: Output[Markdown]):
    """The quality gate: the candidate against the served version on the same held-out users."""
    from model.gate import Thresholds
    from model.release import GateFailed, gate_candidate

    result = gate_candidate(candidate.path, held_out.path, model_store, model_name,
                            Thresholds(min_lift_over_popularity, max_drop_from_served))
    for name, value in result.metrics().items():
        metrics.log_metric(name, value)
    with open(report.path, "w") as f:
        f.write(result.markdown())
    print(result.markdown())
    if not result.passed:
        raise GateFailed("the candidate failed the quality gate: " + "; ".join(result.reasons))


@component
def verify(candidate: Input[Model], model_name: str, report: Output[Markdown]):
    """What would refuse the candidate later, checked now."""
    from model.release import ChecksFailed, check_candidate

    result = check_candidate(candidate.path, model_name)
    with open(report.path, "w") as f:
        f.write(result.markdown())
    print(result.markdown())
    if result.problems:
        raise ChecksFailed("the candidate failed its checks: " + "; ".join(result.problems))


@component
def publish(candidate: Input[Model], model_store: str, model_name: str) -> int:
    """Copy the candidate's version into the model store, atomically; its number."""
    from model.release import publish_candidate

    version = publish_candidate(candidate.path, model_store, model_name)
    print(f"published version {version} into {model_store}")
    return version


@component
def rollout(candidate: Input[Model], version: int, model_store: str, model_name: str, mode: str,
            transformer_url: str, namespace: str, isvc_name: str, timeout_seconds: float) -> str:
    """Make the published version what clients get (mode: cluster, local or none)."""
    from model.release import candidate_dir, retire_version
    from model.rollout import ClusterTarget, probe_row, rollout_on_cluster, wait_until_served
    from transformer.store.bundle import load_bundle

    bundle = load_bundle(candidate_dir(candidate.path, model_name))
    row = probe_row(bundle.feature_min, bundle.feature_max)
    if mode == "none":
        line = f"version {version} is in {model_store}; nothing was asked to roll it out"
    elif mode == "local":
        url = f"{transformer_url.rstrip('/')}/v1/models/{model_name}:predict"
        line = f"{url} answers with version {version} after {wait_until_served(url, version, row, timeout=timeout_seconds):.1f}s"
    elif mode == "cluster":
        target = ClusterTarget(namespace=namespace, name=isvc_name, model=model_name, service_url=transformer_url)
        line = rollout_on_cluster(target, version, row, timeout=timeout_seconds,
                                  retire=lambda: retire_version(model_store, model_name, version))
    else:
        raise ValueError(f"mode must be cluster, local or none, got {mode!r}")
    print(line)
    return line


def mount_store(task) -> None:
    """The model store's volume in the task's pod (a no-op for the local runner, which reads the path)."""
    from kfp import kubernetes

    kubernetes.mount_pvc(task, pvc_name=STORE_CLAIM, mount_path=STORE_MOUNT)


@dsl.pipeline(name="embedder-retrain",
              description="Retrain the user embedding model and its scikit-learn steps, gate the candidate against "
                          "the served version, check it, publish it into the model store and roll it out.")
def retrain(users_path: str = CLUSTER_USERS, interactions_path: str = CLUSTER_INTERACTIONS,
            model_store: str = CLUSTER_STORE, model_name: str = "embedder",
            epochs: int = 25, embedding_dim: int = 32, segments: int = 0, top_k: int = 10, min_score: float = 0.3,
            seed: int = 0, test_fraction: float = 0.2, user_column: str = "user_id", item_column: str = "item_id",
            weight_column: str = "", distributed_workers: int = 1, min_lift_over_popularity: float = 0.10,
            max_drop_from_served: float = 0.10, rollout_mode: str = "cluster", transformer_url: str = "",
            namespace: str = "embedder", isvc_name: str = "embedder", rollout_timeout_seconds: float = 600.0):
    trained = train(users_path=users_path, interactions_path=interactions_path, model_store=model_store,
                    model_name=model_name, epochs=epochs, embedding_dim=embedding_dim, segments=segments, top_k=top_k,
                    min_score=min_score, seed=seed, test_fraction=test_fraction, user_column=user_column,
                    item_column=item_column, weight_column=weight_column, distributed_workers=distributed_workers)
    gate = evaluate(candidate=trained.outputs["candidate"], held_out=trained.outputs["held_out"],
                    model_store=model_store, model_name=model_name,
                    min_lift_over_popularity=min_lift_over_popularity, max_drop_from_served=max_drop_from_served)
    checks = verify(candidate=trained.outputs["candidate"], model_name=model_name).after(gate)
    published = publish(candidate=trained.outputs["candidate"], model_store=model_store,
                        model_name=model_name).after(checks)
    rolled = rollout(candidate=trained.outputs["candidate"], version=published.output, model_store=model_store,
                     model_name=model_name, mode=rollout_mode, transformer_url=transformer_url, namespace=namespace,
                     isvc_name=isvc_name, timeout_seconds=rollout_timeout_seconds)
    for task in (trained, gate, checks, published, rolled):
        task.set_caching_options(False)  # each run trains anew and reads the store as it is now
    for task in (trained, gate, published, rolled):
        mount_store(task)


def compile_pipeline(out: str | Path) -> Path:
    from kfp import compiler

    compiler.Compiler().compile(retrain, str(out))
    return Path(out)


def run_local(args: argparse.Namespace) -> int:
    """Run the pipeline with KFP's SubprocessRunner in this Python (which has the project installed)."""
    from kfp import local

    work = (args.workdir or args.model_store.parent / "pipeline-runs").resolve()
    work.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(work / "outputs"),
               workspace_root=str(work / "workspace"), raise_on_error=True)
    started, began = time.monotonic(), time.time()
    try:
        retrain(
            users_path=str(args.data.resolve()), interactions_path=str(args.interactions.resolve()),
            model_store=str(args.model_store.resolve()), model_name=args.model_name, epochs=args.epochs,
            embedding_dim=args.embedding_dim, seed=args.seed, top_k=args.top_k, min_score=args.min_score,
            distributed_workers=args.distributed_workers, user_column=args.user_column, item_column=args.item_column,
            weight_column=args.weight_column or "",
            min_lift_over_popularity=args.min_lift_over_popularity, max_drop_from_served=args.max_drop_from_served,
            rollout_mode="local" if args.transformer_url else "none", transformer_url=args.transformer_url or "",
            rollout_timeout_seconds=args.rollout_timeout)
    except RuntimeError as exc:
        print(f"error: the pipeline failed: {failure_reason(work, since=began) or exc}", file=sys.stderr)
        print("nothing was published when the gate or the checks failed; the task logs above have the details",
              file=sys.stderr)
        return 1
    print(f"pipeline done in {time.monotonic() - started:.0f}s: version published into {args.model_store}"
          + (f" and served by {args.transformer_url}" if args.transformer_url else ""))
    return 0


def failure_reason(work: Path, since: float = 0.0) -> str | None:
    """The reasons of the newest failing report (the gate's or the checks') written since ``since`` (this run's
    start: an earlier run's report in the same folder is not this run's reason)."""
    reports = [p for p in (work / "outputs").glob("**/report") if p.stat().st_mtime >= since]
    for report in sorted(reports, key=lambda p: p.stat().st_mtime, reverse=True):
        lines = report.read_text().splitlines()
        if "Fails because:" in lines:
            return lines[0].lstrip("# ") + ": " + "; ".join(line[2:] for line in lines if line.startswith("- "))
    return None


def store_problem(store: Path, name: str, new_model: bool) -> str | None:
    """Why ``store`` is not the model store to publish ``name`` into (None: it is). A model's own folder given as
    the store would get a nested ``<name>/<name>/1`` that nothing serves, while the rollout saw the old version
    answer and called it a success."""
    from transformer.store.bundle import model_versions

    if model_versions(store):
        return (f"--model-store {store} is the folder of one model (it holds version folders "
                f"{', '.join(map(str, model_versions(store)))}): pass the store that holds it, {store.parent}")
    if new_model or (store / name).is_dir():
        return None
    held = sorted(p.name for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")) if store.is_dir() else []
    return (f"--model-store {store} holds no model {name!r} ("
            + (f"it holds {', '.join(held)}" if held else "it is empty or does not exist")
            + "): pass the store whose <model>/<version>/ folders the transformer serves (build/models for the local "
              f"stack), or add --new-model to start {name!r} there")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m model.pipeline", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    commands = parser.add_subparsers(dest="command", required=True)
    compile_cmd = commands.add_parser("compile", help="write the pipeline's YAML for a Kubeflow Pipelines cluster")
    compile_cmd.add_argument("--out", type=Path, required=True, help="the YAML file to write")
    run = commands.add_parser("run-local", help="run the pipeline on this machine with KFP's local runner",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run.add_argument("--data", type=Path, required=True, help="CSV of users (python -m model.train --help)")
    run.add_argument("--interactions", type=Path, required=True, help="CSV of interactions, one row per (user, item)")
    run.add_argument("--model-store", type=Path, required=True,
                     help="the folder of <model>/<version>/ folders the transformer and TF Serving read "
                          "(build/models for the local stack)")
    run.add_argument("--transformer-url", help="the running transformer (e.g. http://127.0.0.1:8080): wait until "
                     "it answers with the new version; without it, the run ends once the version is published")
    run.add_argument("--workdir", type=Path, help="the runs' outputs (default: pipeline-runs/ beside the store)")
    run.add_argument("--model-name", default="embedder",
                     help="the model's folder in the store: a new name publishes a new model beside the served one")
    run.add_argument("--new-model", action="store_true",
                     help="the store holds no --model-name folder yet: start it (a first model, or a deliberate "
                          "interface change served beside the old one)")
    run.add_argument("--epochs", type=int, default=25)
    run.add_argument("--embedding-dim", type=int, default=32)
    run.add_argument("--top-k", type=int, default=10)
    run.add_argument("--min-score", type=float, default=0.3)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--user-column", default="user_id")
    run.add_argument("--item-column", default="item_id")
    run.add_argument("--weight-column", help="positive weight column of --interactions (default: all 1)")
    run.add_argument("--distributed-workers", type=int, default=1, help="train on this many local worker processes")
    run.add_argument("--min-lift-over-popularity", type=float, default=0.10,
                     help="the candidate's recall@10 must beat the popularity baseline's by this share")
    run.add_argument("--max-drop-from-served", type=float, default=0.10,
                     help="the candidate may lose at most this share of the served version's recall@10")
    run.add_argument("--rollout-timeout", type=float, default=120.0, help="seconds to wait for the new version")
    args = parser.parse_args(argv)
    if args.command == "run-local":
        for flag, path in (("--data", args.data), ("--interactions", args.interactions)):
            if not path.is_file():
                parser.error(f"{flag} {path}: no such file")
        if args.model_store.exists() and not args.model_store.is_dir():
            parser.error(f"--model-store {args.model_store} is not a folder")
        problem = store_problem(args.model_store, args.model_name, args.new_model)
        if problem:
            parser.error(problem)
        from model.gate import Thresholds

        try:  # here, not in the evaluate task after training
            Thresholds(args.min_lift_over_popularity, args.max_drop_from_served)
        except ValueError as exc:
            parser.error(str(exc).replace("min_lift_over_popularity", "--min-lift-over-popularity")
                         .replace("max_drop_from_served", "--max-drop-from-served"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "compile":
        print(f"wrote {compile_pipeline(args.out)}: upload it in the Kubeflow Pipelines UI, or with "
              f"`kfp pipeline create -p embedder-retrain {args.out}`")
        return 0
    return run_local(args)


if __name__ == "__main__":
    sys.exit(main())
