"""The KServe transformer: scale -> TF Serving -> segment and rank.

    preprocess   parse and validate rows, quantile-scale them (float64), float32 out
    predict      POST the scaled features to TF Serving's REST API
    postprocess  nearest centroid -> segment; scores -> rules -> best items

The fitted scikit-learn steps are loaded once, verified against the bundle's
manifest, and run as numpy kernels (see ``kernels.py``). CPU work on large
batches leaves the event loop, so one big request does not stall the others.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Callable

import kserve
import numpy as np

from transformer.bundle import Bundle, load_bundle
from transformer.codec import decode_body, encode_predictions, parse_instances
from transformer.kernels import NearestCentroid, SklearnScaler, SklearnSegmenter, scaler_kernel, top_items
from transformer.metrics import ModelMetrics
from transformer.predictor import PredictorClient, PredictorError, ReadinessProbe, RetryPolicy

log = logging.getLogger("transformer")


class EmbedderTransformer(kserve.Model):
    """A ``kserve.Model`` holding the fitted steps around the TF Serving embedding model."""

    def __init__(
        self,
        name: str,
        bundle_dir: str | Path,
        *,
        predictor_host: str | None = None,
        predictor_timeout: float = 5.0,
        retry: RetryPolicy = RetryPolicy(),
        max_rows: int = 1024,
        offload_rows: int = 64,
        kernels: str = "numpy",
    ):
        super().__init__(name)
        self.bundle_dir = Path(bundle_dir)
        self.max_rows = max_rows
        self.offload_rows = offload_rows
        if kernels not in ("numpy", "sklearn"):
            raise ValueError(f"kernels must be 'numpy' or 'sklearn', got {kernels!r}")
        self.kernels = kernels
        self._predictor_host = predictor_host
        self._predictor_timeout = predictor_timeout
        self._retry = retry
        self._predictor: PredictorClient | None = None
        self._readiness: ReadinessProbe | None = None
        self.bundle: Bundle | None = None

    # -- start-up ---------------------------------------------------------------------------

    def load(self) -> bool:
        """Verify and load the bundle; raises BundleError with what to do when it is not usable."""
        bundle = load_bundle(self.bundle_dir)
        if self.kernels == "numpy":
            self.scaler = scaler_kernel(bundle.scaler)
            self.segmenter = NearestCentroid.from_estimator(bundle.segments)
        else:  # the naive baseline, for the benchmark
            self.scaler = SklearnScaler(bundle.scaler)
            self.segmenter = SklearnSegmenter(bundle.segments)
        self.bundle = bundle
        self.feature_names = bundle.feature_names
        self.spec = bundle.model
        self.rules = bundle.rules
        self.metrics = ModelMetrics(self.name, bundle.feature_names, bundle.feature_min, bundle.feature_max,
                                    int(bundle.segments.n_clusters))
        if bundle.model.name != self.name:
            log.info("bundle was trained for model %r, serving it as %r", bundle.model.name, self.name)
        self.ready = True
        return self.ready

    @property
    def predictor(self) -> PredictorClient:
        if self._predictor is None:
            host = self._predictor_host or (self.predictor_config.predictor_host if self.predictor_config else None)
            if not host:
                raise PredictorError(503, "no predictor host configured: start with --predictor_host HOST:PORT")
            self._predictor = PredictorClient(host, self.name, timeout=self._predictor_timeout, retry=self._retry,
                                              on_retry=self.metrics.retry)
            self._readiness = ReadinessProbe(self._predictor, self.spec)
        return self._predictor

    async def healthy(self) -> bool:
        """Ready when the bundle is loaded, TF Serving reports the model AVAILABLE and its metadata fits."""
        if not self.ready:
            return False
        self.predictor  # creates the readiness probe
        return await self._readiness.ready()

    @property
    def not_ready_reason(self) -> str:
        if not self.ready:
            return "the artifact bundle is not loaded"
        return self._readiness.reason if self._readiness else "not checked yet"

    async def _compute(self, fn: Callable[..., Any], rows: int, *args: Any) -> Any:
        """Run CPU work inline for small batches, in a worker thread for large ones."""
        if rows > self.offload_rows:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    # -- the request path ---------------------------------------------------------------------

    async def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> np.ndarray:
        X = parse_instances(decode_body(payload), self.feature_names, self.max_rows)
        self.metrics.observe_rows(X)
        scaled = await self._compute(self.scaler.transform, X.shape[0], X)
        return scaled.astype(np.float32)

    async def predict(self, payload: np.ndarray, headers: dict[str, str] | None = None) -> dict[str, np.ndarray]:
        with self.metrics.predictor_seconds.time():
            outputs = await self.predictor.predict(payload, self.spec.signature_name)
        n = payload.shape[0]
        expected = {
            self.spec.embedding_output: (n, self.spec.embedding_dim),
            self.spec.scores_output: (n, self.spec.n_items),
        }
        for name, shape in expected.items():
            got = outputs.get(name)
            if got is None or got.shape != shape:
                raise PredictorError(
                    502,
                    f"the predictor's output {name!r} has shape "
                    f"{None if got is None else list(got.shape)}, expected {list(shape)}: "
                    "is the predictor serving the model this bundle was trained with?",
                    "predictor_bad_answer",
                )
        return outputs

    async def postprocess(self, result: dict[str, np.ndarray], headers: dict[str, str] | None = None) -> dict:
        embedding = result[self.spec.embedding_output]
        return await self._compute(self._rank, embedding.shape[0], embedding, result[self.spec.scores_output])

    def _rank(self, embedding: np.ndarray, scores: np.ndarray) -> dict:
        labels, distances = self.segmenter.assign(embedding)
        self.metrics.observe_segments(labels)
        item_ids, keep = top_items(scores, self.rules.min_score, self.rules.top_k)
        return encode_predictions(labels, distances, item_ids, keep, scores)
