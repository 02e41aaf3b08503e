"""Secret values, resolved at run time and never stored on disk.

Mirrors Truss's ``Secrets`` mapping: names come from the config; values from
values set in memory (``%model_secret``), a mounted secrets directory (one
file per secret, as Truss mounts ``/secrets``) or ``TRUSS_SECRET_<name>``.

A secret is looked for in every form the formats we write give it
(:func:`secret_forms`, :data:`ENCODINGS`): the one redaction every display and
log uses (:meth:`SecretStore.redact`) and the scan that refuses an export or a
%model_show holding a secret (:class:`SecretScanner`) share them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import traceback
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import SecretNotFound

__all__ = ["SecretStore", "SecretScanner", "ENV_PREFIX", "MIN_LENGTH", "ENCODINGS", "printable", "secret_forms",
           "redact_log_records"]

ENV_PREFIX = "TRUSS_SECRET_"
# Shorter values are left alone: replacing them would mangle ordinary text and hide nothing worth hiding.
MIN_LENGTH = 4
# How files hold text: UTF-8 (source, YAML, JSON, pickles), Latin-1 (protocol 0 pickles), UTF-16, and
# UTF-32 (numpy's `<U` arrays in .npy files are UTF-32-LE); both byte orders.
ENCODINGS = ("utf-8", "latin-1", "utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be")
CHUNK_SIZE = 1 << 20  # a file is scanned this many bytes at a time, never read whole


def printable(text: str) -> str:
    """``text`` with each character that does not print (line breaks, tabs, terminal escapes, NULs, U+2028)
    written as its escape (``\\n``, ``\\x1b``, ``\\u2028``), the rest as it is: how the server's log writes what a
    caller sent (a path, a request id), one line each. One of :func:`secret_forms`."""
    if text.isprintable():  # (nearly always: no new string)
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def secret_forms(value: str) -> set[str]:
    """The texts a secret's value becomes where it is written: as is and stripped (a value read from a
    file keeps its trailing newline), and escaped as repr, ascii, JSON and YAML write strings, as the
    server's log writes what a caller sent (:func:`printable`), and as the repr of its UTF-8 bytes.
    Forms shorter than :data:`MIN_LENGTH` are left out."""
    forms: set[str] = set()
    for text in {value, value.strip()}:
        forms.update((
            text,
            printable(text),
            repr(text)[1:-1],
            ascii(text)[1:-1],
            json.dumps(text)[1:-1],
            json.dumps(text, ensure_ascii=False)[1:-1],
            text.replace("'", "''"),  # YAML's single-quoted style
            repr(text.encode("utf-8", "surrogatepass"))[2:-1],
        ))
    return {form for form in forms if len(form) >= MIN_LENGTH}


def _pickle_protocol_0(text: str) -> bytes:
    """How a protocol 0 pickle writes a str (pickle.py's save_str)."""
    for char, escape in (("\\", "\\u005c"), ("\0", "\\u0000"), ("\n", "\\u000a"), ("\r", "\\u000d"),
                         ("\x1a", "\\u001a")):
        text = text.replace(char, escape)
    return text.encode("raw-unicode-escape")


class SecretScanner:
    """Finds any of some secrets' values in text, bytes, files or a folder, in every form and encoding
    they can be written in; says which secret (by name) and where, never the value."""

    def __init__(self, secrets: Mapping[str, str]) -> None:
        """``secrets``: value -> the secret's name."""
        texts: dict[str, str] = {}
        for value, name in secrets.items():
            for form in secret_forms(value):
                texts.setdefault(form, name)
        # Longest first, so a form that contains another is replaced whole.
        self._texts = sorted(texts.items(), key=lambda item: len(item[0]), reverse=True)
        self._pattern = re.compile("|".join(re.escape(t) for t, _ in self._texts)) if texts else None
        # The escaped forms are written by text serializers (source, YAML, JSON), in UTF-8; the value
        # itself may be stored in any encoding.
        found: dict[bytes, str] = {text.encode("utf-8", "surrogatepass"): name for text, name in self._texts}
        for value, name in secrets.items():
            for text in {value, value.strip()}:
                if len(text) < MIN_LENGTH:
                    continue
                found.setdefault(_pickle_protocol_0(text), name)
                for encoding in ENCODINGS:
                    try:
                        found.setdefault(text.encode(encoding), name)
                    except UnicodeEncodeError:
                        continue
        # A pattern holding a shorter one is found by that one: search each byte string once.
        shortest = sorted(found, key=len)
        self._bytes: list[tuple[bytes, str]] = []
        for pattern in shortest:
            if not any(kept in pattern for kept, _ in self._bytes):
                self._bytes.append((pattern, found[pattern]))
        self.overlap = max((len(p) for p, _ in self._bytes), default=1) - 1

    def __bool__(self) -> bool:
        return bool(self._texts)

    def redact(self, text: str) -> str:
        """``text`` with every form of every secret replaced by ``***``."""
        return self._pattern.sub("***", text) if self._pattern is not None and text else text

    def find_in_text(self, text: str) -> Optional[tuple[str, int]]:
        """``(secret name, index)`` of the first secret in ``text``, or None."""
        match = self._pattern.search(text) if self._pattern is not None else None
        if match is None:
            return None
        return dict(self._texts)[match.group()], match.start()

    def find_in_bytes(self, data: bytes) -> Optional[tuple[str, int]]:
        """``(secret name, offset)`` of the first secret in ``data`` in any encoding, or None."""
        best: Optional[tuple[str, int]] = None
        for pattern, name in self._bytes:
            at = data.find(pattern)
            if at >= 0 and (best is None or at < best[1]):
                best = (name, at)
        return best

    def find_in_file(self, path: Path, chunk_size: int = CHUNK_SIZE) -> Optional[tuple[str, int]]:
        """As :meth:`find_in_bytes` over a file, read in chunks that overlap by the longest pattern
        (a large file costs one chunk of memory, never its size)."""
        if not self._bytes:
            return None
        tail, start = b"", 0  # tail: the end of what was read before; start: the file offset of chunk
        with open(path, "rb") as file:
            while chunk := file.read(chunk_size):
                if tail:  # a secret across the seam (the chunk itself is searched without copying it)
                    hit = self.find_in_bytes(tail + chunk[:self.overlap])
                    if hit is not None:
                        return hit[0], start - len(tail) + hit[1]
                hit = self.find_in_bytes(chunk)
                if hit is not None:
                    return hit[0], start + hit[1]
                tail = (tail + chunk)[-self.overlap:] if len(chunk) < self.overlap else chunk[-self.overlap:]
                start += len(chunk)
        return None


class SecretStore(Mapping):
    """A read-only mapping of secret name to value, passed to the model as ``secrets``.

    ``hint`` ends the "no value" message with how to provide one in the current
    adapter (``%model_secret NAME`` in a notebook, ``--secrets-dir`` for a server).
    """

    def __init__(
        self,
        names: Iterable[str] = (),
        *,
        secrets_dir: Optional[Path] = None,
        hint: str = "",
        defaults: Optional[Mapping[str, str]] = None,
    ) -> None:
        self._names = list(dict.fromkeys(names))
        self._overrides: dict[str, str] = {}
        # Values written in a config.yaml made elsewhere: the lowest priority, as in Truss.
        self._defaults: dict[str, str] = dict(defaults or {})
        self._secrets_dir = Path(secrets_dir) if secrets_dir else None
        self._hint = hint
        self._handed_out: dict[str, str] = {}  # value -> name: values given to the model, to scrub from logs
        self._scanner: tuple[Any, SecretScanner] = (None, SecretScanner({}))

    # Names may change when the config cell is re-run; values set in memory stay.
    def set_names(self, names: Iterable[str]) -> None:
        self._names = list(dict.fromkeys(names))

    def set_value(self, name: str, value: str) -> None:
        """Keep a value in memory only (what ``%model_secret`` does)."""
        self._overrides[name] = value

    def source_of(self, name: str) -> Optional[str]:
        """Where the value of ``name`` comes from, or None when it has none. Never the value."""
        if name in self._overrides:
            return "set in this session"
        if self._secrets_dir and (self._secrets_dir / name).is_file():
            return f"file {self._secrets_dir / name}"
        if os.environ.get(ENV_PREFIX + name):
            return f"environment variable {ENV_PREFIX}{name}"
        if self._defaults.get(name):
            return "the default in config.yaml"
        return None

    def __getitem__(self, name: str) -> str:
        if name not in self._names:
            raise SecretNotFound(
                f"Secret '{name}' is not declared in the config. Add `{name}: null` under `secrets:` "
                f"in the config so the deployment knows to provide it."
            )
        value = self._resolve(name)
        if value:
            self._handed_out[value] = name
            return value
        hint = f" {self._hint.format(name=name)}" if self._hint else ""
        raise SecretNotFound(
            f"Secret '{name}' has no value: set the environment variable {ENV_PREFIX}{name}{hint}."
        )

    def _resolve(self, name: str) -> Optional[str]:
        if name in self._overrides:
            return self._overrides[name]
        if self._secrets_dir and (self._secrets_dir / name).is_file():
            return (self._secrets_dir / name).read_text()
        return os.environ.get(ENV_PREFIX + name) or self._defaults.get(name) or None

    def known_values(self) -> dict[str, str]:
        """Every value a secret has or had here, mapped to the secret's name (for redaction and scans;
        never shown). Iterating it gives the values."""
        values = dict(self._handed_out)
        values.update((v, n) for n, v in self._defaults.items() if v)
        values.update((v, n) for n, v in self._overrides.items() if v)
        for name in self._names:
            try:
                value = self._resolve(name)
            except (OSError, UnicodeDecodeError):
                value = None
            if value:
                values[value] = name
        return values

    def scanner(self) -> SecretScanner:
        """A :class:`SecretScanner` for the values known now (rebuilt only when they change)."""
        known = self.known_values()
        key = frozenset(known.items())
        if self._scanner[0] != key:
            self._scanner = (key, SecretScanner(known))
        return self._scanner[1]

    def redact(self, text: str) -> str:
        """``text`` with every secret value replaced by ``***``: the one redaction every display and log uses.

        Every form of a value is replaced (stripped, repr-, JSON- and YAML-escaped: :func:`secret_forms`);
        values shorter than :data:`MIN_LENGTH` characters are left alone.
        """
        return self.scanner().redact(text)

    def held_in(self, *objects: Any) -> Optional[str]:
        """The name of a secret whose value one of ``objects`` holds (as its JSON, or its repr when it
        is not JSON), or None: what must not be recorded or written."""
        scanner = self.scanner()
        if not scanner:
            return None
        for obj in objects:
            try:
                text = json.dumps(obj, ensure_ascii=False, default=repr)
            except (TypeError, ValueError, RecursionError):
                text = repr(obj)
            hit = scanner.find_in_text(text)
            if hit is not None:
                return hit[0]
        return None

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        # Names and whether they are set; values never.
        state = ", ".join(f"{n}: {'set' if self.source_of(n) else 'not set'}" for n in self._names)
        return f"SecretStore({state})"


def redact_log_records(redact: Callable[[str], str]) -> Callable[[], None]:
    """Redact every log record this process makes from now on, before any handler sees it (a handler
    the notebook or a server configured writes the record, not our capture); returns the function that
    stops it. Records are created through :func:`logging.setLogRecordFactory`, so handlers, formatters
    and levels stay as their owners set them; a record's message (and its exception text) is replaced
    only when it holds a secret."""
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: logging reports it when a handler formats the record
            return record
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            clean = redact(text)
            if clean != text:
                record.exc_text = clean  # what Formatter.format prints instead of formatting exc_info
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return record

    logging.setLogRecordFactory(factory)

    def stop() -> None:
        if logging.getLogRecordFactory() is factory:
            logging.setLogRecordFactory(previous)

    return stop
