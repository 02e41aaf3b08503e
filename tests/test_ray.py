"""`kernel-magics serve --engine ray`: real Ray Serve on this machine (127.0.0.1, small object store).

The Truss-compatible route tests run against the Ray engine too (test_server.py, engine=ray);
here: what only the Ray engine does.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from server_harness import (
    HOME_VARIABLES, free_port, post_concurrently, post_in_background, serve_ours, wait_for, write_truss,
)

pytest.importorskip("ray", reason="ray[serve] is not installed (pip install 'kernel-magics[ray]')")

CANARY = "sk-CANARY-ray-3c4d"
ECHO = "import os\nclass Model:\n    def load(self):\n        self.tok = os.environ.get('NOPE')\n" \
       "    def predict(self, model_input):\n        return model_input\n"
# Echoes a request that has a body; an empty one raises an error naming the token.
SECRET = ("class Model:\n    def __init__(self, secrets):\n        self._s = secrets\n    def load(self):\n"
          "        self.n = len(self._s['tok'])\n    def predict(self, model_input):\n"
          "        if model_input:\n            return model_input\n"
          "        raise ValueError(f'bad token {self._s[\"tok\"]}')\n")
# A load that waits for the test: it marks that it began, and ends when the test writes "release".
SLOW_LOAD = """
import pathlib
import time

MARKS = pathlib.Path(%r)

class Model:
    def load(self):
        (MARKS / "loading").touch()
        while not (MARKS / "release").exists():
            time.sleep(0.05)

    def predict(self, model_input):
        return model_input
"""
# The same load, with a secret that an empty request's error names.
SLOW_LOAD_WITH_A_SECRET = SLOW_LOAD.replace("class Model:\n", "class Model:\n    def __init__(self, secrets):\n"
                                            "        self._s = secrets\n\n").replace(
    "        return model_input\n", "        if model_input:\n            return model_input\n"
    "        raise ValueError(f\"bad token {self._s['tok']}\")\n")


def files_holding(root: Path, *texts: bytes) -> list[Path]:
    """The files under root holding any of ``texts`` (files that vanish meanwhile aside)."""
    found = []
    for f in root.rglob("*"):
        try:
            if f.is_file() and any(text in f.read_bytes() for text in texts):
                found.append(f)
        except OSError:
            pass
    return found


def ray_processes(root: psutil.Process) -> list[psutil.Process]:
    try:
        return root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_two_replicas_share_the_load(tmp_path, ray_cluster):
    d = write_truss(tmp_path / "echo", ECHO, "runtime: {predict_concurrency: 1}\n")
    with serve_ours(d, engine=ray_cluster, replicas=2) as s:
        responses = post_concurrently(s.predict_url(), [{"i": i} for i in range(32)])
        assert [r.status_code for r in responses] == [200] * 32
        assert sorted(r.json()["i"] for r in responses) == list(range(32))
        replicas = {r.headers["x-kernel-magics-replica"] for r in responses}
        assert len(replicas) == 2  # both replicas answered
        assert httpx.get(s.url + "/v1/models/model").status_code == 200


def test_replicas_answer_liveness_while_they_load_and_readiness_once_every_one_has(tmp_path, ray_cluster):
    """As Truss's server and `kernel-magics serve`: a replica imports and loads in a load thread, so Ray routes
    to it at once; readiness is 503 with Truss's body until the load ends; the command says it serves only then."""
    marks = tmp_path / "marks"
    marks.mkdir()
    d = write_truss(tmp_path / "slow", SLOW_LOAD % str(marks))
    with serve_ours(d, engine=ray_cluster, replicas=2, wait_ready=False, timeout=120) as s:
        assert s.proc.poll() is None, s.log
        assert wait_for(marks / "loading", 60)  # liveness answered, and the load runs until "release"
        ready = httpx.get(s.url + "/v1/models/model", timeout=10)
        assert ready.status_code == 503 and ready.json() == {"error": "Model with name model is not ready."}
        assert httpx.get(s.url + "/", timeout=10).json() is True
        # Ray routes to a replica that runs, loaded or not: a predict there waits for the load instead of a 503.
        early, answered = post_in_background(s.predict_url(), {"x": 0})
        early.join(timeout=3)  # a 503 would be back by now; a waiting request is not (it cannot fail by waiting)
        assert early.is_alive() and "r" not in answered, answered
        assert "Serving on" not in s.log
        (marks / "release").touch()
        assert wait_for_status(s.url + "/v1/models/model", 200, timeout=60)
        assert httpx.post(s.predict_url(), json={"x": 1}).json() == {"x": 1}
        early.join()
        assert answered["r"].status_code == 200 and answered["r"].json() == {"x": 0}
        deadline = time.monotonic() + 30
        while "Serving on" not in s.log and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "Serving on" in s.log, s.log


def wait_for_status(url: str, status: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == status:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False


def predict_url(url: str) -> str:
    return url + "/v1/models/model:predict"


# Request heads past the bounds of serving/limits.py (16 KiB, 100 headers), and one within them.
HEADS = {
    "unfinished": b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000,
    "big": b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 17000 + b"\r\n\r\n",
    "many": b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(101)) + b"\r\n",
    "fine": b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(50))
            + b"X-Big: " + b"a" * 12000 + b"\r\n\r\n",
}


def bounds_answers(url: str) -> dict:
    """What the server says to each of HEADS (status line, and the body of a refusal) and to bodies past 1000 bytes."""
    from test_serving_edge import raw_request

    found = {}
    for name, data in HEADS.items():
        head, _, body = raw_request(url, data).partition(b"\r\n\r\n")
        found[name] = (head.split(b"\r\n")[0], body if name != "fine" else b"")
    predict = url + "/v1/models/model:predict"
    big = httpx.post(predict, json="a" * 2000, timeout=60)
    found["body"] = (big.status_code, big.json(), big.headers["x-baseten-error-code"])
    found["chunked"] = httpx.post(predict, content=iter([b" " * 500] * 10), timeout=60).status_code
    found["small"] = httpx.post(predict, json="a" * 900, timeout=60).json()
    return found


def test_request_heads_and_bodies_are_bounded_on_ray_as_by_kernel_magics_serve(tmp_path, ray_cluster):
    """Ray Serve's proxy parses the requests on this engine: its heads are bounded as ours (through Serve's proxy
    hook, set where the cluster's nodes start), and the replicas refuse bodies past --max-body-size."""
    d = write_truss(tmp_path / "echo", ECHO)
    with serve_ours(d, "--max-body-size", "1000") as plain:
        expected = bounds_answers(plain.url)
    assert expected["unfinished"][0] == b"HTTP/1.1 400 Bad Request" and expected["fine"][0] == b"HTTP/1.1 200 OK"
    assert expected["body"][0] == 413 and expected["small"] == "a" * 900
    with serve_ours(d, "--max-body-size", "1000", engine=ray_cluster, replicas=1) as s:
        assert bounds_answers(s.url) == expected
        assert httpx.get(s.url + "/v1/models/model").status_code == 200  # the proxy and the replica are fine


# uvicorn as Ray Serve 2.60's proxy runs it (serve/_private/http_util.py: no `http=`, so "auto"), after the hook.
PROXY_LIKE = """
import sys
import uvicorn
from kernel_magics.serving.ray_proxy import bound_request_heads

assert bound_request_heads() == []

async def app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"true"})

uvicorn.Server(uvicorn.Config(lambda: app, factory=True, host="127.0.0.1", port=int(sys.argv[1]), lifespan="off",
                              access_log=False, log_level=None, log_config=None)).run()
"""


def test_the_proxy_hook_bounds_uvicorn_as_rays_proxy_runs_it():
    """What Serve's proxy hook does, without a Ray: the proxy's uvicorn then refuses heads past the bounds."""
    from test_serving_edge import raw_request

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", PROXY_LIKE, str(port)])
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_for_status(url + "/", 200, timeout=60)
        for name in ("unfinished", "big", "many"):
            assert raw_request(url, HEADS[name]).startswith(b"HTTP/1.1 400 "), name
        assert raw_request(url, HEADS["fine"]).startswith(b"HTTP/1.1 200 ")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_killed_commands_ray_goes_and_the_next_command_answers_liveness_at_once_and_keeps_to_itself(
        tmp_path, monkeypatch):
    """Two `serve --engine ray` commands, each with a local Ray of its own. One test: each local Ray start costs
    half a minute of both cores here, so the second command is checked for everything a local Ray must do.

    The first gets its secret in its environment, as `kernel-magics serve` users pass it: none of the processes its
    Ray starts has it in theirs. It is killed (kill -9) once Serve runs on its Ray and the deploy begins: its Ray
    ends too (the raylet and GCS share its fate, the agents and workers follow their raylet), and the next command
    that starts a local Ray removes the folder it left (nobody holds its lock any more).

    The second is started as %model_serve starts it (ServeProcess, which hands the secret over a pipe). Before it
    imports Ray it puts a stand-in on the port (serving/stand_in.py): liveness 200 and readiness 503 with Truss's
    body while Ray starts; Serve's proxy takes the port over once it answers through the replica (the replica
    header), and the port is never closed in between. Its Ray keeps to itself: it listens on loopback only, the
    secret is in no process's environment and none of its files, nothing goes to the home directory, and nothing
    is left behind when it stops."""
    from server_harness import Served
    from test_serving_edge import raw_request

    from kernel_magics.serving.background import ServeProcess
    from kernel_magics.serving.ray_engine import REPLICA_HEADER
    from kernel_magics.serving.stand_in import STAND_IN_SERVER

    d = write_truss(tmp_path / "sec", SECRET, "secrets: {tok: null}\n")
    with serve_ours(d, engine="ray", replicas=1, wait_ready=False, timeout=240,
                    env={"TRUSS_SECRET_tok": CANARY}) as first:
        # Killed once Serve runs and the deploy begins (the "files under" line comes after serve.start), both agents
        # up: what the kill must take down. The replica need not be up; waiting for it costs a replica's start.
        found, agents, deadline = None, [], time.monotonic() + 180
        while not (found and {agent_of(p) for p in agents} == set(AGENTS)) and first.proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.2)
            found = re.search(r"files under (\S+)\)", first.log)
            agents = [p for p in ray_processes(psutil.Process(first.proc.pid)) if agent_of(p)]
        assert found and {agent_of(p) for p in agents} == set(AGENTS), first.log
        killed_temp = Path(found.group(1))
        killed_children = ray_processes(psutil.Process(first.proc.pid))
        commands = [command_of(p) for p in killed_children]
        assert all(any(name in c for c in commands) for name in ("gcs_server", "raylet", "ServeController")), commands
        assert [c for p, c in zip(killed_children, commands) if CANARY in environment_of(p)] == []
        agents = [p for p in killed_children if agent_of(p)]
        first.proc.kill()
        first.proc.wait()
        # The raylet and the GCS go with it, the workers at once after. The two agents see their raylet gone
        # within seconds, then spend Ray's fixed 60 s trying to report that to the dead GCS before they exit
        # (ray/_private/process_watcher.py): the next start goes ahead meanwhile, and they are checked at the end.
        psutil.wait_procs([p for p in killed_children if p not in agents], timeout=180)
        assert killed_temp.is_dir()  # what a kill -9 leaves

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # (ServeProcess passes the environment on, less any secret)
    for variable in HOME_VARIABLES:  # (the suite's own, in its temp dir: here everything goes by HOME)
        monkeypatch.delenv(variable, raising=False)
    marks = tmp_path / "marks"
    marks.mkdir()
    d = write_truss(tmp_path / "slow", SLOW_LOAD_WITH_A_SECRET % str(marks), "secrets: {tok: null}\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = ServeProcess.start(d, ["--replicas", "1"], port=port, secrets={"tok": CANARY}, engine="ray")
    proc, log = started.proc, started.log
    served = Served(proc, url, log)
    try:
        first_answer, deadline = None, time.monotonic() + 120
        while first_answer is None and proc.poll() is None and time.monotonic() < deadline:
            try:
                first_answer = httpx.get(url + "/", timeout=10)
            except httpx.HTTPError:
                time.sleep(0.01)
        assert first_answer is not None, served.log
        # The first answer is the stand-in's: Ray is still starting (its proxy says "uvicorn").
        assert first_answer.status_code == 200 and first_answer.json() is True, served.log
        assert first_answer.headers["server"] == STAND_IN_SERVER.decode() and "Serving on" not in served.log
        not_ready = {"error": "Model with name model is not ready."}
        ready = httpx.get(url + "/v1/models/model", timeout=10)
        assert (ready.status_code, ready.json(), ready.headers["server"]) == (503, not_ready, STAND_IN_SERVER.decode())
        early = httpx.post(predict_url(url), json={"x": 0}, timeout=30)
        assert (early.status_code, early.json(), early.headers["x-baseten-error-code"], early.headers["server"]) == (
            503, not_ready, "600", STAND_IN_SERVER.decode())
        # Serve's proxy takes over once it answers through the replica, which is loading meanwhile; every probe
        # until then is answered (a refused connection would raise here).
        assert wait_for(marks / "loading", 180), served.log
        assert not killed_temp.exists()  # removed by this command's local Ray start
        deadline = time.monotonic() + 60
        while REPLICA_HEADER not in (live := httpx.get(url + "/", timeout=10)).headers and time.monotonic() < deadline:
            time.sleep(0.05)
        assert live.status_code == 200 and live.headers["server"] == "uvicorn", (live.headers, served.log)
        ready = httpx.get(url + "/v1/models/model", timeout=10)
        assert (ready.status_code, ready.json(), ready.headers.get(REPLICA_HEADER) is not None) == (503, not_ready, True)
        (marks / "release").touch()
        assert wait_for_status(url + "/v1/models/model", 200, timeout=60), served.log
        assert httpx.post(predict_url(url), json={"x": 1}).json() == {"x": 1}
        assert httpx.post(predict_url(url), json={}).status_code == 500  # the error names the token: redacted
        # The Serve proxy of a Ray this command starts bounds request heads as `kernel-magics serve` does.
        assert raw_request(url, HEADS["unfinished"]).startswith(b"HTTP/1.1 400 ")
        temp = Path(re.search(r"files under (\S+)\)", served.log).group(1))
        assert temp.is_dir() and str(temp).startswith(("/tmp/", os.environ.get("TMPDIR", "/tmp")))
        driver = psutil.Process(proc.pid)
        children = ray_processes(driver)
        assert any("gcs_server" in command_of(p) for p in children)
        holding = [command_of(p) for p in [driver, *children] if CANARY in environment_of(p)]
        listening = []
        for p in [driver, *children]:
            try:
                listening += [(p.name(), c.laddr.ip) for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        assert len(children) > 2 and holding == [] and listening, (len(children), holding, listening)
        # Everything Ray starts listens on loopback, the replica's inter-deployment gRPC port too
        # (Ray Serve 2.60 hard-codes [::] for it; the replica moves it to loopback).
        others = [(name, ip) for name, ip in listening if ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
        assert others == []
        # Ray writes the replica's logs on its own schedule: wait until the error is in them, redacted or not.
        deadline = time.monotonic() + 30
        while not files_holding(temp, b"bad token ***", CANARY.encode()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert files_holding(temp, b"bad token ***"), "the replica's error never reached Ray's log files"
        assert not files_holding(temp, CANARY.encode())
    finally:
        served.finish(remove=log)
    assert CANARY not in served.log and "bad token ***" in served.log
    assert proc.returncode == 0, served.log
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/")
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in children)
    assert not temp.exists()
    assert list(home.iterdir()) == []  # no auth token or anything else in the home directory
    _, alive = psutil.wait_procs(killed_children, timeout=180)  # the killed command's Ray has ended too
    assert alive == []
    # And so has any process forked after the snapshot above: Ray passes its folder to every process it starts.
    left = [c for p in psutil.process_iter() if str(killed_temp) in (c := command_of(p))]
    assert left == []


AGENTS = ("DashboardAgent", "RuntimeEnvAgent")


def agent_of(p: psutil.Process) -> str:
    """Which of Ray's two agents ``p`` is ("" for any other process)."""
    return next((name for name in AGENTS if name in command_of(p)), "")


def command_of(p: psutil.Process) -> str:
    """A process's command line as one string ("" once it is gone); a Ray worker's is its title (ray::...)."""
    try:
        return " ".join(p.cmdline()).strip()
    except psutil.Error:
        return ""


def environment_of(p: psutil.Process) -> str:
    try:
        return " ".join(p.environ().values())
    except psutil.Error:
        return ""


LOGS_THE_SECRET = """
import logging

log = logging.getLogger("my_model")

class Model:
    def __init__(self, secrets):
        self._s = secrets

    def load(self):
        log.warning("loading with token %s", self._s["tok"])
        logging.getLogger().error("root logger: token " + self._s["tok"])

    def predict(self, model_input):
        try:
            raise ValueError(f"refused {self._s['tok']}")
        except ValueError:
            log.exception("predict with token %s", self._s["tok"])
        return {"ok": True}
"""


def test_a_replicas_own_log_lines_are_redacted_in_every_ray_log_file(tmp_path, ray_cluster):
    """The model's logging in a replica goes to Ray's handlers (files under the session dir, the driver):
    each record is redacted as it is made, its exception text too."""
    d = write_truss(tmp_path / "logs", LOGS_THE_SECRET, "secrets: {tok: null}\n")
    canary = "sk-CANARY-ray-logs-7e2a"  # this test's own: the cluster's files outlive other tests
    with serve_ours(d, engine=ray_cluster, replicas=1, env={"TRUSS_SECRET_tok": canary}) as s:
        assert httpx.post(s.predict_url(), json={}).json() == {"ok": True}
        marks = [b"loading with token ***", b"root logger: token ***", b"predict with token ***", b"refused ***"]
        # Ray writes the replica's log files on its own schedule: wait until every line is there, redacted or not.
        deadline = time.monotonic() + 60
        while (not all(files_holding(ray_cluster.temp, m) for m in marks)
               and not files_holding(ray_cluster.temp, canary.encode()) and time.monotonic() < deadline):
            time.sleep(0.2)
        assert files_holding(ray_cluster.temp, canary.encode()) == []
        assert all(files_holding(ray_cluster.temp, m) for m in marks), "the replica's log lines never reached Ray's files"
    assert canary not in s.log


@pytest.mark.parametrize("model_py, config, error", [
    ("class Model:\n    def load(self):\n        raise RuntimeError('no weights at /models/x')\n"
     "    def predict(self, model_input):\n        return 1\n", "model_name: test\n",
     "RuntimeError: no weights at /models/x"),
    # model.py is imported in the replica's load thread: an import error is a failed load too.
    ("raise RuntimeError('no weights at /models/x')\n\nclass Model:\n    def predict(self, model_input):\n"
     "        return 1\n", "model_name: test\n", "importing model/model.py raised RuntimeError: no weights at /models/x"),
    # A load that fails naming the secret: the command's last line says so, redacted, and the replica's traceback,
    # which Ray forwards to the command, is redacted too (a predict's error on a local Ray is checked above).
    ("class Model:\n    def __init__(self, secrets):\n        self._s = secrets\n    def load(self):\n"
     "        raise RuntimeError(f'refused token {self._s[\"tok\"]}')\n    def predict(self, model_input):\n"
     "        return 1\n", "secrets: {tok: null}\n", "RuntimeError: refused token ***"),
], ids=["load", "import", "secret"])
def test_a_replica_that_fails_to_load_ends_the_command_with_the_users_error(tmp_path, ray_cluster, model_py, config,
                                                                            error):
    d = write_truss(tmp_path / "bad", model_py, config)
    canary = "sk-CANARY-failed-load-5e6f"  # its own: the shared cluster's files outlive this test
    env = {**os.environ, "TRUSS_SECRET_tok": canary} if "secrets" in config else None
    done = subprocess.run([sys.executable, "-m", "kernel_magics.cli", "serve", str(d), "--engine", "ray",
                           "--replicas", "2", "--address", ray_cluster.address, "--port", str(ray_cluster.serve_port)],
                          capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: a replica failed to load the model: {error}"), done.stderr
    if env is not None:
        # The replica's own traceback came through as well as the last line, and the secret is in neither.
        assert done.stderr.count(error) >= 2 and canary not in done.stderr + done.stdout, done.stderr
    # The failed deployment is gone; the cluster and its Serve keep running.
    assert httpx.get(f"http://127.0.0.1:{ray_cluster.serve_port}/-/routes").json() == {}
    assert ray_cluster.alive()


def test_without_ray_installed_it_says_how_to_install(tmp_path):
    d = write_truss(tmp_path / "e", ECHO)
    code = ("import sys; sys.modules['ray'] = None; from kernel_magics.cli import main; "
            f"sys.exit(main(['serve', {str(d)!r}, '--engine', 'ray']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "pip install 'kernel-magics[ray]'" in done.stderr


def test_ray_only_options_need_the_ray_engine(tmp_path):
    d = write_truss(tmp_path / "e", ECHO)
    done = subprocess.run([sys.executable, "-m", "kernel_magics.cli", "serve", str(d), "--replicas", "2"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--address need --engine ray" in done.stderr


def test_replica_resources_follow_the_config():
    from kernel_magics.core.config import parse_config
    from kernel_magics.serving.ray_engine import replica_options

    options = replica_options(parse_config(
        "resources: {accelerator: 'A10G:2', cpu: 500m, memory: 2Gi}\nruntime: {predict_concurrency: 4}\n"))
    assert options == {"ray_actor_options": {"num_cpus": 0.5, "num_gpus": 2, "memory": 2 * 2**30},
                       "max_ongoing_requests": 4 + 4,  # predict_concurrency, plus a short queue in the replica
                       "num_replicas": 1}
    from kernel_magics.serving.ray_engine import Scale

    scaled = replica_options(parse_config(""), Scale(min_replicas=1, max_replicas=3, target_ongoing_requests=2,
                                                     per_node=1))
    assert scaled["autoscaling_config"]["min_replicas"] == 1 and scaled["autoscaling_config"]["max_replicas"] == 3
    assert scaled["max_replicas_per_node"] == 1 and "num_replicas" not in scaled


def test_a_custom_layout_serves_on_ray(tmp_path, ray_cluster):
    """model_module_dir, model_class_filename, model_class_name and package dirs, read by each replica."""
    from test_truss_dir import layout_dir

    with serve_ours(layout_dir(tmp_path), engine=ray_cluster, replicas=1) as s:
        assert httpx.post(s.predict_url(), json={"who": "ray"}).json() == {"greeting": "HELLO RAY",
                                                                          "name": "custom-layout"}


def test_model_serve_on_ray_from_the_notebook_serves_the_export(tmp_path, ray_cluster, fresh_kernel):
    k = fresh_kernel(cwd=tmp_path)
    k.ok("%load_ext kernel_magics\nscale = {'k': 3}")
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        return {'y': scale['k'] * model_input['x']}")
    k.ok("scale['k'] = 5")  # a value the notebook changed travels with the export
    k.ok("%model_load")
    assert k.ok("%model_predict {'x': 2}").result == "{'y': 10}"
    ex = k.execute("%model_serve --replicas 2")
    assert ex.status == "error" and "need --engine ray" in ex.reply["evalue"]
    ex = k.ok(f"url = %model_serve --engine ray --replicas 2 --address {ray_cluster.address} "
              f"--port {ray_cluster.serve_port}\nprint(url)", timeout=300)
    assert "answers as the notebook did" in ex.stdout and "does not follow hot reloads" in ex.stdout, ex.stdout
    url = ex.stdout.strip().splitlines()[-1]
    responses = post_concurrently(url + "/v1/models/model:predict", [{"x": 2}] * 16)
    assert {r.status_code for r in responses} == {200} and {r.json()["y"] for r in responses} == {10}
    assert len({r.headers["x-kernel-magics-replica"] for r in responses}) == 2
    temp = Path(k.ok("print(get_ipython().magics_manager.registry['ShipMagics'].model.server.temp)")
                .stdout.strip())
    assert (temp / "truss" / "config.yaml").is_file()
    assert "Stopped" in k.ok("%model_serve --stop", timeout=120).stdout
    assert httpx.get(url + "/-/routes").json() == {}  # the deployment is gone; the cluster's Serve runs on
    assert not temp.exists()
