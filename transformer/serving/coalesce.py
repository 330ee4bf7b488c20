"""Coalescing: concurrent requests share one predictor call.

A predictor call costs a fixed overhead (HTTP, JSON, one graph run) plus a
little per row. Under load the transformer therefore merges the rows of
requests that arrive while ``max_inflight`` calls are already under way into
one call (at most ``max_rows`` rows), and hands each request its own slice of
the answer. A request that finds a free slot is sent at once: coalescing adds
no waiting at low load, and the wait under load is bounded by the calls in
flight. A waiting request whose deadline has passed is dropped (504) rather than
sent: its client has stopped waiting.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

import numpy as np

from transformer.serving.admission import Refused

Outputs = dict[str, np.ndarray]


class Coalescer:
    def __init__(self, call: Callable[[np.ndarray], Awaitable[Outputs]], max_inflight: int = 2,
                 max_rows: int = 256):
        if max_inflight < 1 or max_rows < 1:
            raise ValueError("max_inflight and max_rows must be at least 1")
        self.call = call
        self.max_inflight = max_inflight
        self.max_rows = max_rows
        self.inflight = 0
        self.pending: list[tuple[np.ndarray, asyncio.Future, float | None]] = []

    async def __call__(self, features: np.ndarray, deadline: float | None = None) -> Outputs:
        if self.inflight < self.max_inflight and not self.pending:
            self.inflight += 1
            try:
                return await self.call(features)
            finally:
                self.inflight -= 1
                self._drain()
        future = asyncio.get_running_loop().create_future()
        self.pending.append((features, future, deadline))
        return await future

    def _drain(self) -> None:
        now = time.monotonic()
        while self.pending and self.inflight < self.max_inflight:
            group, rows = [], 0
            while self.pending and (not group or rows + self.pending[0][0].shape[0] <= self.max_rows):
                features, future, deadline = self.pending.pop(0)
                if future.cancelled():  # its client went away
                    continue
                if deadline is not None and now > deadline:
                    future.set_exception(Refused(504, "the request's deadline passed while it waited for the "
                                                 "predictor; it was not sent", "deadline_exceeded"))
                    continue
                group.append((features, future))
                rows += features.shape[0]
            if group:
                self.inflight += 1
                asyncio.get_running_loop().create_task(self._run(group))

    async def _run(self, group: list[tuple[np.ndarray, asyncio.Future]]) -> None:
        try:
            features = np.concatenate([f for f, _ in group]) if len(group) > 1 else group[0][0]
            outputs = await self.call(features)
            start = 0
            for part, future in group:
                stop = start + part.shape[0]
                if not future.done():
                    future.set_result({name: value[start:stop] for name, value in outputs.items()})
                start = stop
        except BaseException as exc:  # every waiting request learns why
            for _, future in group:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self.inflight -= 1
            self._drain()
