"""Wiring of the transformer into KServe's ModelServer.

KServe's own v1 predict endpoint answers 500 for most failures, reads bodies of
any size and rejects ``NaN`` before the model can say where it is. The
transformer registers its own ``POST /v1/models/{name}:predict`` in front of it:

* the body is refused with 413 past ``--max_body_bytes`` (from Content-Length,
  before reading it, or while streaming it);
* JSON is decoded here, so every problem is a 4xx naming the row and field;
* admission control (``admission.py``): a request is refused at once with 503 and
  ``Retry-After`` when the process holds as much work as it should, and work past the
  request's deadline is dropped (504);
* predictor failures keep their status (502, 503, 504);
* each request gets an id (``x-request-id``, echoed back) that its log lines carry;
* each answer names the model version that computed it (``x-model-version``);
* each outcome is counted in ``embedder_requests_total``, by model version.

Everything else (liveness ``/``, readiness ``/v1/models/{name}``, ``/metrics``,
the pre/predict/post contract and its histograms) is KServe's.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import time
import uuid

from fastapi import Request
from fastapi.responses import ORJSONResponse
from kserve import ModelServer, model_server
from kserve.errors import ModelNotFound

from transformer.admission import RETRY_AFTER_SECONDS, TIMEOUT_HEADER, Refused
from transformer.codec import RequestError, decode_json
from transformer.model import request_version
from transformer.predictor import PredictorError

log = logging.getLogger("transformer")


def log_event(level: int, event: str, **fields) -> None:
    """One structured (JSON) log line."""
    if log.isEnabledFor(level):
        log.log(level, "%s", json.dumps({"event": event, **fields}, default=str))


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the body is {declared} bytes, at most {limit} are accepted; send fewer rows per request",
                           status=413, cause="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"the body is more than {limit} bytes; send fewer rows per request",
                               status=413, cause="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


class PredictEndpoint:
    """``POST /v1/models/{model_name}:predict`` with bounded bodies, precise statuses and request ids."""

    def __init__(self, dataplane, max_body_bytes: int):
        self.dataplane = dataplane
        self.max_body_bytes = max_body_bytes

    async def __call__(self, model_name: str, request: Request) -> ORJSONResponse:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        started = time.perf_counter()
        model = self.dataplane.model_registry.get_model(model_name)
        if model is None:
            raise ModelNotFound(model_name)  # KServe's handler: 404
        metrics = getattr(model, "metrics", None)
        admission = getattr(model, "admission", None)
        request_version.set(None)
        admitted = False
        try:
            if admission is not None:  # before the body is read: refusing costs next to nothing
                admission.enter(request.headers.get(TIMEOUT_HEADER))
                admitted = True
            body = await read_body(request, self.max_body_bytes)
            headers = dict(request.headers.items())
            headers["x-request-id"] = request_id
            response, response_headers = await self.dataplane.infer(model_name, decode_json(body), headers)
        except (RequestError, PredictorError, Refused) as exc:
            outcome = ("shed" if isinstance(exc, Refused) and exc.status != 400 else
                       "predictor_error" if isinstance(exc, PredictorError) else "client_error")
            version = request_version.get()
            if metrics:
                metrics.request(outcome, exc.cause, version)
            # Shed requests are counted, not logged one by one: under overload that would be thousands a second.
            level = {"client_error": logging.INFO, "shed": logging.DEBUG}.get(outcome, logging.WARNING)
            log_event(level, "request_failed",
                      request_id=request_id, model=model_name, model_version=version, status=exc.status,
                      cause=exc.cause, error=str(exc), ms=round((time.perf_counter() - started) * 1000, 3))
            headers = {"x-request-id": request_id}
            if exc.status == 503:
                headers["retry-after"] = str(RETRY_AFTER_SECONDS)
            return ORJSONResponse(status_code=exc.status, content={"error": str(exc)}, headers=headers)
        except Exception as exc:  # noqa: BLE001 - answer, log, keep serving
            if metrics:
                metrics.request("internal_error", type(exc).__name__, request_version.get())
            log.exception("%s", json.dumps({"event": "request_crashed", "request_id": request_id}))
            return ORJSONResponse(status_code=500, content={"error": f"internal error (request id {request_id})"},
                                  headers={"x-request-id": request_id})
        finally:
            if admitted:
                admission.leave()
        if metrics:
            metrics.request("ok", "ok", request_version.get())
        return ORJSONResponse(content=response, headers={**response_headers, "x-request-id": request_id})


def serve(model, args: argparse.Namespace) -> None:
    """Run the ModelServer with ``model`` until SIGTERM/SIGINT, then drain in-flight requests."""
    server = ModelServer(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        workers=1,
        enable_grpc=args.enable_grpc,
        enable_docs_url=args.enable_docs_url,
        enable_latency_logging=args.enable_latency_logging,
        access_log_format=args.access_log_format,
        event_loop=args.event_loop,
        timeout_keep_alive=args.timeout_keep_alive,
        # On SIGTERM uvicorn stops accepting connections and lets in-flight requests finish, this long at most.
        grace_period=args.graceful_shutdown_seconds,
    )
    if not args.enable_latency_logging:
        # KServe's timing middleware writes a trace line per request; it is off with latency logging.
        from kserve.logging import trace_logger

        trace_logger.setLevel(logging.WARNING)
    # Registered before KServe adds its routes at start, so this one is matched first.
    model_server.app.add_api_route(
        "/v1/models/{model_name}:predict",
        PredictEndpoint(server.dataplane, args.max_body_bytes),
        methods=["POST"],
        response_model=None,
    )
    if not args.access_log:
        logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    if args.event_loop in ("auto", "uvloop"):
        # ModelServer runs uvicorn inside asyncio.run(), which ignores uvicorn's loop setting.
        try:
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
            asyncio.set_event_loop(asyncio.new_event_loop())
        except ImportError:
            if args.event_loop == "uvloop":
                raise
    # Everything loaded so far lives as long as the process: keep it out of the garbage collector's
    # full passes, which would otherwise scan it and stall the event loop for tens of milliseconds.
    gc.collect()
    gc.freeze()
    server.start([model])
