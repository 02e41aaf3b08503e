"""The serving edge under load and attack: liveness while loading, threads, stalled readers, bounds,
msgpack, the logs. Real `kernel-magics serve` processes, real sockets; no timed assertions."""

import concurrent.futures
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server_harness import (TRUSS_REFERENCE, answer, free_port, serve_ours, serve_truss, truss_reference_python,
                            wait_for, write_truss)

CANARY = "sk-CANARY-edge-5c1e"


@pytest.fixture
def markers(tmp_path):
    path = tmp_path / "markers"
    path.mkdir()
    return path


def run_to_exit(truss_dir: Path, *args: str, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "kernel_magics.cli", "serve", str(truss_dir), "--port", str(free_port()),
                           *args], capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})


# ---------------------------------------------------------------- liveness while model.py imports

def test_liveness_answers_while_model_py_imports_and_readiness_waits(tmp_path, markers):
    gate = markers / "go"
    model = f'''
import time
from pathlib import Path
Path("{markers / 'importing'}").write_text("1")
while not Path("{gate}").exists():  # an import that takes as long as the test wants (torch, saved values ...)
    time.sleep(0.02)


class Model:
    def predict(self, model_input):
        return "ready"
'''
    with serve_ours(write_truss(tmp_path / "slowimport", model), wait_ready=False) as s:
        assert wait_for(markers / "importing", timeout=30)
        assert httpx.get(s.url + "/").json() is True  # the port answers while the import is under way
        not_ready = httpx.get(s.url + "/v1/models/model")
        assert not_ready.status_code == 503 and not_ready.json() == {"error": "Model with name model is not ready."}
        assert httpx.post(s.predict_url(), json={}).status_code == 503
        assert httpx.get(s.url + "/v1/models/model/schema").status_code == 503
        gate.write_text("1")
        deadline = time.monotonic() + 30
        while httpx.get(s.url + "/v1/models/model").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.post(s.predict_url(), json={}).json() == "ready"
    assert f"Serving {tmp_path / 'slowimport'} on http://127.0.0.1:" in s.log and "loading the model" in s.log
    # The import's time is said apart from load()'s (here the import is all of it), after the line that says where.
    loaded = re.search(r"Model loaded in ([0-9.]+) s \(importing model/model\.py ([0-9.]+) s, load\(\) ([0-9.]+) s\); "
                       r"ready", s.log)
    assert loaded and float(loaded[2]) > float(loaded[3]) and s.log.index("Serving ") < loaded.start(), s.log


def test_an_import_error_is_a_failed_load_with_the_users_frames(tmp_path):
    model = f'''
import os


def build():
    raise ValueError("no vocabulary for " + os.environ["TRUSS_SECRET_tok"])


VOCAB = build()


class Model:
    def predict(self, model_input):
        return 1
'''
    done = run_to_exit(write_truss(tmp_path / "badimport", model, "secrets: {tok: null}\n"),
                       env={"TRUSS_SECRET_tok": CANARY})
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the model failed to load: importing model/model.py raised ValueError: "
                           "no vocabulary for ***. The server stopped; fix model/model.py"), last
    # The traceback is the user's: model.py's frames, not ours or importlib's; the secret never shows.
    assert 'model.py", line 9, in <module>' in done.stderr and 'model.py", line 6, in build' in done.stderr
    assert "<frozen" not in done.stderr and "kernel_magics" not in done.stderr.split("Importing")[1]
    assert CANARY not in done.stderr
    assert "Uvicorn running on" in done.stderr  # a failed load in a running server, not a failed start


# ---------------------------------------------------------------- threads: readers that do not read

STREAMS = '''
import os
import time
from pathlib import Path

MARKS = Path(os.environ["KM_MARKS"])


class Model:
    def is_healthy(self):  # sync: readiness needs a worker thread for it
        return True

    def predict(self, model_input):
        if "wait" in model_input:  # a predict stuck until the test releases it
            (MARKS / f"{model_input['wait']}-started").write_text("1")
            while not (MARKS / f"{model_input['wait']}-release").exists():
                time.sleep(0.01)
            return "released"
        if "stream" not in model_input:
            return {"echo": model_input}
        tag = model_input["stream"]

        def gen():
            try:
                i = 0
                while True:
                    yield b"x" * 65536
                    if i == 0:
                        (MARKS / f"{tag}-started").write_text("1")
                        while model_input.get("hold") and not (MARKS / f"{tag}-release").exists():
                            time.sleep(0.01)  # stuck inside the second chunk until the test releases it
                        if model_input.get("fail"):
                            raise TimeoutError("the upstream call timed out")
                    i += 1
            finally:
                (MARKS / f"{tag}-closed").write_text("1")

        return gen()
'''


def stalled_reader(url: str, body: dict) -> socket.socket:
    """A client that sends a streaming request and then reads nothing (a small receive buffer)."""
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/models/model:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return sock


def test_45_stalled_streams_leave_threads_for_probes_and_sync_predicts(tmp_path, markers):
    d = write_truss(tmp_path / "streams", STREAMS, f'''\
        environment_variables: {{KM_MARKS: "{markers}"}}
        runtime: {{predict_concurrency: 100, streaming_read_timeout: 600}}
        ''')
    with serve_ours(d) as s:
        readers = [stalled_reader(s.url, {"stream": f"r{i}"}) for i in range(45)]
        try:
            for i in range(45):
                assert wait_for(markers / f"r{i}-started", timeout=30)
            # More stalled streams than the 40 worker threads: none of them holds one.
            assert httpx.get(s.url + "/v1/models/model", timeout=30).status_code == 200  # sync is_healthy
            assert httpx.post(s.predict_url(), json={"a": 1}, timeout=30).json() == {"echo": {"a": 1}}
        finally:
            for sock in readers:
                sock.close()


def test_a_stalled_reader_loses_its_stream_after_streaming_read_timeout(tmp_path, markers):
    d = write_truss(tmp_path / "stall", STREAMS, f'''\
        environment_variables: {{KM_MARKS: "{markers}"}}
        runtime: {{predict_concurrency: 1, streaming_read_timeout: 1}}
        ''')
    with serve_ours(d) as s:
        sock = stalled_reader(s.url, {"stream": "stalled"})
        try:
            assert wait_for(markers / "stalled-started", timeout=30)
            assert httpx.get(s.url + "/v1/models/model", timeout=30).status_code == 200  # a probe meanwhile
            # The reader takes nothing: after streaming_read_timeout its generator is closed ...
            assert wait_for(markers / "stalled-closed", timeout=30)
            # ... and the one predict slot is free again.
            assert httpx.post(s.predict_url(), json={"a": 2}, timeout=30).json() == {"echo": {"a": 2}}
        finally:
            sock.close()
    assert "Stream cut off: the client read nothing for 1 s" in s.log


def test_a_generator_stuck_inside_a_chunk_loses_its_connection_at_the_timeout_and_is_closed_after(tmp_path, markers):
    """As Truss's server does, the response ends once no chunk came for streaming_read_timeout, even while a sync
    generator is still inside next() (a thread cannot be interrupted). The generator is closed, and its predict
    slot freed, once that chunk is done."""
    d = write_truss(tmp_path / "stuck", STREAMS, f'''\
        environment_variables: {{KM_MARKS: "{markers}"}}
        runtime: {{predict_concurrency: 1, streaming_read_timeout: 1}}
        ''')
    with serve_ours(d) as s:
        got = b""
        body = {"stream": "stuck", "hold": True, "fail": True}
        with httpx.stream("POST", s.predict_url(), json=body, timeout=15) as response:
            with pytest.raises(httpx.RemoteProtocolError):  # the body ends unfinished: the connection is closed
                for part in response.iter_bytes():
                    got += part
        assert got == b"x" * 65536
        assert not (markers / "stuck-closed").exists()  # the response ended while the generator was stuck
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # the one predict slot is still the stream's
            waiting = pool.submit(httpx.post, s.predict_url(), json={"a": 2}, timeout=30)
            with pytest.raises(concurrent.futures.TimeoutError):
                waiting.result(timeout=1)
            (markers / "stuck-release").write_text("1")
            assert waiting.result().json() == {"echo": {"a": 2}}  # freed once that chunk was done
        assert wait_for(markers / "stuck-closed", timeout=30)
    assert ("Stream cut off: the model made no chunk for 1 s (runtime.streaming_read_timeout); its generator is "
            "closed once the chunk it is making is done.") in s.log
    # What that chunk raised once it was done is logged (no one else could see it), with the model's frame.
    assert ("ERROR kernel_magics.server: Exception while generating streamed response (after the response ended): "
            "TimeoutError: the upstream call timed out\nTraceback (most recent call last):\n") in s.log, s.log
    assert 'model.py", line' in s.log.split("after the response ended")[1], s.log
    assert "never retrieved" not in s.log, s.log


def test_a_forced_quit_cuts_a_stream_off_unfinished_without_a_traceback(tmp_path, markers):
    """Ctrl-C twice while a stream runs (uvicorn's forced quit, which no longer waits for requests): the client sees
    an unfinished response, never one that looks complete; the log says the stream was cut off, with no traceback
    (the requests used to end in the clean-up of the KeyboardInterrupt uvicorn raises in the loop)."""
    import signal

    d = write_truss(tmp_path / "quit", STREAMS, f'environment_variables: {{KM_MARKS: "{markers}"}}\n')
    with serve_ours(d) as s:
        with httpx.stream("POST", s.predict_url(), json={"stream": "quit", "hold": True}, timeout=30) as response:
            with pytest.raises(httpx.RemoteProtocolError):  # not a clean end
                for _ in response.iter_bytes():
                    if s.proc.returncode is None and not (markers / "quit-signalled").exists():
                        (markers / "quit-signalled").write_text("1")
                        assert wait_for(markers / "quit-started", timeout=30)  # stuck inside the next chunk
                        s.proc.send_signal(signal.SIGINT)
                        deadline = time.monotonic() + 30
                        while "Waiting for connections to close" not in s.log and time.monotonic() < deadline:
                            time.sleep(0.02)
                        s.proc.send_signal(signal.SIGINT)
        # The generator is still inside its chunk: the process says so, and one more Ctrl-C ends it at once.
        deadline = time.monotonic() + 30
        while "model code is still running in 1 thread" not in s.log and time.monotonic() < deadline:
            time.sleep(0.02)
        assert s.proc.poll() is None, s.log
        s.proc.send_signal(signal.SIGINT)
        assert s.proc.wait(timeout=30) == 130
        assert not (markers / "quit-closed").exists()  # it did not wait for the chunk
    assert "Stream cut off: the server is stopping" in s.log and "Traceback" not in s.log, s.log
    assert "Press Ctrl-C again to quit at once." in s.log, s.log


def test_a_forced_quit_answers_a_predict_in_flight_503_without_a_traceback(tmp_path, markers):
    """Ctrl-C twice while a (non-streamed) predict runs: its client gets Truss's 503 body, not uvicorn's plain 500,
    and the log says so in one line instead of "Exception in ASGI application" and a CancelledError traceback."""
    import signal

    d = write_truss(tmp_path / "quit", STREAMS, f'environment_variables: {{KM_MARKS: "{markers}"}}\n')
    with serve_ours(d) as s:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer_ = pool.submit(httpx.post, s.predict_url(), json={"wait": "quit"}, timeout=30)
            assert wait_for(markers / "quit-started", timeout=30)
            s.proc.send_signal(signal.SIGINT)
            deadline = time.monotonic() + 30
            while "Waiting for connections to close" not in s.log and time.monotonic() < deadline:
                time.sleep(0.02)
            s.proc.send_signal(signal.SIGINT)
            response = answer_.result()
        assert response.status_code == 503, (response.status_code, response.text, s.log)
        assert response.json() == {"error": "The server is stopping; the request was not answered."}
        assert response.headers["x-baseten-error-code"] == "600"
        deadline = time.monotonic() + 30
        while "model code is still running in 1 thread" not in s.log and time.monotonic() < deadline:
            time.sleep(0.02)
        s.proc.send_signal(signal.SIGINT)
        assert s.proc.wait(timeout=30) == 130
    assert "Request cut off: the server is stopping before the model answered it." in s.log, s.log
    assert "Traceback" not in s.log and "Exception in ASGI application" not in s.log, s.log


# ---------------------------------------------------------------- bounds on what a client sends

def raw_request(url: str, data: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(data)
        got = b""
        while True:
            part = sock.recv(65536)
            if not part:
                return got
            got += part
            if b"\r\n\r\n" in got and b"connection: close" not in got.lower():
                return got


def test_request_heads_are_bounded_as_trusss(tmp_path):
    d = write_truss(tmp_path / "echo", "class Model:\n    def predict(self, x):\n        return x\n")
    with serve_ours(d) as s:
        # Headers that never end: refused once they pass 16 KiB, not held for ever.
        unfinished = raw_request(s.url, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000)
        assert unfinished.startswith(b"HTTP/1.1 400 ")
        big = raw_request(s.url, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 17000 + b"\r\n\r\n")
        assert big.startswith(b"HTTP/1.1 400 ")
        many = b"".join(b"X-H%d: v\r\n" % i for i in range(101))
        assert raw_request(s.url, b"GET / HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n").startswith(b"HTTP/1.1 400 ")
        # Within the bounds all is well.
        fine = b"".join(b"X-H%d: v\r\n" % i for i in range(50)) + b"X-Big: " + b"a" * 12000 + b"\r\n"
        assert raw_request(s.url, b"GET / HTTP/1.1\r\nHost: x\r\n" + fine + b"\r\n").startswith(b"HTTP/1.1 200 ")
        assert httpx.get(s.url + "/").json() is True  # the server is fine


def test_request_bodies_are_bounded_by_max_body_size(tmp_path):
    d = write_truss(tmp_path / "echo", "class Model:\n    def predict(self, x):\n        return x\n")
    with serve_ours(d, "--max-body-size", "1000") as s:
        assert httpx.post(s.predict_url(), json="a" * 900).json() == "a" * 900
        big = httpx.post(s.predict_url(), json="a" * 2000)
        assert big.status_code == 413 and "limit of 1000 bytes" in big.json()["error"]
        assert big.headers["x-baseten-error-code"] == "700"

        def chunked():  # no Content-Length: counted as it arrives
            for _ in range(10):
                yield b" " * 500

        assert httpx.post(s.predict_url(), content=chunked()).status_code == 413


# ---------------------------------------------------------------- clients that leave while their request waits

BUSY = """
import os
import time
from pathlib import Path


class Model:
    def predict(self, model_input):
        with open(Path(os.environ["KM_MARKS"]) / "calls", "a") as f:
            f.write(f"{model_input['i']} ")
        time.sleep(model_input.get("sleep", 0))
        return model_input["i"]
"""


def test_requests_whose_clients_left_while_they_waited_are_skipped_as_trusss_server_skips_them(tmp_path):
    """50 ms predicts at the default bound of 1, clients with a short timeout: Truss's server checks for the
    disconnect before it calls predict and skips it (499, "Client disconnected, skipping `predict`."). Ours must
    too, or a timeout that hits every client keeps the model busy for nobody, and the next client waits behind it."""
    if truss_reference_python() is None:
        pytest.skip("the truss reference server is not set up (make test sets it up)")
    d = write_truss(tmp_path / "busy", BUSY)

    def run(start, marks: Path, skips: int = 0) -> tuple:
        marks.mkdir()
        with start(d, env={"KM_MARKS": str(marks)}) as s:
            body = lambda i, sleep=0.0: json.dumps({"i": i, "sleep": sleep}).encode()  # noqa: E731
            request = lambda data: (b"POST /v1/models/model:predict HTTP/1.1\r\nhost: x\r\ncontent-type: "  # noqa: E731
                                    b"application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(data), data))
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                first = pool.submit(httpx.post, s.predict_url(), content=body(0, 3.0), timeout=30)
                deadline = time.monotonic() + 30
                while not (marks / "calls").exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
                leaving = [socket.create_connection(tuple(s.url.removeprefix("http://").split(":")), timeout=10)
                           for _ in range(5)]
                for i, sock in enumerate(leaving, 1):
                    sock.sendall(request(body(i)))
                time.sleep(0.5)  # their requests wait behind the first (watched after 50 ms)
                for sock in leaving:
                    sock.close()
                answer = first.result(timeout=30)
            after = httpx.post(s.predict_url(), content=body(9), timeout=30)
            skipped, deadline = 0, time.monotonic() + 10
            while skipped < skips and time.monotonic() < deadline:  # (the log is written by a thread of its own)
                time.sleep(0.05)
                skipped = s.log.count("Client disconnected, skipping `predict`.")
            return answer.json(), after.json(), (marks / "calls").read_text().split(), s.log

    theirs = run(lambda p, env: serve_truss(p, env=env), tmp_path / "theirs")
    ours = run(lambda p, env: serve_ours(p, env=env), tmp_path / "ours", skips=5)
    assert theirs[:3] == (0, 9, ["0", "9"]), theirs[3][-3000:]
    assert ours[:3] == theirs[:3], ours[3][-3000:]
    assert ours[3].count("Client disconnected, skipping `predict`.") == 5, ours[3][-3000:]


# ---------------------------------------------------------------- msgpack bodies, as Truss answers them

def test_msgpack_bodies_match_trusss_server():
    import msgpack

    if truss_reference_python() is None:
        pytest.skip("the truss reference server is not set up (make test sets it up)")
    binary = {"content-type": "application/octet-stream"}
    requests = [
        ("POST", "/v1/models/model:predict", msgpack.packb({"a": [1, 2.5, None], "s": "é"}), binary),
        ("POST", "/v1/models/model:predict", msgpack.packb([1, "x"]), {"content-type": "Application/Octet-Stream; x=y"}),
        ("POST", "/v1/models/model:predict", b"\x91", binary),  # a truncated array
        ("POST", "/no/such/route", b"\xc1", binary),
    ]
    echo = TRUSS_REFERENCE / "bench_trusses" / "echo"
    with serve_truss(echo) as theirs:
        expected = [answer(theirs.url, *req) for req in requests]
    with serve_ours(echo) as ours:
        got = [answer(ours.url, *req) for req in requests]
    for req, want, have in zip(requests, expected, got):
        assert have == want, f"{req}: Truss answered {want}, we answered {have}"
    assert msgpack.unpackb(got[0][-1]) == {"a": [1, 2.5, None], "s": "é"}


# ---------------------------------------------------------------- the logs

LOGGING = '''
import logging
import time
from pathlib import Path

logger = logging.getLogger("my_model")


class Model:
    def __init__(self, secrets):
        self._secrets = secrets

    def load(self):
        logger.warning("loading with token %s", self._secrets["tok"])

    def predict(self, model_input):
        if model_input.get("stream"):
            def gen():
                try:
                    yield "a"
                    yield "b"
                finally:
                    logger.warning("stream finished")
            return gen()
        logger.warning("predict sees %s", self._secrets["tok"])
        return 1
'''


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_models_own_log_lines_are_redacted(tmp_path, fmt):
    d = write_truss(tmp_path / "logs", LOGGING, "secrets: {tok: null}\n")
    with serve_ours(d, "--log-format", fmt, env={"TRUSS_SECRET_tok": CANARY}) as s:
        assert httpx.post(s.predict_url(), json={}).json() == 1
    assert "loading with token ***" in s.log and "predict sees ***" in s.log
    assert CANARY not in s.log
    if fmt == "json":
        lines = [json.loads(line) for line in s.log.splitlines() if line.startswith("{")]
        assert any(e["message"] == "predict sees ***" and e.get("request_id") for e in lines)
        # The access line (made in the writer thread from what the request path queued) has the same request id.
        (access,) = [e for e in lines if e["logger"] == "kernel_magics.access"]
        assert access["message"].startswith("Handled request - POST /v1/models/model:predict 200 (")
        assert access["request_id"] == next(e["request_id"] for e in lines if e["message"] == "predict sees ***")


def test_the_access_log_redacts_a_callers_id_as_it_was_sent_replaces_an_empty_one_and_counts_a_get_as_readiness(
        tmp_path):
    """A caller's x-baseten-request-id is read as the text it was sent as (UTF-8, or Latin-1 as Python's http.client
    sends a str), and what does not print in it is escaped, so a secret in it is found: read as Latin-1 always, a
    UTF-8 id went out as mojibake, unredacted. An empty id gets one of ours. A GET of a predict path answers as
    readiness (as under Truss: `{model_name}` takes the colon) and is counted so, and logged, as Truss logs it."""
    secret = "pä\\ss\twört-" + CANARY  # (a backslash and a tab: escaped in the line, found all the same)
    d = write_truss(tmp_path / "logs", LOGGING, "secrets: {tok: null}\n")

    def count(metrics: str, route: str) -> float:
        line = f'kernel_magics_requests_total{{route="{route}",status="200"}} '
        return sum(float(x.rsplit(" ", 1)[1]) for x in metrics.splitlines() if x.startswith(line))

    with serve_ours(d, env={"TRUSS_SECRET_tok": secret}) as s:
        for request_id in (f"utf8-{secret}".encode(), f"latin1-{secret}".encode("latin-1"), b""):
            assert httpx.post(s.predict_url(), json={}, headers={"x-baseten-request-id": request_id}).json() == 1
        before = httpx.get(s.url + "/metrics").text
        assert httpx.get(s.predict_url()).json() == {}  # readiness's answer
        after = httpx.get(s.url + "/metrics").text
    handled = [line for line in s.log.splitlines() if "Handled request" in line]
    assert CANARY not in s.log and "ssw" not in s.log, s.log
    assert [line.rsplit("request_id=", 1)[1] for line in handled[:2]] == ["utf8-***", "latin1-***"]
    assert not handled[2].endswith("request_id=")  # ours instead
    assert count(after, "/v1/models/{model_name}:predict") == 3
    assert count(after, "/v1/models/{model_name}") == count(before, "/v1/models/{model_name}") + 1
    assert "GET /v1/models/model:predict 200" in handled[3]


@pytest.mark.parametrize("level", ["warning", "error"])
def test_a_port_the_system_chose_is_said_at_any_log_level(tmp_path, level):
    """`--port 0 --log-level warning` (or error): the line that names the address still comes, an INFO line
    (nothing else tells the port)."""
    import os
    import queue
    import threading

    d = write_truss(tmp_path / "m", "class Model:\n    def predict(self, model_input):\n        return model_input\n")
    proc = subprocess.Popen([sys.executable, "-m", "kernel_magics.cli", "serve", str(d), "--port", "0", "--log-level",
                             level], stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        deadline, seen = time.monotonic() + 60, []
        while not any("Serving " in line for line in seen):
            seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
        (url,) = re.findall(r" INFO kernel_magics\.server: Serving .* on (http://127\.0\.0\.1:\d+): loading", seen[-1])
        while httpx.get(url + "/v1/models/model", timeout=10).status_code != 200:  # (503 while it loads)
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        assert httpx.post(url + "/v1/models/model:predict", json={"a": 1}, timeout=60).json() == {"a": 1}
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)


def test_with_json_logs_every_line_the_command_writes_is_json_to_the_interrupt(tmp_path):
    """`serve --log-format json`: the command's own lines (a requirement warning, "interrupted" after Ctrl-C) are
    JSON lines like the server's, so a collector that reads every line as JSON reads all of them."""
    import signal

    d = write_truss(tmp_path / "logs", LOGGING, "secrets: {tok: null}\nrequirements: [no-such-dist-km==1.0]\n")
    with serve_ours(d, "--log-format", "json", env={"TRUSS_SECRET_tok": CANARY}) as s:
        assert httpx.post(s.predict_url(), json={}).json() == 1
        s.proc.send_signal(signal.SIGINT)
        assert s.proc.wait(timeout=30) == 130
    lines = [json.loads(line) for line in s.log.splitlines() if line.strip()]  # each one JSON, or this fails
    assert lines[-1]["level"] == "WARNING" and lines[-1]["message"] == "interrupted"
    assert any(e["level"] == "WARNING" and e["message"].startswith("config.yaml requires no-such-dist-km==1.0")
               for e in lines)
    assert any(e["logger"] == "kernel_magics.access" for e in lines)
    # An error the command finds in its options before it serves: one JSON line too (exit 2, a usage error).
    refused = subprocess.run([sys.executable, "-m", "kernel_magics", "serve", str(d), "--replicas", "2",
                              "--log-format", "json"], capture_output=True, text=True, timeout=60)
    (line,) = [json.loads(line) for line in refused.stderr.splitlines()]
    assert (refused.returncode, line["level"]) == (2, "ERROR") and line["message"].endswith("need --engine ray.")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_an_access_line_written_without_a_record_reads_as_its_record_would(fmt):
    """The writer makes no LogRecord for an access line (serving/logs.py): the line must be the one the
    formatter writes for the record, to the character, in both formats."""
    import time

    from kernel_magics.serving.logs import _ACCESS_FORMAT, JsonLines, _Text, _Writer

    formatter = JsonLines() if fmt == "json" else _Text()
    items = [(created, "rid-7", ("POST", "/v1/models/model:predict", 200, 1.25, "rid-7"))
             for created in (time.time(), 1700000000.9996, 1700000001.0, 1700000001.0004, 1700000000.5)]
    items.append((1700000002.25, None, ("GET", "/v1/models/é", 404, 0.04999, None)))
    lines = [formatter.format(_Writer._record(item)) for item in items]
    for (created, request_id, args), line in zip(items, lines):
        assert formatter.access(created, _ACCESS_FORMAT % args, request_id) == line  # (with secrets: redacted first)
    assert formatter.access_lines(items) == lines  # one burst across four seconds, back to one of them


def test_request_counts_read_as_prometheus_clients_counter_and_histogram_would_show_them():
    """serving/access.py keeps a request's counts in plain lists and renders them when /metrics is read: the
    text must be the one prometheus_client's own Counter and Histogram give for the same requests, sample
    for sample (the ``_created`` times aside, which differ by when each was made)."""
    import re

    from prometheus_client import (
        CollectorRegistry, Counter, Histogram, disable_created_metrics, enable_created_metrics, generate_latest,
    )

    from kernel_magics.serving.access import _LATENCY_BOUNDS, Metrics

    ours, theirs = CollectorRegistry(), CollectorRegistry()
    metrics = Metrics(registry=ours)
    counter = Counter("kernel_magics_requests", "HTTP requests handled", ["route", "status"], registry=theirs)
    latency = Histogram("kernel_magics_request_seconds", "Time to the response's start", ["route"],
                        buckets=_LATENCY_BOUNDS, registry=theirs)
    # Bounds exactly (a bucket counts what is at most its bound), between them, beyond the last, and none at all.
    requests = [("/v1/models/{model_name}:predict", 200, s) for s in (0.0004, 0.001, 0.0011, 0.005, 0.3, 30, 31.5)]
    requests += [("/v1/models/{model_name}:predict", 500, 0.02), ("/", 200, 0.0), ("unmatched", 404, 1e-6)]
    for route, status, seconds in requests:
        metrics.record(route, status, seconds)
        counter.labels(route, str(status)).inc()
        latency.labels(route).observe(seconds)

    def text(registry) -> str:
        return re.sub(r"^(\S+_created(\{.*\})?) \S+$", r"\1 T", generate_latest(registry).decode(), flags=re.M)

    assert text(ours) == text(theirs)  # (and no batch metrics: no model with predict_batch was watched)
    disable_created_metrics()  # (as PROMETHEUS_DISABLE_CREATED_SERIES=true does at import)
    try:
        assert text(ours) == text(theirs) and "_created" not in text(ours)
    finally:
        enable_created_metrics()
    assert 'kernel_magics_request_seconds_bucket{le="0.001",route="/v1/models/{model_name}:predict"} 2.0' in text(ours)


def test_each_request_is_labelled_with_the_route_that_answers_it():
    """/metrics labels a request by its path's shape (serving/access.route_of, no router call on the request
    path): the label must be the template of the route Starlette answers it with, for every route and method."""
    from starlette.routing import Match

    from kernel_magics.serving.access import route_of
    from kernel_magics.serving.server import _routes

    routes = _routes()
    paths = ["/", "/ping", "/invocations", "/metrics", "/v1/chat/completions", "/v1/models/model",
             "/v1/models/m:predict", "/v1/models/m:predict_binary", "/v1/models/m:other", "/v1/models/model/loaded",
             "/v1/models/m:predict/loaded", "/v1/models/m:x/schema", "/v1/models/model/schema", "/v1/models/a/b",
             "/no/such", "/v1/models/", "/v1/models//loaded", "/v1/models/:predict"]
    checked = 0
    for path in paths:
        for method in ("GET", "HEAD", "POST"):
            scope = {"type": "http", "path": path, "method": method, "root_path": ""}
            full = [route.path for route in routes if route.matches(scope)[0] is Match.FULL]
            if full:
                assert route_of(path, method) == full[0], (path, method)
                checked += 1
            elif not any(route.matches(scope)[0] is Match.PARTIAL for route in routes):
                assert route_of(path, method) == "unmatched", (path, method)
                checked += 1
    assert checked > 30


@pytest.fixture
def server_logging():
    """serving/logs.configure in this process, undone afterwards (the root logger is the process's)."""
    import logging

    from kernel_magics.serving import logs

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    yield logs
    logs.stop()
    root.handlers[:], _ = saved
    root.setLevel(saved[1])


class _HostWithASecret:
    def __init__(self, name: str, value: str) -> None:
        from kernel_magics.core.secrets import SecretStore

        self.secrets = SecretStore([name])
        self.secrets.set_value(name, value)


def test_the_writer_keeps_every_line_where_it_belongs(capsys, server_logging):
    """A handler added after configure still gets the access lines; a caller's request id holding a secret is
    redacted in the JSON field too; lines after stop() are written, not queued for nobody."""
    import logging

    logs = server_logging
    host = _HostWithASecret("tok", CANARY)
    logs.redact_logs_of(host)
    logs.configure("info", "json")
    logs.access_line("GET", "/a\nforged line", 200, 1.0, f"first-{CANARY}")
    logs.access_line("GET", "/t\tab\x1b[31mred\x00", 404, 1.0, "controls")  # (%09, %1B, %00: none written raw)
    logs.access_line("GET", "/v1/models/é", 404, 1.0, "printable")  # (as it is)
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    keep = Keep()
    logging.getLogger().addHandler(keep)
    token = logs.REQUEST_ID.set(f"id-{CANARY}")  # as RequestLog sets it for the request
    try:
        logs.access_line("POST", "/v1/models/model:predict", 200, 1.0, f"id-{CANARY}")
        logging.getLogger("model").warning("a model line")
    finally:
        logs.REQUEST_ID.reset(token)
        logging.getLogger().removeHandler(keep)
    assert any("POST /v1/models/model:predict 200" in m for m in seen)  # the late handler got the access line
    logs.stop()
    logging.getLogger("model").warning("after stop")
    err = capsys.readouterr().err
    assert CANARY not in err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    messages = [e["message"] for e in lines]
    assert "a model line" in messages and "after stop" in messages
    assert {e.get("request_id") for e in lines} >= {"id-***", "first-***"}  # the record's path and the writer's
    assert any(m.startswith("Handled request - GET /a\\nforged line 200") for m in messages)  # one line
    assert any(m.startswith("Handled request - GET /t\\tab\\x1b[31mred\\x00 404") for m in messages)
    assert any(m.startswith("Handled request - GET /v1/models/é 404") for m in messages)


def test_a_change_to_the_access_loggers_handlers_or_level_holds_from_the_next_burst(capsys, server_logging):
    """On a loop, whether the access logger is on and goes only to our writer is asked once a burst
    (serving/logs.access_line): a handler added or a level raised meanwhile holds from the next burst on."""
    import asyncio
    import logging

    logs = server_logging
    logs.configure("info", "text")
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage().rsplit("=", 1)[1])

    keep, access = Keep(), logging.getLogger(logs.ACCESS_LOGGER)

    async def requests() -> None:
        logs.access_line("POST", "/v1/models/model:predict", 200, 1.0, "a")  # opens a burst
        logging.getLogger().addHandler(keep)
        logs.access_line("POST", "/v1/models/model:predict", 200, 1.0, "b")  # the same burst: our writer only
        await asyncio.sleep(logs._LOOP_GATHER * 3)
        logs.access_line("POST", "/v1/models/model:predict", 200, 1.0, "c")  # the next: an ordinary record too
        logging.getLogger().removeHandler(keep)
        await asyncio.sleep(logs._LOOP_GATHER * 3)
        logs.access_line("POST", "/v1/models/model:predict", 200, 1.0, "d")  # a burst, our writer's alone again
        access.setLevel(logging.WARNING)
        logs.access_line("POST", "/v1/models/model:predict", 200, 1.0, "e")  # its burst is open: written
        await asyncio.sleep(logs._LOOP_GATHER * 3)
        logs.access_line("POST", "/v1/models/model:predict", 200, 1.0, "f")  # the logger is off: nowhere

    try:
        asyncio.run(requests())
    finally:
        access.setLevel(logging.NOTSET)
    logs.stop()
    written = [line.rsplit("=", 1)[1] for line in capsys.readouterr().err.splitlines() if "Handled request" in line]
    assert seen == ["c"]
    assert written == ["a", "b", "c", "d", "e"]


def test_the_access_log_as_trusss(tmp_path):
    d = write_truss(tmp_path / "logs", LOGGING, "secrets: {tok: null}\n")
    with serve_ours(d, env={"TRUSS_SECRET_tok": CANARY}) as s:
        for path in ("/", "/v1/models/model", "/v1/models/model/loaded", "/ping", "/metrics", "/no/such"):
            httpx.get(s.url + path)
        httpx.post(s.predict_url(), json={}, headers={"x-baseten-request-id": "req-42"})
        assert httpx.post(s.predict_url(), json={"stream": True}).text == "ab"
    handled = [line for line in s.log.splitlines() if "Handled request" in line]
    assert any("POST /v1/models/model:predict 200" in line and "request_id=req-42" in line for line in handled)
    assert any("GET /no/such 404" in line for line in handled)  # a 404 is logged
    # Probes and /metrics are not.
    assert not any(f"GET {p} " in line for line in handled for p in ("/", "/v1/models/model", "/ping", "/metrics"))
    assert not any("/loaded" in line for line in handled)
    # Every line has its own request id.
    ids = [line.rsplit("request_id=", 1)[1] for line in handled]
    assert len(set(ids)) == len(ids) == 3
    # A stream's line is written when the stream has ended (its generator's finally ran first).
    log = s.log
    stream_lines = [i for i, line in enumerate(log.splitlines()) if "Handled request - POST" in line]
    finished = [i for i, line in enumerate(log.splitlines()) if "stream finished" in line]
    assert finished and finished[0] < stream_lines[-1]
    # The last requests' lines (still in the loop's burst when the server was told to stop) come before the lines
    # that say it stopped.
    complete = [i for i, line in enumerate(log.splitlines()) if "Application shutdown complete" in line]
    assert complete and stream_lines[-1] < complete[0], log


# ---------------------------------------------------------------- one wire form of a chunk

def test_a_character_split_across_chunks_shows_the_same_live_and_joined():
    from kernel_magics.core.streams import ChunkText, chunk_bytes, join_chunks
    from kernel_magics.notebook.streaming import chunk_text

    snowman = "☃".encode()  # three bytes
    chunks = ["a", snowman[:1], snowman[1:2], snowman[2:] + b"b", {"n": 1}]
    assert b"".join(chunk_bytes(c) for c in chunks) == b"a\xe2\x98\x83b" + b'{"n": 1}\n'
    live = ChunkText()  # as the view receives them: one delivery a chunk
    shown = "".join(live.feed([c]) for c in chunks) + live.finish()
    assert shown == chunk_text(chunks) == 'a☃b{"n": 1}\n'
    assert "\ufffd" not in shown
    assert join_chunks(chunks[:4]) == "a☃b"  # the gathered result of the text chunks reads the same
    cut = ChunkText()
    assert cut.feed([snowman[:2]]) == "" and cut.finish() == "\ufffd"  # a stream that ends mid-character


def test_the_stream_view_shows_a_split_character_once(tmp_path, fresh_kernel):
    """In a kernel: a generator of bytes that splits a character; the view's text and the result agree."""
    k = fresh_kernel(cwd=tmp_path, load_ext=True)
    k.ok("import time")
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        def gen():\n"
         "            data = 'é☃'.encode()\n            for i in range(len(data)):\n"
         "                yield data[i:i + 1]\n                time.sleep(0.05)\n        return gen()")
    k.ok("%model_load")
    ex = k.ok("r = %model_predict {}\nprint(repr(r))")
    # The plain view prints each flush's delta (one byte or so each): the characters show whole.
    assert ex.stdout.startswith("é☃\n[done: 5 chunks") and "\ufffd" not in ex.stdout
    assert "'é☃'" in ex.stdout


def test_access_lines_made_on_an_event_loop_are_written_once_each_redacted_and_none_is_lost_at_stop(
        capsys, server_logging):
    """On a loop the lines of a burst are made there and handed to the writer as one text, soon; a burst that its
    loop never handed over (the loop closed first) is written out by stop(), and the thread's next loop opens a
    burst of its own."""
    import asyncio

    logs = server_logging
    host = _HostWithASecret("tok", CANARY)  # (the logs hold it weakly)
    logs.redact_logs_of(host)
    logs.configure("info", "text")

    async def requests(last: str) -> None:
        for i in range(3):
            logs.access_line("POST", "/v1/models/model:predict", 200, 1.0, f"r{i}-{CANARY}")
        await asyncio.sleep(0.5)  # the burst is handed over and written
        logs.access_line("GET", f"/v1/models/{CANARY}", 404, 1.0, last)  # its burst is still open when the loop ends

    def written() -> list:
        return [line.split("request_id=")[1] for line in capsys.readouterr().err.splitlines()
                if "Handled request" in line]

    asyncio.run(requests("first-loop"))
    assert written() == ["r0-***", "r1-***", "r2-***"]  # written before stop(), within the half second
    asyncio.run(requests("second-loop"))  # a new loop in the same thread: its lines are written too
    second = written()
    logs.stop()
    err = capsys.readouterr().err
    assert CANARY not in err
    handled = [line for line in err.splitlines() if "Handled request" in line]
    assert second == ["r0-***", "r1-***", "r2-***"]
    assert [line.split("request_id=")[1] for line in handled] == ["first-loop", "second-loop"], err
    assert "GET /v1/models/*** 404" in handled[-1]
