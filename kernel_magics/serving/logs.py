"""One format for every line the servers log, written off the event loop, with secrets redacted.

uvicorn's own loggers, ours, and the model's (the root logger, what ``logging`` in ``load()`` or
``predict()`` writes) all go through one queue: the request path only hands a record over, and a
listener thread formats it (plain text for a terminal, or JSON lines as Truss's server writes),
replaces every secret value in it and writes it. An access record is not even formatted on the
way in: its arguments are plain strings and numbers.
"""

from __future__ import annotations

import atexit
import contextvars
import copy
import json
import logging
import logging.handlers
import queue
import sys
import time
import traceback
import weakref
from typing import Callable, Optional

__all__ = ["configure", "JsonLines", "LEVELS", "REQUEST_ID", "redact_logs_of", "ACCESS_LOGGER"]

LEVELS = ("debug", "info", "warning", "error")
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ACCESS_LOGGER = "kernel_magics.access"

# The request a log record belongs to (set by the server for each request; the model's own
# lines in predict() carry it too, as Truss's carry x-baseten-request-id).
REQUEST_ID: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("km_request_id", default=None)


class JsonLines(logging.Formatter):
    """One JSON object a line: time, level, logger, message, request id and traceback when there are."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
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

    def add(self, host) -> None:
        self._hosts = [ref for ref in self._hosts if ref() is not None] + [weakref.ref(host)]

    def filter(self, record: logging.LogRecord) -> bool:
        hosts = [h for ref in self._hosts if (h := ref()) is not None]
        if not hosts:
            return True
        text = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        tb = record.exc_text
        for host in hosts:
            text = host.secrets.redact(text)
            tb = host.secrets.redact(tb) if tb else tb
        record.msg, record.args, record.exc_info, record.exc_text = text, (), None, tb
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


_listener: Optional[logging.handlers.QueueListener] = None


def configure(level: str = "info", fmt: str = "text") -> Callable[[], None]:
    """Route the root, uvicorn and our loggers through one queue to stderr, in one format, at
    ``level``; returns a function that writes out what is queued and stops the writer."""
    global _listener
    stop()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if fmt == "json" else logging.Formatter(_TEXT))
    handler.addFilter(_REDACT)
    records: queue.SimpleQueue = queue.SimpleQueue()
    _listener = logging.handlers.QueueListener(records, handler)
    _listener.start()
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
    global _listener
    listener, _listener = _listener, None
    if listener is not None:
        listener.stop()
        sys.stderr.flush()


atexit.register(stop)
