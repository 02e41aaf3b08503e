"""Capture what one thread prints or logs, line by line, while passing it through.

Used around ``load()``: the load view shows the last lines; output still goes
where it always went. Only the thread that runs load is captured, so other
cells printing meanwhile (a background load) are left alone.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import threading
from typing import Callable, Iterator

__all__ = ["capture_lines"]

LineSink = Callable[[str, str], None]  # (source: stdout|stderr|log, line)


class _Tee(io.TextIOBase):
    def __init__(self, target, source: str, sink: LineSink, thread: int) -> None:
        self._target, self._source, self._sink, self._thread = target, source, sink, thread
        self._partial = ""

    def write(self, text: str) -> int:
        if threading.get_ident() == self._thread:
            lines = (self._partial + text).split("\n")
            self._partial = lines.pop()
            for line in lines:
                self._sink(self._source, line)
        return self._target.write(text)

    def flush(self) -> None:
        self._target.flush()

    def finish(self) -> None:
        if self._partial:
            self._sink(self._source, self._partial)
            self._partial = ""

    def __getattr__(self, name: str):  # fileno, encoding, isatty ... of the real stream
        return getattr(self._target, name)


class _Handler(logging.Handler):
    def __init__(self, sink: LineSink, thread: int) -> None:
        super().__init__()
        self._sink, self._thread = sink, thread
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self._thread:
            for line in self.format(record).splitlines():
                self._sink("log", line)


@contextlib.contextmanager
def capture_lines(sink: LineSink) -> Iterator[None]:
    """Send every line this thread writes to stdout/stderr or logs to ``sink`` too."""
    thread = threading.get_ident()
    out, err = _Tee(sys.stdout, "stdout", sink, thread), _Tee(sys.stderr, "stderr", sink, thread)
    handler = _Handler(sink, thread)
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        # Only put the streams back if nobody replaced them meanwhile.
        if sys.stdout is out:
            sys.stdout = saved[0]
        if sys.stderr is err:
            sys.stderr = saved[1]
        out.finish()
        err.finish()
