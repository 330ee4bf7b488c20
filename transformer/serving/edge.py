"""What every request goes through at the edge, whatever its protocol: admission, accounting, failures.

:func:`handle` admits a request (``admission.py``: refused with 503 when the process holds as
much work as it should; at once, or after a wait for a client that came back too early), runs
it, counts its outcome in ``embedder_requests_total`` by model version, logs failures with the request id, and turns every failure into a
:class:`Failure` with the status v1 REST answers (400, 413, 502, 503, 504, 500). Each
transport then speaks its own language: REST answers the status (``rest.py``), gRPC the
matching code (:data:`GRPC_CODES`, raised from ``model.py``).
"""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import os
import time
from typing import Any, Awaitable, Callable, Hashable

from transformer.serving.admission import RETRY_AFTER_SECONDS, Refused
from transformer.protocols.v1 import RequestError
from transformer.predictor import PredictorError

log = logging.getLogger("transformer")

# The version a request was given, for its log line and outcome counter (set by the model's preprocess,
# read here, in the same context).
request_version: contextvars.ContextVar[int | None] = contextvars.ContextVar("request_version", default=None)


_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count()


def new_request_id() -> str:
    """An id for a request that came without ``x-request-id``: 32 hex digits like ``uuid4().hex``, unique in this
    process's life and across processes (a random half drawn once, then a counter), without a random draw per
    request (0.26 against 2.4 us)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


class Failure(Exception):
    """A request that ends without an answer: its status, message and response headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str]):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def grpc_code(status: int):
    """The gRPC status code of an HTTP status, as gRPC's own HTTP mapping pairs them (413: the size limit's)."""
    from grpc import StatusCode

    return {400: StatusCode.INVALID_ARGUMENT, 404: StatusCode.NOT_FOUND, 413: StatusCode.RESOURCE_EXHAUSTED,
            502: StatusCode.UNAVAILABLE, 503: StatusCode.UNAVAILABLE,
            504: StatusCode.DEADLINE_EXCEEDED}.get(status, StatusCode.INTERNAL)


def log_event(level: int, event: str, **fields) -> None:
    """One structured (JSON) log line."""
    if log.isEnabledFor(level):
        log.log(level, "%s", json.dumps({"event": event, **fields}, default=str))


def failure(exc: RequestError | PredictorError | Refused, metrics: Any, model_name: str, request_id: str,
            started: float) -> Failure:
    """Count and log a request that ends without an answer; the Failure its transport answers."""
    outcome = ("shed" if isinstance(exc, Refused) and exc.status in (503, 504) else
               "predictor_error" if isinstance(exc, PredictorError) else "client_error")
    version = request_version.get()
    if metrics:
        metrics.request(outcome, exc.cause, version)
    # Shed requests are counted, not logged one by one: under overload that would be thousands a second; so are
    # the clients that left before their body was read (the paced ones of a storm that ends).
    level = logging.DEBUG if exc.cause == "client_disconnected" else \
        {"client_error": logging.INFO, "shed": logging.DEBUG}.get(outcome, logging.WARNING)
    log_event(level, "request_failed",
              request_id=request_id, model=model_name, model_version=version, status=exc.status,
              cause=exc.cause, error=str(exc), ms=round((time.perf_counter() - started) * 1000, 3))
    headers = {"x-request-id": request_id}
    if exc.status == 503:
        headers["retry-after"] = str(exc.retry_after if isinstance(exc, Refused) else RETRY_AFTER_SECONDS)
    return Failure(exc.status, str(exc), headers)


async def handle(model: Any, model_name: str, request_id: str, timeout_header: str | None,
                 work: Callable[[], Awaitable[Any]], client: Hashable | None = None,
                 connected: Callable[[], Awaitable[bool]] | None = None) -> Any:
    """Admit, run and account for one request; returns ``work()``'s result or raises :class:`Failure`.
    ``client``: the connection's address, by which admission knows a client that re-sends too early;
    ``connected``: whether that client is still there (asked after such a client's wait)."""
    started = time.perf_counter()
    metrics = getattr(model, "metrics", None)
    admission = getattr(model, "admission", None)
    request_version.set(None)
    admitted = None  # when it was admitted
    try:
        if admission is not None:  # before the body is read: refusing costs next to nothing
            await admission.admit(timeout_header, client, connected)
            admitted = time.perf_counter()
        result = await work()
    except (RequestError, PredictorError, Refused) as exc:
        raise failure(exc, metrics, model_name, request_id, started) from None
    except Exception as exc:  # noqa: BLE001 - answer, log, keep serving
        if metrics:
            metrics.request("internal_error", type(exc).__name__, request_version.get())
        log.exception("%s", json.dumps({"event": "request_crashed", "request_id": request_id}))
        raise Failure(500, f"internal error (request id {request_id})", {"x-request-id": request_id}) from None
    finally:
        if admitted is not None:
            # The limit learns the time the request was inside, not a paced client's wait before it: counted, the
            # 500 ms waits of a storm's early re-senders held the limit at its floor (32) for the rest of the
            # storm and after it, and the next storm found it there: 77%, 65%, 63% of the peak's goodput in three
            # storms back to back (benchmarks/overload.md).
            admission.leave(time.perf_counter() - admitted)
    if metrics:
        metrics.request("ok", "ok", request_version.get())
    return result
