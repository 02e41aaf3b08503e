"""The stand-in `serve --engine ray` puts on the port while Ray starts (serving/stand_in.py), on its own: no Ray.

It answers as `kernel-magics serve` does before the model is loaded, lets Serve's proxy bind beside it
(SO_REUSEPORT), keeps every connection but its own probes until the proxy answers through the deployment,
then hands the port over without refusing a connection. tests/test_ray.py runs it with Ray.
"""

import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from server_harness import free_port, serve_ours, wait_for, write_truss
from test_serving_edge import raw_request

from kernel_magics.core.errors import PortUnavailable
from kernel_magics.serving.stand_in import STAND_IN_SERVER, StandIn, stand_in

pytestmark = pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="needs SO_REUSEPORT (Linux)")

WAITING_LOAD = """
import pathlib

class Model:
    def load(self):
        (pathlib.Path(%r) / "loading").touch()
        while not (pathlib.Path(%r) / "release").exists():
            import time
            time.sleep(0.05)

    def predict(self, model_input):
        return model_input
"""
UNFINISHED_HEAD = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000
MANY_HEADERS = b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(101)) + b"\r\n"


def answers(url: str) -> dict:
    """Status, media type, Truss's error headers and the exact body of each kind of request; the status line
    and body of a refused head."""
    found = {}
    for name, method, path, body in [("liveness", "GET", "/", None), ("readiness", "GET", "/v1/models/model", None),
                                     ("predict", "POST", "/v1/models/model:predict", b'{"x": 1}'),
                                     ("big predict", "POST", "/v1/models/model:predict", b"[" + b"1," * 2**20 + b"1]"),
                                     ("liveness head", "HEAD", "/", None), ("liveness query", "GET", "/?x=1", None),
                                     ("loaded", "GET", "/v1/models/model/loaded", None), ("ping", "GET", "/ping", None),
                                     ("schema", "GET", "/v1/models/model/schema", None),
                                     ("other model", "GET", "/v1/models/other", None),
                                     ("sagemaker", "POST", "/invocations", b"{}"),
                                     ("chat", "POST", "/v1/chat/completions", b"{}"),
                                     ("unknown path", "GET", "/nothing/here", None),
                                     ("unknown post", "POST", "/nothing", b"{}"),
                                     ("wrong method", "POST", "/", b"{}"), ("put readiness", "PUT", "/v1/models/model", b""),
                                     ("get predict", "GET", "/v1/models/model:predict", None),
                                     ("delete predict", "DELETE", "/v1/models/model:predict", None),
                                     ("trailing slash", "GET", "/ping/?a=b", None),
                                     ("redirect to a colon", "GET", "/v1/models/model:predict/", None),
                                     ("encoded path", "GET", "/v1/models/mo%64el", None),
                                     ("newline path", "GET", "/%0A", None)]:
        r = httpx.request(method, url + path, content=body, timeout=30)
        allow = r.headers.get("allow")  # (Starlette lists a set: its order varies from process to process)
        found[name] = (r.status_code, r.headers.get("content-type"), r.headers.get("x-baseten-error-source"),
                       r.headers.get("x-baseten-error-code"), allow and sorted(allow.split(", ")),
                       r.headers.get("location", "").replace(url, "URL"), r.content)
    metrics = httpx.get(url + "/metrics", timeout=30)  # (its samples are the server's own)
    found["metrics"] = (metrics.status_code, metrics.headers["content-type"])
    for name, data in [("unfinished head", UNFINISHED_HEAD), ("many headers", MANY_HEADERS),
                       ("lowercase method", b"get / HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n"),
                       ("no version", b"GET /\r\nHost: x\r\n\r\n"),
                       ("unknown version", b"GET / HTTP/9.9\r\nHost: x\r\nconnection: close\r\n\r\n"),
                       ("absolute form", b"GET http://x:1/ HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n"),
                       ("bare line feeds", b"GET / HTTP/1.0\n\n"),
                       ("quoted redirect", b"GET /ping/?a=|b%22c HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n"),
                       ("behind a TLS proxy", b"GET /ping/ HTTP/1.1\r\nHost: x\r\nX-Forwarded-Proto: https\r\n"
                                              b"connection: close\r\n\r\n")]:
        head, _, body = raw_request(url, data).partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        location = [line.partition(b":")[2].strip() for line in lines if line.lower().startswith(b"location:")]
        found[name] = (lines[0], location, body)
    return found


def test_it_answers_as_kernel_magics_serve_does_before_the_model_is_loaded(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    d = write_truss(tmp_path / "slow", WAITING_LOAD % (str(marks), str(marks)))
    with serve_ours(d, wait_ready=False) as real:
        assert wait_for(marks / "loading", 60), real.log
        expected = answers(real.url)
    assert expected["liveness"][0] == 200 and expected["readiness"][0] == expected["predict"][0] == 503
    assert expected["unfinished head"][0] == b"HTTP/1.1 400 Bad Request"
    port = free_port()
    with stand_in("127.0.0.1", port) as listener:
        assert listener is not None
        assert answers(f"http://127.0.0.1:{port}") == expected
        assert httpx.get(f"http://127.0.0.1:{port}/").headers["server"] == STAND_IN_SERVER.decode()


class Other:
    """A listener beside the stand-in, bound as Serve's proxy binds (SO_REUSEADDR + SO_REUSEPORT): answers
    404 (a proxy before the deployment exists), then, once ``deployed`` is set, 200 with the replica header."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(128)
        self.deployed = threading.Event()
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.recv(65536)
                status, extra = (b"200 OK", b"x-test-replica: r1\r\n") if self.deployed.is_set() else (b"404 Not Found", b"")
                conn.sendall(b"HTTP/1.1 " + status + b"\r\nserver: other\r\ncontent-length: 4\r\n" + extra
                             + b"connection: close\r\n\r\ntrue")

    def close(self) -> None:
        self.sock.close()


def served_by(port: int, n: int) -> list[str]:
    return [httpx.get(f"http://127.0.0.1:{port}/", headers={"connection": "close"}).headers["server"]
            for _ in range(n)]


def test_it_keeps_the_port_until_the_other_listener_answers_through_the_deployment_then_hands_it_over():
    port = free_port()
    with stand_in("127.0.0.1", port, handed_over_when=b"X-Test-Replica") as listener:
        assert listener is not None and listener.steered
        # Serve's proxy binds beside it; a second stand-in does not (something listens there).
        other = Other(port)
        try:
            assert StandIn.bind("127.0.0.1", port) is None
            # The proxy answers 404 until the deployment exists: every client meets the stand-in meanwhile
            # (spread by the kernel, about half of 40 would meet the proxy).
            assert set(served_by(port, 40)) == {STAND_IN_SERVER.decode()}
            assert not listener.handed_over.is_set()
            # Clients keep connecting across the hand-over: none is refused or reset (a listener that closed
            # with connections still queued on it would reset them).
            failed, stop = [], threading.Event()
            clients = [threading.Thread(target=keep_connecting, args=(port, stop, failed)) for _ in range(4)]
            for client in clients:
                client.start()
            other.deployed.set()
            assert listener.handed_over.wait(60)
            assert set(served_by(port, 40)) == {"other"}  # handed over: every connection reaches the proxy
            stop.set()
            for client in clients:
                client.join()
            assert failed == []
        finally:
            other.close()


def keep_connecting(port: int, stop: threading.Event, failed: list) -> None:
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
                conn.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                while conn.recv(65536):
                    pass
        except OSError as exc:
            failed.append(repr(exc))


def test_it_closes_cleanly_and_leaves_the_port_free():
    port = free_port()
    before = {t.ident for t in threading.enumerate()}
    with stand_in("127.0.0.1", port, handed_over_when=b"x-test-replica") as listener:
        assert httpx.get(f"http://127.0.0.1:{port}/").json() is True
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/")
    listener.close()  # again: nothing happens
    with socket.socket() as plain:  # nothing listens there: a listener without SO_REUSEPORT binds it
        plain.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # beside the closed connections' TIME_WAIT
        plain.bind(("127.0.0.1", port))
        plain.listen()
    left = [t for t in threading.enumerate() if t.ident not in before and t.name.startswith("stand-in")]
    for t in left:  # the hand-over watcher ends after its current probe
        t.join(timeout=10)
    assert not any(t.is_alive() for t in left)


def test_no_stand_in_where_something_listens_already():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with stand_in("127.0.0.1", taken.getsockname()[1]) as listener:
            assert listener is None


# ---------------------------------------------------------------- `kernel-magics serve`: the socket goes to uvicorn

def test_released_it_gives_its_socket_and_the_connections_waiting_on_it_to_the_next_server():
    port = free_port()
    with stand_in("127.0.0.1", port, share_port=False) as listener:
        assert listener is not None
        assert httpx.get(f"http://127.0.0.1:{port}/").headers["server"] == STAND_IN_SERVER.decode()
        sock = listener.release()
        # Nobody accepts now: a client connects and sends its request; it waits in the backlog, not refused.
        waiting = socket.create_connection(("127.0.0.1", port), timeout=30)
        waiting.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        other = Other.__new__(Other)  # the next server, on the released socket itself
        other.sock, other.deployed, other.accepted = sock, threading.Event(), 0
        threading.Thread(target=other._serve, daemon=True).start()
        answer = b""
        while chunk := waiting.recv(65536):
            answer += chunk
        waiting.close()
        assert b"server: other" in answer
    # Leaving the block closed nothing: the socket is the next server's.
    assert served_by(port, 1) == ["other"]
    other.close()
    with pytest.raises(RuntimeError):
        listener.release()


def test_every_route_of_the_table_has_its_answer_before_the_load():
    from kernel_magics.core.routes import ROUTES
    from kernel_magics.serving import stand_in as module

    assert {name for _, _, name in ROUTES} == set(module._BEFORE_THE_LOAD)


def test_alone_it_binds_an_address_given_as_a_number_and_says_at_once_when_the_port_is_taken(tmp_path):
    assert StandIn.bind("localhost", free_port(), share_port=False) is None  # a name may resolve to two addresses
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortUnavailable, match=f"127.0.0.1:{port}: Address already in use. Another program"):
            StandIn.bind("127.0.0.1", port, share_port=False)
        # The command says so in one line before it imports or loads anything (uvicorn loaded the model first).
        marks = tmp_path / "marks"
        marks.mkdir()
        d = write_truss(tmp_path / "m", WAITING_LOAD % (str(marks), str(marks)))
        done = subprocess.run([sys.executable, "-m", "kernel_magics.cli", "serve", str(d), "--port", str(port)],
                              capture_output=True, text=True, timeout=120)
        # A directory that cannot be served is the first thing to fix: said even when the port is taken too.
        no_truss = subprocess.run([sys.executable, "-m", "kernel_magics.cli", "serve", str(marks), "--port", str(port)],
                                  capture_output=True, text=True, timeout=120)
    assert no_truss.returncode == 1 and "has no config.yaml" in no_truss.stderr, no_truss.stderr
    assert done.returncode == 3 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: kernel-magics serve cannot listen on 127.0.0.1:{port}"), done.stderr
    assert not (marks / "loading").exists()


def test_kernel_magics_serve_answers_from_the_stand_in_then_from_uvicorn_on_the_same_port(tmp_path):
    """The CLI binds before it imports FastAPI, uvicorn and our server: its first answers come from the stand-in
    (liveness 200, readiness 503), then uvicorn's on the same socket, with no refusal in between."""
    marks = tmp_path / "marks"
    marks.mkdir()
    d = write_truss(tmp_path / "slow", WAITING_LOAD % (str(marks), str(marks)))
    with serve_ours(d, wait_ready=False) as s:
        seen = []  # (status of GET /, its server header, status of readiness) each time either changes
        refused_after_first_answer, give_up = 0, time.monotonic() + 120  # (a bound on a hang, not a timing)
        while not (marks / "loading").exists() or len(seen) < 2:
            assert time.monotonic() < give_up, (seen, s.log)
            try:
                live = httpx.get(s.url + "/", headers={"connection": "close"}, timeout=30)
                ready = httpx.get(s.url + "/v1/models/model", headers={"connection": "close"}, timeout=30)
            except httpx.ConnectError:
                refused_after_first_answer += bool(seen)
                continue
            now = (live.status_code, live.headers["server"], ready.status_code)
            if not seen or seen[-1] != now:
                seen.append(now)
            if s.proc.poll() is not None:
                break
        assert seen[:2] == [(200, STAND_IN_SERVER.decode(), 503), (200, "uvicorn", 503)], (seen, s.log)
        assert refused_after_first_answer == 0
        (marks / "release").touch()
        while httpx.get(s.url + "/v1/models/model", timeout=30).status_code != 200:
            assert s.proc.poll() is None and time.monotonic() < give_up + 120, s.log
            time.sleep(0.05)
        assert httpx.post(s.url + "/v1/models/model:predict", json={"x": 1}).json() == {"x": 1}
        assert f"Uvicorn running on {s.url} (Press CTRL+C to quit)" in s.log  # as uvicorn says it


def test_port_zero_is_served_on_the_port_the_system_chose_and_said_in_uvicorns_order(tmp_path):
    d = write_truss(tmp_path / "echo", "class Model:\n    def predict(self, x):\n        return x\n")
    log = tmp_path / "log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kernel_magics.cli", "serve", str(d), "--port", "0"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        running = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+) \(Press CTRL\+C to quit\)")
        give_up = time.monotonic() + 120  # (a bound on a hang, not a timing)
        while not running.search(log.read_text()):
            assert proc.poll() is None and time.monotonic() < give_up, log.read_text()
            time.sleep(0.05)
        text = log.read_text()
        port = int(running.search(text)[1])
        serving = re.search(r"Serving \S+ on http://127\.0\.0\.1:(\d+): loading the model", text)
        assert port != 0 and serving and int(serving[1]) == port, text
        # As uvicorn writes it for a port it binds: after the application's startup (which says "Serving").
        assert text.index("Application startup complete") < running.search(text).start(), text
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=30).content == b"true"
    finally:
        proc.terminate()
        proc.wait(60)
