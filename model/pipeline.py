"""Retrain, gate, check, publish and roll out the model: a Kubeflow Pipelines v2 pipeline.

    python -m model.pipeline compile --out embedder-retrain.yaml      # for a Kubeflow Pipelines cluster
        [--image REGISTRY/kserve-embedder-training:TAG --claim CLAIM | --model-store s3://BUCKET/models ...]
    python -m model.pipeline run-local --data users.csv --interactions interactions.csv \\
        --model-store build/models [--transformer-url http://127.0.0.1:8080] [--features a,b,c ...]

Tasks, in order (each a component; its outputs show in the KFP UI):

    train      the next version from the two CSV files (paths: on a cluster, on the model store's volume,
               /mnt/model-store/data/ by default), with the held-out users -> candidate (Model), held-out, metrics
    evaluate   the quality gate against the served version        -> metrics, report (Markdown); fails the run
    verify     the transformer's bundle checks, TF Serving's ops, fused parity      -> report; fails the run
    publish    into the model store, atomically                  -> the version number
    rollout    cluster: patch the InferenceService, wait for both Deployments, smoke, roll back on failure;
               local: wait until the transformer at --transformer-url answers with the new version;
               both judge by the version's manifest sha256, which the transformer names its answers with

The store is a folder (a volume on a cluster) or an S3 bucket (model/store.py). The training options are
model.train's, defined once (model/options.py): run-local takes them as flags, the compiled pipeline as its
``training`` parameter (a JSON object of the same names).

``run-local`` runs the same pipeline with KFP's local runner (``SubprocessRunner``: each task a process on
this machine, no cluster, no container engine), printing a line per task, the gate's table and the outcome
(``--verbose``: everything). On a cluster the components run in the training image (``model/Dockerfile``,
``compile --image``) with the model store's volume mounted at ``/mnt/model-store`` (``compile --claim``) or an S3
store's credentials from a Secret (``compile --s3-secret``).
"""


import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output

from model import options as training_options
from transformer.helpformat import HelpFormatter, RawHelpFormatter

TRAINING_IMAGE = "docker.io/library/kserve-embedder-training:dev"
STORE_CLAIM = "embedder-model-store"  # the PersistentVolumeClaim of the model store (manifests/pipeline/)
STORE_MOUNT = "/mnt/model-store"
CLUSTER_STORE = f"{STORE_MOUNT}/models"  # the store's <name>/<version> folders inside the claim
# The users' files, on the same claim. Kubeflow Pipelines' launcher reads artifacts from gs://, s3://, minio:// and
# mem:// only and returns without error when no object matches, so an importer of files nobody uploaded fails later
# with a missing file; a path on the mounted claim (or an s3:// object) is checked by the train task itself.
CLUSTER_DATA = f"{STORE_MOUNT}/data"
CLUSTER_USERS, CLUSTER_INTERACTIONS = f"{CLUSTER_DATA}/users.csv", f"{CLUSTER_DATA}/interactions.csv"
# The keys of an S3 credentials Secret (the one KServe's storage initializer reads, manifests/overlays/production),
# given to the tasks that touch a bucket as boto3's variables of the same names.
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# Lines the tasks print for the person running the pipeline start with SAY: run-local shows these (and a line per
# task) unless --verbose, which shows everything KFP's executor prints. It lives in model.release: a task's body is
# shipped as its own source, without this module's names.
from model.release import SAY  # noqa: E402


# -- the tasks: each runs in the training image; the steps themselves are model/release.py's ----------------------

def train(users_path: str, interactions_path: str, model_store: str, s3_endpoint: str, model_name: str,
          training: dict, candidate: Output[Model], held_out: Output[Dataset], metrics: Output[Metrics]) -> int:
    """Train the model store's next version from the users and their interactions (paths the task can read: on a
    cluster, on the model store's volume; or s3:// objects). ``training``: model.train's options by name."""
    from model.release import SAY, input_digests, manifest_digest, train_candidate

    version, quality = train_candidate(users_path, interactions_path, candidate.path, held_out.path, model_store,
                                       model_name, training, endpoint=s3_endpoint or None)
    candidate.metadata["version"] = version
    candidate.metadata["manifest_sha256"] = manifest_digest(candidate.path, model_name)
    if not users_path.startswith("s3://"):
        candidate.metadata.update(input_digests(users_path, interactions_path))  # which files it was trained on
    for name, value in quality.items():
        if isinstance(value, (int, float)):
            metrics.log_metric(name, value)
    shown = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in quality.items()
                      if v is not None)
    print(f"{SAY}trained version {version}: {shown}")
    return version


def evaluate(candidate: Input[Model], held_out: Input[Dataset], model_store: str, s3_endpoint: str, model_name: str,
             min_lift_over_popularity: float, max_drop_from_served: float, metrics: Output[Metrics],
             report: Output[Markdown]):
    """The quality gate: the candidate against the served version on the same held-out users."""
    from model.gate import Thresholds
    from model.release import SAY, GateFailed, gate_candidate
    from model.store import open_store

    result = gate_candidate(candidate.path, held_out.path, open_store(model_store, s3_endpoint or None), model_name,
                            Thresholds(min_lift_over_popularity, max_drop_from_served))
    for name, value in result.metrics().items():
        metrics.log_metric(name, value)
    with open(report.path, "w") as f:
        f.write(result.markdown())
    print("\n".join(SAY + line for line in result.markdown().splitlines()))
    if not result.passed:
        raise GateFailed("the candidate failed the quality gate: " + "; ".join(result.reasons))


def verify(candidate: Input[Model], model_name: str, report: Output[Markdown]):
    """What would refuse the candidate later, checked now."""
    from model.release import SAY, ChecksFailed, check_candidate

    result = check_candidate(candidate.path, model_name)
    with open(report.path, "w") as f:
        f.write(result.markdown())
    heading, *details = result.markdown().splitlines()
    print(SAY + heading)
    print("\n".join(details))
    if result.problems:
        raise ChecksFailed("the candidate failed its checks: " + "; ".join(result.problems))


def publish(candidate: Input[Model], model_store: str, s3_endpoint: str, model_name: str) -> int:
    """Copy the candidate's version into the model store, atomically; its number."""
    from model.release import SAY, publish_candidate
    from model.store import open_store

    version = publish_candidate(candidate.path, open_store(model_store, s3_endpoint or None), model_name)
    print(f"{SAY}published version {version} into {model_store}")
    return version


def rollout(candidate: Input[Model], version: int, model_store: str, s3_endpoint: str, model_name: str, mode: str,
            transformer_url: str, namespace: str, isvc_name: str, timeout_seconds: float) -> str:
    """Make the published version what clients get (mode: cluster, local or none), judged by its manifest's sha256:
    a transformer answering with another artifact under the same number has not rolled it out."""
    from model.release import SAY, candidate_dir, manifest_digest, retire_version
    from model.rollout import ClusterTarget, probe_row, rollout_on_cluster, wait_until_served
    from model.store import open_store
    from transformer.store.bundle import load_bundle

    bundle = load_bundle(candidate_dir(candidate.path, model_name))
    digest = manifest_digest(candidate.path, model_name)
    row = probe_row(bundle.feature_min, bundle.feature_max)
    if mode == "none":
        line = f"version {version} is in {model_store}; nothing was asked to roll it out"
    elif mode == "local":
        url = f"{transformer_url.rstrip('/')}/v1/models/{model_name}:predict"
        seconds = wait_until_served(url, version, row, timeout=timeout_seconds, manifest_sha256=digest)
        line = f"{url} answers with version {version} (manifest sha256 {digest[:12]}) after {seconds:.1f}s"
    elif mode == "cluster":
        target = ClusterTarget(namespace=namespace, name=isvc_name, model=model_name, service_url=transformer_url)
        store = open_store(model_store, s3_endpoint or None)
        line = rollout_on_cluster(target, version, row, timeout=timeout_seconds, manifest_sha256=digest,
                                  retire=lambda: retire_version(store, model_name, version))
    else:
        raise ValueError(f"mode must be cluster, local or none, got {mode!r}")
    print(f"{SAY}{line}")
    return line


# -- the pipeline --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """Where the compiled pipeline runs: its image, the store's claim and credentials, and the defaults of the
    parameters that name places (each can still be changed per run)."""

    image: str = TRAINING_IMAGE
    claim: str = STORE_CLAIM  # "" : no volume (every path an s3:// one)
    s3_secret: str = ""  # a Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY ("" : none)
    model_store: str = CLUSTER_STORE
    s3_endpoint: str = ""
    users_path: str = CLUSTER_USERS
    interactions_path: str = CLUSTER_INTERACTIONS
    namespace: str = "embedder"
    isvc_name: str = "embedder"


def build_pipeline(target: Target = Target()):
    """The ``embedder-retrain`` pipeline for ``target``: its tasks run ``target.image``."""
    from kfp import kubernetes

    def component(fn):
        return dsl.component(fn, base_image=target.image, install_kfp_package=False)

    train_op, evaluate_op, verify_op, publish_op, rollout_op = map(component, (train, evaluate, verify, publish,
                                                                               rollout))

    @dsl.pipeline(name="embedder-retrain",
                  description="Retrain the user embedding model and its scikit-learn steps, gate the candidate against "
                              "the served version, check it, publish it into the model store and roll it out.")
    def retrain(users_path: str = target.users_path, interactions_path: str = target.interactions_path,
                model_store: str = target.model_store, s3_endpoint: str = target.s3_endpoint,
                model_name: str = "embedder", training: dict = training_options.defaults(),
                min_lift_over_popularity: float = 0.10, max_drop_from_served: float = 0.10,
                rollout_mode: str = "cluster", transformer_url: str = "", namespace: str = target.namespace,
                isvc_name: str = target.isvc_name, rollout_timeout_seconds: float = 600.0,
                store_claim: str = target.claim, s3_secret: str = target.s3_secret):
        store = dict(model_store=model_store, s3_endpoint=s3_endpoint, model_name=model_name)
        trained = train_op(users_path=users_path, interactions_path=interactions_path, training=training, **store)
        candidate = trained.outputs["candidate"]
        gate = evaluate_op(candidate=candidate, held_out=trained.outputs["held_out"],
                           min_lift_over_popularity=min_lift_over_popularity,
                           max_drop_from_served=max_drop_from_served, **store)
        checks = verify_op(candidate=candidate, model_name=model_name).after(gate)
        published = publish_op(candidate=candidate, **store).after(checks)
        rolled = rollout_op(candidate=candidate, version=published.output, mode=rollout_mode,
                            transformer_url=transformer_url, namespace=namespace, isvc_name=isvc_name,
                            timeout_seconds=rollout_timeout_seconds, **store)
        for task in (trained, gate, checks, published, rolled):
            task.set_caching_options(False)  # each run trains anew and reads the store as it is now
        for task in (trained, gate, published, rolled):  # the tasks that touch the store
            if target.claim:
                kubernetes.mount_pvc(task, pvc_name=store_claim, mount_path=STORE_MOUNT)
            if target.s3_secret:
                kubernetes.use_secret_as_env(task, secret_name=s3_secret,
                                             secret_key_to_env={k: k for k in S3_SECRET_KEYS})

    return retrain


retrain = build_pipeline()


def compile_pipeline(out: str | Path, target: Target = Target()) -> Path:
    """Write the pipeline for ``target`` as the YAML a Kubeflow Pipelines cluster runs."""
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(target), str(out))
    return Path(out)


class RunOutput:
    """run-local's stdout while the pipeline runs: everything goes to the run's log file; the terminal gets a line
    per finished task and the lines the tasks mark for it (:data:`SAY`), or everything with ``verbose``."""

    def __init__(self, log, terminal, verbose: bool):
        import re

        self.log, self.terminal, self.verbose = log, terminal, verbose
        self._partial = ""
        self._started: dict[str, float] = {}
        self.finished: list[tuple[str, str]] = []  # (task, status), in order
        self._colour = re.compile(r"\x1b\[[0-9;]*m")
        self._task = re.compile(r"(Executing task|Task) '([^']+)'(?: finished with status (\w+))?")

    def write(self, text: str) -> int:
        self.log.write(text)
        if self.verbose:
            return self.terminal.write(text)
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            shown = self.shown(line)
            if shown is not None:
                self.terminal.write(shown + "\n")
        return len(text)

    def shown(self, line: str) -> str | None:
        """What the terminal shows of one line of the run (None: nothing)."""
        plain = self._colour.sub("", line)
        task = self._task.search(plain)
        if task and task.group(1) == "Executing task":
            self._started[task.group(2)] = time.monotonic()
            return None
        if task and task.group(3):
            self.finished.append((task.group(2), task.group(3)))
            seconds = time.monotonic() - self._started.get(task.group(2), time.monotonic())
            return f"{task.group(2):<9} {task.group(3)} in {seconds:.0f}s"
        said = plain.lstrip()
        if said.startswith(SAY):
            return "          " + said[len(SAY):]
        return None

    def flush(self) -> None:
        self.log.flush()
        self.terminal.flush()

    def isatty(self) -> bool:
        return False


def run_local(args: argparse.Namespace) -> int:
    """Run the pipeline with KFP's SubprocessRunner in this Python (which has the project installed)."""
    import contextlib

    from kfp import local

    store = args.model_store if args.model_store.startswith("s3://") else str(Path(args.model_store).resolve())
    work = (args.workdir or (Path(store).parent if not store.startswith("s3://") else Path("build")) / "pipeline-runs")
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(work / "outputs"),
               workspace_root=str(work / "workspace"), raise_on_error=True)
    started, began = time.monotonic(), time.time()
    log_path = work / f"run-{time.strftime('%Y%m%dT%H%M%S')}.log"
    print(f"running the pipeline (train, evaluate, verify, publish, rollout); every task's log: {log_path}",
          flush=True)
    pipeline = build_pipeline(Target())
    failure = None
    with open(log_path, "w") as log:
        output = RunOutput(log, sys.stdout, args.verbose)
        try:
            with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
                pipeline(
                    users_path=str(args.data.resolve()), interactions_path=str(args.interactions.resolve()),
                    model_store=store, s3_endpoint=args.s3_endpoint or "", model_name=args.model_name,
                    training=training_options.from_args(args),
                    min_lift_over_popularity=args.min_lift_over_popularity,
                    max_drop_from_served=args.max_drop_from_served,
                    rollout_mode="local" if args.transformer_url else "none",
                    transformer_url=args.transformer_url or "", rollout_timeout_seconds=args.rollout_timeout)
        except RuntimeError as exc:  # KFP's local runner: a task failed
            failure = exc
    if failure is not None:
        sys.stdout.flush()
        print(f"error: the pipeline failed: {failure_reason(work, since=began) or task_error(log_path) or failure}",
              file=sys.stderr)
        failed = next((task for task, status in output.finished if status != "SUCCESS"), None)
        if failed == "rollout":
            outcome = (f"the version was published into {args.model_store}, but the transformer does not serve it: "
                       "no version was retired (locally nothing is rolled back)")
        else:
            outcome = "nothing was published" + (" (a copy that fails half-way is never taken for a version)"
                                                 if failed == "publish" else "")
        print(f"{outcome}; every task's log: {log_path}", file=sys.stderr)
        return 1
    print(f"pipeline done in {time.monotonic() - started:.0f}s: version published into {args.model_store}"
          + (f" and served by {args.transformer_url}" if args.transformer_url else ""))
    return 0


def task_error(log_path: Path) -> str | None:
    """The last error a task's traceback ended with, from the run's log (what failed, when no report says)."""
    import re

    errors = [m.group(0).strip() for m in re.finditer(r"^\s*[A-Za-z_.]*(Error|Exception|Missing|Failed): .+$",
                                                      log_path.read_text(), re.MULTILINE)]
    return errors[-1] if errors else None


def failure_reason(work: Path, since: float = 0.0) -> str | None:
    """The reasons of the newest failing report (the gate's or the checks') written since ``since`` (this run's
    start: an earlier run's report in the same folder is not this run's reason)."""
    reports = [p for p in (work / "outputs").glob("**/report") if p.stat().st_mtime >= since]
    for report in sorted(reports, key=lambda p: p.stat().st_mtime, reverse=True):
        lines = report.read_text().splitlines()
        if "Fails because:" in lines:
            return lines[0].lstrip("# ") + ": " + "; ".join(line[2:] for line in lines if line.startswith("- "))
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m model.pipeline", description=__doc__.split("\n\n")[0],
                                     formatter_class=RawHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    commands = parser.add_subparsers(dest="command", required=True)
    defaults = Target()
    compile_cmd = commands.add_parser(
        "compile", help="write the pipeline's YAML for a Kubeflow Pipelines cluster",
        formatter_class=HelpFormatter,
        description="Write the pipeline for a Kubeflow Pipelines cluster. Its defaults are for the kind cluster of "
                    "scripts/kind-up.sh; each flag below sets what a run uses unless the run says otherwise.")
    compile_cmd.add_argument("--out", type=Path, required=True, help="the YAML file to write")
    compile_cmd.add_argument("--image", default=defaults.image, help="the training image every task runs "
                             "(model/Dockerfile, pushed where the cluster pulls from)")
    compile_cmd.add_argument("--claim", default=defaults.claim, help="the PersistentVolumeClaim (in the runs' "
                             "namespace) mounted at /mnt/model-store in the tasks that touch the store; '' for none, "
                             "when the store and the users' files are all s3:// locations")
    compile_cmd.add_argument("--model-store", default=defaults.model_store, help="where versions are published: a "
                             "folder on the claim, or s3://BUCKET/PREFIX (what the InferenceService's storageUri "
                             "reads, less the model's name)")
    compile_cmd.add_argument("--s3-secret", default=defaults.s3_secret, help="a Secret in the runs' namespace with "
                             "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, given to the tasks that touch the store")
    compile_cmd.add_argument("--s3-endpoint", default=defaults.s3_endpoint, help="the S3 API's URL (MinIO, "
                             "SeaweedFS, ...); empty for AWS")
    compile_cmd.add_argument("--users-path", default=defaults.users_path, help="the users file the train task "
                             "reads (on the claim, or s3://)")
    compile_cmd.add_argument("--interactions-path", default=defaults.interactions_path,
                             help="the interactions file the train task reads (on the claim, or s3://)")
    compile_cmd.add_argument("--namespace", default=defaults.namespace, help="the InferenceService's namespace")
    compile_cmd.add_argument("--isvc-name", default=defaults.isvc_name, help="the InferenceService's name")

    run = commands.add_parser("run-local", help="run the pipeline on this machine with KFP's local runner",
                              formatter_class=HelpFormatter,
                              description="Run the pipeline on this machine (each task a process), with the same "
                                          "training options as python -m model.train.")
    run.add_argument("--data", type=Path, required=True, help="CSV of users (python -m model.train --help)")
    run.add_argument("--interactions", type=Path, required=True, help="CSV of interactions, one row per (user, item)")
    run.add_argument("--model-store", required=True,
                     help="the folder of <model>/<version>/ folders the transformer and TF Serving read "
                          "(build/models for the local stack), or s3://BUCKET/PREFIX")
    run.add_argument("--s3-endpoint", help="with an s3:// store: the S3 API's URL (default: $AWS_ENDPOINT_URL, "
                     "else AWS)")
    run.add_argument("--transformer-url", help="the running transformer (e.g. http://127.0.0.1:8080): wait until "
                     "it answers with the new version's manifest; without it, the run ends once the version is "
                     "published")
    run.add_argument("--workdir", type=Path, help="the runs' outputs and logs (default: pipeline-runs/ beside the "
                     "store)")
    run.add_argument("--model-name", default="embedder",
                     help="the model's folder in the store: a new name publishes a new model beside the served one")
    run.add_argument("--new-model", action="store_true",
                     help="the store holds no --model-name folder yet: start it (a first model, or a deliberate "
                          "interface change served beside the old one)")
    run.add_argument("--verbose", action="store_true", help="show everything the tasks print (KFP's executor logs) "
                     "instead of a line per task, the gate's table and the outcome")
    gate = run.add_argument_group("the quality gate")
    gate.add_argument("--min-lift-over-popularity", type=float, default=0.10,
                      help="the candidate's recall@k must beat the popularity baseline's by this share")
    gate.add_argument("--max-drop-from-served", type=float, default=0.10,
                      help="the candidate may lose at most this share of the served version's recall@k")
    gate.add_argument("--rollout-timeout", type=float, default=120.0, help="seconds to wait for the new version")
    training_options.add_options(run)
    args = parser.parse_args(argv)
    if args.command == "run-local":
        for flag, path in (("--data", args.data), ("--interactions", args.interactions)):
            if not path.is_file():
                parser.error(f"{flag} {path}: no such file")
        for problem in training_options.problems(training_options.from_args(args)):
            parser.error(problem)
        if not args.model_store.startswith("s3://") and Path(args.model_store).exists() \
                and not Path(args.model_store).is_dir():
            parser.error(f"--model-store {args.model_store} is not a folder")
        from model.release import store_problem
        from model.store import StoreError, open_store

        try:
            problem = store_problem(open_store(args.model_store, args.s3_endpoint), args.model_name, args.new_model)
        except StoreError as exc:
            parser.error(f"--model-store: {exc}")
        if problem:
            parser.error(f"--model-store {problem}")
        from model.gate import Thresholds

        try:  # here, not in the evaluate task after training
            Thresholds(args.min_lift_over_popularity, args.max_drop_from_served)
        except ValueError as exc:
            parser.error(str(exc).replace("min_lift_over_popularity", "--min-lift-over-popularity")
                         .replace("max_drop_from_served", "--max-drop-from-served"))
    return args


def target_of(args: argparse.Namespace) -> Target:
    return Target(image=args.image, claim=args.claim, s3_secret=args.s3_secret, model_store=args.model_store,
                  s3_endpoint=args.s3_endpoint, users_path=args.users_path, interactions_path=args.interactions_path,
                  namespace=args.namespace, isvc_name=args.isvc_name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "compile":
        target = target_of(args)
        print(f"wrote {compile_pipeline(args.out, target)}: its tasks run {target.image}"
              + (f", mount the claim {target.claim}" if target.claim else ", mount no volume")
              + f" and publish into {target.model_store}; upload it in the Kubeflow Pipelines UI, or with "
              f"`kfp pipeline create -p embedder-retrain {args.out}`")
        return 0
    return run_local(args)


if __name__ == "__main__":
    sys.exit(main())
