"""The micro-batching queue on its own, with a plain function in place of the model."""

from __future__ import annotations

import asyncio
import threading

import pytest

from nla.serve.batching import MicroBatcher, ModelThread


def _make(calls: list[list[tuple[str, int]]], *, enabled: bool = True, max_rows: int = 64,
          gate: threading.Event | None = None, entered: threading.Event | None = None,
          ) -> MicroBatcher[tuple[str, int], int]:
    def run(items: list[tuple[str, int]]) -> list[int]:
        if entered is not None:
            entered.set()
        if gate is not None:
            gate.wait(30)
        calls.append(list(items))
        if any(v < 0 for _, v in items):
            raise ValueError("negative input")
        return [v * 10 for _, v in items]

    return MicroBatcher(run=run, thread=ModelThread(), key=lambda item: item[0], max_rows=max_rows,
                        max_wait_s=0.05, enabled=enabled)


def test_concurrent_items_share_calls_grouped_by_key_in_order() -> None:
    calls: list[list[tuple[str, int]]] = []

    async def main() -> list[int]:
        b = _make(calls)
        items = [("greedy" if i % 2 else "sampled", i) for i in range(10)]
        out = await asyncio.gather(*(b.submit(it) for it in items))
        await b.stop()
        return list(out)

    assert asyncio.run(main()) == [i * 10 for i in range(10)]
    assert sum(len(c) for c in calls) == 10
    assert len(calls) < 10  # shared calls
    for call in calls:
        assert len({k for k, _ in call}) == 1  # never mixes settings
        values = [v for _, v in call]
        assert values == sorted(values)  # arrival order kept


def test_max_rows_bounds_every_call_and_disabled_means_one_per_call() -> None:
    calls: list[list[tuple[str, int]]] = []

    async def main(enabled: bool) -> None:
        b = _make(calls, enabled=enabled, max_rows=3)
        assert await asyncio.gather(*(b.submit(("k", i)) for i in range(8))) == [i * 10 for i in range(8)]
        await b.stop()

    asyncio.run(main(True))
    assert max(len(c) for c in calls) <= 3 and sum(len(c) for c in calls) == 8
    calls.clear()
    asyncio.run(main(False))
    assert [len(c) for c in calls] == [1] * 8


def test_a_failing_call_fails_only_its_own_callers_and_the_worker_survives() -> None:
    calls: list[list[tuple[str, int]]] = []

    async def main() -> None:
        b = _make(calls)
        bad, other = await asyncio.gather(b.submit(("a", -1)), b.submit(("b", 2)), return_exceptions=True)
        assert isinstance(bad, ValueError) and other == 20
        assert await b.submit(("a", 3)) == 30  # still serving
        await b.stop()

    asyncio.run(main())


def test_a_cancelled_request_is_dropped_before_it_reaches_the_model() -> None:
    calls: list[list[tuple[str, int]]] = []
    gate, entered = threading.Event(), threading.Event()

    async def main() -> None:
        b = _make(calls, gate=gate, entered=entered)
        first = asyncio.ensure_future(b.submit(("k", 1)))  # occupies the model thread (gate closed)
        while not entered.is_set():  # wait until the model thread is really busy with it
            await asyncio.sleep(0.01)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(b.submit(("k", 2)), 0.1)  # the caller gives up while it is queued
        gate.set()
        assert await first == 10
        assert await b.submit(("k", 3)) == 30
        await b.stop()

    asyncio.run(main())
    assert [v for call in calls for _, v in call] == [1, 3]
