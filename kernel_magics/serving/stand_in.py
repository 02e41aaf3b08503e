"""A stand-in on the port while Ray starts: liveness answers from the first second, as on the uvicorn engine.

`serve --engine ray` needs seconds before Ray Serve's proxy binds the port (importing and starting Ray,
Serve's controller, the proxy, the replicas). Meanwhile a health check would find the port closed. Serve's
proxy binds its socket with SO_REUSEADDR and SO_REUSEPORT (ray/serve/_private/http_util.py), so this
listener binds the same address first, with both, and answers what our server answers before the model is
loaded (core/routes.py's table: liveness 200 ``true``, the model's routes 503 with Truss's not-ready body, the
router's 404 and 405 elsewhere).

Once the proxy binds beside it, the kernel would spread connections over both, and the proxy answers
404 until our deployment exists. A socket filter of the port's reuseport group (SO_ATTACH_REUSEPORT_CBPF)
keeps every connection on the stand-in except the probes it sends itself (picked by their source port);
when a probe is answered through our deployment (the replica header), the filter sends every new
connection to the proxy, the stand-in answers what it has already accepted and closes: the port is never
closed, and no request meets a stand-in after Ray answers. Without the filter (not Linux), connections are
spread until the hand-over.

`kernel-magics serve` (uvicorn) uses it too, without sharing the port: the CLI binds it before importing
FastAPI, uvicorn and our server (about 0.5 to 1.5 s here), and :meth:`StandIn.release` then hands the listening
socket itself to uvicorn; connections waiting in its backlog are uvicorn's.

Standard library only: it starts before Ray, FastAPI or the model are imported.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import struct
import sys
import threading
import time
import urllib.parse
from typing import Callable, Iterator, Optional

from ..core.routes import ENDPOINT_METHODS, ROUTES
from .limits import HEAD_LIMIT, MAX_HEADERS

__all__ = ["StandIn", "stand_in", "LIVE", "NOT_READY", "STAND_IN_SERVER"]

STAND_IN_SERVER = b"kernel-magics-stand-in"  # its `server` header (uvicorn, ours and Ray's proxy, say "uvicorn")


def _response(status: bytes, body: bytes, headers: tuple = ()) -> bytes:
    lines = [b"HTTP/1.1 " + status, b"content-length: %d" % len(body), *headers, b"server: " + STAND_IN_SERVER,
             b"connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _json(status: bytes, body: dict, headers: tuple = ()) -> bytes:
    return _response(status, json.dumps(body, separators=(",", ":")).encode(),
                     (b"content-type: application/json", *headers))


# What `kernel-magics serve` answers before the model is loaded (serving/server.py's handlers, the
# ModelNotReadyError row of serving/errors.py's table with Truss's x-baseten-error-* headers, and the
# router's own 404/405/307). Written out here because those modules import FastAPI; tests/test_stand_in.py
# holds the two to the same answers, request by request.
LIVE = _response(b"200 OK", b"true", (b"content-type: application/json",))
_NOT_READY_HEADERS = (b"x-baseten-error-source: 04", b"x-baseten-error-code: 600")
NOT_READY = _json(b"503 Service Unavailable", {"error": "Model with name model is not ready."}, _NOT_READY_HEADERS)
_BEFORE_THE_LOAD = {
    "liveness": LIVE,
    "schema": _json(b"503 Service Unavailable", {"error": "Schema not available, please try again later."},
                    _NOT_READY_HEADERS),
    "metrics": None,  # (_no_samples_yet)
    **dict.fromkeys(["readiness", "loaded", "predict", *ENDPOINT_METHODS], NOT_READY),
}


def _no_samples_yet() -> bytes:
    """``/metrics`` before the server runs: Prometheus's format, no samples (its counters start with it)."""
    try:
        from prometheus_client import CONTENT_TYPE_LATEST  # (pure Python; the server imports it anyway)
    except ImportError:
        CONTENT_TYPE_LATEST = "text/plain; version=0.0.4; charset=utf-8"
    return _response(b"200 OK", b"", (b"content-type: " + CONTENT_TYPE_LATEST.encode(),))


NOT_FOUND = _json(b"404 Not Found", {"detail": "Not Found"})
# uvicorn's answer to a head past the bounds of serving/limits.py, or one it cannot parse.
BAD_REQUEST = _response(b"400 Bad Request", b"Invalid HTTP request received.",
                        (b"content-type: text/plain; charset=utf-8",))
# The methods httptools parses (llhttp's list); any other is a bad request before routing.
_METHODS = frozenset(b"DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH "
                     b"SEARCH UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY "
                     b"SUBSCRIBE UNSUBSCRIBE PATCH PURGE MKCALENDAR LINK UNLINK SOURCE QUERY".split())


def _compile_routes() -> list:
    """core/routes.py's table as Starlette matches it: a ``{name}`` is one path segment, GET admits HEAD."""
    compiled = []
    for path, method, name in ROUTES:
        pieces = re.split(r"\{[^}]+\}", path)
        methods = {method.encode()} | ({b"HEAD"} if method == "GET" else set())
        compiled.append((re.compile("^" + "[^/]+".join(map(re.escape, pieces)) + "$"), methods, name))
    return compiled


_ROUTES = _compile_routes()


def _routed(method: bytes, path: str, location: Callable[[str], bytes]) -> bytes:
    """What our server answers ``method path`` with before the model is loaded (Starlette's router: the first
    route whose path and method match; else 405 from the first whose path matches; else a 307 to the path with
    its trailing slash toggled when that one exists, at ``location(path)``; else 404)."""
    allowed = None
    for pattern, methods, name in _ROUTES:
        if pattern.match(path):
            if method not in methods:
                allowed = allowed or methods
            else:
                return _BEFORE_THE_LOAD[name] or _no_samples_yet()
    if allowed:
        listed = b", ".join(sorted(allowed, key=lambda m: (m != b"GET", m)))
        return _json(b"405 Method Not Allowed", {"detail": "Method Not Allowed"}, (b"allow: " + listed,))
    if path != "/":
        toggled = path.rstrip("/") if path.endswith("/") else path + "/"
        if any(pattern.match(toggled) for pattern, _, _ in _ROUTES):
            return _response(b"307 Temporary Redirect", b"", (b"location: " + location(toggled),))
    return NOT_FOUND


def _trusted_proxy(peer: str) -> bool:
    """Whether uvicorn takes X-Forwarded-Proto from ``peer`` (its forwarded_allow_ips, by default the loopback)."""
    allowed = [h.strip() for h in os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1,::1").split(",")]
    return "*" in allowed or peer in allowed


def _location(conn: socket.socket, headers: dict, path: str, query: bytes) -> bytes:
    """The URL of ``path`` as Starlette's redirect writes it: the request's scheme (a trusted proxy's
    X-Forwarded-Proto) and Host (else the server's own address), the path and query quoted as it quotes them."""
    scheme = "http"
    proto = headers.get(b"x-forwarded-proto", b"").decode("latin-1").strip()
    if proto in ("http", "https", "ws", "wss") and _trusted_proxy(conn.getpeername()[0]):
        scheme = proto
    netloc = headers.get(b"host", b"").decode("latin-1")
    if not netloc:
        host, port = conn.getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        netloc = host if port == {"http": 80, "https": 443, "ws": 80, "wss": 443}[scheme] else f"{host}:{port}"
    path = path.replace("?", "%3F").replace("#", "%23").replace("\\", "%5C")
    url = f"{scheme}://{netloc}{path}" + (f"?{query.decode('utf-8', 'replace')}" if query else "")
    return urllib.parse.quote(url, safe=":/%#?=@[]!$&'()*+,;").encode("latin-1")


_SO_ATTACH_REUSEPORT_CBPF = getattr(socket, "SO_ATTACH_REUSEPORT_CBPF", 51)
_NET = 0xFFF00000  # SKF_NET_OFF: a load relative to the packet's IP header
_CONCURRENT = 64  # connections answered at once; more wait in the backlog
_READ_TIMEOUT = 5.0  # a client that sends no complete head in this long is dropped
_DRAIN_SECONDS = 2.0


def _filter(*instructions: tuple) -> tuple:
    """A classic BPF program as (the sock_fprog to pass, the instructions' buffer to keep alive meanwhile)."""
    import ctypes

    code = b"".join(struct.pack("@HBBI", op, jt, jf, k) for op, jt, jf, k in instructions)
    buffer = ctypes.create_string_buffer(code, len(code))
    return struct.pack("@HP", len(instructions), ctypes.addressof(buffer)), buffer


def _probes_to_the_other(source_port: int) -> tuple:
    """Connections from ``source_port`` go to the group's second socket (Serve's proxy), the rest to the first
    (the stand-in); with one socket, to it (an index past the group falls back to the kernel's choice)."""
    return _filter(
        (0x30, 0, 0, _NET),  # A = the IP header's first byte
        (0x74, 0, 0, 4),  # A >>= 4: the IP version
        (0x15, 0, 2, 6),  # IPv6?
        (0x28, 0, 0, _NET + 40),  # A = the TCP source port after a 40-byte IPv6 header
        (0x05, 0, 0, 1),  # jump to the comparison
        (0x28, 0, 0, _NET + 20),  # A = the TCP source port after an IPv4 header (no options on a SYN)
        (0x15, 0, 1, source_port),
        (0x06, 0, 0, 1),  # return 1: the proxy
        (0x06, 0, 0, 0),  # return 0: the stand-in
    )


def _all_to_the_stand_in() -> tuple:
    return _filter((0x06, 0, 0, 0))


def _all_to_the_other() -> tuple:
    return _filter((0x06, 0, 0, 1))


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET  # as Serve's proxy chooses


def _reachable(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


class StandIn:
    """The listener and its threads; :meth:`close` (idempotent) stops them and closes the socket."""

    def __init__(self, sock: socket.socket, host: str, port: int, handed_over_when: Optional[bytes]) -> None:
        self._sock, self._host, self._port = sock, host, port
        self._marker = handed_over_when.lower() if handed_over_when else None
        self._closing = threading.Event()
        self._slots = threading.BoundedSemaphore(_CONCURRENT)
        self._lock = threading.Lock()
        self.steered = True  # whether the filter works here (False: connections are spread until the hand-over)
        self.handed_over = threading.Event()
        if self._marker is not None:
            self._attach(_all_to_the_stand_in())  # until the first probe: Serve's proxy may bind any moment
        self._accepting = threading.Thread(target=self._accept, name="stand-in", daemon=True)
        self._accepting.start()
        if self._marker is not None:
            threading.Thread(target=self._watch, name="stand-in-hand-over", daemon=True).start()

    @classmethod
    def bind(cls, host: str, port: int, handed_over_when: Optional[bytes] = None,
             share_port: bool = True) -> Optional["StandIn"]:
        """A stand-in on ``host:port``, or None when something listens there already (or it cannot bind).

        ``handed_over_when``: a response header that marks an answer from the server that takes over (the one
        our replicas add); once a probe gets ``GET /`` 200 with it, the stand-in hands over and closes.
        ``share_port=False``: a socket bound as uvicorn binds its own (asyncio's create_server), for
        :meth:`release`; None for a host name, which uvicorn would resolve to more than one address;
        PortUnavailable (one paragraph) when the address cannot be bound.
        """
        if not share_port:
            return cls._bind_alone(host, port)
        family = _family(host)
        try:
            # A listener there would take a SO_REUSEPORT socket beside it (a running Serve's proxy, say):
            # ask without SO_REUSEPORT first.
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, port))
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            return None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(128)
        except (OSError, AttributeError):  # no SO_REUSEPORT here, or the port was taken meanwhile
            sock.close()
            return None
        return cls(sock, host, port, handed_over_when)

    @classmethod
    def _bind_alone(cls, host: str, port: int) -> Optional["StandIn"]:
        import ipaddress

        try:
            family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        except ValueError:
            return None  # a name: uvicorn binds every address it resolves to
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's create_server
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            sock.listen(2048)  # uvicorn's default backlog: the socket stays the server's
        except OSError as exc:
            sock.close()
            # Said now, before anything is imported or loaded (uvicorn would load the model first, then fail).
            from ..core.errors import PortUnavailable

            raise PortUnavailable(
                f"kernel-magics serve cannot listen on {host}:{port}: {exc.strerror or exc}. "
                + ("Another program listens there: pass another --port, or stop that program."
                   if exc.errno == errno.EADDRINUSE else
                   "Pass a --host address of this machine and a --port it may use (ports below 1024 need root)."))
        return cls(sock, host, port, None)

    def release(self) -> socket.socket:
        """Stop answering and give the listening socket to the server that takes over: what the stand-in has
        accepted it answers; what waits in the backlog is the new server's. No connection is refused."""
        with self._lock:
            if self._closing.is_set():
                raise RuntimeError("the stand-in is closed")
            self._closing.set()
        self._accepting.join()
        self._sock.settimeout(None)
        return self._sock

    # ------------------------------------------------------------------ answering

    def _accept(self) -> None:
        self._sock.settimeout(0.1)  # to see `_closing`: a close() does not wake a thread blocked in accept()
        while not self._closing.is_set():
            if not self._slots.acquire(timeout=0.1):
                continue
            try:
                conn, _ = self._sock.accept()
            except OSError:  # the timeout, or closed
                self._slots.release()
                continue
            self._start_answering(conn)

    def _start_answering(self, conn: socket.socket) -> None:
        conn.settimeout(None)
        threading.Thread(target=self._answer_and_release, args=(conn,), daemon=True).start()

    def _answer_and_release(self, conn: socket.socket) -> None:
        try:
            with conn:
                answer(conn)
        except OSError:
            pass  # the client went away
        finally:
            self._slots.release()

    # ------------------------------------------------------------------ the hand-over

    def _watch(self) -> None:
        while not self._closing.wait(0.1):
            if self._taken_over():
                self._hand_over()
                return

    def _taken_over(self) -> bool:
        """One probe, steered to the proxy: does ``GET /`` answer 200 there through our deployment?"""
        family = self._sock.family
        with socket.socket(family, socket.SOCK_STREAM) as client:
            try:
                client.bind((_reachable(self._host), 0))
                if self.steered:
                    self._attach(_probes_to_the_other(client.getsockname()[1]))
                client.settimeout(2.0)
                client.connect((_reachable(self._host), self._port))
                client.sendall(b"GET / HTTP/1.1\r\nhost: stand-in\r\nconnection: close\r\n\r\n")
                head = _read_head(client)
            except OSError:
                return False
        if head is None:
            return False
        lines = head.split(b"\r\n")
        names = {line.partition(b":")[0].strip().lower() for line in lines[1:]}
        return lines[0].split(b" ")[1:2] == [b"200"] and self._marker in names

    def _attach(self, program: tuple) -> None:
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_CBPF, program[0])
        except OSError:
            self.steered = False

    def _hand_over(self) -> None:
        """New connections go to the proxy; what reached the stand-in is answered; then it closes."""
        if self._closing.is_set():
            return
        if self.steered:
            self._attach(_all_to_the_other())
        self.handed_over.set()
        self.close()

    def close(self) -> None:
        """Stop: answer the connections already queued here (a closing listener would reset them), then close."""
        with self._lock:
            if self._closing.is_set():
                return  # closed already, or released (the socket is the new server's)
            self._closing.set()
        if threading.current_thread() is not self._accepting:
            self._accepting.join()
        self._sock.setblocking(False)
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                break
            self._slots.acquire()
            self._start_answering(conn)
        self._sock.close()

    def __enter__(self) -> "StandIn":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_head(conn: socket.socket) -> Optional[bytes]:
    """The request (or response) head, or None past the bounds of serving/limits.py or when the peer left."""
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > HEAD_LIMIT or b"\n\n" in data:  # (a head ended by bare line feeds: refused, as httptools does)
            return None
        chunk = conn.recv(65536)
        if not chunk:
            return b"" if not data else None
        data += chunk
    head = data.partition(b"\r\n\r\n")[0]
    if len(head) > HEAD_LIMIT or head.count(b"\r\n") > MAX_HEADERS:
        return None
    return head


def answer(conn: socket.socket) -> None:
    """Answer one request on ``conn`` as a server that has not loaded the model, then close it."""
    conn.settimeout(_READ_TIMEOUT)
    head = _read_head(conn)
    if head == b"":
        return
    conn.sendall(_answer_to(head, conn) if head else BAD_REQUEST)
    # The client may still be sending a body: read it away (bounded) before closing, or the close resets
    # the connection and the client may lose the answer.
    conn.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + _DRAIN_SECONDS
    with contextlib.suppress(OSError):
        while time.monotonic() < deadline:
            conn.settimeout(max(deadline - time.monotonic(), 0.01))
            if not conn.recv(65536):
                break


def _answer_to(head: bytes, conn: socket.socket) -> bytes:
    request_line, _, header_block = head.partition(b"\r\n")
    parts = request_line.split(b" ")
    if (len(parts) not in (2, 3) or parts[0] not in _METHODS  # ("GET /": HTTP/0.9's form, which httptools takes)
            or len(parts) == 3 and parts[2] not in (b"HTTP/1.0", b"HTTP/1.1")):
        return BAD_REQUEST
    method, target = parts[0], parts[1]
    if target.startswith((b"http://", b"https://")):  # the absolute form, as a proxy sends it
        split = urllib.parse.urlsplit(target)
        target = (split.path or b"/") + (b"?" + split.query if split.query else b"")
    raw_path, _, query = target.partition(b"?")
    headers = {}
    for line in header_block.split(b"\r\n"):
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), value.strip())
    response = _routed(method, urllib.parse.unquote(raw_path.decode("latin-1")),
                       lambda path: _location(conn, headers, path, query))
    return response.partition(b"\r\n\r\n")[0] + b"\r\n\r\n" if method == b"HEAD" else response


@contextlib.contextmanager
def stand_in(host: str, port: int, handed_over_when: Optional[bytes] = None,
             share_port: bool = True) -> Iterator[Optional[StandIn]]:
    """A :class:`StandIn` on ``host:port`` for the block (None when the port is taken); closed on the way out
    (unless released)."""
    listener = StandIn.bind(host, port, handed_over_when, share_port) if sys.platform != "win32" else None
    try:
        yield listener
    finally:
        if listener is not None:
            listener.close()
