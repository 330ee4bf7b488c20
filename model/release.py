"""The retraining pipeline's steps as plain functions: train, gate, check, publish, roll out.

``model/pipeline.py`` wraps each in a Kubeflow Pipelines component; here they take folders and
numbers, so they run and are tested without KFP. A *candidate* is a build folder
(``<candidate>/models/<name>/<version>/`` and ``<name>-fused/<version>/``) that training wrote; the
*store* is the folder TF Serving and the transformer read (``<store>/<name>/<version>/``).
"""

from __future__ import annotations

from pathlib import Path

from model.gate import Evaluation, Thresholds, evaluate, read_held_out
from model.publish import publish, retire
from model.verify import Verification, verify
from transformer.store.bundle import BundleError, load_bundle, model_versions

# Options of `python -m model.train` the pipeline passes on (its parameters of the same names).
TRAINING_OPTIONS = ("epochs", "embedding_dim", "segments", "top_k", "min_score", "seed", "test_fraction",
                    "user_column", "item_column", "weight_column", "distributed_workers")


class GateFailed(RuntimeError):
    """The candidate is worse than what it would replace; nothing was published."""


class ChecksFailed(RuntimeError):
    """The candidate would be refused by the transformer or TF Serving; nothing was published."""


def fused_name(name: str) -> str:
    return f"{name}-fused"


def served_version_dir(store: str | Path, name: str) -> Path | None:
    """The version the transformer serves from ``store``: the newest folder with a bundle that verifies."""
    for version in reversed(model_versions(Path(store) / name)):
        folder = Path(store) / name / str(version)
        try:
            load_bundle(folder)
        except BundleError:
            continue
        return folder
    return None


def next_version(store: str | Path, name: str) -> int:
    """One past the newest version of the model or its fused twin in the store (1 for an empty store),
    including retired ones: a number, once published, always means that training."""
    numbers = [0]
    for model in (name, fused_name(name)):
        folder = Path(store) / model
        if folder.is_dir():
            numbers += [int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()]
            numbers += [int(p.name.split("-")[1]) for p in folder.glob(".retired-*-*") if p.name.split("-")[1].isdigit()]
    return max(numbers) + 1


def training_argv(users: str, interactions: str, out: str, held_out: str, name: str, version: int,
                  options: dict) -> list[str]:
    argv = ["--data", users, "--interactions", interactions, "--out", out, "--held-out", held_out,
            "--model-name", name, "--version", str(version), "--quiet"]
    for option, value in options.items():
        if option not in TRAINING_OPTIONS:
            raise ValueError(f"{option!r} is not a training option the pipeline passes on: {', '.join(TRAINING_OPTIONS)}")
        if value in (None, "") or (option == "segments" and value == 0):
            continue  # the training default
        argv += [f"--{option.replace('_', '-')}", str(value)]
    return argv


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


def train_candidate(users: str, interactions: str, candidate: str | Path, held_out: str | Path, store: str | Path,
                    name: str, options: dict) -> tuple[int, dict]:
    """Train the next version of ``name`` into the candidate folder; (its version, its training quality).

    Raises:
        InputMissing: a file is not there (on a cluster: not on the model store's volume).
    """
    from model.train import main as train

    for what, path in (("users", users), ("interactions", interactions)):
        if not Path(path).is_file():
            raise InputMissing(f"the {what} file {path} does not exist: on a cluster, copy it onto the model store's "
                               f"volume (kind: build/data/ on the host, /mnt/model-store/data/ in the tasks) or give "
                               f"the pipeline's {what}_path parameter where it is")
    version = next_version(store, name)
    code = train(training_argv(str(users), str(interactions), str(candidate), str(held_out), name, version, options))
    if code != 0:
        raise RuntimeError(f"training failed (exit {code}): its error is printed above")
    return version, load_bundle(candidate_dir(candidate, name)).manifest["training"]["quality"]


def candidate_dir(candidate: str | Path, name: str, fused: bool = False) -> Path:
    """The one version folder a candidate holds for the model (or its fused twin)."""
    folder = Path(candidate) / "models" / (fused_name(name) if fused else name)
    versions = model_versions(folder)
    if len(versions) != 1:
        raise ValueError(f"{folder} holds versions {versions}: a candidate is one training, one version")
    return folder / str(versions[0])


def gate_candidate(candidate: str | Path, held_out: str | Path, store: str | Path, name: str,
                   thresholds: Thresholds, k: int = 10) -> Evaluation:
    """Judge the candidate against the version the store serves (:mod:`model.gate`)."""
    data, popularity = read_held_out(held_out)
    return evaluate(candidate_dir(candidate, name), served_version_dir(store, name), data, popularity,
                    k=k, thresholds=thresholds)


def check_candidate(candidate: str | Path, name: str) -> Verification:
    fused = Path(candidate) / "models" / fused_name(name)
    return verify(candidate_dir(candidate, name), candidate_dir(candidate, name, fused=True) if fused.is_dir() else None)


def publish_candidate(candidate: str | Path, store: str | Path, name: str) -> int:
    """Publish every model of the candidate into the store (:mod:`model.publish`); the version."""
    folders = {name: candidate_dir(candidate, name)}
    if (Path(candidate) / "models" / fused_name(name)).is_dir():
        folders[fused_name(name)] = candidate_dir(candidate, name, fused=True)
    version = int(folders[name].name)
    publish(folders, store, version)
    return version


def retire_version(store: str | Path, name: str, version: int) -> list[Path]:
    return retire(store, [name, fused_name(name)], version)
