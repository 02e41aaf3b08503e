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

from server_harness import post_concurrently, serve_ours, write_truss

pytest.importorskip("ray", reason="ray[serve] is not installed (pip install 'kernel-magics[ray]')")

CANARY = "sk-CANARY-ray-3c4d"
ECHO = "import os\nclass Model:\n    def load(self):\n        self.tok = os.environ.get('NOPE')\n" \
       "    def predict(self, model_input):\n        return model_input\n"
SECRET = ("class Model:\n    def __init__(self, secrets):\n        self._s = secrets\n    def load(self):\n"
          "        self.n = len(self._s['tok'])\n    def predict(self, model_input):\n"
          "        raise ValueError(f'bad token {self._s[\"tok\"]}')\n")


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


def test_local_ray_keeps_to_itself_and_leaves_nothing_behind(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    d = write_truss(tmp_path / "sec", SECRET, "secrets: {tok: null}\n")
    with serve_ours(d, engine="ray", replicas=1, env={"HOME": str(home), "TRUSS_SECRET_tok": CANARY}) as s:
        assert httpx.post(s.predict_url(), json={}).status_code == 500  # the error names the token: redacted
        temp = Path(re.search(r"files under (\S+)\)", s.log).group(1))
        assert temp.is_dir() and str(temp).startswith(("/tmp/", os.environ.get("TMPDIR", "/tmp")))
        driver = psutil.Process(s.proc.pid)
        children = ray_processes(driver)
        assert any("gcs_server" in " ".join(p.cmdline()) for p in children)
        listening = []
        for p in [driver, *children]:
            try:
                listening += [(p.name(), c.laddr.ip) for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
            except psutil.NoSuchProcess:
                pass
        assert listening
        # Everything Ray starts listens on loopback, the replica's inter-deployment gRPC port too
        # (Ray Serve 2.60 hard-codes [::] for it; the replica moves it to loopback).
        others = [(name, ip) for name, ip in listening if ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
        assert others == []
        # Ray writes the replica's logs on its own schedule: wait until the error is in them, redacted or not.
        deadline = time.monotonic() + 30
        while not files_holding(temp, b"bad token ***", CANARY.encode()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert files_holding(temp, b"bad token ***"), "the replica's error never reached Ray's log files"
        leaked = files_holding(temp, CANARY.encode())
        assert not leaked
    assert CANARY not in s.log and "bad token ***" in s.log
    assert s.proc.returncode == 0
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in children)
    assert not temp.exists()
    assert list(home.iterdir()) == []  # no auth token or anything else in the home directory


def test_a_replica_that_fails_to_load_ends_the_command_with_the_users_error(tmp_path, ray_cluster):
    d = write_truss(tmp_path / "bad", "class Model:\n    def load(self):\n        raise RuntimeError('no weights at /models/x')\n"
                                       "    def predict(self, model_input):\n        return 1\n")
    done = subprocess.run([sys.executable, "-m", "kernel_magics.cli", "serve", str(d), "--engine", "ray",
                           "--replicas", "2", "--address", ray_cluster.address, "--port", str(ray_cluster.serve_port)],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: a replica failed to load the model: RuntimeError: no weights at /models/x")
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


def test_secrets_stay_out_of_the_ray_processes_environment_and_a_failed_loads_words(tmp_path):
    """What %model_serve --engine ray starts (ServeProcess) hands the secret over a pipe: no Ray process
    has it in its environment; a load() that fails naming the secret prints it nowhere."""
    from kernel_magics.serving.background import ServeProcess, free_port

    d = write_truss(tmp_path / "sec", SECRET, "secrets: {tok: null}\n")
    served = ServeProcess.start(d, ["--replicas", "1"], port=free_port(), secrets={"tok": CANARY}, engine="ray")
    try:
        served.wait_ready(240)
        assert httpx.post(served.url + "/v1/models/model:predict", json={}).status_code == 500
        processes = [psutil.Process(served.proc.pid), *ray_processes(psutil.Process(served.proc.pid))]
        holding = []
        for p in processes:
            try:
                if any(CANARY in value for value in p.environ().values()):
                    holding.append(p.name())
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        assert len(processes) > 3 and holding == []
    finally:
        served.stop()
    bad = write_truss(tmp_path / "bad", "class Model:\n    def __init__(self, secrets):\n        self._s = secrets\n"
                                         "    def load(self):\n        raise RuntimeError(f'refused token {self._s[\"tok\"]}')\n"
                                         "    def predict(self, model_input):\n        return 1\n",
                      "secrets: {tok: null}\n")
    done = subprocess.run([sys.executable, "-m", "kernel_magics.cli", "serve", str(bad), "--engine", "ray",
                           "--port", str(free_port())], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRUSS_SECRET_tok": CANARY})
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: a replica failed to load the model: RuntimeError: refused token ***"), last
    assert CANARY not in done.stderr + done.stdout
