"""Prometheus metrics of the transformer, served at /metrics beside KServe's per-stage histograms
(``request_preprocess_seconds``, ``request_predict_seconds``, ``request_postprocess_seconds``).

    embedder_requests_total{model_version, outcome, cause}   every predict request, how it ended (ok,
                                                             client_error, predictor_error, shed,
                                                             internal_error) and
                                                             which model version answered ("" if none)
    embedder_request_rows                                    rows per accepted request
    embedder_feature_out_of_range_total{model_version,       rows with a feature outside the training
        feature, side}                                       range (below/above): a drift signal
    embedder_segment_assignments_total{model_version,        rows assigned to each segment (segments are
        segment}                                             numbered anew by every training)
    embedder_predictor_request_seconds                       TF Serving calls, retries included
    embedder_predictor_call_rows                             rows per TF Serving call (coalescing at work)
    embedder_predictor_retries_total{reason}                 retried predictor calls
    embedder_model_version                                   the version answering new requests (0: none)
    embedder_model_version_switches_total                    changes of that version
    embedder_bundle_rejections_total                         version folders whose bundle failed verification
    embedder_interface_refusals_total{model_version}         versions refused because they would change the
                                                             interface the clients call (once per bundle)
    embedder_inflight_requests, embedder_inflight_rows       work admitted and not answered yet (admission.py):
                                                             the load signal for an autoscaler
    embedder_admission_limit                                 requests that may be inside at once now
    embedder_feature_drift_psi{feature}                      population stability index of each raw feature
                                                             over the last rows against the training data
    embedder_segment_mix_drift_psi                           the same for the segment mix (drift.py)
"""

from __future__ import annotations

import numpy as np
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

LABEL = "model_name"

VERSION = "model_version"
REQUESTS = Counter("embedder_requests_total", "Predict requests by model version, outcome (ok, client_error, "
                   "predictor_error, internal_error) and cause", [LABEL, VERSION, "outcome", "cause"])
ROWS = Histogram("embedder_request_rows", "Rows per accepted predict request", [LABEL],
                 buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096))
OUT_OF_RANGE = Counter("embedder_feature_out_of_range_total",
                       "Rows whose feature lies outside the range seen in training",
                       [LABEL, VERSION, "feature", "side"])
SEGMENTS = Counter("embedder_segment_assignments_total", "Rows assigned to each segment", [LABEL, VERSION, "segment"])
PREDICTOR_SECONDS = Histogram("embedder_predictor_request_seconds", "TF Serving predict calls, retries included",
                              [LABEL], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
PREDICTOR_ROWS = Histogram("embedder_predictor_call_rows", "Rows per TF Serving call (requests coalesced under load)",
                           [LABEL], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
PREDICTOR_RETRIES = Counter("embedder_predictor_retries_total", "Predictor calls tried again", [LABEL, "reason"])
MODEL_VERSION = Gauge("embedder_model_version", "Model version answering new requests (0: none)", [LABEL])
SWITCHES = Counter("embedder_model_version_switches_total", "Changes of the version answering new requests", [LABEL])
REJECTIONS = Counter("embedder_bundle_rejections_total", "Version folders whose bundle failed verification", [LABEL])
REFUSALS = Counter("embedder_interface_refusals_total", "Versions refused because they would change the interface "
                   "the clients call (features, top-k, segments, item id type)", [LABEL, VERSION])
INFLIGHT_REQUESTS = Gauge("embedder_inflight_requests", "Requests admitted and not answered yet", [LABEL])
INFLIGHT_ROWS = Gauge("embedder_inflight_rows", "Rows of admitted requests not answered yet", [LABEL])
ADMISSION_LIMIT = Gauge("embedder_admission_limit", "Requests that may be inside at once now (it follows their "
                        "latency, between --min_inflight and --max_inflight)", [LABEL])


class DriftCollector:
    """Reports, at scrape time, the drift of the version answering new requests, for each model name.

    One collector for all model names: Prometheus' registry refuses two collectors of the same series."""

    def __init__(self):
        self.monitors: dict[str, object] = {}  # model name -> its DriftMonitor, or None: not measured

    def collect(self):
        features = GaugeMetricFamily("embedder_feature_drift_psi", "Population stability index of each raw "
                                     "feature over the recent rows against the training quantiles (> 0.25: "
                                     "significant drift)", labels=[LABEL, "feature"])
        segments = GaugeMetricFamily("embedder_segment_mix_drift_psi", "Population stability index of the "
                                     "segment mix over the recent rows against the training mix", labels=[LABEL])
        for model_name, monitor in list(self.monitors.items()):
            if monitor is not None:
                for feature, value in monitor.feature_psi().items():
                    features.add_metric([model_name, feature], value)
                segments.add_metric([model_name], monitor.segment_psi())
        yield features
        yield segments


DRIFT = DriftCollector()
REGISTRY.register(DRIFT)


class ModelMetrics:
    """The metrics of one model, with label children bound once (cheap on the request path)."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.rows = ROWS.labels(model_name)
        self.predictor_seconds = PREDICTOR_SECONDS.labels(model_name)
        self.predictor_rows = PREDICTOR_ROWS.labels(model_name)
        self.model_version = MODEL_VERSION.labels(model_name)
        self._outcomes: dict[tuple[str, str, str], object] = {}

    def request(self, outcome: str, cause: str, version: int | None = None) -> None:
        key = ("" if version is None else str(version), outcome, cause)
        child = self._outcomes.get(key)
        if child is None:
            child = self._outcomes[key] = REQUESTS.labels(self.model_name, *key)
        child.inc()

    def retry(self, reason: str) -> None:
        PREDICTOR_RETRIES.labels(self.model_name, reason).inc()

    def watch(self, admission) -> None:
        """Expose the admitted work of an ``Admission`` (read when Prometheus scrapes)."""
        INFLIGHT_REQUESTS.labels(self.model_name).set_function(lambda: admission.requests)
        INFLIGHT_ROWS.labels(self.model_name).set_function(lambda: admission.rows)
        ADMISSION_LIMIT.labels(self.model_name).set_function(lambda: admission.limit)

    def switched(self, version: int | None, drift=None) -> None:
        """A new version answers new requests; ``drift`` is its DriftMonitor (None: not measured)."""
        self.model_version.set(version or 0)
        DRIFT.monitors[self.model_name] = drift
        SWITCHES.labels(self.model_name).inc()

    def rejected(self) -> None:
        REJECTIONS.labels(self.model_name).inc()

    def interface_refused(self, version: int) -> None:
        REFUSALS.labels(self.model_name, str(version)).inc()


class VersionMetrics:
    """What one model version saw: features outside its training range, its segment mix."""

    def __init__(self, model_name: str, version: int, feature_names: tuple[str, ...], feature_min, feature_max,
                 n_segments: int, drift=None):
        v = str(version)
        self.drift = drift  # a DriftMonitor, or None
        self.feature_min = np.asarray(feature_min, dtype=np.float64)
        self.feature_max = np.asarray(feature_max, dtype=np.float64)
        self.below = [OUT_OF_RANGE.labels(model_name, v, f, "below") for f in feature_names]
        self.above = [OUT_OF_RANGE.labels(model_name, v, f, "above") for f in feature_names]
        self.segments = [SEGMENTS.labels(model_name, v, str(s)) for s in range(n_segments)]

    def observe_rows(self, X: np.ndarray) -> None:
        if self.drift is not None:
            self.drift.observe_rows(X)
        below, above = X < self.feature_min, X > self.feature_max
        # Most rows lie inside the training range: asked first, that case costs 4 us a request instead of 13.
        if not (below.any() or above.any()):
            return
        for counters, outside in ((self.below, below), (self.above, above)):
            counts = outside.sum(axis=0)
            for j in np.flatnonzero(counts):
                counters[j].inc(int(counts[j]))

    def observe_segments(self, labels: np.ndarray) -> None:
        if self.drift is not None:
            self.drift.observe_segments(labels)
        if labels.shape[0] == 1:  # one row, the most common request: 1 us instead of 5
            self.segments[int(labels[0])].inc()
            return
        counts = np.bincount(labels, minlength=len(self.segments))
        for s in np.flatnonzero(counts):
            self.segments[s].inc(int(counts[s]))
