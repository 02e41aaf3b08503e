"""Capture what one thread prints or logs, line by line.

Used around ``load()``: the load view shows the lines. Only the thread that runs
load is captured, so other cells printing meanwhile are left alone. With
``echo`` the lines also go where they would have gone anyway (the cell's output,
the loggers' own handlers); without it (a view shows them) printed lines show
only in the view, so each line shows exactly once.
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
    def __init__(self, target, source: str, sink: LineSink, thread: int, echo: bool,
                 redact: Callable[[str], str]) -> None:
        self._target, self._source, self._sink, self._thread, self._echo = target, source, sink, thread, echo
        self._redact = redact
        self._partial = ""

    def write(self, text: str) -> int:
        if threading.get_ident() != self._thread:
            return self._target.write(text)
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._sink(self._source, self._redact(line))
        if self._echo:
            self._target.write(self._redact(text))
        return len(text)

    def flush(self) -> None:
        self._target.flush()

    def finish(self) -> None:
        if self._partial:
            self._sink(self._source, self._redact(self._partial))
            self._partial = ""

    def __getattr__(self, name: str):  # fileno, encoding, isatty ... of the real stream
        return getattr(self._target, name)


class _Handler(logging.Handler):
    def __init__(self, sink: LineSink, thread: int, echo: bool, redact: Callable[[str], str]) -> None:
        super().__init__()
        self._sink, self._thread, self._echo, self._redact = sink, thread, echo, redact
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self._thread:
            return
        for line in self.format(record).splitlines():
            self._sink("log", self._redact(line))
        # Being on the root logger, this handler turns off Python's last-resort handler (which
        # prints warnings when nothing else would): do its job, or the record would vanish.
        if self._echo and not _handled_elsewhere(record, self) and record.levelno >= logging.lastResort.level:
            logging.lastResort.handle(record)


def _handled_elsewhere(record: logging.LogRecord, ours: logging.Handler) -> bool:
    logger = logging.getLogger(record.name)
    while logger is not None:
        if any(h is not ours for h in logger.handlers):
            return True
        if not logger.propagate:
            return False
        logger = logger.parent
    return False


@contextlib.contextmanager
def capture_lines(sink: LineSink, *, echo: bool = True,
                  redact: Callable[[str], str] = lambda text: text) -> Iterator[None]:
    """Send every line this thread writes to stdout/stderr or logs to ``sink`` (and, with ``echo``, on),
    each passed through ``redact`` first (secret values never reach an output)."""
    thread = threading.get_ident()
    out = _Tee(sys.stdout, "stdout", sink, thread, echo, redact)
    err = _Tee(sys.stderr, "stderr", sink, thread, echo, redact)
    handler = _Handler(sink, thread, echo, redact)
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
