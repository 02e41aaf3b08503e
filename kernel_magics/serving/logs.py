"""One format for every line the servers log, written off the event loop, with secrets redacted.

uvicorn's own loggers, ours, and the model's (the root logger, what ``logging`` in ``load()`` or
``predict()`` writes) all go through one queue: the request path only hands a record over, and a
listener thread formats it (plain text for a terminal, or JSON lines as Truss's server writes),
replaces every secret value in it and writes it. An access line is not even a record: on the
server's event loop it joins a burst that the loop makes into lines a tenth of a second later, all
at once, and hands to the writer as one text (``access_line``); the writer only writes it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import contextvars
import copy
import json
import logging
import logging.handlers
import queue
import sys
import threading
import time
import traceback
import weakref
from typing import Callable, Optional

from ..core.secrets import printable

__all__ = ["access_line", "configure", "flush_access_lines", "JsonLines", "LEVELS", "REQUEST_ID", "redact_logs_of", "ACCESS_LOGGER"]

LEVELS = ("debug", "info", "warning", "error")
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ACCESS_LOGGER = "kernel_magics.access"
# An access line's message (as uvicorn's and Truss's: method, path, status, then ours: milliseconds and the id).
_ACCESS_FORMAT = "Handled request - %s %s %d (%.1f ms) request_id=%s"

# The request a log record belongs to (set by the server for each request; the model's own
# lines in predict() carry it too, as Truss's carry x-baseten-request-id).
REQUEST_ID: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("km_request_id", default=None)


class _Seconds:
    """``strftime`` of a record's second, made once a second (it was a sixth of the writer's work)."""

    def __init__(self, fmt: str, convert) -> None:
        self.fmt, self.convert, self.second, self.text = fmt, convert, None, ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self.second:
            self.second, self.text = second, time.strftime(self.fmt, self.convert(second))
        return self.text


def _msecs(created: float) -> int:
    return int((created - int(created)) * 1000)  # as LogRecord computes its msecs


class _Text(logging.Formatter):
    """logging's own text format, its time made once a second."""

    def __init__(self) -> None:
        super().__init__(_TEXT)
        self._seconds = _Seconds(self.default_time_format, self.converter)

    def formatTime(self, record: logging.LogRecord, datefmt: Optional[str] = None) -> str:
        return self.default_msec_format % (self._seconds(record.created), record.msecs)

    def access(self, created: float, message: str, request_id: Optional[str]) -> str:
        """An access line as ``format`` writes its record, without making the record."""
        return f"{self._seconds(created)},{_msecs(created):03d} INFO {ACCESS_LOGGER}: {message}"

    def access_lines(self, items: list) -> list:
        """``access`` of each access tuple (``_ACCESS_FORMAT`` and all) as one f-string, the second's text made
        once a second: 1.35 us a line against 1.74 us for ``access`` with its message (benchmarks/README.md)."""
        seconds, lines, second, stamp = self._seconds, [], None, ""
        for created, _, (method, path, status, ms, request_id) in items:
            if int(created) != second:
                second = int(created)
                stamp = seconds(created)
            lines.append(f"{stamp},{int((created - second) * 1000):03d} INFO {ACCESS_LOGGER}: Handled request - "
                         f"{method} {path} {status:d} ({ms:.1f} ms) request_id={request_id}")
        return lines


class JsonLines(logging.Formatter):
    """One JSON object a line: time, level, logger, message, request id and traceback when there are."""

    def __init__(self) -> None:
        super().__init__()
        self._seconds = _Seconds("%Y-%m-%dT%H:%M:%S", time.gmtime)

    def access(self, created: float, message: str, request_id: Optional[str]) -> str:
        """An access line as ``format`` writes its record, without making the record."""
        entry = {"time": self._seconds(created) + f".{_msecs(created):03d}Z", "level": "INFO", "logger": ACCESS_LOGGER,
                 "message": message}
        if request_id:
            entry["request_id"] = request_id
        return json.dumps(entry, ensure_ascii=False)

    def access_lines(self, items: list) -> list:
        """``access`` of each access tuple."""
        return [self.access(created, _ACCESS_FORMAT % args, request_id) for created, request_id, args in items]

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self._seconds(record.created) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["traceback"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)


class _RedactSecrets(logging.Filter):
    """Every line goes out with the secret values of the served hosts replaced (the host's own
    redaction, core/secrets.py: the transformed forms it knows are covered too)."""

    def __init__(self) -> None:
        super().__init__()
        self._hosts: list[weakref.ref] = []
        self._burst: Optional[list] = None

    def add(self, host) -> None:
        self._hosts = [ref for ref in self._hosts if ref() is not None] + [weakref.ref(host)]

    def _scanners(self) -> list:
        # Each call reads the secrets as they are now (a rotated secret is redacted from its next line on).
        hosts = [h for ref in self._hosts if (h := ref()) is not None]
        return [scanner for host in hosts if (scanner := host.secrets.scanner())]

    @contextlib.contextmanager
    def burst(self):
        """The writer's lines of one burst share one reading of the secrets (a reading resolves every
        secret, files included: per line it cost more than the line)."""
        self._burst = self._scanners()
        try:
            yield
        finally:
            self._burst = None

    def _current(self) -> list:
        return self._burst if self._burst is not None else self._scanners()

    def text(self, text: str) -> str:
        for scanner in self._current():
            text = scanner.redact(text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        scanners = self._current()
        if not scanners:
            return True
        text = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        tb = record.exc_text
        request_id = getattr(record, "request_id", None)
        for scanner in scanners:
            text = scanner.redact(text)
            tb = scanner.redact(tb) if tb else tb
            request_id = scanner.redact(request_id) if request_id else request_id
        record.msg, record.args, record.exc_info, record.exc_text = text, (), None, tb
        if request_id:
            record.request_id = request_id  # the caller's x-baseten-request-id: it could hold anything
        return True


_REDACT = _RedactSecrets()
# Loggers that may write elsewhere than our handler (a kernel's own logging set-up, %model_serve).
_OWN_LOGGERS = ("kernel_magics.server", ACCESS_LOGGER, "uvicorn.error", "uvicorn.access", "uvicorn")
for _name in _OWN_LOGGERS:
    logging.getLogger(_name).addFilter(_REDACT)


def redact_logs_of(host) -> None:
    """Every server log line from now on has ``host``'s secret values replaced (a Ray replica's host
    exists only after its app does, so the replica calls this itself)."""
    _REDACT.add(host)


class _HandOff(logging.handlers.QueueHandler):
    """Hands a record to the writer thread. The message is fixed here (its arguments may change
    after this call), except for access records, whose arguments cannot."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = copy.copy(record)
        record.request_id = REQUEST_ID.get()
        if record.name != ACCESS_LOGGER:
            record.msg, record.args = record.getMessage(), None
            if record.exc_info:
                record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip()
                record.exc_info = None
        return record


_access = logging.getLogger(ACCESS_LOGGER)
_parent = logging.getLogger(ACCESS_LOGGER.rsplit(".", 1)[0])
_root = logging.getLogger()


def _broken_line() -> None:
    with contextlib.suppress(Exception):
        sys.stderr.write("kernel-magics: a log line could not be written:\n" + traceback.format_exc(limit=3))


class _Writer(threading.Thread):
    """The writer thread: writes the access lines an event loop made (one text per burst) at once;
    other records (and access tuples from outside a loop) it gathers for ``GATHER`` seconds,
    redacts and formats, and writes with one write.

    Why bursts: a thread that woke for every line would take the GIL from the event loop a
    thousand times a second under load, and each handover costs the loop more than the line
    itself (measured: a writer per line cost echo at concurrency 32 a third of its requests)."""

    GATHER = 0.01
    _STOP = object()

    def __init__(self, records: queue.SimpleQueue, handler: logging.Handler) -> None:
        super().__init__(name="kernel-magics-log-writer", daemon=True)
        self.records, self.handler = records, handler
        # Access lines made without records: the format knows how, and nothing but the redaction filters them.
        self.fast = (hasattr(handler.formatter, "access") and handler.level <= logging.INFO
                     and len(handler.filters) == 1)

    def access_text(self, items: list) -> str:
        """Access lines from their tuples, redacted, one text (a burst of them: the secrets read once, or not at
        all inside the writer's own burst, which has read them)."""
        formatter, made = self.handler.formatter, []
        try:
            scanners = _REDACT._current()
        except Exception:  # reading the secrets failed: the lines are not written unredacted
            _broken_line()
            return ""
        if not scanners:  # (no secrets to redact: the lines made in one go)
            try:
                return "\n".join(formatter.access_lines(items))
            except Exception:  # a line that cannot be made: each on its own below, so the others are written
                pass
        for created, request_id, args in items:
            try:
                message = _ACCESS_FORMAT % args
                for scanner in scanners:
                    message = scanner.redact(message)
                    request_id = scanner.redact(request_id) if request_id else request_id
                made.append(formatter.access(created, message, request_id))
            except Exception:  # a line that cannot be made must not stop the rest
                _broken_line()
        return "\n".join(made)

    def run(self) -> None:
        records, more = self.records, True
        fast = self.fast
        while more:
            burst = [records.get()]
            if burst[0] is not self._STOP and type(burst[0]) is not _MadeLines:  # (made lines are a burst)
                time.sleep(self.GATHER)
            while True:
                try:
                    burst.append(records.get_nowait())
                except queue.Empty:
                    break
            lines = []
            try:
                with _REDACT.burst():
                    for item in burst:
                        if item is self._STOP:
                            more = False
                            continue
                        try:
                            if type(item) is _MadeLines:
                                lines.append(item)
                                continue
                            if type(item) is tuple and fast:  # an access line: no record made (a third of the work)
                                text = self.access_text([item])
                                if text:
                                    lines.append(text)
                                continue
                            record = self._record(item)
                            if record.levelno >= self.handler.level and self.handler.filter(record):
                                lines.append(self.handler.format(record))
                        except Exception:  # a line that cannot be made must not stop the writer (nor the rest)
                            _broken_line()
            except Exception:  # reading the secrets failed: the lines are not written unredacted
                _broken_line()
            if lines:
                stream = self.handler.stream
                try:
                    stream.write("\n".join(lines) + "\n")
                    stream.flush()
                except (OSError, ValueError):  # stderr closed or gone: nothing left to tell
                    pass

    @staticmethod
    def _record(item) -> logging.LogRecord:
        if type(item) is not tuple:
            return item
        created, request_id, args = item
        record = _access.makeRecord(ACCESS_LOGGER, logging.INFO, __file__, 0, _ACCESS_FORMAT, args, None)
        record.created, record.msecs = created, _msecs(created) + 0.0
        record.request_id = request_id
        return record

    def stop(self) -> None:
        self.records.put_nowait(self._STOP)
        self.join(10)


_listener: Optional[_Writer] = None
_records: Optional[queue.SimpleQueue] = None


def access_line(method: str, path: str, status: int, ms: float, request_id: str) -> None:
    """The access line of one request. On an event loop (the server's request path), the line joins
    the loop's burst: a list append; ``_LOOP_GATHER`` after the burst began the loop makes its lines
    and hands them to the writer thread as one text (an access line may so follow a model's line
    logged after it; its time is the request's). Elsewhere, with the writer running, it is one tuple
    put; otherwise (a server in a process that configured its own logging) an ordinary ``info``
    call. Whether the access logger is on, and goes nowhere but to our writer, is asked when a burst
    opens, for all its lines: a change to its level or handlers holds from the next burst on."""
    if not path.isprintable():  # (%0A, %1B, %00 in a URL: one request, one line, no terminal escapes, no NULs)
        path = printable(path)
    burst = _burst
    lines = burst.lines
    # (asyncio._get_running_loop: None where no loop runs, where get_running_loop raises)
    if lines is None or _records is None or burst.loop is not asyncio._get_running_loop():
        if not _access.isEnabledFor(logging.INFO):  # (here, not in _open_burst: --log-level warning's every request)
            return
        lines = _open_burst(method, path, status, ms, request_id)
        if lines is None:  # (the line went another way)
            return
    lines.append((time.time(), request_id, (method, path, status, ms, request_id)))


def _open_burst(method: str, path: str, status: int, ms: float, request_id: str) -> Optional[list]:
    """A burst opened on this thread's event loop for the line and those after it, or None when the line went
    another way: an ordinary record, or a tuple for the writer."""
    records = _records
    if records is None or not _only_our_writer():
        _access.info(_ACCESS_FORMAT, method, path, status, ms, request_id)
        return None
    loop, listener = asyncio._get_running_loop(), _listener
    if loop is None or listener is None or not listener.fast:  # no event loop in this thread, or lines not made
        records.put_nowait((time.time(), request_id, (method, path, status, ms, request_id)))
        return None
    burst = _burst  # (a burst belongs to its loop: one that closed left it)
    burst.loop, burst.lines = loop, []
    _open_bursts.append(burst.lines)
    loop.call_later(_LOOP_GATHER, _hand_over, burst.lines)
    return burst.lines


class _Burst(threading.local):
    """The access lines this thread's event loop has gathered since its burst began (None: no burst open)."""

    loop: Optional[asyncio.AbstractEventLoop] = None
    lines: Optional[list] = None


# Why the loop makes its own access lines, and hands them over ten times a second: each time the writer
# thread woke (a hundred times a second under load) it took the GIL from the event loop and from the
# threads running sync predicts, for as long as it made the burst's lines, and the hand-overs cost the
# server more than the lines (perf trace, echo at concurrency 32: eight futex calls per burst in the
# writer, one more in the loop for every two requests; benchmarks/README.md, "the serving edge",
# session of 2026-12-02 (fourth)). Made on the loop a line costs a few microseconds (and the secrets are
# read once per burst: with --secrets-dir, a small file each); the writer wakes once per burst, to write
# one text, and holds the GIL for a moment.
_LOOP_GATHER = 0.1
_burst = _Burst()
_open_bursts: list = []  # every burst not handed over yet: flush_access_lines() and stop() hand them over
# A burst is taken once: by its loop's timer, or by flush_access_lines() (the server's shutdown, stop()), which
# may run in another thread. Reentrant: stop() also runs from a signal handler, on the thread that may hold it.
_taking = threading.RLock()


class _MadeLines(str):
    """Lines already made, redacted and joined: an event loop's burst of access lines, for the writer."""


def _hand_over(lines: list) -> None:
    """The burst's lines, redacted and formatted, to the writer as one text (or written at once, when the writer
    stopped meanwhile): on the loop ``_LOOP_GATHER`` after the burst began, or from flush_access_lines()."""
    if _burst.lines is lines:
        _burst.lines = None
    with _taking:  # the loop may still add to the burst meanwhile (at its end): the lines taken go, the rest stay
        with contextlib.suppress(ValueError):
            _open_bursts.remove(lines)
        items = lines[:]
        del lines[:len(items)]
    if not items:
        return
    listener, records = _listener, _records
    if listener is None or records is None:  # stopped meanwhile: as stop() leaves lines, written at once
        for item in items:
            try:
                logging.getLogger(ACCESS_LOGGER).handle(_Writer._record(item))
            except Exception:  # (a timer's callback or the server's shutdown: nothing to raise into)
                _broken_line()
        return
    text = listener.access_text(items)
    if text:
        records.put_nowait(_MadeLines(text))


def flush_access_lines() -> None:
    """Hand every open burst of access lines to the writer now (a server shutting down: its last lines
    go out before the lines that say it stopped)."""
    for lines in list(_open_bursts):
        _hand_over(lines)


def _only_our_writer() -> bool:
    """True while a line of the access logger goes nowhere but to our writer (no filter or handler was
    added since ``configure`` on its way to the root: those get the line as an ordinary record)."""
    return (not _access.filters and not _access.handlers and _access.propagate and not _parent.filters
            and not _parent.handlers and _parent.propagate and len(_root.handlers) == 1
            and type(_root.handlers[0]) is _HandOff and not _root.filters)


def configure(level: str = "info", fmt: str = "text") -> Callable[[], None]:
    """Route the root, uvicorn and our loggers through one queue to stderr, in one format, at
    ``level``; returns a function that writes out what is queued and stops the writer."""
    global _listener, _records
    stop()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if fmt == "json" else _Text())
    handler.addFilter(_REDACT)
    records: queue.SimpleQueue = queue.SimpleQueue()
    _listener = _Writer(records, handler)
    _listener.start()
    _records = records
    root = logging.getLogger()
    root.handlers[:] = [_HandOff(records)]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    for name in _OWN_LOGGERS:
        # The writer's filter redacts every line, off the loop: none is needed on the way in.
        logging.getLogger(name).removeFilter(_REDACT)
    return stop


def stop() -> None:
    """Write out every queued line, then stop the writer thread (idempotent)."""
    global _listener, _records
    if _listener is not None:
        flush_access_lines()  # bursts whose loop has not handed them over (a loop closed meanwhile)
    listener, _listener, _records = _listener, None, None
    if listener is not None:
        listener.stop()
        # Lines after this (a model's last words at exit, a request racing the shutdown) are written at once,
        # in the same format, redacted, instead of going to a queue nobody reads.
        root = logging.getLogger()
        root.handlers[:] = [h if not isinstance(h, _HandOff) else listener.handler for h in root.handlers]
        sys.stderr.flush()


atexit.register(stop)
