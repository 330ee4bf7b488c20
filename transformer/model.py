"""The KServe transformer: scale -> TF Serving -> segment and rank.

    preprocess   parse and validate rows, quantile-scale them (float64), float32 out
    predict      POST the scaled features to TF Serving's REST API
    postprocess  nearest centroid -> segment; scores -> rules -> best items

The fitted scikit-learn steps are loaded once, verified against the bundle's
manifest, and run as numpy kernels (see ``kernels.py``): tens of microseconds a
row, so they run on the event loop. Moving large batches to a worker thread
(``offload_rows``) is possible but measured slower: the GIL serialises the
Python parts anyway, and the switching cost 48% of the throughput at 256 rows.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Callable

import kserve
import numpy as np

from transformer.bundle import Bundle, load_bundle
from transformer.coalesce import Coalescer
from transformer.codec import decode_body, encode_predictions, parse_instances
from transformer.kernels import (
    NearestCentroid, SklearnScaler, SklearnSegmenter, rules_on_candidates, scaler_kernel, top_items,
)
from transformer.metrics import ModelMetrics
from transformer.predictor import Contract, PredictorClient, PredictorError, ReadinessProbe, RetryPolicy

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
        offload_rows: int = 0,
        kernels: str = "numpy",
        coalesce_inflight: int = 2,
        coalesce_rows: int = 256,
        full_scores: bool = False,
    ):
        super().__init__(name)
        self.bundle_dir = Path(bundle_dir)
        self.max_rows = max_rows
        self.offload_rows = offload_rows
        if kernels not in ("numpy", "sklearn"):
            raise ValueError(f"kernels must be 'numpy' or 'sklearn', got {kernels!r}")
        self.kernels = kernels
        self.coalesce_inflight = coalesce_inflight
        self.coalesce_rows = coalesce_rows
        self.full_scores = full_scores
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
        self.contract, self.use_candidates = self._contract(bundle)
        self.metrics = ModelMetrics(self.name, bundle.feature_names, bundle.feature_min, bundle.feature_max,
                                    int(bundle.segments.n_clusters))
        # Under load, concurrent requests share predictor calls (see coalesce.py).
        self._forward = (Coalescer(self._call_predictor, self.coalesce_inflight, self.coalesce_rows)
                         if self.coalesce_inflight > 0 else self._call_predictor)
        if bundle.model.name != self.name:
            log.info("bundle was trained for model %r, serving it as %r", bundle.model.name, self.name)
        self.ready = True
        return self.ready

    def _contract(self, bundle: Bundle) -> tuple[Contract, bool]:
        """Ask for the model's best candidates when it offers enough of them, else for every score."""
        spec, rules = bundle.model, bundle.rules
        outputs = {spec.embedding_output: ("DT_FLOAT", spec.embedding_dim)}
        use_candidates = bool(spec.candidates_signature) and not self.full_scores
        if use_candidates and spec.n_candidates < min(rules.top_k, spec.n_items):
            log.info("the model ranks %d candidates, the rules want %d: asking for every score",
                     spec.n_candidates, rules.top_k)
            use_candidates = False
        if use_candidates:
            outputs[spec.candidate_ids_output] = ("DT_INT64", spec.n_candidates)
            outputs[spec.candidate_scores_output] = ("DT_FLOAT", spec.n_candidates)
            signature = spec.candidates_signature
        else:
            outputs[spec.scores_output] = ("DT_FLOAT", spec.n_items)
            signature = spec.signature_name
        return Contract(signature, spec.input_name, spec.n_features, outputs), use_candidates

    @property
    def predictor(self) -> PredictorClient:
        if self._predictor is None:
            host = self._predictor_host or (self.predictor_config.predictor_host if self.predictor_config else None)
            if not host:
                raise PredictorError(503, "no predictor host configured: start with --predictor_host HOST:PORT")
            self._predictor = PredictorClient(host, self.name, timeout=self._predictor_timeout, retry=self._retry,
                                              on_retry=self.metrics.retry)
            self._readiness = ReadinessProbe(self._predictor, self.contract)
        return self._predictor

    async def healthy(self) -> bool:
        """Ready when the bundle is loaded, TF Serving reports the model AVAILABLE and its metadata fits."""
        if not self.ready:
            return False
        self.predictor  # creates the readiness probe
        return await self._readiness.ready()

    async def _compute(self, fn: Callable[..., Any], rows: int, *args: Any) -> Any:
        """Run CPU work inline, or in a worker thread for batches above ``offload_rows`` (0: never)."""
        if 0 < self.offload_rows < rows:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    # -- the request path ---------------------------------------------------------------------

    async def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> np.ndarray:
        X = parse_instances(decode_body(payload), self.feature_names, self.max_rows)
        self.metrics.observe_rows(X)
        scaled = await self._compute(self.scaler.transform, X.shape[0], X)
        return scaled.astype(np.float32)

    async def _call_predictor(self, features: np.ndarray) -> dict[str, np.ndarray]:
        """One TF Serving call (possibly carrying the rows of several requests)."""
        self.metrics.predictor_rows.observe(features.shape[0])
        with self.metrics.predictor_seconds.time():
            return await self.predictor.predict(features, self.contract)

    async def predict(self, payload: np.ndarray, headers: dict[str, str] | None = None) -> dict[str, np.ndarray]:
        return await self._forward(payload)

    async def postprocess(self, result: dict[str, np.ndarray], headers: dict[str, str] | None = None) -> dict:
        return await self._compute(self._rank, result[self.spec.embedding_output].shape[0], result)

    def _rank(self, result: dict[str, np.ndarray]) -> dict:
        labels, distances = self.segmenter.assign(result[self.spec.embedding_output])
        self.metrics.observe_segments(labels)
        min_score, top_k = self.rules.min_score, self.rules.top_k
        if self.use_candidates:
            ids, scores, keep = rules_on_candidates(result[self.spec.candidate_ids_output],
                                                    result[self.spec.candidate_scores_output], min_score, top_k)
        else:
            ids, scores, keep = top_items(result[self.spec.scores_output], min_score, top_k)
        return encode_predictions(labels, distances, ids, scores, keep)
