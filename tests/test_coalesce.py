"""Coalescing: concurrent requests share predictor calls, each gets its own rows back."""

import asyncio

import numpy as np
import pytest

from transformer.serving.admission import Refused
from transformer.serving.coalesce import Coalescer


class SlowPredictor:
    """Doubles its input after a short wait, and records the size of every call."""

    def __init__(self, fail_on: int | None = None):
        self.calls: list[int] = []
        self.fail_on = fail_on

    async def __call__(self, X: np.ndarray) -> dict:
        self.calls.append(X.shape[0])
        await asyncio.sleep(0.01)
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise RuntimeError("predictor failed")
        return {"y": X * 2, "n": np.arange(X.shape[0])}


def test_requests_beyond_the_inflight_limit_share_calls_and_get_their_rows():
    predictor = SlowPredictor()

    async def run():
        coalescer = Coalescer(predictor, max_inflight=1, max_rows=100)
        inputs = [np.full((i + 1, 2), float(i)) for i in range(10)]
        outputs = await asyncio.gather(*(coalescer(x) for x in inputs))
        return inputs, outputs

    inputs, outputs = asyncio.run(run())
    for x, out in zip(inputs, outputs):
        np.testing.assert_array_equal(out["y"], x * 2)
    assert predictor.calls[0] == 1  # the first request went alone, at once
    assert len(predictor.calls) == 2 and sum(predictor.calls) == 55  # the other nine shared one call


def test_merged_calls_respect_max_rows():
    predictor = SlowPredictor()

    async def run():
        coalescer = Coalescer(predictor, max_inflight=1, max_rows=4)
        await asyncio.gather(*(coalescer(np.ones((2, 1))) for _ in range(7)))

    asyncio.run(run())
    assert max(predictor.calls) <= 4 and sum(predictor.calls) == 14


def test_a_failed_call_fails_every_request_in_it_and_the_next_calls_work():
    predictor = SlowPredictor(fail_on=2)

    async def run():
        coalescer = Coalescer(predictor, max_inflight=1, max_rows=100)
        results = await asyncio.gather(*(coalescer(np.ones((1, 1))) for _ in range(4)), return_exceptions=True)
        after = await coalescer(np.ones((3, 1)))
        return results, after

    results, after = asyncio.run(run())
    assert not isinstance(results[0], Exception)
    assert all(isinstance(r, RuntimeError) for r in results[1:])
    assert after["y"].shape == (3, 1)


def test_a_cancelled_waiting_request_is_skipped():
    predictor = SlowPredictor()

    async def run():
        coalescer = Coalescer(predictor, max_inflight=1, max_rows=100)
        first = asyncio.create_task(coalescer(np.ones((1, 1))))
        await asyncio.sleep(0)
        kept = asyncio.create_task(coalescer(np.ones((2, 1))))
        waiting = asyncio.create_task(coalescer(np.ones((5, 1))))
        also = asyncio.create_task(coalescer(np.ones((3, 1))))
        await asyncio.sleep(0)
        waiting.cancel()
        await first
        return await kept, await also

    out, also = asyncio.run(run())
    assert out["y"].shape == (2, 1) and also["y"].shape == (3, 1)
    assert predictor.calls == [1, 5]  # the requests on either side of the cancelled one share a call


def test_limits_must_be_positive():
    with pytest.raises(ValueError):
        Coalescer(SlowPredictor(), max_inflight=0)


class GatedPredictor:
    """Answers each call only when the test opens its gate: which calls are in flight is the test's to
    decide, with no sleeping. Returns each row's own values so every request can check its slice."""

    def __init__(self):
        self.calls: list[np.ndarray] = []
        self.gates: list[asyncio.Event] = []

    async def __call__(self, X: np.ndarray) -> dict:
        self.calls.append(X)
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        return {"y": X * 2, "first": X[:, :1].copy()}

    async def open(self, index: int) -> None:
        self.gates[index].set()
        for _ in range(5):  # let the answer, the drain and the next calls run
            await asyncio.sleep(0)


def test_two_calls_in_flight_then_waiting_requests_are_packed_in_order_up_to_max_rows():
    predictor = GatedPredictor()
    sizes = [1, 1, 2, 3, 1, 4, 2]  # the first two go at once; the rest wait and are packed by 6 rows

    async def run():
        coalescer = Coalescer(predictor, max_inflight=2, max_rows=6)
        inputs = [np.column_stack([np.full(n, float(i)), np.arange(n, dtype=float)]) for i, n in enumerate(sizes)]
        tasks = [asyncio.create_task(coalescer(x)) for x in inputs]
        for _ in range(3):
            await asyncio.sleep(0)
        assert [c.shape[0] for c in predictor.calls] == [1, 1] and coalescer.inflight == 2
        assert len(coalescer.pending) == 5
        await predictor.open(0)  # a slot frees: 2 + 3 + 1 = 6 rows fit exactly, the 4 waits
        assert [c.shape[0] for c in predictor.calls] == [1, 1, 6] and coalescer.inflight == 2
        await predictor.open(1)  # 4 + 2 = 6
        await predictor.open(2)
        await predictor.open(3)
        outputs = await asyncio.gather(*tasks)
        return coalescer, inputs, outputs

    coalescer, inputs, outputs = asyncio.run(run())
    assert [c.shape[0] for c in predictor.calls] == [1, 1, 6, 6]
    for x, out in zip(inputs, outputs):  # every request got exactly its own rows back
        np.testing.assert_array_equal(out["y"], x * 2)
        np.testing.assert_array_equal(out["first"], x[:, :1])
    assert coalescer.inflight == 0 and not coalescer.pending


def test_an_expired_request_between_two_live_ones_leaves_them_in_one_call():
    predictor = GatedPredictor()

    async def run():
        coalescer = Coalescer(predictor, max_inflight=1, max_rows=100)
        first = asyncio.create_task(coalescer(np.ones((1, 2))))
        await asyncio.sleep(0)
        live = asyncio.create_task(coalescer(np.full((2, 2), 2.0)))
        expired = asyncio.create_task(coalescer(np.full((3, 2), 3.0), deadline=0.0))  # long past
        later = asyncio.create_task(coalescer(np.full((4, 2), 4.0), deadline=float("inf")))
        await asyncio.sleep(0)
        await predictor.open(0)
        await predictor.open(1)
        return await asyncio.gather(first, live, expired, later, return_exceptions=True), coalescer

    (first, live, expired, later), coalescer = asyncio.run(run())
    assert [c.shape[0] for c in predictor.calls] == [1, 6]  # 2 + 4 together; the expired 3 never sent
    assert isinstance(expired, Refused) and (expired.status, expired.cause) == (504, "deadline_exceeded")
    assert str(expired) == "the request's deadline passed while it waited for the predictor; it was not sent"
    np.testing.assert_array_equal(live["y"], np.full((2, 2), 4.0))
    np.testing.assert_array_equal(later["y"], np.full((4, 2), 8.0))
    assert coalescer.inflight == 0


def test_a_failed_merged_call_gives_each_of_its_requests_the_error_and_frees_its_slot():
    failing = RuntimeError("predictor failed")
    calls = []

    async def call(X):
        calls.append(X.shape[0])
        await asyncio.sleep(0)
        if len(calls) == 2:
            raise failing
        return {"y": X}

    async def run():
        coalescer = Coalescer(call, max_inflight=1, max_rows=100)
        results = await asyncio.gather(*(coalescer(np.ones((n, 1))) for n in (1, 2, 3)), return_exceptions=True)
        return results, coalescer

    (first, second, third), coalescer = asyncio.run(run())
    assert calls == [1, 5] and first["y"].shape == (1, 1)
    assert second is failing and third is failing
    assert coalescer.inflight == 0 and not coalescer.pending


def test_defaults_and_the_smallest_limits():
    async def call(X):
        return {"y": X}

    coalescer = Coalescer(call)
    assert (coalescer.max_inflight, coalescer.max_rows, coalescer.inflight) == (2, 256, 0)
    assert Coalescer(call, max_inflight=1, max_rows=1).max_rows == 1
    for bad in ({"max_inflight": 0}, {"max_rows": 0}):
        with pytest.raises(ValueError, match="^max_inflight and max_rows must be at least 1$"):
            Coalescer(call, **bad)


def test_a_client_leaving_a_merged_call_in_flight_leaves_every_other_client_its_own_rows():
    """One call in flight, three requests merged into the next; the middle one's client goes away while the
    merged call is at the predictor. The requests after it must still get their own rows, not a neighbour's,
    and the slot must be free again afterwards."""
    predictor = GatedPredictor()

    async def run():
        coalescer = Coalescer(predictor, max_inflight=1, max_rows=100)
        first = asyncio.ensure_future(coalescer(np.full((1, 2), 0.0)))
        await asyncio.sleep(0)
        parts = [np.full((n, 2), float(value)) for n, value in ((2, 1.0), (1, 2.0), (3, 3.0))]
        waiting = [asyncio.ensure_future(coalescer(x)) for x in parts]
        await asyncio.sleep(0)
        predictor.gates[0].set()  # the first call answers; the three waiting go out together
        await first
        while len(predictor.calls) < 2:
            await asyncio.sleep(0)
        assert predictor.calls[1].shape == (6, 2) and coalescer.inflight == 1
        waiting[1].cancel()  # its client went away while the merged call is in flight
        await asyncio.sleep(0)
        predictor.gates[1].set()
        before, after = await waiting[0], await waiting[2]
        with pytest.raises(asyncio.CancelledError):
            await waiting[1]
        alone = asyncio.ensure_future(coalescer(np.full((1, 2), 9.0)))  # the slot is free: sent at once
        while len(predictor.calls) < 3:
            await asyncio.sleep(0)
        predictor.gates[2].set()
        return parts, before, after, await alone, coalescer

    parts, before, after, alone, coalescer = asyncio.run(run())
    np.testing.assert_array_equal(before["y"], parts[0] * 2)
    np.testing.assert_array_equal(after["y"], parts[2] * 2)
    np.testing.assert_array_equal(alone["y"], np.full((1, 2), 18.0))
    assert coalescer.inflight == 0 and coalescer.pending == []


def test_every_client_of_a_merged_call_leaving_frees_the_slot_and_the_call_goes_unanswered_to_none():
    predictor = GatedPredictor()

    async def run():
        coalescer = Coalescer(predictor, max_inflight=1, max_rows=100)
        first = asyncio.ensure_future(coalescer(np.zeros((1, 1))))
        await asyncio.sleep(0)
        waiting = [asyncio.ensure_future(coalescer(np.ones((1, 1)))) for _ in range(2)]
        await asyncio.sleep(0)
        predictor.gates[0].set()
        await first
        while len(predictor.calls) < 2:
            await asyncio.sleep(0)
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        predictor.gates[1].set()
        for _ in range(5):
            await asyncio.sleep(0)
        return coalescer

    coalescer = asyncio.run(run())
    assert coalescer.inflight == 0 and coalescer.pending == []
