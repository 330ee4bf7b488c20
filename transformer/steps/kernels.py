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

from transformer.steps.fitted import (  # noqa: F401  (UnsupportedEstimator re-exported for callers)
    AffineStep, QuantileStep, UnsupportedEstimator, kmeans_centers, scaler_steps,
)

# scikit-learn's sklearn.preprocessing._data.BOUNDS_THRESHOLD: an ABSOLUTE margin in
# input units, which is why scaling runs in float64 (float32 cannot resolve it).
BOUNDS_THRESHOLD = 1e-7
# The clipping bounds scikit-learn applies after stats.norm.ppf (which is ndtri).
_CLIP_MIN = float(ndtri(BOUNDS_THRESHOLD - np.spacing(1)))
_CLIP_MAX = float(ndtri(1 - (BOUNDS_THRESHOLD - np.spacing(1))))


class _Interpolation:
    """``np.interp`` of each feature's own table: bit-identical to calling ``np.interp`` per feature,
    and cheaper for the few rows of a typical request.

    Few rows: one ``searchsorted`` for all rows and features at once, then numpy's ``arr_interp``
    arithmetic (the bracket found by binary search, the value at an exact knot, the slope times the
    offset plus the left value). The tables go into one sorted complex array, feature index as the
    real part and knot as the imaginary part: numpy orders complex numbers by real, then imaginary
    part, so a search for ``j + x*1j`` stays within feature ``j``'s knots. Many rows: ``np.interp``
    per feature, whose search is faster per value. Measured on 12 features x 1,000 knots, both
    directions: 1 row 61 -> 33 us, 32 rows 70 -> 68 us, 256 rows 118 -> 428 us; hence the switch.
    """

    #: Rows up to which the single search is used (the measured crossover is near 32).
    FEW_ROWS = 16

    def __init__(self, xp: np.ndarray, fp: np.ndarray):
        """``xp`` (F, K): each feature's increasing knots; ``fp``: the values at them, (K,) for every feature
        alike or (F, K) a table each."""
        n_features, n_knots = xp.shape
        fp = np.broadcast_to(np.asarray(fp, dtype=np.float64), xp.shape)
        self.n_knots = n_knots
        self.tables = [(np.ascontiguousarray(row), np.ascontiguousarray(values)) for row, values in zip(xp, fp)]
        self.features = np.arange(n_features, dtype=np.float64)
        self.offsets = np.arange(n_features) * n_knots  # where each feature's knots start in the flat arrays
        self.keys = (self.features[:, None] + 1j * xp).ravel()
        self.xp = xp.ravel()
        self.fp = np.ascontiguousarray(fp).ravel()
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # repeated knots: never a bracket
            slopes = (fp[:, 1:] - fp[:, :-1]) / (xp[:, 1:] - xp[:, :-1])
        self.slopes = np.concatenate([slopes, np.zeros((n_features, 1))], axis=1).ravel()
        self.left, self.right = fp[:, 0].copy(), fp[:, -1].copy()  # per feature

    def __call__(self, X: np.ndarray) -> np.ndarray:
        if X.shape[0] > self.FEW_ROWS:
            return np.column_stack([np.interp(X[:, j], xp, fp) for j, (xp, fp) in enumerate(self.tables)])
        # The last knot <= x (side "right"), as numpy's binary_search_with_guess finds it: its right
        # neighbour is strictly greater, so no division by zero. Before a feature's first
        # knot the index is the previous feature's last (-1 for the first feature: the very last):
        # always a valid index, its value replaced by ``left`` below, so nothing needs clipping.
        found = np.searchsorted(self.keys, self.features + 1j * X, side="right") - 1
        knot, value = self.xp[found], self.fp[found]
        out = self.slopes[found] * (X - knot) + value
        # At a knot the value itself, as numpy does: with knots a subnormal apart the slope can be
        # infinite, and inf * 0 is NaN (numpy warns about it once; no np.errstate here, it costs 3 us).
        exact = X == knot
        out[exact] = value[exact]
        local = found - self.offsets
        out = np.where(local < 0, self.left, out)
        return np.where(local >= self.n_knots - 1, self.right, out)


class QuantileScaler:
    """``QuantileTransformer.transform`` for dense float64 input, either output distribution."""

    def __init__(self, step: QuantileStep):
        quantiles, references = step.quantiles, step.references
        self.n_features = quantiles.shape[1]
        self.normal = step.output_distribution == "normal"
        # The forward interpolation and the backward one on the mirrored tables, as one interpolation over
        # 2F tables (the first F forward, the next F backward): one search for both (1 row: 21 -> 16 us).
        forward, backward = quantiles.T, -quantiles.T[:, ::-1]
        self._both = _Interpolation(np.ascontiguousarray(np.concatenate([forward, backward])),
                                    np.concatenate([np.broadcast_to(references, forward.shape),
                                                    np.broadcast_to(-references[::-1], backward.shape)]))
        self._low = np.ascontiguousarray(quantiles[0])
        self._high = np.ascontiguousarray(quantiles[-1])

    @classmethod
    def from_estimator(cls, estimator: Any) -> "QuantileScaler":
        (step,) = scaler_steps(estimator)
        return cls(step)

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Scale raw features (n, F) float64; returns float64 like scikit-learn."""
        X = np.asarray(X, dtype=np.float64)
        # Average of the forward and backward interpolation: with repeated
        # quantiles (a constant or discrete column) this lands in the middle.
        both = self._both(np.concatenate([X, -X], axis=1))
        out = 0.5 * (both[:, :self.n_features] - both[:, self.n_features:])
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
            np.maximum(out, _CLIP_MIN, out=out)  # np.clip, at half its call overhead (2.6 vs 4.4 us)
            np.minimum(out, _CLIP_MAX, out=out)
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
