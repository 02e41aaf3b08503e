"""Consume a streaming prediction while a display shows it, at almost no cost.

The consumer keeps every chunk in a list and hands the new ones to a sink (a
widget, or plain text) at most ``rate`` times a second.
So per chunk the stream pays one ``list.append`` and one flag check, whatever
the display does, and the frontend gets a bounded number of small messages
(deltas), then the full output once at the end.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

from ..core.runtime import ChunkStream
from ..core.streams import ChunkText
from ..core.tracebacks import trim_traceback

__all__ = ["StreamStats", "StreamSink", "StreamConsumer", "chunk_text"]

_END = object()


@dataclass(frozen=True)
class StreamStats:
    chunks: int
    first_chunk_seconds: Optional[float]
    elapsed_seconds: float

    @property
    def chunks_per_second(self) -> float:
        return self.chunks / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"chunks": self.chunks, "first_chunk_ms": None if self.first_chunk_seconds is None
                else round(self.first_chunk_seconds * 1000, 1),
                "elapsed_s": round(self.elapsed_seconds, 3), "chunks_per_s": round(self.chunks_per_second, 1)}

    def describe(self) -> str:
        first = "no chunks" if self.first_chunk_seconds is None else f"first after {self.first_chunk_seconds * 1000:.0f} ms"
        return (f"{self.chunks} chunks in {self.elapsed_seconds:.2f} s "
                f"({self.chunks_per_second:.0f} chunks/s, {first})")


class StreamSink(Protocol):
    """Where the chunks are shown. ``update`` runs on the ticker thread."""

    def update(self, text: str, stats: StreamStats) -> None: ...

    def finish(self, text: str, stats: StreamStats, outcome: str, error: Optional[str]) -> None: ...


def chunk_text(chunks: list) -> str:
    """The chunks as a reader of the server's stream sees them (core/streams.py's wire form)."""
    return ChunkText.of(chunks)


class StreamConsumer:
    """Drains one ChunkStream into ``chunks``; stoppable from any thread.

    Flushing to the sink happens in the consuming thread when it checks its one
    flag after a chunk: a ticker raises the flag every interval, a stop raises it
    too. So a CPU-bound generator never waits on the GIL for a display thread,
    and per chunk the loop costs an append and an attribute check. When the
    generator itself is slow to produce (the flag goes unanswered for an
    interval), the ticker flushes in its place.
    """

    def __init__(self, sink: StreamSink, rate: float = 30.0,
                 describe: Callable[[BaseException], str] = lambda exc: f"{type(exc).__name__}: {exc}") -> None:
        self.sink = sink
        self.describe = describe  # how an error is shown (the host's: secrets redacted)
        self.interval = 1.0 / rate
        self.chunks: list = []
        self.stop_requested = False
        # Raised by the ticker after the first interval, not at once, so the message rate stays
        # within `rate` from the start (the first chunk still shows within one interval).
        self.attention = False
        self.outcome = "running"
        self.error: Optional[BaseException] = None
        self._first: Optional[float] = None
        self._started = time.perf_counter()
        self._sent = 0
        self._flush_lock = threading.Lock()
        self._text = ChunkText()  # the deltas, decoded across flushes: a split character shows once
        self._ticker_done = threading.Event()
        self._ticker: Optional[threading.Thread] = None
        self._task: Optional[asyncio.Task] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    # ------------------------------------------------------------------ control

    def request_stop(self) -> None:
        """Ask the stream to end after the current chunk (the Stop button); any thread."""
        self.stop_requested = True
        self.attention = True
        if self._task is not None and self._loop is not None:
            # An async generator may be waiting for its next chunk: cancel that wait.
            self._loop.call_soon_threadsafe(self._task.cancel)

    def stats(self) -> StreamStats:
        return StreamStats(len(self.chunks), self._first, time.perf_counter() - self._started)

    # ------------------------------------------------------------------ flushing

    def _start_ticker(self) -> None:
        ctx = contextvars.copy_context()  # the display messages belong to the running cell
        self._ticker = threading.Thread(target=ctx.run, args=(self._tick,), name="stream-view", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        unanswered = False
        # The first update comes a little sooner (0.6 of an interval): the first chunk shows
        # fast, and the stream as a whole still sends at most `rate` updates a second.
        wait = self.interval * 0.6
        while not self._ticker_done.wait(wait):
            wait = self.interval
            if len(self.chunks) <= self._sent:
                continue
            if unanswered and self.attention:
                self._flush()  # the consumer is inside a slow generator: show what we have
                unanswered = False
            else:
                self.attention, unanswered = True, True

    def _attend(self) -> bool:
        """Called by the consumer when the flag is up; True means stop."""
        if self.stop_requested:
            return True
        self._flush()
        return False

    def _flush(self) -> None:
        if not self._flush_lock.acquire(blocking=False):
            return  # the other thread is flushing right now
        try:
            self.attention = False
            n = len(self.chunks)
            if n > self._sent:
                new = self.chunks[self._sent:n]
                self._sent = n
                self.sink.update(self._text.feed(new), self.stats())
        finally:
            self._flush_lock.release()

    def _finish(self) -> None:
        self._ticker_done.set()
        if self._ticker is not None:
            self._ticker.join()
        shown = self.describe(self.error) if self.error is not None and self.outcome == "error" else None
        self.sink.finish(chunk_text(self.chunks), self.stats(), self.outcome, shown)

    # ------------------------------------------------------------------ consuming

    def consume_sync(self, stream: ChunkStream) -> None:
        """Iterate a sync generator in this thread (no per-chunk thread hop)."""
        self._started = stream.started
        gen = stream.take_sync()
        append = self.chunks.append
        self._start_ticker()
        try:
            first = next(gen, _END)
            if first is not _END:
                self._first = time.perf_counter() - self._started
                append(first)
                if not (self.attention and self._attend()):
                    for chunk in gen:  # the hot loop: one append and one attribute check a chunk
                        append(chunk)
                        if self.attention and self._attend():
                            break
            self.outcome = "stopped" if self.stop_requested else "done"
        except KeyboardInterrupt as exc:
            self.outcome, self.error = "interrupted", exc
        except Exception as exc:
            self.outcome, self.error = "error", trim_traceback(exc)
        finally:
            stream.close_sync(len(self.chunks), self._first)
            self._finish()

    async def consume_async(self, stream: ChunkStream) -> None:
        """Iterate the stream on its loop (async generators live there)."""
        self._started = stream.started
        self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
        append = self.chunks.append
        self._start_ticker()
        try:
            async with stream:
                if not self.stop_requested:
                    async for chunk in stream:
                        if self._first is None:
                            self._first = time.perf_counter() - self._started
                        append(chunk)
                        if self.attention and self._attend():
                            break
            self.outcome = "stopped" if self.stop_requested else "done"
        except asyncio.CancelledError as exc:
            self.outcome = "stopped" if self.stop_requested else "interrupted"
            if not self.stop_requested:
                self.error = exc
        except Exception as exc:
            self.outcome, self.error = "error", trim_traceback(exc)
        finally:
            self._task = None
            self._finish()
