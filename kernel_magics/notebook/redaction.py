"""Keep secret values out of what the kernel sends for an error, and out of log records.

Jupyter saves an error as ``ename``, ``evalue = str(exc)`` and the rendered traceback. ipykernel
builds the iopub ``error`` message (what a notebook saves) in ``ZMQInteractiveShell._showtraceback``
and the execute reply from the cell's ``ExecutionResult`` after ``post_run_cell``; IPython prints a
``UsageError`` in ``show_usage_error``; IPython 9 keeps each error for ``%notebook`` (which writes an
.ipynb) through ``_format_exception_for_storage``. Rewriting an exception's string arguments cannot reach a
secret held in a dict, a tuple, bytes, an ``OSError`` filename or a custom ``__str__``, so the text
is redacted at those four points, for every error the kernel shows once kernel_magics is loaded
(a secret is as secret in a user's own cell as in a magic's). Log records are redacted when they are
made, so a handler the notebook configured (``logging.basicConfig``) writes them redacted too; what
the kernel's stdout and stderr are given, and what IPython's display formatter makes of a displayed
object or a cell's result, are redacted before they are sent.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Callable, Iterator

from ..core.secrets import redact_log_records

__all__ = ["install"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _Redaction:
    """One per shell: the hooks call whichever redaction the latest %load_ext installed."""

    def __init__(self, redact: Callable[[str], str]) -> None:
        self.redact = redact

    def text(self, text: str) -> str:
        return self.redact(text)

    def line(self, line: str) -> str:
        """A traceback line; where colours split a secret, the line loses its colours."""
        clean = self.redact(line)
        if clean == line and "\x1b" in line:
            plain = _ANSI.sub("", line)
            redacted = self.redact(plain)
            if redacted != plain:
                return redacted
        return clean

    def stand_in(self, exc: BaseException) -> Any:
        """``exc`` itself when its name and text hold no secret, else an exception of the same name
        whose text is redacted (what the execute reply reads)."""
        text, name = _text_of(exc), type(exc).__name__
        clean, clean_name = self.redact(text), self.redact(name)
        if clean == text and clean_name == name:
            return exc
        try:  # a subclass keeps isinstance checks of later hooks true
            cls = type(clean_name, (type(exc),), {"__str__": lambda self: clean, "__module__": type(exc).__module__})
            return cls.__new__(cls)
        except Exception:
            return type(clean_name, (Exception,), {"__str__": lambda self: clean})()


def _text_of(exc: Any) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__} object>"


def install(shell: Any, redact: Callable[[str], str]) -> None:
    """Redact with ``redact`` every error ``shell`` sends or prints, every log record, what its output
    streams are given and every displayed object's data."""
    current = getattr(shell, "_kernel_magics_redaction", None)
    if current is not None:  # %reload_ext: the hooks stay, the new session's secrets count
        current.redact = redact
        return
    redaction = _Redaction(redact)
    shell._kernel_magics_redaction = redaction
    show_traceback, show_usage_error = shell._showtraceback, shell.show_usage_error

    def _showtraceback(etype: type, evalue: Any, stb: Any) -> Any:
        # ipykernel sends str(evalue) and etype.__name__: give it the redacted text and name.
        shown = redaction.stand_in(evalue) if isinstance(evalue, BaseException) else evalue
        return show_traceback(type(shown) if shown is not evalue else etype, redaction.text(_text_of(shown)),
                              [redaction.line(line) for line in (stb or [])])

    def _show_usage_error(exc: Any) -> Any:
        return show_usage_error(redaction.text(_text_of(exc)))

    def _redact_result(result: Any) -> None:
        for attribute in ("error_before_exec", "error_in_exec"):
            exc = getattr(result, attribute, None)
            if isinstance(exc, BaseException):
                setattr(result, attribute, redaction.stand_in(exc))

    shell._showtraceback = _showtraceback
    shell.show_usage_error = _show_usage_error
    store = getattr(shell, "_format_exception_for_storage", None)
    if store is not None:  # IPython 9 keeps each error for %notebook, which writes them into an .ipynb
        def _format_exception_for_storage(exception: BaseException, *args: Any, **kwargs: Any) -> dict:
            stored = store(exception, *args, **kwargs)
            return {**stored, "ename": redaction.text(str(stored.get("ename", ""))),
                    "evalue": redaction.text(str(stored.get("evalue", ""))),
                    "traceback": [redaction.line(line) for line in stored.get("traceback") or []]}

        shell._format_exception_for_storage = _format_exception_for_storage
    shell.events.register("post_run_cell", _redact_result)
    redact_log_records(lambda text: redaction.redact(text))
    for stream in (sys.stdout, sys.stderr):
        _redact_writes(stream, redaction)
    formatter = getattr(shell, "display_formatter", None)
    if formatter is not None:  # every displayed object and cell result (Out[n]), as each mime type's data
        shown = formatter.format

        def format(obj: Any, *args: Any, **kwargs: Any) -> Any:
            data, metadata = shown(obj, *args, **kwargs)
            return _redact_data(data, redaction), metadata

        format._kernel_magics = getattr(shown, "_kernel_magics", False)  # the result hider's mark, kept
        formatter.format = format


def _redact_data(data: Any, redaction: _Redaction) -> Any:
    if isinstance(data, str):
        return redaction.text(data)
    if isinstance(data, dict):
        return {key: _redact_data(value, redaction) for key, value in data.items()}
    if isinstance(data, list):
        return [_redact_data(value, redaction) for value in data]
    return data


def _redact_writes(stream: Any, redaction: _Redaction) -> None:
    """What the model (or any code) prints, redacted as ipykernel sends it: its output stream class hands
    each buffered stretch of text to the send through ``_flush_buffers`` (a secret written in pieces
    between two sends is caught whole). ``write`` itself cannot be wrapped: IPython 9 sets its own on
    the stream for every cell and then puts back the one it found."""
    cls = type(stream)
    flush_buffers = getattr(cls, "_flush_buffers", None)
    if not cls.__module__.startswith("ipykernel.") or flush_buffers is None or \
            getattr(flush_buffers, "_kernel_magics", False):
        return

    def redacted_flush_buffers(self: Any) -> Iterator[tuple[Any, Any]]:
        for parent, data in flush_buffers(self):
            yield parent, redaction.text(data) if isinstance(data, str) else data

    redacted_flush_buffers._kernel_magics = True
    cls._flush_buffers = redacted_flush_buffers
