"""The artifact bundle: fitted scikit-learn steps plus a manifest that describes them.

A bundle lives *inside* the SavedModel version folder it was fitted on, where TF
Serving ignores it (it reads only ``assets.extra/tf_serving_warmup_requests``
from that folder)::

    <model base path>/<version>/saved_model.pb, variables/, fingerprint.pb   the model
    <model base path>/<version>/assets.extra/transformer-bundle/
        manifest.json      the model version and the SavedModel's fingerprint it was
                           fitted on, feature names and order, model name, signature
                           and tensor names, dims, rules, library versions, sha256
                           of every file, what each array of fitted.npz is
        fitted.npz         the fitted numbers (quantiles, centroids, ...) as plain
                           arrays: what the transformer serves with (``steps/fitted.py``)
        scaler.joblib      the fitted QuantileTransformer, for scikit-learn users and
        segments.joblib    the fitted KMeans                 ``--kernels sklearn``

So a model version and the fitted steps made from it are one folder, written
and renamed into place together, and cannot be paired wrongly: the transformer
reads the same base path as TF Serving and pins every call to the version whose
bundle it uses (see ``versions.py``).

This module is the single place that knows the format: training writes bundles
with :func:`write_bundle`, the transformer reads them with :func:`load_bundle`.
Every file is checked against the manifest's sha256, the model's
``fingerprint.pb`` against the one recorded at training, and artifacts made by
another scikit-learn minor version are refused. Serving reads ``fitted.npz``
without pickle; the joblib files are unpickled only when asked for
(``estimators=True``), since unpickling runs whatever code a file names. The
manifest vouches for the files but not for itself: ``trusted`` digests, set from
outside the model store, pin the manifests that may be loaded at all.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Collection

from transformer.steps.fitted import FITTED_FILE, FittedSteps, FittedStepsError

FORMAT_VERSION = 2
BUNDLE_SUBDIR = Path("assets.extra") / "transformer-bundle"
FINGERPRINT_FILE = "fingerprint.pb"  # written by TensorFlow into every SavedModel
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


# Padding of the empty item slots, shared by the transformer's codecs and the fused graph
# (model/fuse.py) so both modes answer alike. Defined here, not in a codec, because
# training imports it and must not import kserve (whose import parses sys.argv).
PAD_ID, PAD_TEXT_ID, PAD_SCORE = -1, "", -1.0


@dataclass(frozen=True)
class Rules:
    """Which items to return: at most ``top_k``, each scoring at least ``min_score``.

    Answers are ``top_k`` wide in every mode; slots left empty by ``min_score`` hold
    ``PAD_ID`` (``PAD_TEXT_ID`` for string catalogues) and ``PAD_SCORE``.
    """

    min_score: float
    top_k: int

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"min_score must be within [0, 1], got {self.min_score}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")


@dataclass(frozen=True)
class Bundle:
    """A verified, loaded bundle; ``version`` is the model version folder it belongs to.

    ``fitted`` holds the numbers everything is computed with; ``scaler`` and ``segments``
    are the scikit-learn estimators, None unless loaded with ``estimators=True``.
    """

    path: Path
    version: int
    feature_names: tuple[str, ...]
    feature_min: tuple[float, ...]
    feature_max: tuple[float, ...]
    model: ModelSpec
    rules: Rules
    fitted: FittedSteps
    manifest: dict
    scaler: Any = None
    segments: Any = None
    # The manifest file's sha256: it lists every file's digest, so it names the whole artifact. Answers carry it
    # (x-model-manifest-sha256) and a rollout waits for it: a version number alone can name two trainings.
    manifest_sha256: str = ""

    @property
    def n_segments(self) -> int:
        return int(self.fitted.centers.shape[0])


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


def bundle_dir(version_dir: str | Path) -> Path:
    """Where the bundle of a model version folder lives."""
    return Path(version_dir) / BUNDLE_SUBDIR


def model_versions(base_path: str | Path) -> list[int]:
    """The numeric version folders under a model base path, oldest first (as TF Serving sees them)."""
    base = Path(base_path)
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit())


def write_bundle(
    version_dir: str | Path,
    *,
    scaler: Any,
    segments: Any,
    feature_names: tuple[str, ...],
    item_ids: Any = None,
    feature_min: tuple[float, ...],
    feature_max: tuple[float, ...],
    model: ModelSpec,
    rules: Rules,
    extra: dict | None = None,
) -> Path:
    """Write the bundle into a SavedModel version folder, before that folder is renamed into place.

    Training calls this on the staging copy of ``<base>/<version>`` (see ``model/export.py``), so
    the SavedModel and its fitted steps appear together or not at all.

    Args:
        version_dir: the SavedModel folder the steps were fitted on; it must hold ``fingerprint.pb``.
        scaler: fitted QuantileTransformer.
        segments: fitted KMeans.
        feature_names: raw feature names, in the model's input order.
        item_ids: the users' own id (int or str) of each item index the model scores; answers carry
            these. None: the index is the id.
        feature_min, feature_max: training range of each feature (drift signal).
        model: how to call the embedding model; ``model.version`` is the version folder's number.
        rules: item filtering rules.
        extra: more manifest entries (training summary, tensorflow version, ...).
    """
    import joblib

    version_dir = Path(version_dir)
    fingerprint = version_dir / FINGERPRINT_FILE
    if not fingerprint.is_file():
        raise BundleError(f"{version_dir} has no {FINGERPRINT_FILE}: write the SavedModel (TensorFlow >= 2.12) "
                          "before its bundle")
    directory = bundle_dir(version_dir)
    if directory.exists():
        raise BundleError(f"{directory} exists already: a bundle is written once, with its model version")
    fitted = FittedSteps.from_estimators(scaler, segments, item_ids)  # UnsupportedEstimator: nothing is written
    if fitted.item_ids is not None and len(fitted.item_ids) != model.n_items:
        raise BundleError(f"{len(fitted.item_ids)} item ids for a model scoring {model.n_items} items")
    directory.mkdir(parents=True)
    fitted_description = fitted.write(directory)
    joblib.dump(scaler, directory / SCALER_FILE)
    joblib.dump(segments, directory / SEGMENTS_FILE)
    files = {
        name: {"sha256": sha256_of(directory / name), "bytes": (directory / name).stat().st_size}
        for name in (FITTED_FILE, SCALER_FILE, SEGMENTS_FILE)
    }
    manifest = {
        "format_version": FORMAT_VERSION,
        "saved_model": {"fingerprint_sha256": sha256_of(fingerprint)},
        "features": [
            {"name": n, "train_min": float(lo), "train_max": float(hi)}
            for n, lo, hi in zip(feature_names, feature_min, feature_max, strict=True)
        ],
        "model": asdict(model),
        "rules": asdict(rules),
        "n_segments": int(segments.n_clusters),
        "fitted": fitted_description,
        "versions": library_versions(),
        "files": files,
        **(extra or {}),
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return directory


def read_manifest(directory: str | Path, trusted: Collection[str] | None = None) -> dict:
    """The manifest, parsed; with ``trusted`` digests, only a manifest whose sha256 is one of them."""
    return read_manifest_and_digest(directory, trusted)[0]


def read_manifest_and_digest(directory: str | Path, trusted: Collection[str] | None = None) -> tuple[dict, str]:
    """The manifest, parsed, and the sha256 of the very bytes parsed (:func:`read_manifest`)."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(
            f"no {MANIFEST_FILE} in {directory}: this model version has no transformer bundle; "
            "train it with `python -m model.train`, which writes both into one version folder"
        )
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{path} is not readable ({exc}); re-run training") from exc
    digest = hashlib.sha256(raw).hexdigest()
    if trusted:
        if digest not in trusted:
            raise BundleError(
                f"{path} has sha256 {digest}, which is not among the trusted manifest digests "
                "(--trusted_manifests): the bundle was changed after it was trusted, or it is new; add the "
                "digest that training printed for this version to the trusted set"
            )
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise BundleError(f"{path} is not readable JSON ({exc}); re-run training") from exc
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        found = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise BundleError(
            f"{path} has format_version {found!r}, this transformer "
            f"reads {FORMAT_VERSION}; re-run training with this version of the project"
        )
    return manifest, digest


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


def check_model(version_dir: Path, manifest: dict) -> int:
    """The bundle belongs to this very SavedModel: same version number, same fingerprint."""
    recorded = (manifest.get("model") or {}).get("version")
    if str(recorded) != version_dir.name:
        raise BundleError(
            f"the bundle in {version_dir} was made for model version {recorded}, but it sits in version "
            f"folder {version_dir.name}: version folders are written whole by training; do not copy or "
            "rename bundles between them"
        )
    fingerprint = version_dir / FINGERPRINT_FILE
    expected = (manifest.get("saved_model") or {}).get("fingerprint_sha256")
    actual = sha256_of(fingerprint) if fingerprint.is_file() else None
    if actual is None or actual != expected:
        found = "is missing" if actual is None else f"has sha256 {actual}"
        raise BundleError(
            f"{fingerprint} {found}, the bundle was fitted on a SavedModel whose fingerprint has sha256 "
            f"{expected}: the model in this version folder is not the one the bundle was made with; "
            "re-run training to write a new version"
        )
    return int(version_dir.name)


def load_bundle(version_dir: str | Path, *, estimators: bool = False,
                trusted: Collection[str] | None = None) -> Bundle:
    """Read and verify the bundle of a model version folder; its fitted numbers are read without pickle.

    Args:
        version_dir: the model version folder (SavedModel + ``assets.extra/transformer-bundle/``).
        estimators: also unpickle the scikit-learn estimators (runs code from the files: only for
            artifacts you trust, e.g. ``--kernels sklearn``).
        trusted: if given, the manifest's sha256 must be one of these.

    Raises:
        BundleError: no bundle, an untrusted manifest, a bundle of another SavedModel, missing,
            unlisted or altered files, incompatible versions, or artifacts that do not fit the manifest.
    """
    version_dir = Path(version_dir)
    if not version_dir.is_dir():
        raise BundleError(
            f"model version folder {version_dir} does not exist: run `python -m model.train`, and pass "
            "--model_base_path with the folder that holds the numeric version folders"
        )
    directory = bundle_dir(version_dir)
    manifest, manifest_sha256 = read_manifest_and_digest(directory, trusted)
    verify_files(directory, manifest)
    version = check_model(version_dir, manifest)
    check_versions(manifest)
    try:
        model = ModelSpec(**manifest["model"])
        rules = Rules(**manifest["rules"])
        features = manifest["features"]
        feature_names = tuple(f["name"] for f in features)
        feature_min = tuple(float(f["train_min"]) for f in features)
        feature_max = tuple(float(f["train_max"]) for f in features)
        fitted_description = manifest["fitted"]
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{directory / MANIFEST_FILE} is incomplete ({exc}); re-run training") from exc
    if model.n_features != len(feature_names):
        raise BundleError(
            f"the manifest lists {len(feature_names)} features and the model {model.n_features}: the bundle is "
            "inconsistent; re-run training"
        )
    try:
        fitted = FittedSteps.read(directory, fitted_description, len(feature_names), model.embedding_dim,
                                  model.n_items)
    except FittedStepsError as exc:
        raise BundleError(f"{exc}: the bundle is inconsistent; re-run training") from None
    scaler = segments = None
    if estimators:
        import joblib

        from transformer.steps.fitted import same_numbers

        scaler = joblib.load(directory / SCALER_FILE)
        segments = joblib.load(directory / SEGMENTS_FILE)
        if not same_numbers(FittedSteps.from_estimators(scaler, segments, fitted.item_ids), fitted):
            raise BundleError(f"{directory}: the pickled estimators and {FITTED_FILE} hold different numbers; "
                              "re-run training")
    return Bundle(
        path=directory,
        version=version,
        feature_names=feature_names,
        feature_min=feature_min,
        feature_max=feature_max,
        model=model,
        rules=rules,
        fitted=fitted,
        manifest=manifest,
        scaler=scaler,
        segments=segments,
        manifest_sha256=manifest_sha256,
    )
