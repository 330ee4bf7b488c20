"""Admission control: a bound on the work inside the transformer, and deadlines for what waits.

One transformer process serves about 2,400 one-row requests a second, or 68,600 rows a
second in 256-row requests (benchmarks/results.md). Past that, requests would queue
without bound (the event loop, the coalescer's pending list) and every client would wait
longer, until all time out. Instead a request is refused at once, with 503 and
``Retry-After``, when admitting it would put more than ``max_requests`` requests or
``max_rows`` rows inside the process. By Little's law the defaults hold about 100 ms of
work at the measured capacity (2,437 req/s x 0.1 s -> 256 requests; 68,634 rows/s x
0.1 s -> 8,192 rows), which keeps the admitted requests' p99 within a 250 ms budget.

A request also carries a deadline (``x-request-timeout-ms``, or ``default_timeout``):
work still waiting past it, in the coalescer or before a stage, is dropped (504) rather
than computed for a client that has given up.
"""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass

TIMEOUT_HEADER = "x-request-timeout-ms"
RETRY_AFTER_SECONDS = 1

# When the current request's client stops waiting (time.monotonic()), None: no deadline.
deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)
# The rows this request holds in the admission count (taken once, released when it is answered).
rows_held: contextvars.ContextVar[int] = contextvars.ContextVar("rows_held", default=0)


class Refused(Exception):
    """The transformer did not do the work: ``status`` 503 (overloaded) or 504 (deadline passed)."""

    def __init__(self, status: int, message: str, cause: str):
        super().__init__(message)
        self.status = status
        self.cause = cause


def check_deadline(stage: str) -> None:
    """Drop the request if its client's deadline has passed (before ``stage`` is done for it)."""
    limit = deadline.get()
    if limit is not None and time.monotonic() > limit:
        raise Refused(504, f"the request's deadline passed before {stage}; nothing more was computed for it",
                      "deadline_exceeded")


@dataclass
class Admission:
    max_requests: int = 256
    max_rows: int = 8192
    default_timeout: float = 10.0  # seconds, for requests without x-request-timeout-ms
    requests: int = 0
    rows: int = 0

    def __post_init__(self) -> None:
        if self.max_requests < 1 or self.max_rows < 1 or self.default_timeout <= 0:
            raise ValueError("max_requests and max_rows must be at least 1, default_timeout positive")

    def enter(self, timeout_header: str | None) -> None:
        """Admit a request (before its body is read) and set its deadline, or refuse it with 503."""
        if self.requests >= self.max_requests:
            raise Refused(503, f"the transformer is at capacity ({self.requests} requests in progress, at most "
                          f"{self.max_requests}); retry after {RETRY_AFTER_SECONDS}s", "overloaded_requests")
        timeout = self.default_timeout
        if timeout_header is not None:
            try:
                timeout = float(timeout_header) / 1000.0
            except ValueError:
                timeout = -1.0
            if not 0 < timeout < 3600:
                raise Refused(400, f"{TIMEOUT_HEADER} must be a number of milliseconds between 0 and 3600000, "
                              f"got {timeout_header[:40]!r}", "invalid_timeout")
        self.requests += 1
        deadline.set(time.monotonic() + timeout)
        rows_held.set(0)

    def take_rows(self, n: int) -> None:
        """Count a parsed request's rows, or refuse it with 503 when they would pass ``max_rows``.

        A request larger than ``max_rows`` is admitted when nothing else is inside, so it can be served."""
        if rows_held.get():
            return  # taken already (a request computed again on another model version)
        if self.rows and self.rows + n > self.max_rows:
            raise Refused(503, f"the transformer is at capacity ({self.rows} rows in progress, at most "
                          f"{self.max_rows}); retry after {RETRY_AFTER_SECONDS}s", "overloaded_rows")
        self.rows += n
        rows_held.set(n)

    def leave(self) -> None:
        """The request is answered (whatever the outcome): release what it held."""
        self.requests -= 1
        self.rows -= rows_held.get()
        rows_held.set(0)
