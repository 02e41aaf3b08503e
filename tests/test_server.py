"""`kernel-magics serve` and `%model_serve`: real uvicorn on free ports, real HTTP, compared with Truss's server."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server_harness import (
    TRUSS_REFERENCE, answer, free_port, post_concurrently, post_in_background, serve_ours, serve_truss,
    truss_reference_python, wait_for, write_truss,
)

CANARY = "sk-CANARY-serve-91b2"

BASIC = '''
import os, time
from pathlib import Path
from fastapi import HTTPException

MARKERS = Path(os.environ["KM_MARKERS"])  # from config.yaml: set before this module is imported


class Model:
    def __init__(self, **kwargs):
        self._secrets = kwargs["secrets"]

    def load(self):
        self.token = self._secrets["tok"]

    def predict(self, model_input):
        op = model_input.get("op", "echo")
        if op == "boom":
            raise ValueError(f"bad token {self.token}")
        if op == "teapot":
            raise HTTPException(status_code=418, detail="I'm a teapot")
        if op == "sleep":
            (MARKERS / "sleep-started").write_text("1")
            time.sleep(model_input["s"])
        return {"op": op, "i": model_input.get("i"), "token_length": len(self.token), "flag": os.environ["KM_FLAG"]}
'''

STREAM = '''
import os, time
from pathlib import Path

MARKERS = Path(os.environ["KM_MARKERS"])


class Model:
    def predict(self, model_input):
        n, tag = model_input.get("n", 3), model_input.get("tag", "t")
        acks, delay = model_input.get("acks", False), model_input.get("delay", 0)

        def gen():
            try:
                for i in range(n):
                    yield f"{i};"
                    time.sleep(delay)
                    # With acks, chunk i+1 is made only after the client saw chunk i.
                    deadline = time.monotonic() + 10
                    while acks and not (MARKERS / f"{tag}-ack-{i}").exists() and time.monotonic() < deadline:
                        time.sleep(0.01)
            finally:
                (MARKERS / f"{tag}-closed").write_text("1")

        return gen()
'''

PYD = '''
import pydantic


class Prompt(pydantic.BaseModel):
    prompt: str
    n: int = 1


class Out(pydantic.BaseModel):
    text: str
    score: float = 1.5


class Model:
    def predict(self, model_input: Prompt) -> Out:
        if model_input.prompt == "boom":
            raise RuntimeError("boom")
        if model_input.prompt == "nan":
            return Out(text="", score=float("nan"))  # Truss sends a Pydantic result's NaN as null
        return Out(text=model_input.prompt * model_input.n)
'''


@pytest.fixture
def markers(tmp_path):
    path = tmp_path / "markers"
    path.mkdir()
    return path


def basic_dir(tmp_path, markers, concurrency=4):
    return write_truss(tmp_path / "basic", BASIC, f"""\
        model_name: basic
        secrets: {{tok: null}}
        environment_variables: {{KM_FLAG: "on", KM_MARKERS: "{markers}"}}
        runtime: {{predict_concurrency: {concurrency}}}
        """)


def stream_dir(tmp_path, markers):
    return write_truss(tmp_path / "stream", STREAM, f"environment_variables: {{KM_MARKERS: \"{markers}\"}}\n")


def baseten_headers(response: httpx.Response) -> tuple:
    return response.headers.get("x-baseten-error-source"), response.headers.get("x-baseten-error-code")


# ---------------------------------------------------------------- routes, bodies, headers

@pytest.fixture(params=["uvicorn", pytest.param("ray", marks=[pytest.mark.ray, pytest.mark.ray_cluster])])
def engine(request):
    """Each test below runs on `kernel-magics serve` and on Ray Serve (one replica, on the shared cluster; what
    two replicas do is tested in test_ray.py, test_ray_cluster.py and test_batching.py)."""
    return request.param if request.param == "uvicorn" else request.getfixturevalue("ray_cluster")


def test_routes_errors_and_headers(tmp_path, markers, engine):
    with serve_ours(basic_dir(tmp_path, markers), env={"TRUSS_SECRET_tok": CANARY}, engine=engine) as s:
        assert httpx.get(s.url + "/").json() is True
        assert httpx.get(s.url + "/v1/models/model").json() == {}
        ok = httpx.post(s.predict_url("any-name"), json={"op": "echo", "i": 1})  # the name is ignored
        assert ok.status_code == 200 and ok.headers["content-type"] == "application/json"
        assert ok.json() == {"op": "echo", "i": 1, "token_length": len(CANARY), "flag": "on"}
        bad = httpx.post(s.predict_url(), content=b"{nope")
        assert bad.status_code == 400 and bad.json()["error"].startswith("Invalid JSON payload: ")
        assert baseten_headers(bad) == ("04", "700")
        empty = httpx.post(s.predict_url(), content=b"")
        assert empty.status_code == 400 and "Invalid JSON payload" in empty.json()["error"]
        boom = httpx.post(s.predict_url(), json={"op": "boom"})
        assert boom.status_code == 500 and boom.json() == {"error": "Internal Server Error (in model/chainlet)."}
        assert baseten_headers(boom) == ("04", "600")
        teapot = httpx.post(s.predict_url(), json={"op": "teapot"})
        assert teapot.status_code == 418 and teapot.json() == {"error": "I'm a teapot"}
        assert baseten_headers(teapot) == ("04", "600")
        assert httpx.get(s.url + "/v1/models/model/schema").status_code == 404
        assert httpx.get(s.url + "/nothing").status_code == 404
    log = s.log
    # The user's traceback is in the log, pointing at model.py; the secret value never is.
    assert "Internal Server Error (in model/chainlet)." in log and "model.py" in log and "ValueError" in log
    assert CANARY not in log and "bad token ***" in log
    if engine == "uvicorn":
        assert "Uvicorn running on http://127.0.0.1:" in log
    else:
        assert "Serving on http://127.0.0.1:" in log


def test_pydantic_input_errors_and_schema(tmp_path, engine):
    with serve_ours(write_truss(tmp_path / "pyd", PYD), engine=engine) as s:
        assert httpx.post(s.predict_url(), json={"prompt": "ab", "n": 2}).json() == {"text": "abab", "score": 1.5}
        missing = httpx.post(s.predict_url(), json={"n": 2})
        assert missing.status_code == 400 and baseten_headers(missing) == ("04", "700")
        assert missing.json() == {"error": "Input Parsing Error:\n  `prompt`: Field required."}
        schema = httpx.get(s.url + "/v1/models/model/schema").json()
        assert schema["input_schema"]["title"] == "Prompt" and schema["output_schema"]["title"] == "Out"
        assert schema["supports_streaming"] is False


def test_readiness_is_503_while_loading_and_liveness_answers(tmp_path, markers):
    gate = markers / "go"
    model = f'''
import time
from pathlib import Path
class Model:
    def load(self):
        while not Path("{gate}").exists():
            time.sleep(0.02)
    def predict(self, model_input):
        return "ready"
'''
    with serve_ours(write_truss(tmp_path / "slow", model), wait_ready=False) as s:
        assert httpx.get(s.url + "/").json() is True
        not_ready = httpx.get(s.url + "/v1/models/model")
        assert not_ready.status_code == 503 and not_ready.json() == {"error": "Model with name model is not ready."}
        assert baseten_headers(not_ready) == ("04", "600")
        assert httpx.post(s.predict_url(), json={}).status_code == 503
        gate.write_text("1")
        deadline = time.monotonic() + 20
        while httpx.get(s.url + "/v1/models/model").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.post(s.predict_url(), json={}).json() == "ready"


def test_liveness_and_readiness_answer_during_a_long_sync_predict(tmp_path, markers):
    with serve_ours(basic_dir(tmp_path, markers), env={"TRUSS_SECRET_tok": CANARY}) as s:
        slow, result = post_in_background(s.predict_url(), {"op": "sleep", "s": 3})
        assert wait_for(markers / "sleep-started")
        assert httpx.get(s.url + "/v1/models/model", timeout=5).status_code == 200
        assert httpx.get(s.url + "/", timeout=5).status_code == 200
        assert slow.is_alive()  # both answered while the predict was still running
        slow.join()
        assert result["r"].status_code == 200


def test_32_concurrent_requests_none_lost(tmp_path, markers):
    with serve_ours(basic_dir(tmp_path, markers, concurrency=1), env={"TRUSS_SECRET_tok": CANARY}) as s:
        responses = post_concurrently(s.predict_url(), [{"i": i} for i in range(32)])
    assert [r.status_code for r in responses] == [200] * 32
    assert sorted(r.json()["i"] for r in responses) == list(range(32))


# ---------------------------------------------------------------- streaming

def test_stream_arrives_chunk_by_chunk(tmp_path, markers, engine):
    with serve_ours(stream_dir(tmp_path, markers), engine=engine) as s:
        with httpx.stream("POST", s.predict_url(), json={"n": 4, "tag": "s", "acks": True}, timeout=30) as r:
            assert r.headers["content-type"] == "application/octet-stream"
            assert r.headers.get("transfer-encoding") == "chunked"
            assert (engine != "uvicorn") == ("x-kernel-magics-replica" in r.headers)
            got = []
            for chunk in r.iter_raw():
                got.append(chunk.decode())
                # Only now may the model produce the next chunk: each one was sent on its own.
                (markers / f"s-ack-{len(got) - 1}").write_text("1")
        assert got == ["0;", "1;", "2;", "3;"]
        gathered = httpx.post(s.predict_url(), json={"n": 3, "tag": "g"}, headers={"Accept": "application/json"})
        assert gathered.headers["content-type"] == "application/json" and gathered.json() == "0;1;2;"


def test_client_disconnect_closes_the_generator_and_frees_the_slot(tmp_path, markers, engine):
    with serve_ours(stream_dir(tmp_path, markers), engine=engine, replicas=1) as s:  # predict_concurrency 1
        # A generator that would run for minutes (100,000 chunks, 10 ms apart).
        with httpx.stream("POST", s.predict_url(), json={"n": 100000, "tag": "d", "delay": 0.01}, timeout=30) as r:
            first = next(r.iter_raw())
            assert first == b"0;"
        # The client is gone: the generator's `finally` ran ...
        assert wait_for(markers / "d-closed")
        # ... and the only predict slot is free again.
        after = httpx.post(s.predict_url(), json={"n": 2, "tag": "after"}, timeout=20)
        assert after.status_code == 200 and after.content == b"0;1;"


# ---------------------------------------------------------------- secrets, lifecycle

def test_secrets_from_a_secrets_dir(tmp_path, markers):
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "tok").write_text("from-a-file")
    with serve_ours(basic_dir(tmp_path, markers), "--secrets-dir", str(secrets)) as s:
        assert httpx.post(s.predict_url(), json={}).json()["token_length"] == len("from-a-file")


def test_missing_secret_fails_the_load_with_one_paragraph(tmp_path, markers):
    port = free_port()
    done = _run_to_exit(basic_dir(tmp_path, markers), port)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the model failed to load: Secret 'tok' has no value")
    assert "TRUSS_SECRET_tok" in last and "--secrets-dir folder. The server stopped; start it again" in last, last
    assert "Traceback" not in done.stderr and "secrets.py" not in done.stderr  # a config mistake: no frames of ours


def _run_to_exit(truss_dir: Path, port: int, *args: str, env=None):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "kernel_magics.cli", "serve", str(truss_dir), "--port", str(port), *args],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})


def test_failed_load_and_missing_model_exit_non_zero(tmp_path):
    bad = write_truss(tmp_path / "bad", "class Model:\n    def load(self):\n        raise RuntimeError('no weights at /models/x')\n"
                                         "    def predict(self, model_input):\n        return 1\n")
    done = _run_to_exit(bad, free_port())
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: the model failed to load: RuntimeError: no weights at /models/x.")
    assert 'model.py", line 3, in load' in done.stderr
    (tmp_path / "nomodel").mkdir()
    (tmp_path / "nomodel" / "config.yaml").write_text("model_name: x\n")
    done = _run_to_exit(tmp_path / "nomodel", free_port())
    assert done.returncode == 1 and "has no model/model.py" in done.stderr and "Traceback" not in done.stderr
    done = _run_to_exit(tmp_path / "nowhere", free_port())
    assert done.returncode == 1 and "nowhere does not exist" in done.stderr
    (tmp_path / "noconfig").mkdir()
    done = _run_to_exit(tmp_path / "noconfig", free_port())
    assert done.returncode == 1 and "has no config.yaml" in done.stderr


def test_sigterm_finishes_the_request_in_flight(tmp_path, markers):
    with serve_ours(basic_dir(tmp_path, markers), env={"TRUSS_SECRET_tok": CANARY}) as s:
        slow, result = post_in_background(s.predict_url(), {"op": "sleep", "s": 1.5})
        assert wait_for(markers / "sleep-started")
        s.proc.send_signal(signal.SIGTERM)
        slow.join()
        assert result["r"].status_code == 200 and result["r"].json()["op"] == "sleep"
        # After the graceful shutdown uvicorn re-raises the signal, so a supervisor sees "terminated by SIGTERM".
        assert s.proc.wait(timeout=30) == -signal.SIGTERM
    assert "Finished server process" in s.log


def test_requirement_mismatches_are_warned_about(tmp_path):
    d = write_truss(tmp_path / "req", "class Model:\n    def predict(self, x):\n        return x\n",
                    "requirements: [pyyaml==0.0.1, not-a-real-dist-xyz==1.0, httpx]\n")
    with serve_ours(d) as s:
        assert httpx.post(s.predict_url(), json=1).json() == 1
    assert "warning: config.yaml requires pyyaml==0.0.1 but pyyaml" in s.log
    assert "warning: config.yaml requires not-a-real-dist-xyz==1.0 but not-a-real-dist-xyz is not installed" in s.log
    assert "httpx" not in s.log.split("Uvicorn running")[0].replace("not-a-real", "")


# ---------------------------------------------------------------- the same answers as Truss's own server

COMMON_REQUESTS = [
    ("GET", "/", None, {}),
    ("GET", "/v1/models/model", None, {}),
    ("GET", "/v1/models/whatever", None, {}),
    ("GET", "/v1/models/model/schema", None, {}),
    ("GET", "/no/such/route", None, {}),
    ("POST", "/v1/models/model:predict", b"{bad json", {}),
    ("POST", "/v1/models/model:predict", b"", {}),
]
JSON = {"content-type": "application/json"}
REPLAY = {
    "echo": (TRUSS_REFERENCE / "bench_trusses" / "echo", [
        ("POST", "/v1/models/model:predict", b'{"a": [1, 2, {"b": null}], "s": "\\u00e9"}', JSON),
        ("POST", "/v1/models/m:predict", b'"just a string"', JSON),
        ("POST", "/v1/models/model:predict", b"3.5", JSON),
    ]),
    "echo_stream": (TRUSS_REFERENCE / "bench_trusses" / "echo_stream", [
        ("POST", "/v1/models/model:predict", b'{"text": "hello", "n": 5}', JSON),
        ("POST", "/v1/models/model:predict", b'{"text": "hi", "n": 3}', {**JSON, "accept": "application/json"}),
        ("POST", "/v1/models/model:predict", b'{"n": 0}', JSON),
    ]),
    "pydantic": (None, [
        ("POST", "/v1/models/model:predict", b'{"prompt": "ab", "n": 3}', JSON),
        ("POST", "/v1/models/model:predict", b'{"prompt": "nan"}', JSON),
        ("POST", "/v1/models/model:predict", b'{"n": 3}', JSON),
        ("POST", "/v1/models/model:predict", b'{"prompt": "a", "n": "many"}', JSON),
        ("POST", "/v1/models/model:predict", b'{"prompt": "boom"}', JSON),
        ("POST", "/v1/models/model:predict", b"[1,", JSON),
    ]),
    "errors": (None, [
        ("POST", "/v1/models/model:predict", b'{"op": "echo", "i": 7}', JSON),
        ("POST", "/v1/models/model:predict", b'{"op": "boom"}', JSON),
        ("POST", "/v1/models/model:predict", b'{"op": "teapot"}', JSON),
    ]),
}


@pytest.mark.parametrize("name, on_ray", [(name, False) for name in REPLAY] + [
    pytest.param(name, True, marks=[pytest.mark.ray, pytest.mark.ray_cluster]) for name in ("errors", "echo_stream")])
def test_answers_match_truss_server(tmp_path, markers, name, on_ray, request):
    engine = request.getfixturevalue("ray_cluster") if on_ray else "uvicorn"
    if truss_reference_python() is None:
        pytest.skip("the truss reference server is not set up (make test sets it up)")
    path, requests = REPLAY[name]
    env = {}
    if name == "pydantic":
        path = write_truss(tmp_path / "pyd", PYD)
    elif name == "errors":
        path, env = basic_dir(tmp_path, markers), {"TRUSS_SECRET_tok": CANARY}
    requests = COMMON_REQUESTS + requests
    with serve_truss(path, env=env) as theirs:
        expected = [answer(theirs.url, *req) for req in requests]
    with serve_ours(path, env=env, engine=engine) as ours:
        got = [answer(ours.url, *req) for req in requests]
    for req, want, have in zip(requests, expected, got):
        assert have == want, f"{req}: Truss answered {want}, we answered {have}"


# ---------------------------------------------------------------- %model_serve in the notebook

def test_model_serve_from_the_notebook(tmp_path, fresh_kernel):
    k = fresh_kernel(cwd=tmp_path)
    port = free_port()
    k.ok("%load_ext kernel_magics\nimport time")
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        if model_input.get('sleep'):\n"
         "            time.sleep(model_input['sleep'])\n        return {'v': 1}")
    k.ok("%model_load")
    ex = k.ok(f"%model_serve --port {port}")
    assert f"http://127.0.0.1:{port}/v1/models/model:predict" in ex.stdout
    url = f"http://127.0.0.1:{port}/v1/models/model:predict"
    assert httpx.post(url, json={}).json() == {"v": 1}
    # A hot reload takes effect on the next request.
    k.ok("%%model\nimport pathlib\nclass Model:\n    def predict(self, model_input):\n        if model_input.get('gate'):\n"
         "            pathlib.Path(model_input['gate'] + '.started').write_text('1')\n"
         "            while not pathlib.Path(model_input['gate']).exists():\n                time.sleep(0.01)\n"
         "        return {'v': 2}")
    assert httpx.post(url, json={}).json() == {"v": 2}
    # The kernel keeps answering while a slow request is served (it waits for the gate until then).
    gate = tmp_path / "gate"
    slow, result = post_in_background(url, {"gate": str(gate)})
    assert wait_for(tmp_path / "gate.started")
    assert k.ok("40 + 2").result == "42"
    assert slow.is_alive()
    gate.write_text("go")
    slow.join()
    assert result["r"].json() == {"v": 2}
    ex = k.execute(f"%model_serve --port {port}")
    assert ex.status == "error" and "already served" in ex.reply["evalue"]
    assert "Stopped" in k.ok("%model_serve --stop").stdout
    with pytest.raises(httpx.ConnectError):
        httpx.post(url, json={}, timeout=2)
    assert k.ok("%model_predict {}").result == "{'v': 2}"


# ---------------------------------------------------------------- backpressure: a slow reader pauses the generator

def test_a_slow_reader_pauses_the_generator_and_keeps_memory_bounded(tmp_path, markers):
    import psutil

    from server_harness import BIG_STREAM, slow_read

    d = write_truss(tmp_path / "big", BIG_STREAM, f'environment_variables: {{KM_MARKS: "{markers}"}}\n')
    with serve_ours(d) as s:
        read = slow_read(s.predict_url(), mib=60, rate_mib_s=30, marks=markers, server=psutil.Process(s.proc.pid))
    # 60 MiB went through; the server held a few MiB of it at a time, and the generator ran only a few
    # chunks ahead of the reader (socket buffers), then made the rest as it was read: paused, not finished early.
    assert int((markers / "made").read_text()) == 60
    assert read["peak_growth_mib"] < 20 and read["lead_mib"] <= 12, read
    assert read["seconds"] >= 1.5  # the reader, not the generator, set the pace


def test_the_port_model_serve_picks_is_free_and_outside_the_ports_outgoing_connections_take(monkeypatch):
    """`%model_serve --engine ray --port 0` picks the port its child binds a moment later: never one of the
    ephemeral range, where any outgoing connection could take it first, and never one in use."""
    import socket

    from kernel_magics.serving import background

    first, last = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2])
    beside = background.ports_beside_ephemeral()
    assert len(beside) >= 1000 and not set(beside) & set(range(first, last + 1))
    picked = {background.free_port() for _ in range(20)}
    assert picked <= set(beside) and len(picked) > 1  # (a random start: two kernels do not race for one port)
    free = background.free_port()
    with socket.socket() as held:  # the only other port of the range is in use: never handed out
        held.bind(("127.0.0.1", 0))
        used = held.getsockname()[1]
        monkeypatch.setattr(background, "ports_beside_ephemeral", lambda: [used, free])
        assert {background.free_port() for _ in range(10)} == {free}


def test_a_served_child_stops_when_its_kernel_dies(tmp_path):
    """`%model_serve --engine ray` runs `serve` as a child in its own session: it must not outlive a killed kernel."""
    import psutil

    d = write_truss(tmp_path / "m", "class Model:\n    def predict(self, x):\n        return x\n")
    parent = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom pathlib import Path\nfrom kernel_magics.serving.background import ServeProcess\n"
        f"p = ServeProcess.start(Path({str(d)!r}), [], port={free_port()})\np.wait_ready(60)\n"
        "print(p.proc.pid, p.url, p.log, flush=True)\ntime.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    pid, url, log = parent.stdout.readline().split()
    child = psutil.Process(int(pid))
    assert httpx.post(url + "/v1/models/model:predict", json={"a": 1}).json() == {"a": 1}
    parent.kill()  # as a kernel restart or a crash does: no atexit, no cleanup
    parent.wait()
    child.wait(timeout=30)  # psutil.TimeoutExpired if it outlived its kernel
    with pytest.raises(httpx.ConnectError):
        httpx.post(url + "/v1/models/model:predict", json={}, timeout=2)
    Path(log).unlink()  # a killed parent left its child's log, as a crashed kernel would


RELATIVE_DATA = """
class Model:
    def load(self):
        with open("data/labels.txt") as f:  # relative: Truss's server runs the model from /app, the root
            self.labels = f.read().split()
    def predict(self, model_input):
        return self.labels[model_input["i"]]
"""


def test_serve_and_predict_run_the_model_from_its_root_as_truss_does(tmp_path):
    """A load() that opens data/labels.txt relative to its working directory works deployed (Truss runs from /app,
    which holds model/ and data/) and in the export's check: `serve` and `predict` started elsewhere run it there too."""
    d = write_truss(tmp_path / "m", RELATIVE_DATA)
    (d / "data").mkdir()
    (d / "data" / "labels.txt").write_text("cat dog")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run([sys.executable, "-m", "kernel_magics", "predict", str(d), "-d", '{"i": 1}'],
                          capture_output=True, text=True, cwd=elsewhere, timeout=120)
    assert done.returncode == 0 and done.stdout == '"dog"\n', done.stderr
    with serve_ours(d) as served:  # started from the test's working directory, not the root
        assert httpx.post(served.url + "/v1/models/model:predict", json={"i": 0}).json() == "cat"


FROZEN = '''
import gc
import weakref

THRESHOLD_WHILE_IMPORTED = gc.get_threshold()[0]  # 0: no automatic collection

class Cycle:
    pass


class Model:
    def load(self):
        self.table = {str(i): [i] for i in range(1000)}
        garbage = Cycle()
        garbage.me = garbage
        self.garbage = weakref.ref(garbage)
        gc.collect()  # the cycle, still alive, goes to the oldest generation: only a full collection frees it there
        del garbage

    def predict(self, model_input):
        return {"frozen": gc.get_freeze_count(), "load_garbage_freed": self.garbage() is None,
                "threshold": [THRESHOLD_WHILE_IMPORTED, gc.get_threshold()[0]], "enabled": gc.isenabled()}
'''


def test_a_server_imports_model_py_uncollected_and_leaves_what_loaded_out_of_the_collectors_walks(tmp_path):
    """model.py is imported with the cyclic collector's automatic collections paused (its full collections were a
    fifth of importing torch and transformers) and resumed afterwards; what the import and the load made is frozen
    (a full collection walked half a million objects: a 300 ms stall of every request in flight), and the load's
    cyclic garbage is collected first, not kept for good."""
    with serve_ours(write_truss(tmp_path / "m", FROZEN)) as served:
        reply = httpx.post(served.predict_url(), json={}, timeout=30).json()
    assert reply["threshold"][0] == 0 and reply["threshold"][1] > 0 and reply["enabled"], reply
    assert reply["load_garbage_freed"] is True, reply
    assert reply["frozen"] > 1000, reply  # the model's own table at least, and every module imported
