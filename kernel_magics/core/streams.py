"""A streaming prediction as an async iterator: chunks made on demand, closed for real.

``ChunkStream`` wraps the generator a streaming ``predict`` returned. An async
generator is iterated on the loop. A sync generator is advanced one chunk at a
time in a worker thread, as Truss does (``to_thread.run_sync(next, gen)``), and
only on demand: chunk *n+1* is asked for once the consumer has sent chunk *n*. So

- the loop never waits on the GIL for a generator that is computing ahead
  (the first chunk goes out as soon as it exists),
- a slow reader pauses the generator: at most one chunk is ever made but not
  yet sent, whatever the stream's size (backpressure), and
- a stream waiting for its reader holds no thread: 200 slow readers leave the
  pool to the predicts and probes.

``on_close`` runs exactly once, when the generator has really finished or
closed (its ``finally`` has run), never earlier: the predict slot it holds is
freed only then.

:func:`chunk_bytes` is the one wire form of a chunk (the server sends it, the
notebook's view shows it); :class:`ChunkText` decodes those bytes incrementally,
so a character split across chunks shows the same live and joined.
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import contextvars
import inspect
import json
import time
from typing import Any, Callable, Optional

from .serialization import to_jsonable
from .tracebacks import trim_traceback

__all__ = ["ChunkStream", "join_chunks", "close_quietly", "is_stream", "chunk_bytes", "ChunkText"]


def join_chunks(chunks: list) -> Any:
    """What a streamed prediction amounts to, everywhere (notebook, gathered HTTP, replay):
    one string for text chunks (Truss's gathered form), else the JSON list of chunks."""
    if chunks and all(isinstance(c, (str, bytes, bytearray)) for c in chunks):
        return b"".join(c if isinstance(c, (bytes, bytearray)) else c.encode() for c in chunks).decode("utf-8", "replace")
    return to_jsonable(chunks, what="the streamed chunks")


def chunk_bytes(chunk: Any) -> bytes:
    """The bytes of one streamed chunk, as the server sends them and the notebook shows them."""
    if isinstance(chunk, (bytes, bytearray, memoryview)):
        return bytes(chunk)
    if isinstance(chunk, str):
        return chunk.encode()
    # Truss sends only str/bytes chunks; other chunks go out as JSON lines (the notebook warns).
    return (json.dumps(to_jsonable(chunk, what="a streamed chunk", wire=True)) + "\n").encode()


class ChunkText:
    """Chunks to text as a reader of the wire sees them: UTF-8 decoded incrementally, so a
    character whose bytes are split across chunks (or across two deliveries) shows once, whole."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, chunks: list) -> str:
        """The text of ``chunks``, following the ones fed before; an incomplete character waits."""
        if all(isinstance(c, str) for c in chunks) and not self._pending():
            return "".join(chunks)  # the common case: no bytes, nothing held back
        return self._decoder.decode(b"".join(chunk_bytes(c) for c in chunks))

    def finish(self) -> str:
        """What is left at the end (an incomplete character shows as U+FFFD)."""
        return self._decoder.decode(b"", final=True)

    def _pending(self) -> bool:
        return bool(self._decoder.getstate()[0])

    @classmethod
    def of(cls, chunks: list) -> str:
        text = cls()
        return text.feed(chunks) + text.finish()


def is_stream(result: Any) -> bool:
    """What a predict returned is a stream (a generator, sync or async), sent chunk by chunk."""
    return inspect.isgenerator(result) or inspect.isasyncgen(result)


def close_quietly(gen: Any) -> None:
    if inspect.isgenerator(gen):
        try:
            gen.close()
        except Exception:
            pass


_END = object()


class _Raised:
    """What ``next()`` raised in a worker thread, handed back as a value so that the generator's frames come with it:
    a step whose reader had left, read afterwards with ``result()``, raised without them, and a chunk that fails
    after its reader left is logged with them."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _advance(gen: Any) -> Any:
    try:
        return next(gen, _END)
    except Exception as exc:
        return _Raised(exc)


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
        # The one `next(gen)` running in a worker thread, if any: the generator is closed only after it.
        self._step: Optional[asyncio.Future] = None
        self._closer: Optional[asyncio.Future] = None  # closing a sync generator, off the loop
        # What the chunk being made raised after its reader had left (no one else sees it; the server logs it).
        self.late_error: Optional[BaseException] = None
        self._started_sync = False
        self._taken = False  # handed to a caller that iterates it itself (take_sync)
        self.chunks = 0
        self.first_chunk_seconds: Optional[float] = None
        self.elapsed: float = 0.0

    @property
    def is_async(self) -> bool:
        return inspect.isasyncgen(self._gen)

    @property
    def making_chunk(self) -> bool:
        """A ``next()`` of ours is running in a worker thread: the generator cannot be closed before it returns."""
        return self._step is not None and not self._step.done()

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
        if self.is_async or self._started_sync:
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
        except asyncio.CancelledError:
            if self.making_chunk:
                # The reader is gone (a client left, a timeout): it does not wait for the chunk being made. The
                # generator is closed once that next() returns; aclose() waits for that.
                self._start_closing()
            else:
                await self.aclose()
            raise
        except BaseException as exc:
            trim_traceback(exc)
            await self.aclose()
            raise
        self.chunks += 1
        if self.first_chunk_seconds is None:
            self.first_chunk_seconds = time.perf_counter() - self._started
        return chunk

    async def _next_from_thread(self) -> Any:
        # One thread hop a chunk, and no thread at all between chunks: a stream waiting for
        # its reader holds nothing but its generator.
        self._started_sync = True
        ctx = contextvars.copy_context()  # keeps output routed to the calling cell
        try:
            step = self._loop.run_in_executor(self._executor, ctx.run, _advance, self._gen)
        except RuntimeError:  # the pool was shut down: the server is stopping, which cancels this stream
            raise asyncio.CancelledError("the worker threads were let go") from None
        self._step = step
        chunk = await asyncio.shield(step)  # a cancelled reader never leaves next() running unseen
        if chunk is _END:
            raise StopAsyncIteration
        if type(chunk) is _Raised:
            raise chunk.exc
        return chunk

    async def aclose(self) -> None:
        """Stop the generator (its ``finally`` runs); ``on_close`` runs once it has really stopped."""
        if self._closer is not None:
            await asyncio.shield(self._closer)
            return
        if self._closing:
            return
        self._closing = True
        if self.is_async:
            # Shielded: a cancelled caller must not leave the generator half-closed with its slot freed.
            await asyncio.shield(self._close_async())
            return
        if self._nothing_runs_in_it():
            # Closing it runs no code: closed here, without a task or a thread hop (most of what a short stream's
            # end would otherwise cost).
            try:
                close_quietly(self._gen)
            finally:
                self._finish()
            return
        await asyncio.shield(self._start_closing())

    def _start_closing(self) -> asyncio.Future:
        """Close a sync generator off the loop, once; the future is done when ``on_close`` has run."""
        self._closing = True
        if self._closer is None:
            self._closer = asyncio.ensure_future(self._close_sync())
        return self._closer

    def _nothing_runs_in_it(self) -> bool:
        """A generator that ended (ran out, or raised) or never ran, with no next() of ours pending, that no
        caller iterates itself (take_sync): its close() runs none of its code."""
        if self._taken or not inspect.isgenerator(self._gen) or self.making_chunk:
            return False
        return inspect.getgeneratorstate(self._gen) in (inspect.GEN_CREATED, inspect.GEN_CLOSED)

    async def _close_sync(self) -> None:
        try:
            if self.making_chunk:
                # A generator cannot be closed while next() runs in it: wait for that chunk first.
                step = self._step
                await asyncio.wait([step])
                raised = step.result() if not step.cancelled() and step.exception() is None else None
                if type(raised) is _Raised:  # (its reader left before it failed: no one else sees it)
                    self.late_error = trim_traceback(raised.exc)
            # Its `finally` may block (a file, a socket): off the loop, like its chunks.
            # In the closer's context, as each chunk ran in its reader's: what the `finally` logs keeps the request id.
            ctx = contextvars.copy_context()
            try:
                await self._loop.run_in_executor(self._executor, ctx.run, close_quietly, self._gen)
            except RuntimeError:  # the pool was shut down (the server stopped): closed here, on the loop
                ctx.run(close_quietly, self._gen)
        finally:
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
