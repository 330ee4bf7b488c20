"""The transformer's REST predict endpoints, in front of KServe's own (``server.py`` runs them).

KServe's own predict endpoints answer 500 for most failures, read bodies of any size and
reject ``NaN`` before the model can say where it is. The transformer registers its own
``POST /v1/models/{name}:predict`` and ``POST /v2/models/{name}/infer`` in front of them:

* the body is refused with 413 past ``--max_body_bytes`` (from Content-Length,
  before reading it, or while streaming it);
* the body is decoded by the protocol's codec (``protocols/v1.py``, ``protocols/v2.py``), so every
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

import logging
import time
from typing import Any, AsyncIterator

import orjson

from fastapi import Request
from fastapi.responses import Response
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from kserve.errors import ModelNotFound

from transformer.serving.admission import TIMEOUT_HEADER
from transformer.protocols.v1 import RequestError, decode_json
from transformer.protocols.v2 import HEADER_LENGTH, EncodedAnswer, from_rest
from transformer.serving.edge import Failure, failure, handle, new_request_id

log = logging.getLogger("transformer")


async def read_body(declared: str | None, chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """The request body from its chunks, refused with 413 past ``limit`` bytes (from the declared
    Content-Length before reading any, or while streaming)."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the body is {declared} bytes, at most {limit} are accepted; send fewer rows per request",
                           status=413, cause="body_too_large")
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise RequestError(f"the body is more than {limit} bytes; send fewer rows per request",
                               status=413, cause="body_too_large")
        parts.append(chunk)
    return b"".join(parts)


def decode_v1(body: bytes, headers: Headers):
    return decode_json(body)


def decode_v2(body: bytes, headers: Headers):
    length = headers.get(HEADER_LENGTH)
    if length is not None and not length.isdigit():
        raise RequestError(f"the {HEADER_LENGTH} header must be a number of bytes, got {length[:20]!r}")
    return from_rest(body, int(length) if length is not None else None)


def json_response(content, status: int, headers: dict[str, str]) -> Response:
    """A JSON answer written by orjson: numpy values as they are (a float32 as its shortest text)."""
    return Response(content=orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json", headers=headers)


async def respond(dataplane, model: Any, model_name: str, headers: Headers, chunks: AsyncIterator[bytes],
                  max_body_bytes: int, decode, client: Any = None, connected=None) -> Response:
    """One predict request, whichever way it came in (the fast path's raw ASGI or FastAPI's route): bounded
    body, the protocol's decoder, the edge, KServe's DataPlane and the model; an answer or a status.
    ``client``: the connection's (address, port), for admission's pacing of clients that re-send too early;
    ``connected``: whether that client is still there after such a wait (the fast path can tell)."""
    request_id = headers.get("x-request-id") or new_request_id()

    async def work():
        try:
            body = await read_body(headers.get("content-length"), chunks, max_body_bytes)
        except ClientDisconnect:
            # The client went away before its body arrived (for instance while it was paced, after a storm):
            # nothing to compute or answer, and no crash to log. 499 as proxies count it; nobody receives it.
            raise RequestError("the client closed the connection before its body was read", status=499,
                               cause="client_disconnected") from None
        payload = decode(body, headers)
        forwarded = dict(headers.items())
        forwarded["x-request-id"] = request_id
        return await dataplane.infer(model_name, payload, forwarded)

    try:
        response, response_headers = await handle(model, model_name, request_id, headers.get(TIMEOUT_HEADER), work,
                                                  client, connected)
    except Failure as failure:
        return json_response({"error": failure.message}, failure.status, failure.headers)
    answer_headers = {**response_headers, "x-request-id": request_id}
    if isinstance(response, EncodedAnswer):
        return Response(content=response.body, media_type=response.media_type,
                        headers={**answer_headers, **response.headers})
    return json_response(response, 200, answer_headers)


class Endpoint:
    """A predict route as FastAPI serves it (``--predict_path kserve``, and for any request the fast path
    passes on): the same :func:`respond` as the fast path."""

    def __init__(self, dataplane, max_body_bytes: int, decode):
        self.dataplane = dataplane
        self.max_body_bytes = max_body_bytes
        self.decode = decode

    async def __call__(self, model_name: str, request: Request) -> Response:
        model = self.dataplane.model_registry.get_model(model_name)
        if model is None:
            raise ModelNotFound(model_name)  # KServe's handler: 404
        return await respond(self.dataplane, model, model_name, request.headers, request.stream(),
                             self.max_body_bytes, self.decode, request.scope.get("client"))


class Metadata:
    """``GET /v2/models/{name}`` and ``.../versions/{version}``: the model's own description
    (:meth:`EmbedderTransformer.metadata`), where KServe's answers only the tensors and ``"versions": null`` (and
    500 for a version)."""

    def __init__(self, dataplane):
        self.dataplane = dataplane

    async def __call__(self, model_name: str, model_version: str | None = None) -> Response:
        model = self.dataplane.model_registry.get_model(model_name)
        if model is None:
            raise ModelNotFound(model_name)  # KServe's handler: 404
        if model_version is not None and not model_version.isdigit():
            return json_response({"error": f"model_version must be a version number, got {model_version!r}"}, 400,
                                 {})
        try:
            return json_response(model.metadata(int(model_version) if model_version else None), 200, {})
        except KeyError as exc:
            return json_response({"error": exc.args[0]}, 404 if model_version else 503, {})


class FastPath:
    """ASGI, in front of KServe's whole application: ``POST /v1/models/{name}:predict`` and
    ``POST /v2/models/{name}/infer`` for a registered model are answered here by :func:`respond`, the
    same code FastAPI's route runs, without the layers in between; every other request (liveness,
    readiness, metadata, ``/metrics``, docs, an unknown model) goes to KServe's application as it is.

    What it skips, per request, is what the profile showed to cost more than our own work at one row
    (benchmarks/profile-hop.md): uvicorn -> Starlette's error middleware -> KServe's TimingMiddleware
    (which reads the process's CPU time twice and formats a trace line) -> FastAPI's exit stack and
    body-limit middlewares -> routing by regular expression -> FastAPI's dependency solving -> the
    endpoint. The model's own pre/predict/post, KServe's DataPlane, its histograms and latency log are
    still on the path. A path is matched as Starlette's router matches ``{model_name}`` (no slash in it).
    """

    ROUTES = (("/v1/models/", ":predict", decode_v1), ("/v2/models/", "/infer", decode_v2))

    def __init__(self, app, dataplane, max_body_bytes: int):
        self.app = app
        self.dataplane = dataplane
        self.max_body_bytes = max_body_bytes

    def route(self, path: str):
        """(model name, decoder) of a predict path, or None."""
        for prefix, suffix, decode in self.ROUTES:
            if path.startswith(prefix) and path.endswith(suffix):
                name = path[len(prefix):len(path) - len(suffix)]
                if name and "/" not in name:
                    return name, decode
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            route = self.route(scope["path"])
            if route is not None:
                model = self.dataplane.model_registry.get_model(route[0])
                if model is not None:
                    receive = _LookAhead(receive)
                    response = await respond(self.dataplane, model, route[0], Headers(scope=scope),
                                             _chunks(receive), self.max_body_bytes, route[1], scope.get("client"),
                                             receive.connected)
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


class _LookAhead:
    """ASGI ``receive`` that can tell whether the client is still there without losing what it reads: the
    message read to find out is handed to the body's reader first."""

    def __init__(self, receive):
        self._receive = receive
        self._held: list[dict] = []

    async def __call__(self) -> dict:
        return self._held.pop(0) if self._held else await self._receive()

    async def connected(self) -> bool:
        """False when the client has gone. uvicorn answers at once then (``http.disconnect``), and at once with
        the body when it has arrived, as it has for a request that waited; otherwise this waits for the body,
        which is read next anyway."""
        message = await self._receive()
        self._held.append(message)
        return message["type"] != "http.disconnect"


async def _chunks(receive) -> AsyncIterator[bytes]:
    """The body's chunks as ASGI delivers them (Starlette's ``Request.stream`` without the request)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


class ShedWhenFull:
    """ASGI middleware: a predict request that finds the transformer full is refused here (unless its client
    came back too early: admission paces it, in the edge), before KServe's routing, FastAPI's request
    handling and our endpoint run for it. Under overload most
    requests are refused, and they share one event loop with the admitted ones: what a refusal costs
    there, every answer waits for. Counted, logged and worded as the edge does it (``edge.failure``)."""

    def __init__(self, app, model, model_name: str):
        self.app = app
        self.model = model
        self.model_name = model_name

    async def __call__(self, scope, receive, send):
        admission = getattr(self.model, "admission", None)
        if scope["type"] == "http" and admission is not None and admission.full() and scope["method"] == "POST" \
                and scope["path"].endswith((":predict", "/infer")) and not admission.paces(scope.get("client")):
            started = time.perf_counter()
            request_id = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None) \
                or new_request_id()
            refused = failure(admission.refusal(scope.get("client")), getattr(self.model, "metrics", None),
                              self.model_name, request_id, started)
            body = orjson.dumps({"error": refused.message})
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            headers += [(k.encode(), v.encode()) for k, v in refused.headers.items()]
            await send({"type": "http.response.start", "status": refused.status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


PREDICT_PATHS = ("fast", "kserve")


def install(app, dataplane, model, model_name: str, max_body_bytes: int, predict_path: str = "fast") -> None:
    """Put the transformer's predict endpoints and its shedding in front of KServe's own (``app``: its FastAPI
    application). Registered before KServe adds its routes at start, so these are matched first. With
    ``predict_path="fast"`` the :class:`FastPath` sits outside all of the application's layers: Starlette
    builds them on the first request, so it wraps what ``build_middleware_stack`` returns."""
    if predict_path not in PREDICT_PATHS:
        raise ValueError(f"predict_path must be one of {', '.join(PREDICT_PATHS)}, got {predict_path!r}")
    for path, decode in (("/v1/models/{model_name}:predict", decode_v1), ("/v2/models/{model_name}/infer", decode_v2)):
        app.add_api_route(path, Endpoint(dataplane, max_body_bytes, decode), methods=["POST"], response_model=None)
    if hasattr(model, "metadata"):
        for path in ("/v2/models/{model_name}", "/v2/models/{model_name}/versions/{model_version}"):
            app.add_api_route(path, Metadata(dataplane), methods=["GET"], response_model=None)
    app.add_middleware(ShedWhenFull, model=model, model_name=model_name)
    if predict_path == "fast":
        build = app.build_middleware_stack
        app.build_middleware_stack = lambda: FastPath(build(), dataplane, max_body_bytes)
