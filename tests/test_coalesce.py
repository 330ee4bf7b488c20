"""Coalescing: concurrent requests share predictor calls, each gets its own rows back."""

import asyncio

import numpy as np
import pytest

from transformer.coalesce import Coalescer


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
        waiting = asyncio.create_task(coalescer(np.ones((5, 1))))
        kept = asyncio.create_task(coalescer(np.ones((2, 1))))
        await asyncio.sleep(0)
        waiting.cancel()
        await first
        return await kept

    out = asyncio.run(run())
    assert out["y"].shape == (2, 1)
    assert predictor.calls == [1, 2]


def test_limits_must_be_positive():
    with pytest.raises(ValueError):
        Coalescer(SlowPredictor(), max_inflight=0)
