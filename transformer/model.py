"""The KServe transformer: scale -> TF Serving -> segment and rank, one model version per request.

    preprocess   take the active model version; the request's codec parses and validates its
                 rows against the version's features; quantile-scale them (float64), float32 out
    predict      send the scaled rows to TF Serving, pinned to that version
    postprocess  nearest centroid -> segment; scores -> rules -> best items; the codec writes the
                 answer in the request's protocol, naming the version (``x-model-version``)

What is computed is ``pipeline.py``'s, protocol-free; how it travels is a codec's: v1 REST
(``protocols/v1.py``), v2 REST and gRPC (``protocols/v2.py``). Adding a protocol means adding a codec
and a line in :func:`codec_for`.

The request carries its :class:`ServedVersion` from preprocess to postprocess, so a
model update in between cannot mix two versions' steps in one answer (``store/versions.py``
decides which version is active). The fitted steps run as numpy kernels (``steps/kernels.py``):
tens of microseconds a row, so they run on the event loop. Moving large batches to a worker
thread (``offload_rows``) is possible but measured slower: the GIL serialises the Python
parts anyway, and the switching cost 48% of the throughput at 256 rows.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import kserve
import numpy as np

from transformer.serving.admission import TIMEOUT_HEADER, Admission, check_deadline, deadline
from transformer.store.bundle import Bundle, BundleError, load_bundle
from transformer.store.interface import Interface
from transformer.serving.coalesce import Coalescer
from transformer.protocols.v1 import V1Codec
from transformer.protocols.v2 import V2Codec, V2Request, tensor_metadata
from transformer.serving.drift import DriftMonitor
from transformer.serving.edge import Failure, grpc_code, handle, new_request_id, request_version
from transformer.serving.metrics import ModelMetrics, VersionMetrics
from transformer.pipeline import Pipeline
from transformer.predictor import PredictorClient, PredictorError, RetryPolicy, VersionNotServed, connect
from transformer.store.versions import ModelVersions, NoServableVersion, ServedVersion

log = logging.getLogger("transformer")

VERSION_HEADER = "x-model-version"
# The sha256 of the answering version's manifest.json, which lists every file's digest: what a rollout checks,
# since one version number can name two trainings (a store given wrongly, a version retired and made again).
MANIFEST_HEADER = "x-model-manifest-sha256"

# Set for the one retry of a request whose version TF Serving stopped serving: the version to avoid.
_avoid_version: contextvars.ContextVar[int | None] = contextvars.ContextVar("avoid_version", default=None)


@dataclass(frozen=True)
class Batch:
    """Rows on their way through one model version: scaled features, then TF Serving's outputs; and the
    codec that read the request and writes its answer."""

    served: ServedVersion
    data: Any
    codec: Any


def codec_for(payload: Any) -> Any:
    """The codec of a request's protocol: v2 (REST, as the v2 endpoint decoded it, or gRPC, as KServe's
    servicer did), else v1 REST."""
    if isinstance(payload, (V2Request, kserve.InferRequest)):
        return V2Codec(payload)
    return V1Codec(payload)


class EmbedderTransformer(kserve.Model):
    """A ``kserve.Model`` holding the fitted steps of each model version around TF Serving."""

    def __init__(
        self,
        name: str,
        model_base_path: str | Path,
        *,
        predictor_host: str | None = None,
        predictor_api: str = "auto",
        predictor_rest_client: str = "loop",
        predictor_rest_rows: int = 64,
        predictor_grpc_port: int = 9000,
        predictor_timeout: float = 5.0,
        predictor_use_ssl: bool = False,
        retry: RetryPolicy = RetryPolicy(),
        max_rows: int = 1024,
        offload_rows: int = 0,
        kernels: str = "numpy",
        coalesce_inflight: int = 2,
        coalesce_rows: int = 256,
        full_scores: bool = False,
        keep_versions: int = 2,
        poll_seconds: float = 1.0,
        trusted_manifests: frozenset[str] = frozenset(),
        drift_window: int = 2000,
        admission: Admission | None = None,
    ):
        super().__init__(name, return_response_headers=True)
        self.model_base_path = Path(model_base_path)
        self.max_rows = max_rows
        self.offload_rows = offload_rows
        self.kernels = kernels
        self.coalesce_inflight = coalesce_inflight
        self.coalesce_rows = coalesce_rows
        self.full_scores = full_scores
        self.keep_versions = keep_versions
        self.poll_seconds = poll_seconds
        self.trusted_manifests = trusted_manifests
        self.drift_window = drift_window
        self.admission = admission or Admission()
        self._predictor_host = predictor_host
        self._predictor_api = predictor_api
        self._predictor_rest_client = predictor_rest_client
        self._predictor_rest_rows = predictor_rest_rows
        self._predictor_grpc_port = predictor_grpc_port
        self._predictor_timeout = predictor_timeout
        self._predictor_use_ssl = predictor_use_ssl
        self._retry = retry
        self._predictor: PredictorClient | None = None
        self.versions: ModelVersions | None = None

    # -- start-up ---------------------------------------------------------------------------

    def load(self) -> bool:
        """Verify and load the bundles of the newest versions; raises BundleError when none is usable.

        Runs once: KServe's DataPlane calls ``load()`` again on every request while ``healthy()`` is
        false, and the version registry already looks for new bundles by itself.
        """
        if self.versions is not None:
            return self.ready
        self.metrics = ModelMetrics(self.name)
        self.metrics.watch(self.admission)
        # The fitted numbers are read as plain data; only the scikit-learn baseline unpickles estimators.
        load = partial(load_bundle, estimators=self.kernels == "sklearn", trusted=self.trusted_manifests or None)
        self.versions = ModelVersions(
            self.model_base_path, _LazyClient(self), self.serve_version, keep=self.keep_versions,
            poll_seconds=self.poll_seconds, load=load, on_switch=self._switched,
            on_reject=self.metrics.rejected, on_refuse=self.metrics.interface_refused,
        )
        self.versions.scan()
        if not self.versions.loaded:
            problems = self.versions.problems()
            raise BundleError(
                f"no model version under {self.model_base_path} has a usable bundle"
                + (": " + "; ".join(problems) if problems else
                   " (no numeric version folders there): run `python -m model.train`, and point "
                   "--model_base_path at the folder TF Serving serves (it holds the version folders)")
            )
        self.ready = True
        return self.ready

    def serve_version(self, bundle: Bundle) -> ServedVersion:
        """Everything a version needs to answer, built once when its bundle is loaded."""
        pipeline = Pipeline(bundle, kernels=self.kernels, full_scores=self.full_scores)

        async def call(features: np.ndarray, deadline: float | None = None) -> dict[str, np.ndarray]:
            """One TF Serving call pinned to this version (possibly carrying several requests' rows)."""
            self.metrics.predictor_rows.observe(features.shape[0])
            with self.metrics.predictor_seconds.time():
                return await self.predictor.predict(features, pipeline.contract)

        # Under load, concurrent requests share predictor calls (see coalesce.py); never across versions.
        forward = Coalescer(call, self.coalesce_inflight, self.coalesce_rows) if self.coalesce_inflight > 0 else call
        try:
            drift = DriftMonitor(bundle.fitted, bundle.feature_names, window=self.drift_window)
        except ValueError as exc:
            log.info("version %d: no drift gauges (%s)", bundle.version, exc)
            drift = None
        metrics = VersionMetrics(self.name, bundle.version, bundle.feature_names, bundle.feature_min,
                                 bundle.feature_max, bundle.n_segments, drift)
        return ServedVersion(pipeline, forward, metrics, Interface.of(bundle))

    def _switched(self, version: int | None) -> None:
        served = self.versions.active
        self.metrics.switched(version, served.metrics.drift if served is not None else None)

    @property
    def predictor(self) -> PredictorClient:
        if self._predictor is None:
            host = self._predictor_host or (self.predictor_config.predictor_host if self.predictor_config else None)
            if not host:
                raise PredictorError(503, "no predictor host configured: start with --predictor_host HOST:PORT")
            self._predictor = connect(self._predictor_api, host, self.name, grpc_port=self._predictor_grpc_port,
                                      rest_client=self._predictor_rest_client, rest_rows=self._predictor_rest_rows,
                                      timeout=self._predictor_timeout, use_ssl=self._predictor_use_ssl,
                                      retry=self._retry, on_retry=self.metrics.retry)
        return self._predictor

    async def healthy(self) -> bool:
        """Ready when a model version is loaded here, TF Serving serves it AVAILABLE and its metadata fits."""
        return self.ready and await self.versions.ready()

    async def _compute(self, fn: Callable[..., Any], rows: int, *args: Any) -> Any:
        """Run CPU work inline, or in a worker thread for batches above ``offload_rows`` (0: never)."""
        if 0 < self.offload_rows < rows:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    # -- the request path ---------------------------------------------------------------------

    async def __call__(self, body, headers=None, verb=kserve.model.InferenceVerb.PREDICT):
        """KServe's pre -> predict -> post. REST requests come through the transformer's own endpoints,
        which run them through the edge (``serving/edge.py``); gRPC requests come straight from KServe's
        servicer and go through the same edge here, their failures turned into gRPC status codes."""
        if isinstance(body, kserve.InferRequest) and body.from_grpc:
            from grpc_interceptor.exceptions import GrpcException

            headers = dict(headers or {})
            request_id = headers.setdefault("x-request-id", new_request_id())
            try:
                return await handle(self, self.name, request_id, headers.get(TIMEOUT_HEADER),
                                    lambda: self._answer(body, headers, verb))
            except Failure as failure:
                raise GrpcException(failure.message, status_code=grpc_code(failure.status)) from None
        return await self._answer(body, headers, verb)

    async def _answer(self, body, headers, verb):
        """Pre -> predict -> post, tried once more on another version if TF Serving stopped serving this
        request's version meanwhile (a rollback, or a predictor pod that has not loaded the newest
        version yet). The retry starts from the raw request: no mixing."""
        started = time.monotonic()
        try:
            return await super().__call__(body, headers, verb)
        except VersionNotServed as exc:
            await self.versions.version_missing(started)
            try:
                self.versions.current(exclude=exc.version)
            except NoServableVersion:
                raise exc from None  # no other version to answer with: TF Serving's own words say why
            token = _avoid_version.set(exc.version)
            try:
                return await super().__call__(body, headers, verb)
            finally:
                _avoid_version.reset(token)

    async def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> Batch:
        check_deadline("parsing")
        served = self.versions.current(exclude=_avoid_version.get())
        request_version.set(served.version)
        pipeline = served.pipeline
        codec = codec_for(payload)
        X = codec.rows(pipeline.feature_names, self.max_rows)
        self.admission.take_rows(X.shape[0])
        self.metrics.rows.observe(X.shape[0])
        served.metrics.observe_rows(X)
        return Batch(served, await self._compute(pipeline.scale, X.shape[0], X), codec)

    async def predict(self, batch: Batch, headers: dict[str, str] | None = None,
                      response_headers: dict[str, str] | None = None) -> Batch:
        check_deadline("the predictor call")
        return Batch(batch.served, await batch.served.forward(batch.data, deadline.get()), batch.codec)

    async def postprocess(self, batch: Batch, headers: dict[str, str] | None = None,
                          response_headers: dict[str, str] | None = None) -> Any:
        served = batch.served
        if response_headers is not None:
            response_headers[VERSION_HEADER] = str(served.version)
            response_headers[MANIFEST_HEADER] = served.pipeline.bundle.manifest_sha256
        ranked = await self._compute(served.pipeline.rank, len(next(iter(batch.data.values()))), batch.data)
        served.metrics.observe_segments(ranked.labels)
        return batch.codec.answer(ranked, self.name, served.version)

    # -- v2 model metadata ----------------------------------------------------------------------

    def _tensor_metadata(self, served: ServedVersion | None = None) -> tuple[list[dict], list[dict]]:
        """The input and output tensors of ``served`` (default: the active version; none: empty lists)."""
        if served is None:
            served = self.versions.active if self.versions is not None else None
        if served is None:
            return [], []
        pipeline = served.pipeline
        catalogue = pipeline.catalogue
        return tensor_metadata(pipeline.feature_names, min(pipeline.rules.top_k, pipeline.spec.n_items),
                               catalogue is not None and catalogue.dtype.kind == "U")

    def metadata(self, version: int | None = None) -> dict:
        """v2 model metadata of the active version (or of ``version``, when it is loaded): KServe's fields filled in
        (``versions``: every version loaded, newest first) and, as the REST extension ``parameters``, what a client
        needs beside the tensors: the version and its manifest's sha256, the feature names in the order of the
        ``features`` columns, the per-feature form of the input, and the rules.

        Raises:
            KeyError: ``version`` is not loaded (the message says which are).
        """
        loaded = dict(self.versions.loaded) if self.versions is not None else {}
        served = self.versions.active if version is None and self.versions is not None else loaded.get(version)
        if served is None:
            have = ', '.join(map(str, sorted(loaded, reverse=True))) or 'none'
            if version is None:  # nothing answers yet: no loaded version is served by TF Serving
                raise KeyError(f"model {self.name} has no version answering yet (loaded: {have}); see its readiness")
            raise KeyError(f"model {self.name} has no version {version} loaded; it has {have}")
        pipeline = served.pipeline
        inputs, outputs = self._tensor_metadata(served)
        return {
            "name": self.name,
            "versions": [str(v) for v in sorted(loaded, reverse=True)],
            "platform": "",
            "inputs": inputs,
            "outputs": outputs,
            "parameters": {
                "version": str(served.version),
                "manifest_sha256": pipeline.bundle.manifest_sha256,
                "feature_names": list(pipeline.feature_names),
                "per_feature_inputs": [{"name": name, "datatype": "FP64", "shape": [-1]}
                                       for name in pipeline.feature_names],
                "top_k": pipeline.rules.top_k,
                "min_score": pipeline.rules.min_score,
            },
        }

    def get_input_types(self) -> list[dict]:
        """v2 metadata: ``features`` FP64 [-1, F] (one tensor per feature name is accepted too)."""
        return self._tensor_metadata()[0]

    def get_output_types(self) -> list[dict]:
        """v2 metadata: the answer's tensors, as fused mode names them."""
        return self._tensor_metadata()[1]


class _LazyClient:
    """The predictor client, made on first use (the host may come from KServe's predictor config)."""

    def __init__(self, model: EmbedderTransformer):
        self._model = model

    def __getattr__(self, name: str):
        return getattr(self._model.predictor, name)
