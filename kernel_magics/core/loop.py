"""One long-lived asyncio loop in a daemon thread, for callers that are not async.

The kernel's shell thread cannot await (a magic is a plain function called
while the kernel's own loop is blocked on the cell), so async model code runs
here instead: always on the same loop, so objects a model binds to its loop
keep working from one predict to the next, and a server started from the
notebook can share it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any, Coroutine, Optional

__all__ = ["BackgroundLoop"]


class BackgroundLoop:
    """Run coroutines on a private event loop thread and wait for them."""

    def __init__(self, name: str = "kernel-magics-loop") -> None:
        self._name = name
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop, started on first use."""
        with self._lock:
            if self._loop is None or not self._thread.is_alive():
                self._loop = asyncio.new_event_loop()
                ready = threading.Event()
                self._thread = threading.Thread(
                    target=self._serve, args=(self._loop, ready), name=self._name, daemon=True
                )
                self._thread.start()
                ready.wait()
            return self._loop

    @staticmethod
    def _serve(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        loop.run_forever()

    def submit(self, coro: Coroutine) -> concurrent.futures.Future:
        """Schedule ``coro``; the caller's contextvars go with it (ipykernel routes output by them)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine, *, cancel_grace: float = 5.0) -> Any:
        """Run ``coro`` to completion and return its result.

        A KeyboardInterrupt (a kernel interrupt) cancels the coroutine, waits up
        to ``cancel_grace`` seconds for its clean-up (generators closed, slots
        released), then re-raises.
        """
        future = self.submit(coro)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()
            try:
                future.result(timeout=cancel_grace)
            except BaseException:
                pass
            raise

    def stop(self) -> None:
        with self._lock:
            if self._loop is not None and self._thread.is_alive():
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=5)
            self._loop = None
