"""The retraining pipeline's steps as plain functions: train, gate, check, publish, roll out.

``model/pipeline.py`` wraps each in a Kubeflow Pipelines component; here they take folders and
numbers, so they run and are tested without KFP. A *candidate* is a build folder
(``<candidate>/models/<name>/<version>/`` and ``<name>-fused/<version>/``) that training wrote; the
*store* is what TF Serving and the transformer read (``<store>/<name>/<version>/``): a folder or an
S3 bucket (:mod:`model.store`), given as its location or opened.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from model import options as training_options
from model.gate import Evaluation, Thresholds, evaluate, read_held_out
from model.store import Store, is_bucket, open_store
from model.verify import Verification, verify
from transformer.store.bundle import MANIFEST_FILE, BundleError, bundle_dir, load_bundle, model_versions, sha256_of
from transformer.store.interface import Interface


# The start of a line a pipeline task prints for the person running it (run-local shows only these and a line per task).
SAY = "» "


def as_store(store: str | Path | Store) -> Store:
    return open_store(store) if isinstance(store, (str, Path)) else store


class GateFailed(RuntimeError):
    """The candidate is worse than what it would replace; nothing was published."""


class ChecksFailed(RuntimeError):
    """The candidate would be refused by the transformer or TF Serving; nothing was published."""


def fused_name(name: str) -> str:
    return f"{name}-fused"


def served_version_dir(store: str | Path | Store, name: str, into: str | Path | None = None) -> Path | None:
    """The version the transformer serves from ``store``: the newest complete version whose bundle verifies, as a
    local folder (a bucket's is downloaded into ``into``, by default a new temporary folder)."""
    store = as_store(store)
    into = Path(into) if into is not None else None
    for version in reversed(store.versions(name)):
        if into is None and is_bucket(store.location):
            into = Path(tempfile.mkdtemp(prefix="served-"))
        folder = store.fetch(name, version, into)
        try:
            load_bundle(folder)
        except BundleError:
            continue
        return folder
    return None


def next_version(store: str | Path | Store, name: str) -> int:
    """One past the newest version of the model or its fused twin in the store (1 for an empty store),
    including retired and half-published ones: a number, once used, always means that training."""
    store = as_store(store)
    return max([0, *store.numbers(name), *store.numbers(fused_name(name))]) + 1


def training_argv(users: str, interactions: str, out: str, held_out: str, name: str, version: int,
                  options: dict) -> list[str]:
    """``model.train``'s command line for a candidate; ``options``: training options (:mod:`model.options`).
    Raises ValueError naming every unknown option or wrong value."""
    return ["--data", users, "--interactions", interactions, "--out", out, "--held-out", held_out,
            "--model-name", name, "--version", str(version), "--quiet", *training_options.to_argv(options)]


class InputMissing(FileNotFoundError):
    """A training input is not where the pipeline was told to read it."""


def input_digests(users: str, interactions: str) -> dict[str, str]:
    """Where each training input was read from and its sha256: the candidate's lineage in the KFP UI."""
    import hashlib

    found = {}
    for name, path in (("users", users), ("interactions", interactions)):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        found[name], found[f"{name}_sha256"] = str(path), digest.hexdigest()
    return found


def local_input(path: str, into: Path, endpoint: str | None = None, what: str = "input") -> str:
    """A training input as a local file: itself, or an ``s3://bucket/key`` object downloaded into ``into``.

    Raises:
        InputMissing: it is not there.
    """
    if is_bucket(path):
        from model.bucket import download_object
        from model.store import StoreError

        try:
            return str(download_object(path, into / path.rsplit("/", 1)[-1], endpoint))
        except StoreError as exc:
            raise InputMissing(f"the {what} file {path} could not be read ({exc}): upload it there, or give the "
                               f"pipeline's {what}_path parameter where it is") from exc
    if not Path(path).is_file():
        raise InputMissing(f"the {what} file {path} does not exist: on a cluster, copy it onto the model store's "
                           "volume (kind: build/data/ on the host, /mnt/model-store/data/ in the tasks) or into a "
                           f"bucket, and give the pipeline's {what}_path parameter where it is")
    return path


def train_candidate(users: str, interactions: str, candidate: str | Path, held_out: str | Path,
                    store: str | Path | Store, name: str, options: dict, endpoint: str | None = None) -> tuple[int, dict]:
    """Train the next version of ``name`` into the candidate folder; (its version, its training quality).
    ``users`` and ``interactions``: paths, or ``s3://`` objects; ``options``: training options (:mod:`model.options`).

    Raises:
        InputMissing: a file is not there (on a cluster: not on the model store's volume, or not in the bucket).
        ValueError: an unknown training option, or a wrong value.
    """
    from model.train import main as train

    problems = training_options.problems(options)
    if problems:
        raise ValueError("; ".join(problems))
    inputs = Path(tempfile.mkdtemp(prefix="inputs-"))
    users = local_input(str(users), inputs, endpoint, "users")
    interactions = local_input(str(interactions), inputs, endpoint, "interactions")
    version = next_version(store, name)
    code = train(training_argv(str(users), str(interactions), str(candidate), str(held_out), name, version, options))
    if code != 0:
        raise RuntimeError(f"training failed (exit {code}): its error is printed above")
    return version, load_bundle(candidate_dir(candidate, name)).manifest["training"]["quality"]


def manifest_digest(candidate: str | Path, name: str) -> str:
    """The sha256 of the candidate's manifest: what the transformer names its answers with once it serves it."""
    return sha256_of(bundle_dir(candidate_dir(candidate, name)) / MANIFEST_FILE)


def candidate_dir(candidate: str | Path, name: str, fused: bool = False) -> Path:
    """The one version folder a candidate holds for the model (or its fused twin)."""
    folder = Path(candidate) / "models" / (fused_name(name) if fused else name)
    versions = model_versions(folder)
    if len(versions) != 1:
        raise ValueError(f"{folder} holds versions {versions}: a candidate is one training, one version")
    return folder / str(versions[0])


def gate_candidate(candidate: str | Path, held_out: str | Path, store: str | Path | Store, name: str,
                   thresholds: Thresholds, k: int = 10) -> Evaluation:
    """Judge the candidate against the version the store serves (:mod:`model.gate`)."""
    data, popularity = read_held_out(held_out)
    with tempfile.TemporaryDirectory(prefix="served-") as into:
        return evaluate(candidate_dir(candidate, name), served_version_dir(store, name, into), data, popularity,
                        k=k, thresholds=thresholds)


def check_candidate(candidate: str | Path, name: str) -> Verification:
    fused = Path(candidate) / "models" / fused_name(name)
    return verify(candidate_dir(candidate, name), candidate_dir(candidate, name, fused=True) if fused.is_dir() else None)


def publish_candidate(candidate: str | Path, store: str | Path | Store, name: str) -> int:
    """Publish every model of the candidate into the store (:mod:`model.store`); the version. A model the store
    has no interface record for (a new one, or one published before records) gets the candidate's, first: the gate
    has passed it, so it is the interface served."""
    store = as_store(store)
    if store.interface(name) is None:
        store.record_interface(name, Interface.of(load_bundle(candidate_dir(candidate, name))))
    folders = {name: candidate_dir(candidate, name)}
    if (Path(candidate) / "models" / fused_name(name)).is_dir():
        folders[fused_name(name)] = candidate_dir(candidate, name, fused=True)
    version = int(folders[name].name)
    store.publish(folders, version)
    return version


def retire_version(store: str | Path | Store, name: str, version: int) -> list[str]:
    return as_store(store).retire([name, fused_name(name)], version)


def store_problem(store: str | Path | Store, name: str, new_model: bool) -> str | None:
    """Why ``store`` is not the model store to publish ``name`` into (None: it is). A model's own folder given as
    the store would get a nested ``<name>/<name>/1`` that nothing serves, while the rollout saw the old version
    answer and called it a success."""
    store = as_store(store)
    root = store.location.rstrip("/")
    own = store.numbers_in_place("")
    if own:
        parent = root.rsplit("/", 1)[0]
        return (f"{root} is the folder of one model (it holds version folders {', '.join(map(str, own))}): pass the "
                f"store that holds it, {parent}")
    if new_model or store.holds_model(name):
        return None
    held = store.models()
    return (f"{root} holds no model {name!r} ("
            + (f"it holds {', '.join(held)}" if held else "it is empty or does not exist")
            + "): pass the store whose <model>/<version>/ folders the transformer serves (build/models for the local "
              f"stack), or start {name!r} there on purpose (run-local --new-model)")
