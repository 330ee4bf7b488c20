"""Drift per feature, with no reference data beyond the fitted steps.

A fitted ``QuantileTransformer`` holds, per raw feature, the training values at
``n_quantiles`` evenly spaced quantiles: an equal-weight sample of the training
distribution. Its ventiles cut each feature into 20 bins; the share of those quantile
points in each bin is the training distribution over the bins (this holds for count
features with ties too, where edges coincide). The transformer counts the
live values of the last ``window`` rows in the same bins, and the population
stability index

    PSI = sum over bins of (live share - training share) * ln(live share / training share)

says how far today's traffic is from the training data: below 0.1 stable, 0.1 to
0.25 moderate, above 0.25 significant (the usual reading). The same is done for the
segment mix against the training mix, when the bundle records it.

Requests only hand over their rows; they are binned 256 at a time (about 1 us a row,
against 18 us for a one-row request binned on its own) or when Prometheus scrapes,
which is also when the index is computed.
"""

from __future__ import annotations

import threading

import numpy as np

from transformer.steps.fitted import FittedSteps, QuantileStep

STABLE, SIGNIFICANT = 0.1, 0.25
BATCH_ROWS = 256  # rows waiting to be binned, at most
# 20 equal-mass bins: a feature scaled x3 reads 0.22 with 10 (tests/test_drift.py); the noise of an
# unchanged feature is about (bins - 1) / window, 0.01 over 2,000 rows.
BIN_EDGES = np.linspace(0.05, 0.95, 19)
_FLOOR = 1e-4  # an empty bin counts as this share: PSI stays finite


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of two distributions over the same bins (each sums to 1)."""
    e, a = np.maximum(expected, _FLOOR), np.maximum(actual, _FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


class SlidingCounts:
    """Counts of bin indices over the last ``window`` rows, for several columns at once."""

    def __init__(self, n_bins: list[int], window: int):
        self.window = window
        self.n_bins = n_bins
        self.offsets = np.concatenate([[0], np.cumsum(n_bins)[:-1]])  # one flat count vector for all columns
        self.counts = np.zeros(int(sum(n_bins)), dtype=np.int64)
        self.ring = np.zeros((window, len(n_bins)), dtype=np.int64)  # flat bin index of each remembered row
        self.rows = 0  # rows seen in all

    def add(self, bins: np.ndarray) -> None:
        """``bins`` (n, columns): the bin of each value of n new rows (only the last ``window`` matter)."""
        bins = bins[-self.window:]
        absolute = self.rows + np.arange(bins.shape[0])
        positions = absolute % self.window
        evicted = self.ring[positions[absolute >= self.window]]  # the rows these slots remembered
        size = self.counts.size
        flat = bins + self.offsets
        # bincount rather than np.add.at: a few microseconds for a request's rows.
        self.counts += np.bincount(flat.ravel(), minlength=size) - np.bincount(evicted.ravel(), minlength=size)
        self.ring[positions] = flat
        self.rows += bins.shape[0]

    def shares(self, column: int) -> np.ndarray:
        start = self.offsets[column]
        counts = self.counts[start:start + self.n_bins[column]]
        total = counts.sum()
        return counts / total if total else counts.astype(np.float64)

    @property
    def filled(self) -> int:
        return min(self.rows, self.window)


class DriftMonitor:
    """PSI of each raw feature, and of the segment mix, over the last ``window`` rows."""

    def __init__(self, fitted: FittedSteps, feature_names: tuple[str, ...], window: int = 2000,
                 min_rows: int = 200):
        first = fitted.scaler[0]
        if not isinstance(first, QuantileStep):
            raise ValueError("drift needs the training quantiles: the first scaler step is not a QuantileTransformer")
        self.feature_names = feature_names
        self.min_rows = min_rows
        self.edges, self.expected = [], []
        for j in range(len(feature_names)):
            points = first.quantiles[:, j]
            edges = np.unique(np.interp(BIN_EDGES, first.references, points))
            self.edges.append(edges)
            self.expected.append(np.bincount(np.searchsorted(edges, points, side="right"),
                                             minlength=edges.size + 1) / points.size)
        self.features = SlidingCounts([e.size + 1 for e in self.edges], window)
        # All edges in one (F, E) matrix padded with +inf: a row's bins are one comparison and a sum
        # ("edges <= x", what searchsorted(side="right") counts). 12 searchsorted calls cost 76 us a row.
        self._edges = np.full((len(self.edges), max(e.size for e in self.edges)), np.inf)
        for j, edges in enumerate(self.edges):
            self._edges[j, :edges.size] = edges
        self.segment_share = fitted.segment_share
        k = fitted.centers.shape[0]
        self.segments = SlidingCounts([k], window) if self.segment_share is not None else None
        self._rows: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._pending = 0
        self._lock = threading.Lock()  # requests on the event loop, scrapes possibly elsewhere

    def observe_rows(self, X: np.ndarray) -> None:
        with self._lock:
            self._rows.append(X)
            self._pending += X.shape[0]
            if self._pending >= BATCH_ROWS:
                self._flush()

    def observe_segments(self, labels: np.ndarray) -> None:
        if self.segments is not None:
            with self._lock:
                self._labels.append(np.asarray(labels, dtype=np.int64))

    def _flush(self) -> None:
        if self._rows:
            X = np.concatenate(self._rows) if len(self._rows) > 1 else self._rows[0]
            self.features.add((self._edges <= X[:, :, None]).sum(axis=2))
        if self._labels and self.segments is not None:
            self.segments.add(np.concatenate(self._labels)[:, None])
        self._rows, self._labels, self._pending = [], [], 0

    def feature_psi(self) -> dict[str, float]:
        """PSI per feature over the window (NaN until ``min_rows`` rows were seen)."""
        with self._lock:
            self._flush()
        if self.features.filled < self.min_rows:
            return {name: float("nan") for name in self.feature_names}
        return {name: psi(self.expected[j], self.features.shares(j)) for j, name in enumerate(self.feature_names)}

    def segment_psi(self) -> float:
        with self._lock:
            self._flush()
        if self.segments is None or self.segments.filled < self.min_rows:
            return float("nan")
        return psi(self.segment_share, self.segments.shares(0))
