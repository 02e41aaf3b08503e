"""The predict concurrency bound (Truss's ``runtime.predict_concurrency``), handed on inside worker threads.

Truss bounds predict with an asyncio semaphore around ``to_thread.run_sync``. When a sync predict
ends, its thread hands the result to the event loop, the loop frees the slot and wakes the next
waiting request, and that request sends its call to a thread again: at the default bound of one,
each predict waits for two thread hops and two turns of the loop, and under load the loop's turns
are long (it reads and writes every other connection meanwhile). Here a sync predict that ends
hands its slot to the next waiting sync call in its own worker thread, so the model's calls run
back to back while the loop does the rest. What the semaphore promised still holds: at most
``size`` predicts at once, in arrival order; a request cancelled while it waits frees nothing and
runs nothing; a slot whose predict is still running when its request is cancelled stays taken until
the model's code returns (Python cannot stop a thread).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import threading
from typing import Any, Awaitable, Callable, Optional, Union

from .batching import call_sync
from .streams import close_quietly, is_stream

__all__ = ["PredictSlots", "CallerGone"]


class CallerGone(Exception):
    """The caller left while its request waited for a slot: none of the model's code ran for it (Truss's server
    skips such a predict too, with a 499)."""

# A waiter's life: waiting in the queue, then given the slot (a sync call: running), then done; or dropped, when its
# request was cancelled before the slot reached it.
_WAITING, _GIVEN, _DONE, _DROPPED = "waiting", "given", "done", "dropped"
_WATCH_AFTER = 0.05  # seconds a request waits for its slot before its caller is watched for leaving


class _Grant:
    """A request waiting for a slot on its event loop (an async predict, a stream, a batch)."""

    __slots__ = ("loop", "future", "state")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.future, self.state = loop, loop.create_future(), _WAITING


class _SyncCall:
    """A sync predict's call, waiting for a slot or running in a worker thread."""

    __slots__ = ("instance", "name", "args", "context", "loop", "future", "state", "abandoned", "kept_slot")

    def __init__(self, instance: Any, name: str, args: tuple, loop: asyncio.AbstractEventLoop) -> None:
        # The method is looked up when the call runs: a hot swap (a %%model cell run again) while it waits
        # reaches it, as it reached a request that waited on the semaphore.
        self.instance, self.name, self.args, self.loop = instance, name, args, loop
        self.context = contextvars.copy_context()  # keeps output routed to the calling cell
        self.future = loop.create_future()
        self.state = _WAITING
        self.abandoned = False  # its request was cancelled while it ran
        self.kept_slot = False  # it returned a stream, which frees the slot when it closes


class PredictSlots:
    """At most ``size`` predicts at once, in arrival order.

    ``pool`` gives the executor a sync call runs in when a slot is freed outside a worker thread
    (a stream that closed, an async predict that ended).
    """

    def __init__(self, size: int, pool: Callable[[], concurrent.futures.Executor]) -> None:
        self.size = size
        self._free = size
        self._waiting: collections.deque[Union[_Grant, _SyncCall]] = collections.deque()
        self._lock = threading.Lock()
        self._pool = pool

    # ------------------------------------------------------------------ an async predict, a stream, a batch

    async def acquire(self, gone: Optional[Callable[[], Awaitable[None]]] = None) -> None:
        """Wait for a slot; the caller frees it with :meth:`release`. ``gone``: see :meth:`run_sync`."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._free > 0 and not self._waiting:
                self._free -= 1
                return
            waiter = _Grant(loop)
            self._waiting.append(waiter)
        if gone is not None:
            self._watch(waiter, gone)
        try:
            await waiter.future
        except asyncio.CancelledError:
            with self._lock:
                if waiter.state == _WAITING:
                    self._waiting.remove(waiter)
                    waiter.state = _DROPPED
                if waiter.state != _GIVEN:
                    raise
            # The slot came with the cancellation. The grant passes it on if it finds the future cancelled; a grant
            # that came first (the future done) leaves it to this request.
            if waiter.future.done() and not waiter.future.cancelled():
                self.release()
            raise

    def release(self) -> None:
        """Free a slot (from any thread): the next waiting request gets it."""
        self._give(self._hand_on())

    def resize(self, size: int) -> None:
        """A new bound (the config changed). The predicts running keep their slots: while more run than the new bound
        allows, a slot they free goes to nobody; a larger bound lets waiting requests in at once."""
        with self._lock:
            self._free += size - self.size
            self.size = size
        while True:
            with self._lock:
                if self._free <= 0 or not self._waiting:
                    return
                self._free -= 1
            self.release()

    # ------------------------------------------------------------------ a sync predict

    async def run_sync(self, instance: Any, name: str, *args: Any,
                       gone: Optional[Callable[[], Awaitable[None]]] = None) -> Any:
        """``instance.name(*args)`` in a worker thread once a slot is free. A stream it returns keeps the slot: the
        caller frees it with :meth:`release` when the stream has closed. ``gone``: an awaitable that ends when the
        caller has left (an HTTP client that disconnected); a request that has to wait leaves the queue then, with
        :class:`CallerGone`."""
        call = _SyncCall(instance, name, args, asyncio.get_running_loop())
        with self._lock:
            start = bool(self._free > 0 and not self._waiting)
            if start:
                self._free -= 1
                call.state = _GIVEN
            else:
                self._waiting.append(call)
        if start:
            try:
                self._pool().submit(self._run, call)
            except BaseException:  # (no thread to run it: a pool shut down, an interpreter exiting)
                self.release()
                raise
        elif gone is not None:
            self._watch(call, gone)
        try:
            return await call.future
        except asyncio.CancelledError:
            with self._lock:
                if call.state == _WAITING:
                    self._waiting.remove(call)  # never ran: nothing to free
                    call.state = _DROPPED
                    raise
                if call.state == _DROPPED:
                    raise
                if call.state == _GIVEN:
                    call.abandoned = True  # its thread frees the slot when the model's code returns
                    raise
            # Done, but cancelled before the result was read: a stream it returned is closed and its slot freed
            # (here if the result came first, else when it comes: _deliver).
            if call.kept_slot and call.future.done() and not call.future.cancelled():
                close_quietly(call.future.result())
                self.release()
            raise

    def _run(self, call: Optional[_SyncCall]) -> None:
        """A worker thread: run the call, then the sync calls that were waiting for its slot, back to back."""
        while call is not None:
            result, error = None, None
            try:
                result = call.context.run(call_sync, getattr(call.instance, call.name), *call.args)
            except BaseException as exc:  # the request's to raise, not the thread's
                error = exc
            # A stream holds its slot until its generator has really closed (as Truss's deferred semaphore).
            keeps = error is None and is_stream(result)
            with self._lock:
                call.state = _DONE
                abandoned = call.abandoned
                call.kept_slot = keeps and not abandoned
            if abandoned:
                if keeps:
                    close_quietly(result)
            else:
                try:
                    call.loop.call_soon_threadsafe(self._deliver, call, result, error)
                except RuntimeError:  # its loop has closed: nobody will read it
                    if keeps:
                        close_quietly(result)
                        keeps = False
                if keeps:
                    return
            result = error = None  # (not held while the next call runs)
            call = self._give(self._hand_on(), here=True)

    def _deliver(self, call: _SyncCall, result: Any, error: Optional[BaseException]) -> None:
        if call.future.cancelled():
            if call.kept_slot:  # a stream nobody will read: its generator never ran, so closing it runs nothing
                close_quietly(result)
                self.release()
        elif error is not None:
            call.future.set_exception(error)
        else:
            call.future.set_result(result)

    def _watch(self, waiter: Union[_Grant, _SyncCall], gone: Callable[[], Awaitable[None]]) -> None:
        """While ``waiter`` waits for its slot: if its caller leaves first, it leaves the queue (a timeout that every
        client of a busy model hits would otherwise leave the model predicting for nobody, and the next caller
        waiting behind all of it). Once the slot is given, a caller that leaves changes nothing (as Truss). The watch
        starts once the request has waited ``_WATCH_AFTER``: a task for every request of a short queue cost echo a
        sixth of its requests a second at concurrency 32."""
        watching: list = []

        def left(task: asyncio.Future) -> None:
            if task.cancelled() or task.exception() is not None:
                return
            with self._lock:
                if waiter.state != _WAITING or waiter.future.done():
                    return
                self._waiting.remove(waiter)
                waiter.state = _DROPPED
            waiter.future.set_exception(CallerGone())  # (futures are set on this loop only: still not done)

        def watch() -> None:
            if waiter.state == _WAITING:
                task = asyncio.ensure_future(gone())
                task.add_done_callback(left)
                watching.append(task)

        timer = waiter.loop.call_later(_WATCH_AFTER, watch)

        def stop(_: Any) -> None:
            timer.cancel()
            for task in watching:
                task.cancel()

        waiter.future.add_done_callback(stop)

    # ------------------------------------------------------------------ handing a slot on

    def _hand_on(self) -> Optional[Union[_Grant, _SyncCall]]:
        """The waiter the freed slot goes to, or None (the slot is free). Requests cancelled while they waited are
        dropped here: a cancellation lands at once, but the request sees it only on its loop's next turn."""
        with self._lock:
            while self._waiting and self._free >= 0:  # (below 0: more run than a bound made smaller allows)
                waiter = self._waiting.popleft()
                if waiter.future.cancelled():
                    waiter.state = _DROPPED
                    continue
                waiter.state = _GIVEN
                return waiter
            self._free += 1
            return None

    def _give(self, waiter: Optional[Union[_Grant, _SyncCall]], here: bool = False) -> Optional[_SyncCall]:
        """Give ``waiter`` its slot, or to the waiter after it where it cannot take it. A sync call runs in a
        worker thread, or is returned when ``here`` (the caller is a worker that runs it next). A loop, not
        recursion: many requests cancelled at once each pass the slot on."""
        while waiter is not None:
            if isinstance(waiter, _SyncCall):
                if here:
                    return waiter
                try:
                    self._pool().submit(self._run, waiter)
                    return None
                except RuntimeError as exc:  # no thread to run it (a pool shut down, an interpreter exiting)
                    with self._lock:
                        waiter.state = _DONE
                    try:
                        waiter.loop.call_soon_threadsafe(self._deliver, waiter, None, exc)
                    except RuntimeError:
                        pass
            elif _on_loop(waiter.loop):
                if not waiter.future.cancelled():
                    waiter.future.set_result(None)
                    return None
            else:
                try:
                    waiter.loop.call_soon_threadsafe(self._grant, waiter)
                    return None
                except RuntimeError:  # its loop has closed
                    pass
            waiter = self._hand_on()
        return None

    def _grant(self, waiter: _Grant) -> None:
        if waiter.future.cancelled():
            self.release()  # its request left meanwhile: the next one gets the slot
        else:
            waiter.future.set_result(None)


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
