"""Admission control: a bound on the work inside the transformer, and deadlines for what waits.

Past its capacity a transformer would queue requests without bound (the event loop, the
coalescer's pending list) and every client would wait longer, until all time out. Instead a
request is refused at once, with 503 and ``Retry-After``, when admitting it would put more
than ``limit`` requests or ``max_rows`` rows inside the process.

The request limit follows the latency of what is admitted: every 32 answered requests, when
their p90 time inside the process passed ``latency_budget`` the limit shrinks by a fifth;
when it stayed under half the budget the limit grows by an eighth; always between
``min_requests`` and ``max_requests``. Capacity differs by machine, model and batch size
(one process here: 700 to 2,400 one-row requests a second, benchmarks/), so no fixed bound
suits all: with 256 (100 ms of work at 2,400 req/s) a slower set-up held 360 ms of queue,
and every answer, a 503 included, waited that long on the one event loop. By Little's law
the limit settles near capacity x budget. ``min_requests`` keeps ordinary concurrency (up to
32 requests) from ever being shed; ``max_rows`` bounds large batches (68,634 rows/s x 0.1 s).

Refused clients are told when to come back (``Retry-After``), and how long follows the
overload: every second, the clients being refused are estimated (refusals a second x the
wait they were told) and the mean wait w set so that their retries stay within a quarter of
the answers a second (``SHED_SHARE``) or 100 a second, whichever is more; w is 1 to 5
seconds, and the refused clients are told 1 .. 2w - 1 seconds in turn so that they do not
come back together. A refusal is cheap but not free: at 1,024 connections all told one
second, 926 refusals a second took 29% of the goodput of one process (650 of 911 answers a
second); told this way, about 300 a second and 99% of the peak (benchmarks/overload.md).

A client that ignores ``Retry-After`` and sends again on the same connection before the time
it was told (wrk, many load balancers' retries) is not refused at once again: its request waits
``early_retry_wait`` seconds (or until its deadline, if sooner), with nothing read or computed
for it, and is then admitted if there is room or refused. Refused at once, 1,024 such
connections made the process spend its time refusing: 3% of the peak goodput
(benchmarks/overload.md, before this pacing). Paced, each such connection costs at most one
refusal per ``early_retry_wait``, however fast it re-sends, and clients that honour
``Retry-After`` still get their 503 at once. A connection is known by the client's address and
port; at most ``max_waiting`` requests wait at once, and the addresses told to wait are kept
only until their wait is over.

A request also carries a deadline (``x-request-timeout-ms``, or ``default_timeout``):
work still waiting past it, in the coalescer or before a stage, is dropped (504) rather
than computed for a client that has given up.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Hashable

TIMEOUT_HEADER = "x-request-timeout-ms"
RETRY_AFTER_SECONDS = 1  # the shortest wait told, and the one for a predictor that is down
MAX_RETRY_AFTER_SECONDS = 5  # the mean wait's ceiling: no client is told more than 9 s
SHED_SHARE = 0.25  # retries of refused clients aimed at, per answer
# Retries a second that are never worth a longer wait: a refusal takes about 0.3 ms of the event loop
# (29% of the loop for 926 a second, benchmarks/overload.md), so 100 a second cost 3%.
RETRIES_ALWAYS_FINE = 100.0

# When the current request's client stops waiting (time.monotonic()), None: no deadline.
deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)
# The rows this request holds in the admission count (taken once, released when it is answered).
rows_held: contextvars.ContextVar[int] = contextvars.ContextVar("rows_held", default=0)


class Refused(Exception):
    """The transformer did not do the work: ``status`` 503 (overloaded) or 504 (deadline passed)."""

    def __init__(self, status: int, message: str, cause: str, retry_after: int = RETRY_AFTER_SECONDS):
        super().__init__(message)
        self.status = status
        self.cause = cause
        self.retry_after = retry_after  # seconds, told with a 503


def check_deadline(stage: str) -> None:
    """Drop the request if its client's deadline has passed (before ``stage`` is done for it)."""
    limit = deadline.get()
    if limit is not None and time.monotonic() > limit:
        raise Refused(504, f"the request's deadline passed before {stage}; nothing more was computed for it",
                      "deadline_exceeded")


WINDOW = 32  # answered requests per adjustment of the limit
MAX_TOLD = 65536  # refused clients remembered at once (seconds of refusals at the highest rates measured)


def _timeout_seconds(header: str | None, default: float) -> float | None:
    """The client's timeout from ``x-request-timeout-ms`` in seconds (``default`` without the header); None when
    it is not a number of milliseconds in (0, 1 hour)."""
    if header is None:
        return default
    try:
        timeout = float(header) / 1000.0
    except ValueError:
        return None
    return timeout if 0 < timeout < 3600 else None


@dataclass
class Admission:
    max_requests: int = 256  # the request limit's ceiling
    max_rows: int = 8192
    default_timeout: float = 10.0  # seconds, for requests without x-request-timeout-ms
    min_requests: int = 32  # the request limit's floor (capped at max_requests)
    latency_budget: float = 0.05  # seconds: the p90 time inside the process the limit aims to keep
    early_retry_wait: float = 0.5  # seconds a client re-sending before its Retry-After waits (0: refused at once)
    max_waiting: int = 4096  # requests waiting so at once, at most; more are refused at once
    requests: int = 0
    rows: int = 0

    def __post_init__(self) -> None:
        if min(self.max_requests, self.max_rows, self.min_requests) < 1 or self.default_timeout <= 0 \
                or self.latency_budget <= 0:
            raise ValueError("max_requests, max_rows and min_requests must be at least 1; default_timeout and "
                             "latency_budget positive")
        if self.early_retry_wait < 0 or self.max_waiting < 0:
            raise ValueError("early_retry_wait and max_waiting must not be negative (0: refuse at once)")
        self.min_requests = min(self.min_requests, self.max_requests)
        self.limit = self.max_requests
        self._latencies: list[float] = []
        self.retry_after = RETRY_AFTER_SECONDS  # the mean wait told to refused clients
        self._period_start = time.monotonic()
        self._refused = self._answered = 0  # in the current period
        self._spread = 0  # turns through the waits told, so that refused clients come back spread out
        self._told: dict[Hashable, float] = {}  # client -> until when it was told to stay away (monotonic)
        self.waiting = 0  # requests of clients that came back too early, waiting now

    def full(self) -> bool:
        """No room for another request: cheap enough to ask before anything else is done for it."""
        return self.requests >= self.limit

    def came_back_early(self, client: Hashable | None) -> bool:
        """Whether ``client`` (an address and port: one connection) was refused and told a wait that is not over."""
        return client is not None and self._told.get(client, 0.0) > time.monotonic()

    def paces(self, client: Hashable | None) -> bool:
        """Whether a request of ``client`` that finds the process full waits before it is answered."""
        return self.early_retry_wait > 0 and self.waiting < self.max_waiting and self.came_back_early(client)

    async def admit(self, timeout_header: str | None, client: Hashable | None = None,
                    connected: Callable[[], Awaitable[bool]] | None = None) -> None:
        """:meth:`enter`, after a wait of ``early_retry_wait`` (or until the request's deadline) when the process is
        full and ``client`` came back before the Retry-After it was told. ``connected``, when given, says after
        the wait whether the client is still there: one that left is not admitted (when a storm ends, its
        clients' paced requests would otherwise take the slots of the first new ones)."""
        if self.full() and self.paces(client):
            timeout = _timeout_seconds(timeout_header, self.default_timeout) or self.early_retry_wait
            self.waiting += 1
            try:
                await asyncio.sleep(min(self.early_retry_wait, timeout))
            finally:
                self.waiting -= 1
            if connected is not None and not await connected():
                raise Refused(499, "the client closed the connection while its request waited; nothing was "
                              "computed for it", "client_disconnected")
        self.enter(timeout_header, client)

    def refusal(self, client: Hashable | None = None) -> Refused:
        wait = self._next_wait()
        if client is not None and len(self._told) < MAX_TOLD:
            self._told[client] = time.monotonic() + wait
        return Refused(503, f"the transformer is at capacity ({self.requests} requests in progress, at most "
                       f"{self.limit} now); retry after {wait}s", "overloaded_requests", wait)

    def _next_wait(self) -> int:
        """The wait told to one refused client: 1 .. 2 x retry_after - 1 in turn (their mean is retry_after)."""
        self._refused += 1
        self._follow_the_period()
        self._spread += 1
        return 1 + self._spread % (2 * self.retry_after - 1)

    def _follow_the_period(self) -> None:
        """Once a second: set retry_after so that the refused clients' retries stay within SHED_SHARE of the
        answers or RETRIES_ALWAYS_FINE (clients waiting ~ refusals a second x the wait they were told)."""
        now = time.monotonic()
        elapsed = now - self._period_start
        if elapsed < 1.0:
            return
        waiting = self._refused / elapsed * self.retry_after
        retries = max(SHED_SHARE * self._answered / elapsed, RETRIES_ALWAYS_FINE)
        self.retry_after = min(MAX_RETRY_AFTER_SECONDS, max(RETRY_AFTER_SECONDS, math.ceil(waiting / retries)))
        self._period_start = now
        self._refused = self._answered = 0
        if self._told:  # forget the clients whose wait is over
            self._told = {client: until for client, until in self._told.items() if until > now}

    def enter(self, timeout_header: str | None, client: Hashable | None = None) -> None:
        """Admit a request (before its body is read) and set its deadline, or refuse it with 503 (``client``, the
        connection's address, is remembered with the wait it was told)."""
        if self.full():
            raise self.refusal(client)
        timeout = _timeout_seconds(timeout_header, self.default_timeout)
        if timeout is None:
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
            wait = self._next_wait()
            raise Refused(503, f"the transformer is at capacity ({self.rows} rows in progress, at most "
                          f"{self.max_rows}); retry after {wait}s", "overloaded_rows", wait)
        self.rows += n
        rows_held.set(n)

    def leave(self, seconds: float) -> None:
        """The request is answered (whatever the outcome), ``seconds`` after it was admitted: release what
        it held, and adjust the limit once a window of answers is in."""
        self.requests -= 1
        self.rows -= rows_held.get()
        rows_held.set(0)
        self._answered += 1
        self._follow_the_period()
        self._latencies.append(seconds)
        if len(self._latencies) >= WINDOW:
            p90 = sorted(self._latencies)[int(0.9 * len(self._latencies))]
            self._latencies.clear()
            if p90 > self.latency_budget:
                self.limit = max(self.min_requests, int(self.limit * 0.8))
            elif p90 < self.latency_budget / 2:
                self.limit = min(self.max_requests, self.limit + max(1, self.limit // 8))
