"""Coalescer: concurrent callers share model calls, each gets exactly its own rows."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from siglip.api.coalesce import Coalescer


class Recorder:
    """An async batch function whose rows identify their inputs; it finishes only when released."""

    def __init__(self):
        self.calls: list[list[int]] = []
        self.release = asyncio.Event()
        self.fail_with: Exception | None = None

    async def __call__(self, items: list[int]) -> np.ndarray:
        self.calls.append(list(items))
        await self.release.wait()
        if self.fail_with:
            raise self.fail_with
        return np.array([[x, x * 10] for x in items], dtype=np.float32)


def test_lone_call_goes_at_once():
    async def run():
        fn = Recorder()
        fn.release.set()
        out = await Coalescer(fn, max_items=8)([1, 2])
        return fn.calls, out

    calls, out = asyncio.run(run())
    assert calls == [[1, 2]]
    assert out.tolist() == [[1, 10], [2, 20]]


def test_callers_waiting_behind_a_call_are_merged_and_get_their_own_rows():
    async def run():
        fn = Recorder()
        co = Coalescer(fn, max_items=100, max_in_flight=1)
        first = asyncio.ensure_future(co([0]))
        await asyncio.sleep(0)  # the first call is now in flight
        rest = [asyncio.ensure_future(co([i, i + 1000])) for i in range(1, 6)]
        await asyncio.sleep(0)
        fn.release.set()
        return fn.calls, await first, await asyncio.gather(*rest)

    calls, first, rest = asyncio.run(run())
    assert calls == [[0], [1, 1001, 2, 1002, 3, 1003, 4, 1004, 5, 1005]]
    assert first.tolist() == [[0, 0]]
    for i, rows in enumerate(rest, start=1):
        assert rows[:, 0].tolist() == [i, i + 1000]


def test_max_items_splits_calls():
    async def run():
        fn = Recorder()
        co = Coalescer(fn, max_items=4, max_in_flight=1)
        first = asyncio.ensure_future(co([0]))
        await asyncio.sleep(0)
        rest = [asyncio.ensure_future(co([i, i])) for i in range(1, 5)]
        await asyncio.sleep(0)
        fn.release.set()
        await asyncio.gather(first, *rest)
        return fn.calls

    calls = asyncio.run(run())
    assert [len(c) for c in calls] == [1, 4, 4]


def test_a_failed_call_fails_every_caller_in_it():
    async def run():
        fn = Recorder()
        fn.fail_with = RuntimeError("model down")
        co = Coalescer(fn, max_items=8, max_in_flight=1)
        tasks = [asyncio.ensure_future(co([i])) for i in range(3)]
        await asyncio.sleep(0)
        fn.release.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(run())
    assert all(isinstance(r, RuntimeError) for r in results)


def test_cancelled_callers_are_skipped():
    async def run():
        fn = Recorder()
        co = Coalescer(fn, max_items=8, max_in_flight=1)
        first = asyncio.ensure_future(co([0]))
        await asyncio.sleep(0)
        gone = asyncio.ensure_future(co([7]))
        kept = asyncio.ensure_future(co([8]))
        await asyncio.sleep(0)
        gone.cancel()
        fn.release.set()
        await first
        return fn.calls, await kept

    calls, kept = asyncio.run(run())
    assert calls == [[0], [8]]
    assert kept.tolist() == [[8, 80]]


@pytest.mark.parametrize("in_flight", [1, 2, 4])
def test_many_concurrent_callers_all_answered_correctly(in_flight):
    async def run():
        async def fn(items):
            await asyncio.sleep(0.001)
            return np.array([[x] for x in items], dtype=np.float32)

        co = Coalescer(fn, max_items=16, max_in_flight=in_flight)
        outs = await asyncio.gather(*[co([i, -i]) for i in range(200)])
        return co.calls, outs

    calls, outs = asyncio.run(run())
    assert calls < 200
    for i, rows in enumerate(outs):
        assert rows[:, 0].tolist() == [i, -i]
