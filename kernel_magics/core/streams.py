"""A streaming prediction as an async iterator: chunks made on demand, closed for real.

``ChunkStream`` wraps the generator a streaming ``predict`` returned. An async
generator is iterated on the loop. A sync generator runs in one worker thread
of its own (no thread hop per chunk), but only on demand, as Truss asks for
each chunk from the loop: the thread makes chunk *n+1* only once the consumer
asks for it, which is after it has sent chunk *n*. So

- the loop never waits on the GIL for a generator that is computing ahead
  (the first chunk goes out as soon as it exists), and
- a slow reader pauses the generator: at most one chunk is ever made but not
  yet sent, whatever the stream's size (backpressure).

``on_close`` runs exactly once, when the generator has really finished or
closed (its ``finally`` has run), never earlier: the predict slot it holds is
freed only then.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import threading
import time
from typing import Any, Callable, Optional

from .serialization import to_jsonable
from .tracebacks import trim_traceback

__all__ = ["ChunkStream", "join_chunks", "close_quietly"]


def join_chunks(chunks: list) -> Any:
    """What a streamed prediction amounts to, everywhere (notebook, gathered HTTP, replay):
    one string for text chunks (Truss's gathered form), else the JSON list of chunks."""
    if chunks and all(isinstance(c, (str, bytes, bytearray)) for c in chunks):
        return b"".join(c if isinstance(c, (bytes, bytearray)) else c.encode() for c in chunks).decode("utf-8", "replace")
    return to_jsonable(chunks, what="the streamed chunks")


def close_quietly(gen: Any) -> None:
    if inspect.isgenerator(gen):
        try:
            gen.close()
        except Exception:
            pass


_END = object()


class ChunkStream:
    """The chunks of a streaming predict; ``aclose()`` (or leaving ``async with``) stops it."""

    def __init__(self, generator: Any, *, on_close: Callable[["ChunkStream"], None], started: float,
                 executor: Optional[concurrent.futures.Executor] = None) -> None:
        self._gen = generator
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()
        self._started = started
        self._executor = executor
        self._closing = False  # no more chunks will be handed out
        self._closed = False  # on_close has run
        # The sync generator's thread: `_want` lets it make one more chunk; `_slot` carries it back.
        self._want = threading.Semaphore(0)
        self._stop = False
        self._slot: Optional[asyncio.Future] = None
        self._pump_done: Optional[asyncio.Future] = None
        self._taken = False  # handed to a caller that iterates it itself (take_sync)
        self.chunks = 0
        self.first_chunk_seconds: Optional[float] = None
        self.elapsed: float = 0.0

    @property
    def is_async(self) -> bool:
        return inspect.isasyncgen(self._gen)

    @property
    def started(self) -> float:
        """``time.perf_counter()`` when the predict began (for time to first chunk)."""
        return self._started

    # ------------------------------------------------------------------ a caller that iterates itself

    def take_sync(self) -> Any:
        """Hand a sync generator to a caller that iterates it in its own thread.

        Used where per-chunk hand-offs would cost more than the generator itself
        (the notebook's stream view). The caller must call :meth:`close_sync`.
        """
        if self.is_async or self._pump_done is not None:
            raise RuntimeError("take_sync needs a sync generator that is not being iterated")
        self._taken = True
        return self._gen

    def close_sync(self, chunks: int = 0, first_chunk_seconds: Optional[float] = None) -> None:
        """Close a generator taken with :meth:`take_sync`, in the thread that ran it; any thread."""
        if self._closing:
            return
        self._closing = True
        close_quietly(self._gen)
        self.chunks, self.first_chunk_seconds = chunks, first_chunk_seconds
        self._loop.call_soon_threadsafe(self._finish)  # the slot belongs to the loop

    # ------------------------------------------------------------------ async iteration

    def __aiter__(self) -> "ChunkStream":
        return self

    async def __aenter__(self) -> "ChunkStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def __anext__(self) -> Any:
        if self._closing:
            raise StopAsyncIteration
        try:
            chunk = await (self._gen.__anext__() if self.is_async else self._next_from_thread())
        except StopAsyncIteration:
            await self.aclose()
            raise
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                trim_traceback(exc)
            await self.aclose()
            raise
        self.chunks += 1
        if self.first_chunk_seconds is None:
            self.first_chunk_seconds = time.perf_counter() - self._started
        return chunk

    async def _next_from_thread(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._pump_done is None:
            self._pump_done = loop.create_future()
            ctx = contextvars.copy_context()  # keeps output routed to the calling cell
            if self._executor is not None:
                self._executor.submit(ctx.run, self._pump)
            else:
                threading.Thread(target=ctx.run, args=(self._pump,), name="model-stream", daemon=True).start()
        self._slot = loop.create_future()
        self._want.release()  # the previous chunk is sent (we are asked again): make the next one
        kind, value = await asyncio.shield(self._slot)
        if kind == "chunk":
            return value
        if kind == "error":
            raise value
        raise StopAsyncIteration

    def _pump(self) -> None:
        """The generator's thread: one chunk per request, closed here (the only safe place)."""
        loop = self._loop

        def hand(item: tuple) -> None:
            slot = self._slot
            if slot is not None and not slot.done():
                slot.set_result(item)

        try:
            while True:
                self._want.acquire()
                if self._stop:
                    break
                chunk = next(self._gen, _END)
                if chunk is _END:
                    loop.call_soon_threadsafe(hand, ("end", None))
                    break
                loop.call_soon_threadsafe(hand, ("chunk", chunk))
        except BaseException as exc:  # forwarded to the consumer
            loop.call_soon_threadsafe(hand, ("error", exc))
        finally:
            close_quietly(self._gen)
            loop.call_soon_threadsafe(lambda: self._pump_done.done() or self._pump_done.set_result(None))

    async def aclose(self) -> None:
        """Stop the generator (its ``finally`` runs); ``on_close`` runs once it has really stopped."""
        if self._closing:
            return
        self._closing = True
        try:
            if self.is_async:
                # Shielded: a cancelled caller must not leave the generator half-closed with its slot freed.
                await asyncio.shield(self._close_async())
                return
            if self._pump_done is None:
                close_quietly(self._gen)  # never started: close it here, nothing runs it
            else:
                self._stop = True
                self._want.release()  # wake the thread if it waits for a request
                await asyncio.shield(self._pump_done)
        except asyncio.CancelledError:
            if self._pump_done is not None and not self._pump_done.done():
                self._pump_done.add_done_callback(lambda _: self._finish())
            raise
        self._finish()

    async def _close_async(self) -> None:
        try:
            await self._gen.aclose()
        finally:
            self._finish()

    def _finish(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.elapsed = time.perf_counter() - self._started
        self._on_close(self)
