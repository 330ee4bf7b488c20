"""Prometheus metrics of the transformer, served at /metrics beside KServe's per-stage histograms
(``request_preprocess_seconds``, ``request_predict_seconds``, ``request_postprocess_seconds``).

    embedder_requests_total{outcome, cause}              every predict request, how it ended
    embedder_request_rows                                rows per accepted request
    embedder_feature_out_of_range_total{feature, side}   rows with a feature outside the training
                                                         range (below/above): a drift signal
    embedder_segment_assignments_total{segment}          rows assigned to each segment
    embedder_predictor_request_seconds                   TF Serving calls, retries included
    embedder_predictor_call_rows                         rows per TF Serving call (coalescing at work)
    embedder_predictor_retries_total{reason}             retried predictor calls
"""

from __future__ import annotations

import numpy as np
from prometheus_client import Counter, Histogram

LABEL = "model_name"

REQUESTS = Counter("embedder_requests_total", "Predict requests by outcome (ok, client_error, "
                   "predictor_error, internal_error) and cause", [LABEL, "outcome", "cause"])
ROWS = Histogram("embedder_request_rows", "Rows per accepted predict request", [LABEL],
                 buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096))
OUT_OF_RANGE = Counter("embedder_feature_out_of_range_total",
                       "Rows whose feature lies outside the range seen in training", [LABEL, "feature", "side"])
SEGMENTS = Counter("embedder_segment_assignments_total", "Rows assigned to each segment", [LABEL, "segment"])
PREDICTOR_SECONDS = Histogram("embedder_predictor_request_seconds", "TF Serving predict calls, retries included",
                              [LABEL], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
PREDICTOR_ROWS = Histogram("embedder_predictor_call_rows", "Rows per TF Serving call (requests coalesced under load)",
                           [LABEL], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
PREDICTOR_RETRIES = Counter("embedder_predictor_retries_total", "Predictor calls tried again", [LABEL, "reason"])


class ModelMetrics:
    """The metrics of one model, with label children bound once (cheap on the request path)."""

    def __init__(self, model_name: str, feature_names: tuple[str, ...], feature_min, feature_max, n_segments: int):
        self.model_name = model_name
        self.rows = ROWS.labels(model_name)
        self.predictor_seconds = PREDICTOR_SECONDS.labels(model_name)
        self.predictor_rows = PREDICTOR_ROWS.labels(model_name)
        self.feature_min = np.asarray(feature_min, dtype=np.float64)
        self.feature_max = np.asarray(feature_max, dtype=np.float64)
        self.below = [OUT_OF_RANGE.labels(model_name, f, "below") for f in feature_names]
        self.above = [OUT_OF_RANGE.labels(model_name, f, "above") for f in feature_names]
        self.segments = [SEGMENTS.labels(model_name, str(s)) for s in range(n_segments)]
        self._outcomes: dict[tuple[str, str], object] = {}

    def request(self, outcome: str, cause: str) -> None:
        child = self._outcomes.get((outcome, cause))
        if child is None:
            child = self._outcomes[(outcome, cause)] = REQUESTS.labels(self.model_name, outcome, cause)
        child.inc()

    def observe_rows(self, X: np.ndarray) -> None:
        self.rows.observe(X.shape[0])
        for counters, counts in ((self.below, (X < self.feature_min).sum(axis=0)),
                                 (self.above, (X > self.feature_max).sum(axis=0))):
            for j in np.flatnonzero(counts):
                counters[j].inc(int(counts[j]))

    def observe_segments(self, labels: np.ndarray) -> None:
        counts = np.bincount(labels, minlength=len(self.segments))
        for s in np.flatnonzero(counts):
            self.segments[s].inc(int(counts[s]))

    def retry(self, reason: str) -> None:
        PREDICTOR_RETRIES.labels(self.model_name, reason).inc()
