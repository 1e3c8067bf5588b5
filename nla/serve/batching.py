"""Micro-batching: requests from concurrent callers that arrive within a few milliseconds share
one model call.

Generation on a small model is dominated by per-step overhead, not by the batch width, so 32
vectors verbalized together cost little more than one. A :class:`MicroBatcher` collects items
from an asyncio queue until ``max_wait_s`` has passed since the first one (or ``max_rows`` rows
are waiting), groups them by a key (items with different generation settings cannot share a
``generate`` call), runs each group through a plain synchronous function in the model thread,
and hands every caller its own slice of the result.

All model work goes through one single-thread executor (:class:`ModelThread`): the verbalizer
and the activation reader install forward hooks on the shared model, so two calls running at
once would see each other's hooks. Running it off the event loop keeps the server answering
health checks, static files and bad requests while the model is busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def _set_threads(n: int) -> None:
    # On a CPU shared with other work, torch's default of one intra-op thread per core makes
    # the threads wait on each other: measured 6x slower generation on a loaded 2-core box.
    if n > 0:
        import torch

        torch.set_num_threads(n)


class Abandoned(Exception):
    """Every caller of the running model call has gone (timed out): stop spending model time."""


class ModelThread:
    """One worker thread that owns the model: every model call is queued onto it in order.

    A call may carry an ``abandoned()`` check; :meth:`check`, installed as a forward pre-hook on
    the model's embeddings (so it runs once per generation step), raises :class:`Abandoned` when
    it turns true. A request that times out therefore frees the thread within one step instead
    of holding it to the end of its generation (docs/guarantees.md, "serve").
    """

    def __init__(self, torch_threads: int = 0) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nla-model",
                                        initializer=_set_threads, initargs=(torch_threads,))
        self._local = threading.local()  # only the model thread's own calls are ever abandoned

    async def run(self, fn: Callable[..., R], *args: Any, abandoned: Callable[[], bool] | None = None) -> R:
        def job() -> R:
            self._local.abandoned = abandoned
            try:
                return fn(*args)
            finally:
                self._local.abandoned = None

        return await asyncio.get_running_loop().run_in_executor(self._pool, job)

    def check(self) -> None:
        abandoned = getattr(self._local, "abandoned", None)
        if abandoned is not None and abandoned():
            raise Abandoned("every caller of this model call has gone")

    def watch(self, model: Any) -> list[Any]:
        """Install :meth:`check` on every embedding of ``model`` (called each forward); the handles."""
        import torch

        return [m.register_forward_pre_hook(lambda *_: self.check()) for m in model.modules()
                if isinstance(m, torch.nn.Embedding)]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _all_done(futures: list[asyncio.Future[Any]]) -> bool:
    return all(f.done() for f in futures)


@dataclass
class _Pending(Generic[T, R]):
    item: T
    rows: int
    key: Hashable
    future: asyncio.Future[R]


@dataclass
class BatchStats:
    """Counters for ``/v1/info``: how many model calls served how many requests."""

    requests: int = 0
    calls: int = 0
    rows: int = 0
    largest_call: int = 0
    model_seconds: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {
            "requests": self.requests,
            "model_calls": self.calls,
            "rows": self.rows,
            "largest_call_rows": self.largest_call,
            "mean_requests_per_call": self.requests / self.calls if self.calls else 0.0,
            "model_seconds": round(self.model_seconds, 3),
        }


@dataclass
class MicroBatcher(Generic[T, R]):
    """Groups concurrent ``submit`` calls into calls of ``run(items) -> results`` (same order).

    ``rows(item)`` is the item's share of a batch (vectors × samples); a group stops growing at
    ``max_rows`` (an item bigger than that runs alone). With ``enabled=False`` every item is its
    own call: the one-at-a-time baseline that ``benchmarks/serve.py`` compares against.
    """

    run: Callable[[list[T]], list[R]]
    thread: ModelThread
    rows: Callable[[T], int] = lambda item: 1
    key: Callable[[T], Hashable] = lambda item: None
    max_rows: int = 64
    max_wait_s: float = 0.005
    enabled: bool = True
    stats: BatchStats = field(default_factory=BatchStats)
    _queue: asyncio.Queue[_Pending[T, R]] | None = field(default=None, init=False, repr=False)
    _worker: asyncio.Task[None] | None = field(default=None, init=False, repr=False)

    async def submit(self, item: T) -> R:
        if self._queue is None:
            self.start()
        assert self._queue is not None
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(item, max(1, self.rows(item)), self.key(item), fut))
        # If the caller times out, this await is cancelled; the worker sees the cancelled
        # future and drops the item instead of spending model time on an answer nobody reads.
        return await fut

    def start(self) -> None:
        """Start the worker on the running loop (idempotent)."""
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None

    async def _collect(self) -> list[_Pending[T, R]]:
        assert self._queue is not None
        first = await self._queue.get()
        batch = [first]
        if not self.enabled:
            return batch
        total = first.rows
        deadline = time.monotonic() + self.max_wait_s
        while total < self.max_rows:
            # Under load the queue already holds the requests that came in while the model
            # was busy: take them at once; otherwise wait out the short window for stragglers.
            if self._queue.empty():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self._queue.get(), left)
                except asyncio.TimeoutError:
                    break
            else:
                nxt = self._queue.get_nowait()
            batch.append(nxt)
            total += nxt.rows
        return batch

    async def _loop(self) -> None:
        while True:
            batch = await self._collect()
            groups: dict[Hashable, list[_Pending[T, R]]] = {}
            for p in batch:
                if not p.future.done():
                    groups.setdefault(p.key, []).append(p)
            for group in groups.values():
                await self._run_group(group)

    async def _run_group(self, group: list[_Pending[T, R]]) -> None:
        # A group may exceed max_rows only by its last item; split so each call stays bounded.
        calls: list[list[_Pending[T, R]]] = [[]]
        rows = 0
        for p in group:
            if calls[-1] and rows + p.rows > self.max_rows:
                calls.append([])
                rows = 0
            calls[-1].append(p)
            rows += p.rows
        for call in calls:
            live = [p for p in call if not p.future.done()]
            if not live:
                continue
            started = time.perf_counter()
            try:
                # future.done() is a plain state read, safe from the model thread.
                results = await self.thread.run(self.run, [p.item for p in live],
                                                abandoned=functools.partial(_all_done, [p.future for p in live]))
            except Exception as exc:  # one bad call must not stop the worker
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            finally:
                self.stats.model_seconds += time.perf_counter() - started
            n_rows = sum(p.rows for p in live)
            self.stats.calls += 1
            self.stats.requests += len(live)
            self.stats.rows += n_rows
            self.stats.largest_call = max(self.stats.largest_call, n_rows)
            for p, result in zip(live, results):
                if not p.future.done():
                    p.future.set_result(result)
