"""Dynamic batching: requests that arrive together reach the model as one ``predict_batch`` call.

One :class:`Batcher` per model instance and event loop. A batch starts when it is
full, when it holds as many requests as the previous batch did (the load it saw
is still there), or when its first request has waited ``max_wait_s`` for company
(counted from when the batcher was free to run it): so at concurrency 1 a request
goes at once (the previous batch held one), a lone request after bigger batches waits
at most ``max_wait_s``, and under load batches fill instead of paying the wait.
Requests that arrive while a batch runs form the next one; one batch runs at a time. A request whose caller went away (a disconnect, a Stop)
leaves the queue, or its answer is dropped; the others in its batch are answered.

``predict_batch`` returns one result per input, in order. An ``Exception``
instance in a slot fails only that request; a raise, or a result of the wrong
length, fails every request of the batch.

This module imports only the standard library on purpose: an export copies it
verbatim into the Truss directory's ``packages/`` (as ``kernel_magics_batching``),
where :func:`batched` makes the ``predict`` Truss's own server calls.
The kernel, ``kernel-magics serve`` and Ray replicas use the same class through
the runtime.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import inspect
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional

__all__ = ["Batcher", "BatchStats", "BatchResultError", "batched", "is_batching_predict", "call_sync"]

# What batched() marks its generated predict with, so the runtime knows the model only batches.
_MARK = "_kernel_magics_batching"


def call_sync(fn: Callable, *args: Any) -> Any:
    """``fn(*args)`` for a worker thread. A StopIteration that escapes the model's code (``next()`` on an empty
    iterator) becomes a RuntimeError, as it does in a generator (PEP 479): asyncio cannot carry a StopIteration
    out of a thread into a future, which would then never finish (that request, or every batch after it, hangs)."""
    try:
        return fn(*args)
    except StopIteration as exc:
        raise RuntimeError(f"{getattr(fn, '__name__', 'the model')} raised StopIteration") from exc


def _settable(error: BaseException) -> BaseException:
    """What a future can hold: a StopIteration (returned in a slot) as a RuntimeError."""
    if isinstance(error, StopIteration):
        replacement = RuntimeError("predict_batch returned a StopIteration for this input")
        replacement.__cause__ = error
        return replacement
    return error


def _own_copy(error: BaseException) -> BaseException:
    """One exception object per failed request of a batch: each caller re-raises it, and its traceback grows.
    The copy keeps the traceback and the chain (copy.copy drops them), so each caller sees the model's frames."""
    try:
        duplicate = copy.copy(error)
        duplicate.__cause__, duplicate.__context__ = error.__cause__, error.__context__
        duplicate.__suppress_context__ = error.__suppress_context__
        return duplicate.with_traceback(error.__traceback__)
    except Exception:
        return error


class BatchResultError(RuntimeError):
    """predict_batch returned something other than one result per input."""


@dataclass(frozen=True)
class BatchStats:
    """One batch that ran: how many requests, how long its first one waited, how long the call took."""

    size: int
    wait_s: float
    run_s: float


class _Pending:
    __slots__ = ("item", "future", "arrived")

    def __init__(self, item: Any, future: asyncio.Future, arrived: float) -> None:
        self.item, self.future, self.arrived = item, future, arrived


class Batcher:
    """Gathers concurrent :meth:`submit` calls into calls of ``run(list_of_inputs) -> list``."""

    def __init__(self, run: Callable[[list], Awaitable[list]], max_batch_size: int = 32, max_wait_s: float = 0.005,
                 on_batch: Optional[Callable[[BatchStats], None]] = None) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_wait_s < 0:
            raise ValueError("max_wait_s must not be negative")
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self._queue: collections.deque[_Pending] = collections.deque()
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._worker: Optional[asyncio.Task] = None
        self._arrived: Optional[asyncio.Event] = None
        self._last_size = 1
        self._free_since = 0.0  # when the last batch ended: the wait for company starts then at the earliest

    @property
    def queued(self) -> int:
        """Requests waiting for a batch (cancelled ones not yet swept included)."""
        return len(self._queue)

    async def submit(self, item: Any) -> Any:
        """Put ``item`` in the next batch and return its own result (or raise its own exception)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # A new loop (a restarted server): whatever was queued on the old one cannot be answered.
            self._loop, self._worker, self._arrived = loop, None, asyncio.Event()
            self._queue.clear()
        future = loop.create_future()
        self._queue.append(_Pending(item, future, time.perf_counter()))
        if self._worker is None:
            self._worker = loop.create_task(self._drain())
        elif len(self._queue) >= self._target():
            self._arrived.set()
        # Cancelling the caller cancels this future: the worker skips it, or drops its answer.
        return await future

    def _target(self) -> int:
        return min(self.max_batch_size, self._last_size)

    def _sweep(self) -> None:
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()

    async def _drain(self) -> None:
        try:
            while True:
                self._sweep()
                if not self._queue:
                    return
                await self._fill()
                batch: list[_Pending] = []
                while self._queue and len(batch) < self.max_batch_size:
                    pending = self._queue.popleft()
                    if not pending.future.done():
                        batch.append(pending)
                if batch:
                    await self._run_batch(batch)
        finally:
            self._worker = None
            for pending in self._queue:  # the loop is going away (or the worker failed): no one waits for ever
                pending.future.cancel()
            self._queue.clear()

    async def _fill(self) -> None:
        """Wait until the queue holds a batch's worth, or its first request has waited max_wait."""
        while True:
            self._sweep()
            if not self._queue or len(self._queue) >= self._target():
                return
            # Waiting behind a running batch is not waiting for company: under load, the requests queued during
            # a batch are joined by the wave its answers release, for up to max_wait after it ended.
            remaining = max(self._queue[0].arrived, self._free_since) + self.max_wait_s - time.perf_counter()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return

    async def _run_batch(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        wait = started - batch[0].arrived
        error: Optional[BaseException] = None
        results: Any = None
        try:
            results = await self._run([p.item for p in batch])
            if not _is_sequence(results) or len(results) != len(batch):
                got = f"{len(results)} results" if _is_sequence(results) else type(results).__name__
                error = BatchResultError(
                    f"predict_batch got {len(batch)} inputs and returned {got}; it must return a list with one "
                    "result per input, in order (an Exception instance in a slot fails only that request).")
        except asyncio.CancelledError:
            for p in batch:
                p.future.cancel()
            raise
        except Exception as exc:
            error = exc
        except BaseException as exc:  # (SystemExit from model code): this batch fails, the batcher goes on
            error = RuntimeError(f"predict_batch raised {type(exc).__name__}")
            error.__cause__ = exc
        self._last_size = len(batch)
        self._free_since = time.perf_counter()
        try:
            for i, pending in enumerate(batch):
                if pending.future.done():  # its caller went away
                    continue
                if error is not None:
                    pending.future.set_exception(_own_copy(_settable(error)))
                elif isinstance(results[i], BaseException):
                    pending.future.set_exception(_settable(results[i]))
                else:
                    pending.future.set_result(results[i])
        finally:  # whatever went wrong above, no caller of this batch waits for ever
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(RuntimeError("the batch ended without an answer for this request"))
        if self.on_batch is not None:
            try:
                self.on_batch(BatchStats(len(batch), wait, time.perf_counter() - started))
            except Exception:  # a display or a metric must never stop the batches
                pass


def _is_sequence(value: Any) -> bool:
    """A list, a tuple, or a list-like (a numpy array's rows): what may hold one result per input."""
    if isinstance(value, (list, tuple)):
        return True
    return (hasattr(value, "__len__") and hasattr(value, "__getitem__")
            and not isinstance(value, (str, bytes, bytearray, dict)) and not hasattr(value, "keys"))


def is_batching_predict(fn: Any) -> bool:
    """Whether ``fn`` is the ``predict`` that :func:`batched` made."""
    return bool(getattr(fn, _MARK, False))


def batched(max_batch_size: int = 32, max_wait_ms: float = 5.0) -> Callable[[Callable], Callable]:
    """Decorate a model's ``predict`` (its body is not used) so that each call becomes a slot in a
    batch of the instance's ``predict_batch``: what an export writes for Truss's server, which calls
    ``predict`` once per request. A sync ``predict_batch`` runs in a worker thread, an async one on the loop."""

    def decorate(_stub: Callable) -> Callable:
        async def predict(self, model_input):
            batcher = self.__dict__.get("_kernel_magics_batcher")
            if batcher is None:
                method = self.predict_batch
                is_async = inspect.iscoroutinefunction(method)

                async def run(inputs: list) -> list:
                    if is_async:
                        return await method(inputs)
                    return await asyncio.to_thread(call_sync, method, inputs)

                batcher = self.__dict__["_kernel_magics_batcher"] = Batcher(run, max_batch_size, max_wait_ms / 1000)
            return await batcher.submit(model_input)

        setattr(predict, _MARK, True)
        predict.__name__, predict.__qualname__, predict.__doc__ = "predict", _stub.__qualname__, _stub.__doc__
        return predict

    return decorate
