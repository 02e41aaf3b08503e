"""Bounds on what one client may make the server hold: request head size and header count, body size.

Truss's server runs uvicorn on h11, which refuses a request head past 16 KiB (its
``h11_max_incomplete_event_size``). We run httptools (about twice the speed), which has no bound
of its own: a client could send megabytes of unfinished headers on each of many connections.
This protocol counts the head's bytes as they arrive and refuses, as h11 does, past the same size.
"""

from __future__ import annotations

import logging

__all__ = ["HEAD_LIMIT", "MAX_HEADERS", "DEFAULT_MAX_BODY", "http_protocol"]

HEAD_LIMIT = 16 * 1024  # request line and headers, as h11 bounds them under Truss's server
MAX_HEADERS = 100
DEFAULT_MAX_BODY = 100 * 2**20  # Truss's own cap on a websocket message; ample for JSON inputs

log = logging.getLogger("kernel_magics.server")


class _HeadTooLarge(Exception):
    pass


def http_protocol():
    """The uvicorn protocol class to serve with (httptools, bounded), or "h11" without httptools."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # uvicorn without [standard]: h11, bounded by h11_max_incomplete_event_size
        return "h11"

    class BoundedHttpTools(HttpToolsProtocol):
        _raw = 0  # bytes received since the head began, while it is unfinished
        _parsed = 0  # bytes of the request line and headers parsed
        _count = 0
        _in_head = True

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                self._raw += len(data)
            super().data_received(data)
            if self._in_head and self._raw > HEAD_LIMIT and not self.transport.is_closing():
                # Still no end of the headers after 16 KiB: refuse before holding more of it.
                log.warning("Refused a request whose headers were not done after %d bytes.", HEAD_LIMIT)
                self.send_400_response("Invalid HTTP request received.")

        def on_message_begin(self) -> None:
            self._parsed, self._count = 0, 0
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            self._add(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count += 1
            self._add(len(name) + len(value) + 4)
            if self._count > MAX_HEADERS:
                log.warning("Refused a request with more than %d headers.", MAX_HEADERS)
                raise _HeadTooLarge()  # httptools stops; uvicorn answers 400 and closes
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_head, self._raw = False, 0
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_head = True
            super().on_message_complete()

        def _add(self, n: int) -> None:
            self._parsed += n
            if self._parsed > HEAD_LIMIT:
                log.warning("Refused a request whose headers are larger than %d bytes.", HEAD_LIMIT)
                raise _HeadTooLarge()

    return BoundedHttpTools
