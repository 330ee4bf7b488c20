"""The artifact bundle: fitted scikit-learn steps plus a manifest that describes them.

Layout of a bundle folder (a ``storageUri`` target, mounted at ``/mnt/models``)::

    manifest.json      feature names and order, model name, signature and tensor
                       names, dims, rules, library versions, sha256 of every file
    scaler.joblib      the fitted QuantileTransformer
    segments.joblib    the fitted KMeans

This module is the single place that knows the format: training writes bundles
with :func:`write_bundle`, the transformer reads them with :func:`load_bundle`.
Every file is checked against the manifest's sha256 *before* anything is
unpickled, and artifacts made by another scikit-learn minor version are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
SCALER_FILE = "scaler.joblib"
SEGMENTS_FILE = "segments.joblib"


class BundleError(RuntimeError):
    """The bundle is missing, altered or incompatible; the message says what to do."""


@dataclass(frozen=True)
class ModelSpec:
    """How to call the embedding model on TF Serving."""

    name: str
    version: int
    signature_name: str
    input_name: str
    embedding_output: str
    scores_output: str
    n_features: int
    embedding_dim: int
    n_items: int
    # Optional second signature: the best n_candidates items per row instead of every score,
    # so the answer does not grow with the catalogue ("" when the model has none).
    candidates_signature: str = ""
    candidate_ids_output: str = "candidate_ids"
    candidate_scores_output: str = "candidate_scores"
    n_candidates: int = 0


@dataclass(frozen=True)
class Rules:
    """Which items to return: at most ``top_k``, each scoring at least ``min_score``."""

    min_score: float
    top_k: int

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"min_score must be within [0, 1], got {self.min_score}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")


@dataclass(frozen=True)
class Bundle:
    """A verified, loaded bundle."""

    path: Path
    feature_names: tuple[str, ...]
    feature_min: tuple[float, ...]
    feature_max: tuple[float, ...]
    model: ModelSpec
    rules: Rules
    scaler: Any
    segments: Any
    manifest: dict


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose objects the bundle holds."""
    import joblib
    import numpy
    import scipy
    import sklearn

    return {
        "python": platform.python_version(),
        "scikit-learn": sklearn.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "joblib": joblib.__version__,
    }


def write_bundle(
    directory: str | Path,
    *,
    scaler: Any,
    segments: Any,
    feature_names: tuple[str, ...],
    feature_min: tuple[float, ...],
    feature_max: tuple[float, ...],
    model: ModelSpec,
    rules: Rules,
    extra: dict | None = None,
) -> Path:
    """Write a bundle atomically: a reader sees the old bundle or the new one, never half.

    Args:
        directory: where the bundle goes (replaced if it exists).
        scaler: fitted QuantileTransformer.
        segments: fitted KMeans.
        feature_names: raw feature names, in the model's input order.
        feature_min, feature_max: training range of each feature (drift signal).
        model: how to call the embedding model.
        rules: item filtering rules.
        extra: more manifest entries (training summary, tensorflow version, ...).
    """
    import joblib

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".bundle-", dir=directory.parent))
    try:
        joblib.dump(scaler, staging / SCALER_FILE)
        joblib.dump(segments, staging / SEGMENTS_FILE)
        files = {
            name: {"sha256": sha256_of(staging / name), "bytes": (staging / name).stat().st_size}
            for name in (SCALER_FILE, SEGMENTS_FILE)
        }
        manifest = {
            "format_version": FORMAT_VERSION,
            "features": [
                {"name": n, "train_min": float(lo), "train_max": float(hi)}
                for n, lo, hi in zip(feature_names, feature_min, feature_max, strict=True)
            ],
            "model": asdict(model),
            "rules": asdict(rules),
            "n_segments": int(segments.n_clusters),
            "versions": library_versions(),
            "files": files,
            **(extra or {}),
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(staging, 0o755)
        if directory.exists():
            retired = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(retired, ignore_errors=True)
            directory.rename(retired)
            staging.rename(directory)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(
            f"no {MANIFEST_FILE} in {directory}: point --bundle at a folder written by "
            "`python -m model.train` (it writes build/bundle/)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path} is not readable JSON ({exc}); re-run training") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{path} has format_version {manifest.get('format_version')!r}, this transformer "
            f"reads {FORMAT_VERSION}; re-run training with this version of the project"
        )
    return manifest


def verify_files(directory: str | Path, manifest: dict) -> None:
    """Check that the folder holds exactly the listed files, with the listed sha256."""
    directory = Path(directory)
    listed = manifest.get("files") or {}
    present = {
        p.name
        for p in directory.iterdir()
        if p.name != MANIFEST_FILE and not p.name.startswith(".")
    }
    unlisted = sorted(present - set(listed))
    if unlisted:
        raise BundleError(
            f"{directory} holds files the manifest does not list: {', '.join(unlisted)}; "
            "remove them or re-run training to write a fresh bundle"
        )
    for name, entry in listed.items():
        path = directory / name
        if not path.is_file():
            raise BundleError(f"{path} is listed in the manifest but missing; copy the whole bundle")
        actual = sha256_of(path)
        if actual != entry.get("sha256"):
            raise BundleError(
                f"{path} has sha256 {actual}, the manifest says {entry.get('sha256')}: the file "
                "was altered or truncated; copy the bundle again or re-run training"
            )


def _minor(version: str) -> tuple[int, int]:
    major, minor, *_ = version.split(".")
    return int(major), int(minor)


def check_versions(manifest: dict) -> None:
    """Refuse artifacts pickled by another scikit-learn major.minor than the one installed."""
    import sklearn

    made_with = (manifest.get("versions") or {}).get("scikit-learn")
    if made_with is None:
        raise BundleError("the manifest does not say which scikit-learn made the artifacts; re-run training")
    if _minor(made_with) != _minor(sklearn.__version__):
        raise BundleError(
            f"the artifacts were made with scikit-learn {made_with}, this process has "
            f"{sklearn.__version__}: re-run training with scikit-learn "
            f"{'.'.join(map(str, _minor(sklearn.__version__)))}.x, or install "
            f"scikit-learn=={made_with} here"
        )


def load_bundle(directory: str | Path) -> Bundle:
    """Read, verify and unpickle a bundle.

    Raises:
        BundleError: missing, unlisted or altered files, incompatible versions, or
            artifacts that do not fit the manifest.
    """
    import joblib

    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(
            f"bundle folder {directory} does not exist: run `python -m model.train` or pass "
            "--bundle with the folder that holds manifest.json"
        )
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    check_versions(manifest)
    try:
        model = ModelSpec(**manifest["model"])
        rules = Rules(**manifest["rules"])
        features = manifest["features"]
        feature_names = tuple(f["name"] for f in features)
        feature_min = tuple(float(f["train_min"]) for f in features)
        feature_max = tuple(float(f["train_max"]) for f in features)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{directory / MANIFEST_FILE} is incomplete ({exc}); re-run training") from exc

    scaler = joblib.load(directory / SCALER_FILE)
    segments = joblib.load(directory / SEGMENTS_FILE)
    n_in = getattr(scaler, "n_features_in_", None)
    if n_in != len(feature_names) or model.n_features != len(feature_names):
        raise BundleError(
            f"the scaler expects {n_in} features, the manifest lists {len(feature_names)} and the "
            f"model {model.n_features}: the bundle is inconsistent; re-run training"
        )
    centers = getattr(segments, "cluster_centers_", None)
    if centers is None or centers.shape[1] != model.embedding_dim:
        raise BundleError(
            f"the segment centroids do not have the model's embedding size {model.embedding_dim}; "
            "re-run training"
        )
    return Bundle(
        path=directory,
        feature_names=feature_names,
        feature_min=feature_min,
        feature_max=feature_max,
        model=model,
        rules=rules,
        scaler=scaler,
        segments=segments,
        manifest=manifest,
    )
