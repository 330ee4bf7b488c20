"""The fitted steps as plain data: numbers and JSON, read without running any code.

Loading a pickle (joblib) runs whatever code the file names, and a digest in a manifest
beside it only proves the two were written together. So training also writes the fitted
numbers as ``fitted.npz`` (read with numpy's ``allow_pickle=False``: arrays of numbers
only), described by the manifest's ``"fitted"`` entry, and the serving path reads only
that. The joblib files stay beside it for scikit-learn users and for ``--kernels sklearn``.

This is also the one module that reads scikit-learn's fitted attributes
(:func:`scaler_steps`, :func:`kmeans_centers`): the numpy kernels (``kernels.py``) and the
TensorFlow compiler (``model/fuse.py``) both build on :class:`FittedSteps`.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

FITTED_FILE = "fitted.npz"
SUPPORTED_SCALERS = "QuantileTransformer, StandardScaler, MinMaxScaler, or a Pipeline of these"


class UnsupportedEstimator(TypeError):
    """The fitted object has no plain-data form here (so no kernel and no compiled graph either)."""


class FittedStepsError(ValueError):
    """``fitted.npz`` or its description does not hold what the manifest says."""


class ByValue:
    """Equality by value, arrays included. A dataclass's own ``__eq__`` compares arrays with ``==``, which numpy
    answers element by element: from Python 3.13, which compares field by field, that raises "truth value of an
    array is ambiguous" (3.11 compared tuples, which take the same array object as equal without asking)."""

    __hash__ = None  # mutable numbers inside: not a key

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        for f in fields(self):
            u, v = getattr(self, f.name), getattr(other, f.name)
            if isinstance(u, np.ndarray) or isinstance(v, np.ndarray):
                if u is None or v is None or not np.array_equal(u, v):
                    return False
            elif u != v:
                return False
        return True


@dataclass(frozen=True, eq=False)
class QuantileStep(ByValue):
    """A fitted ``QuantileTransformer``: its quantiles (n_quantiles, F), references, output distribution."""

    quantiles: np.ndarray
    references: np.ndarray
    output_distribution: str


@dataclass(frozen=True, eq=False)
class AffineStep(ByValue):
    """A fitted ``StandardScaler`` or ``MinMaxScaler``, in scikit-learn's order of operations:
    subtract, divide, multiply, add, then clip (each optional)."""

    subtract: np.ndarray | None = None
    divide: np.ndarray | None = None
    multiply: np.ndarray | None = None
    add: np.ndarray | None = None
    clip: tuple[float, float] | None = None


_AFFINE_ARRAYS = ("subtract", "divide", "multiply", "add")


def scaler_steps(estimator: Any) -> list[QuantileStep | AffineStep]:
    """The fitted numbers of a supported scaler, in the order they apply."""
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import MinMaxScaler, QuantileTransformer, StandardScaler

    name = type(estimator).__name__
    if isinstance(estimator, Pipeline):
        return [s for _, step in estimator.steps if step not in (None, "passthrough") for s in scaler_steps(step)]
    if not isinstance(estimator, (QuantileTransformer, StandardScaler, MinMaxScaler)):
        raise UnsupportedEstimator(f"{name} is not supported as the scaler; supported scalers: {SUPPORTED_SCALERS}")
    if not hasattr(estimator, "n_features_in_"):
        raise UnsupportedEstimator(f"the {name} is not fitted; fit it before bundling")
    if isinstance(estimator, QuantileTransformer):
        if estimator.output_distribution not in ("uniform", "normal"):
            raise UnsupportedEstimator(
                f"QuantileTransformer(output_distribution={estimator.output_distribution!r}) is not "
                "supported; use 'uniform' or 'normal'"
            )
        return [QuantileStep(np.asarray(estimator.quantiles_, dtype=np.float64),
                             np.asarray(estimator.references_, dtype=np.float64), estimator.output_distribution)]
    if isinstance(estimator, StandardScaler):
        return [AffineStep(subtract=_f64(estimator.mean_) if estimator.with_mean else None,
                           divide=_f64(estimator.scale_) if estimator.with_std else None)]
    return [AffineStep(multiply=_f64(estimator.scale_), add=_f64(estimator.min_),
                       clip=tuple(map(float, estimator.feature_range)) if estimator.clip else None)]


def kmeans_centers(estimator: Any) -> np.ndarray:
    """The centroids of a fitted ``KMeans`` (k, D), float64."""
    from sklearn.cluster import KMeans

    if not isinstance(estimator, KMeans):
        raise UnsupportedEstimator(f"no kernel for {type(estimator).__name__}; supported segmenters: KMeans")
    return np.asarray(estimator.cluster_centers_, dtype=np.float64)


def _f64(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


def item_id_array(ids: Any) -> np.ndarray:
    """Item ids as int64 (non-negative integers) or fixed-width text: the two kinds numpy stores without pickle."""
    ids = np.asarray(ids)
    if ids.dtype.kind in "iu":
        return ids.astype(np.int64)
    if ids.dtype.kind in "UO":
        return ids.astype(str)
    raise FittedStepsError(f"item ids must be integers or strings, got {ids.dtype}")


@dataclass(frozen=True, eq=False)
class FittedSteps(ByValue):
    """Everything the transformer computes with: the scaler's steps and the segment centroids, the
    share of training rows in each segment (the reference of the segment-mix drift; None if unknown),
    and the catalogue: the users' own id of each item index the model scores (None: the index is the id)."""

    scaler: tuple[QuantileStep | AffineStep, ...]
    centers: np.ndarray
    segment_share: np.ndarray | None = None
    item_ids: np.ndarray | None = None

    @classmethod
    def from_estimators(cls, scaler: Any, segments: Any, item_ids: Any = None) -> "FittedSteps":
        centers = kmeans_centers(segments)
        labels = getattr(segments, "labels_", None)
        share = (np.bincount(labels, minlength=centers.shape[0]) / len(labels)).astype(np.float64) \
            if labels is not None and len(labels) else None
        return cls(tuple(scaler_steps(scaler)), centers, share, None if item_ids is None else item_id_array(item_ids))

    def write(self, directory: Path) -> dict:
        """Write ``fitted.npz`` into ``directory``; returns the manifest's description of it."""
        arrays, described = {}, []
        for i, step in enumerate(self.scaler):
            if isinstance(step, QuantileStep):
                arrays[f"scaler.{i}.quantiles"] = _f64(step.quantiles)
                arrays[f"scaler.{i}.references"] = _f64(step.references)
                described.append({"step": "quantile", "output_distribution": step.output_distribution})
            else:
                present = [name for name in _AFFINE_ARRAYS if getattr(step, name) is not None]
                arrays.update({f"scaler.{i}.{name}": _f64(getattr(step, name)) for name in present})
                described.append({"step": "affine", "arrays": present,
                                  "clip": list(step.clip) if step.clip is not None else None})
        arrays["segments.centers"] = _f64(self.centers)
        if self.segment_share is not None:
            arrays["segments.training_share"] = _f64(self.segment_share)
        description = {"file": FITTED_FILE, "scaler": described, "segments": {"step": "nearest_centroid"}}
        if self.item_ids is not None:
            arrays["items.ids"] = self.item_ids
            description["items"] = {"ids": "int64" if self.item_ids.dtype == np.int64 else "string"}
        np.savez(directory / FITTED_FILE, **arrays)
        return description

    @classmethod
    def read(cls, directory: Path, description: dict, n_features: int, embedding_dim: int,
             n_items: int) -> "FittedSteps":
        """Read ``fitted.npz`` as numbers only, and check it against the manifest's description.

        Raises:
            FittedStepsError: a missing, unreadable or inconsistent array, or one that is not numbers.
        """
        path = directory / FITTED_FILE
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise FittedStepsError(f"{path} is not a readable array file of numbers ({exc})") from None

        def array(name: str, ndim: int) -> np.ndarray:
            value = arrays.get(name)
            if value is None or value.dtype != np.float64 or value.ndim != ndim or not np.isfinite(value).all():
                got = "missing" if value is None else f"{value.dtype} with shape {list(value.shape)}"
                raise FittedStepsError(f"{path}: {name!r} must be finite float64 numbers of {ndim} dimension(s), "
                                       f"got {got}")
            return value

        try:
            steps: list[QuantileStep | AffineStep] = []
            for i, step in enumerate(description["scaler"]):
                if step["step"] == "quantile":
                    if step["output_distribution"] not in ("uniform", "normal"):
                        raise FittedStepsError(f"scaler step {i}: unknown output distribution "
                                               f"{step['output_distribution']!r}")
                    quantiles, references = array(f"scaler.{i}.quantiles", 2), array(f"scaler.{i}.references", 1)
                    if quantiles.shape != (references.shape[0], n_features) or quantiles.shape[0] < 2:
                        raise FittedStepsError(f"scaler step {i}: quantiles {list(quantiles.shape)} and references "
                                               f"{list(references.shape)} do not fit {n_features} features")
                    steps.append(QuantileStep(quantiles, references, step["output_distribution"]))
                elif step["step"] == "affine":
                    values = {name: array(f"scaler.{i}.{name}", 1) for name in step["arrays"]}
                    if any(name not in _AFFINE_ARRAYS for name in values) or any(
                            v.shape != (n_features,) for v in values.values()):
                        raise FittedStepsError(f"scaler step {i}: arrays {sorted(values)} do not fit "
                                               f"{n_features} features")
                    clip = step["clip"]
                    steps.append(AffineStep(**values, clip=(float(clip[0]), float(clip[1])) if clip else None))
                else:
                    raise FittedStepsError(f"scaler step {i} is {step['step']!r}; this transformer knows "
                                           "'quantile' and 'affine'")
            if description["segments"]["step"] != "nearest_centroid":
                raise FittedStepsError(f"segments step {description['segments']['step']!r} is not 'nearest_centroid'")
        except (KeyError, TypeError, IndexError) as exc:
            raise FittedStepsError(f"the manifest's 'fitted' entry is incomplete ({type(exc).__name__}: {exc})") from None
        centers = array("segments.centers", 2)
        if centers.shape[1] != embedding_dim or centers.shape[0] < 1:
            raise FittedStepsError(f"the segment centroids {list(centers.shape)} do not have the model's embedding "
                                   f"size {embedding_dim}")
        if not steps:
            raise FittedStepsError("the manifest's 'fitted' entry lists no scaler step")
        share = None
        if "segments.training_share" in arrays:
            share = array("segments.training_share", 1)
            if share.shape != (centers.shape[0],) or (share < 0).any() or abs(share.sum() - 1.0) > 1e-9:
                raise FittedStepsError(f"{path}: 'segments.training_share' must be {centers.shape[0]} shares "
                                       "summing to 1")
        return cls(tuple(steps), centers, share, _read_item_ids(path, arrays, description.get("items"), n_items))


def _read_item_ids(path: Path, arrays: dict, description: dict | None, n_items: int) -> np.ndarray | None:
    """The catalogue: n_items unique ids, int64 (non-negative: -1 pads answers) or text; None if not recorded."""
    if description is None:
        return None
    ids = arrays.get("items.ids")
    kind = description.get("ids") if isinstance(description, dict) else None
    expected = {"int64": "i", "string": "U"}.get(kind)
    if expected is None or ids is None or ids.dtype.kind != expected or ids.shape != (n_items,):
        got = "missing" if ids is None else f"{ids.dtype} with shape {list(ids.shape)}"
        raise FittedStepsError(f"{path}: 'items.ids' must be {n_items} item ids of the kind the manifest names "
                               f"({kind!r}), got {got}")
    if len(np.unique(ids)) != n_items or (expected == "i" and (ids < 0).any()):
        raise FittedStepsError(f"{path}: 'items.ids' must be distinct" + (" and non-negative" if expected == "i" else ""))
    return ids.astype(np.int64) if expected == "i" else ids


def same_numbers(a: FittedSteps, b: FittedSteps) -> bool:
    """Whether two FittedSteps hold exactly the same numbers (the plain data and the pickles agree)."""
    return a == b
