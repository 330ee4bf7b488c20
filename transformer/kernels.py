"""Numpy kernels that reproduce the fitted scikit-learn steps on the request path.

scikit-learn's ``QuantileTransformer.transform`` validates its input and calls
``scipy.stats.norm.ppf`` column by column; ``KMeans.predict`` sets up thread
pools. Per request that costs milliseconds. These kernels hold the fitted
arrays (``fitted.py``: plain numbers, never unpickled on the serving path) and
do the same arithmetic in microseconds. ``tests/test_kernels.py`` proves their
parity with scikit-learn.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy.special import ndtri

from transformer.fitted import (  # noqa: F401  (UnsupportedEstimator re-exported for callers)
    AffineStep, QuantileStep, UnsupportedEstimator, kmeans_centers, scaler_steps,
)

# scikit-learn's sklearn.preprocessing._data.BOUNDS_THRESHOLD: an ABSOLUTE margin in
# input units, which is why scaling runs in float64 (float32 cannot resolve it).
BOUNDS_THRESHOLD = 1e-7
# The clipping bounds scikit-learn applies after stats.norm.ppf (which is ndtri).
_CLIP_MIN = float(ndtri(BOUNDS_THRESHOLD - np.spacing(1)))
_CLIP_MAX = float(ndtri(1 - (BOUNDS_THRESHOLD - np.spacing(1))))


class QuantileScaler:
    """``QuantileTransformer.transform`` for dense float64 input, either output distribution."""

    def __init__(self, step: QuantileStep):
        quantiles, references = step.quantiles, step.references
        self.n_features = quantiles.shape[1]
        self.normal = step.output_distribution == "normal"
        # One contiguous row per feature, plus the mirrored copies the backward
        # interpolation needs, so nothing is sliced or reversed per request.
        self._q = np.ascontiguousarray(quantiles.T)
        self._q_rev = np.ascontiguousarray(-quantiles.T[:, ::-1])
        self._ref = references
        self._ref_rev = np.ascontiguousarray(-references[::-1])
        self._low = self._q[:, 0].copy()
        self._high = self._q[:, -1].copy()

    @classmethod
    def from_estimator(cls, estimator: Any) -> "QuantileScaler":
        (step,) = scaler_steps(estimator)
        return cls(step)

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Scale raw features (n, F) float64; returns float64 like scikit-learn."""
        X = np.asarray(X, dtype=np.float64)
        out = np.empty_like(X)
        ref, ref_rev = self._ref, self._ref_rev
        for j in range(self.n_features):
            x = X[:, j]
            # Average of the forward and backward interpolation: with repeated
            # quantiles (a constant or discrete column) this lands in the middle.
            out[:, j] = 0.5 * (np.interp(x, self._q[j], ref) - np.interp(-x, self._q_rev[j], ref_rev))
        if self.normal:
            lower = X - BOUNDS_THRESHOLD < self._low
            upper = X + BOUNDS_THRESHOLD > self._high
        else:
            lower = X == self._low
            upper = X == self._high
        out[upper] = 1.0
        out[lower] = 0.0
        if self.normal:
            out = ndtri(out)
            np.clip(out, _CLIP_MIN, _CLIP_MAX, out=out)
        return out


class AffineScaler:
    """``StandardScaler`` and ``MinMaxScaler``, operation for operation."""

    def __init__(self, step: AffineStep):
        self.step = step

    def transform(self, X: np.ndarray) -> np.ndarray:
        X = np.array(X, dtype=np.float64)  # a copy, operated on in place in scikit-learn's order
        step = self.step
        if step.subtract is not None:
            X -= step.subtract
        if step.divide is not None:
            X /= step.divide
        if step.multiply is not None:
            X *= step.multiply
        if step.add is not None:
            X += step.add
        if step.clip is not None:
            np.clip(X, step.clip[0], step.clip[1], out=X)
        return X


class ChainedScaler:
    """Several steps (a ``Pipeline``), applied in order."""

    def __init__(self, steps: list):
        self.steps = steps

    def transform(self, X: np.ndarray) -> np.ndarray:
        for step in self.steps:
            X = step.transform(X)
        return X


def steps_kernel(steps: Sequence[QuantileStep | AffineStep]):
    """The numpy kernel of a scaler's fitted steps (see ``fitted.py``)."""
    kernels = [QuantileScaler(s) if isinstance(s, QuantileStep) else AffineScaler(s) for s in steps]
    return kernels[0] if len(kernels) == 1 else ChainedScaler(kernels)


def scaler_kernel(estimator: Any):
    """The numpy kernel of a fitted scaler, or a clear error naming what is supported."""
    return steps_kernel(scaler_steps(estimator))


class NearestCentroid:
    """``KMeans.predict`` plus the Euclidean distance to the chosen centroid."""

    def __init__(self, centers: np.ndarray):
        self.centers = np.ascontiguousarray(centers, dtype=np.float64)
        self._centers_t = np.ascontiguousarray(self.centers.T)
        self._half_sq_norms = 0.5 * np.einsum("ij,ij->i", self.centers, self.centers)

    @classmethod
    def from_estimator(cls, estimator: Any) -> "NearestCentroid":
        return cls(kmeans_centers(estimator))

    def assign(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Labels (int64) and distances (float64) for embeddings X (n, D).

        Like scikit-learn, the label minimises ``|c|^2 - 2 x.c`` and ties go to
        the lowest index; the distance is computed directly as ``|x - c|``.
        """
        X = np.asarray(X, dtype=np.float64)
        labels = np.argmin(self._half_sq_norms - X @ self._centers_t, axis=1)
        diff = X - self.centers[labels]
        distances = np.sqrt(np.einsum("ij,ij->i", diff, diff))
        return labels, distances


def top_items(scores: np.ndarray, min_score: float, top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best-first item ids and scores per row, at most ``top_k``, each >= the minimum score.

    Ties go to the lower item id. The comparison is done in float32, the
    precision the model's scores have. Returns (ids, scores, keep), each
    (n, min(top_k, n_items)); ``keep`` marks the entries that pass.
    """
    scores = np.asarray(scores, dtype=np.float32)
    k = min(top_k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    best = np.take_along_axis(scores, order, axis=1)
    return order, best, best >= np.float32(min_score)


def rules_on_candidates(ids: np.ndarray, scores: np.ndarray, min_score: float, top_k: int):
    """The same rules on candidates the model already ranked best-first (ties to the lower id).

    Filtering by score commutes with taking the best k, so this equals
    :func:`top_items` on every score whenever ``top_k`` <= the candidate count.
    """
    ids = np.asarray(ids)[:, :top_k].astype(np.int64, copy=False)
    scores = np.asarray(scores, dtype=np.float32)[:, :top_k]
    return ids, scores, scores >= np.float32(min_score)


class SklearnScaler:
    """The naive baseline (``--kernels sklearn``): scikit-learn's own ``transform`` per request."""

    def __init__(self, estimator: Any):
        self.estimator = estimator

    def transform(self, X: np.ndarray) -> np.ndarray:
        return self.estimator.transform(X)


class SklearnSegmenter:
    """The naive baseline (``--kernels sklearn``): ``KMeans.predict`` and ``KMeans.transform`` per request."""

    def __init__(self, estimator: Any):
        self.estimator = estimator

    def assign(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        X = np.asarray(X, dtype=np.float64)
        labels = self.estimator.predict(X)
        return labels, self.estimator.transform(X)[np.arange(len(labels)), labels]
