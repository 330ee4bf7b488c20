"""Wiring of the transformer into KServe's ModelServer.

KServe's own predict endpoints answer 500 for most failures, read bodies of any size and
reject ``NaN`` before the model can say where it is. The transformer registers its own
``POST /v1/models/{name}:predict`` and ``POST /v2/models/{name}/infer`` in front of them:

* the body is refused with 413 past ``--max_body_bytes`` (from Content-Length,
  before reading it, or while streaming it);
* the body is decoded by the protocol's codec (``codec.py``, ``codec_v2.py``), so every
  problem is a 4xx naming the row or tensor and the field;
* admission, outcome counts, failure logs and statuses are the edge's (``edge.py``): 503 with
  ``Retry-After`` when the process holds as much work as it should, 502/503/504 for the
  predictor's failures;
* each request gets an id (``x-request-id``, echoed back) that its log lines carry;
* each answer names the model version that computed it (``x-model-version``).

gRPC (KServe's ``GRPCInferenceService``) reaches the same model; its requests go through
the same edge in ``model.py``. Everything else (liveness ``/``, readiness ``/v1/models/{name}``
and ``/v2/models/{name}/ready``, v2 metadata, ``/metrics``, the pre/predict/post contract and
its histograms) is KServe's.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import time
import uuid

import orjson

from fastapi import Request
from fastapi.responses import Response
from kserve import ModelServer, model_server
from kserve.errors import ModelNotFound

from transformer.admission import TIMEOUT_HEADER
from transformer.codec import RequestError, decode_json
from transformer.codec_v2 import HEADER_LENGTH, EncodedAnswer, from_rest
from transformer.edge import Failure, failure, handle

log = logging.getLogger("transformer")


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


def decode_v1(body: bytes, request: Request):
    return decode_json(body)


def decode_v2(body: bytes, request: Request):
    length = request.headers.get(HEADER_LENGTH)
    if length is not None and not length.isdigit():
        raise RequestError(f"the {HEADER_LENGTH} header must be a number of bytes, got {length[:20]!r}")
    return from_rest(body, int(length) if length is not None else None)


def json_response(content, status: int, headers: dict[str, str]) -> Response:
    """A JSON answer written by orjson: numpy values as they are (a float32 as its shortest text)."""
    return Response(content=orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json", headers=headers)


class Endpoint:
    """A REST inference endpoint: bounded body, the protocol's decoder, the edge, an answer or a status."""

    def __init__(self, dataplane, max_body_bytes: int, decode):
        self.dataplane = dataplane
        self.max_body_bytes = max_body_bytes
        self.decode = decode

    async def __call__(self, model_name: str, request: Request) -> Response:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        model = self.dataplane.model_registry.get_model(model_name)
        if model is None:
            raise ModelNotFound(model_name)  # KServe's handler: 404

        async def work():
            payload = self.decode(await read_body(request, self.max_body_bytes), request)
            headers = dict(request.headers.items())
            headers["x-request-id"] = request_id
            return await self.dataplane.infer(model_name, payload, headers)

        try:
            response, response_headers = await handle(model, model_name, request_id,
                                                      request.headers.get(TIMEOUT_HEADER), work)
        except Failure as failure:
            return json_response({"error": failure.message}, failure.status, failure.headers)
        headers = {**response_headers, "x-request-id": request_id}
        if isinstance(response, EncodedAnswer):
            return Response(content=response.body, media_type=response.media_type, headers={**headers, **response.headers})
        return json_response(response, 200, headers)


class ShedWhenFull:
    """ASGI middleware: a predict request that finds the transformer full is refused here, before
    KServe's routing, FastAPI's request handling and our endpoint run for it. Under overload most
    requests are refused, and they share one event loop with the admitted ones: what a refusal costs
    there, every answer waits for. Counted, logged and worded as the edge does it (``edge.failure``)."""

    def __init__(self, app, model, model_name: str):
        self.app = app
        self.model = model
        self.model_name = model_name

    async def __call__(self, scope, receive, send):
        admission = getattr(self.model, "admission", None)
        if scope["type"] == "http" and admission is not None and admission.full() and scope["method"] == "POST" \
                and scope["path"].endswith((":predict", "/infer")):
            started = time.perf_counter()
            request_id = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None) \
                or uuid.uuid4().hex
            refused = failure(admission.refusal(), getattr(self.model, "metrics", None), self.model_name,
                              request_id, started)
            body = orjson.dumps({"error": refused.message})
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            headers += [(k.encode(), v.encode()) for k, v in refused.headers.items()]
            await send({"type": "http.response.start", "status": refused.status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def install(app, dataplane, model, model_name: str, max_body_bytes: int) -> None:
    """Put the transformer's predict endpoints and its shedding in front of KServe's own (``app``: its FastAPI
    application). Registered before KServe adds its routes at start, so these are matched first."""
    for path, decode in (("/v1/models/{model_name}:predict", decode_v1), ("/v2/models/{model_name}/infer", decode_v2)):
        app.add_api_route(path, Endpoint(dataplane, max_body_bytes, decode), methods=["POST"], response_model=None)
    app.add_middleware(ShedWhenFull, model=model, model_name=model_name)


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
    install(model_server.app, server.dataplane, model, args.model_name, args.max_body_bytes)
    # gRPC messages are bounded like REST bodies (gRPC refuses larger ones with RESOURCE_EXHAUSTED).
    model_server.args.grpc_max_receive_message_length = args.max_body_bytes
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
