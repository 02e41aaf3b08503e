"""Start real servers (ours and Truss's own) on free 127.0.0.1 ports, and stop them."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import httpx

from kernel_magics.serving.background import first_free, ports_beside_ephemeral

# What tests/conftest.py points into the run's temp dir instead of the home directory. A process given a home of
# its own (HOME) drops them, so that everything it writes by its home lands there (test_ray asserts it is empty).
HOME_VARIABLES = ("XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "IPYTHONDIR", "JUPYTER_CONFIG_DIR",
                  "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "MPLCONFIGDIR")

REPO = Path(__file__).resolve().parents[1]
TRUSS_REFERENCE = REPO.parent / "shared" / "truss_reference"


def _ports_of_this_process() -> range:
    """The ports this test process hands out: a slice of those beside the system's ephemeral range.

    A port the system picks (bind to 0) comes from the ephemeral range, and so does the local port of every
    outgoing connection: between the probe closing and the server binding, a client elsewhere in the run (Ray
    opens hundreds) could take it, and the server failed with "address already in use" (CI, stop 32). No
    connection is ever given a port outside that range. Ray's workers take 10002-19999, so ours start at 20000;
    each xdist worker gets a slice of its own so that two never hand out the same port."""
    beside = ports_beside_ephemeral()  # (the product's own choice, for %model_serve --engine ray --port 0)
    if len(beside) < 1000:
        raise RuntimeError("the system's ephemeral port range (/proc/sys/net/ipv4/ip_local_port_range) leaves "
                           "fewer than 1000 ports beside it, from 20000, for the tests' servers: narrow it")
    low, high = beside.start, beside.stop
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0) % workers
    size = (high - low) // workers
    return range(low + index * size, low + (index + 1) * size)


_PORTS = _ports_of_this_process()
_next_port = [_PORTS.start + (os.getpid() * 7919) % len(_PORTS)]  # another run beside this one starts elsewhere
_port_lock = threading.Lock()


def free_port() -> int:
    """A 127.0.0.1 port nothing listens on, that no outgoing connection can take before a server binds it."""
    def turns():  # from where the last call stopped, once round the slice
        for _ in range(len(_PORTS)):
            port = _next_port[0]
            _next_port[0] = port + 1 if port + 1 < _PORTS.stop else _PORTS.start
            yield port

    with _port_lock:
        port = first_free(turns())
    if port is not None:
        return port
    raise RuntimeError(f"no free port in {_PORTS.start}-{_PORTS.stop - 1} on 127.0.0.1")


def write_truss(root: Path, model_py: str, config: str = "model_name: test\n") -> Path:
    """A Truss directory on disk: config.yaml and model/model.py."""
    (root / "model").mkdir(parents=True, exist_ok=True)
    (root / "model" / "model.py").write_text(textwrap.dedent(model_py))
    (root / "config.yaml").write_text(textwrap.dedent(config))
    return root


@dataclass
class Served:
    proc: subprocess.Popen
    url: str
    log_path: Path
    final_log: Optional[str] = None  # what the log held when the server stopped (its file is gone then)

    @property
    def log(self) -> str:
        return self.final_log if self.final_log is not None else self.log_path.read_text(errors="replace")

    def finish(self, remove: Path) -> None:
        """Stop the server, keep its log in memory and remove ``remove`` (its log file or folder)."""
        _stop(self.proc)
        self.final_log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        if remove.is_dir():
            shutil.rmtree(remove, ignore_errors=True)
        else:
            remove.unlink(missing_ok=True)

    def predict_url(self, name: str = "model") -> str:
        return f"{self.url}/v1/models/{name}:predict"


def _wait_alive(served: Served, timeout: float, ready: bool) -> None:
    path = "/v1/models/model" if ready else "/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if served.proc.poll() is not None:
            return  # exited: the caller looks at the return code
        try:
            if httpx.get(served.url + path, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"server did not come up in {timeout}s:\n{served.log}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL) if hasattr(os, "killpg") else proc.kill()
            proc.wait()


@contextlib.contextmanager
def serve_ours(truss_dir: Path, *args: str, env: Optional[dict] = None, wait_ready: bool = True,
               timeout: float = 90, engine: Any = "uvicorn", replicas: int = 1,
               launcher: Sequence[str] = ("-m", "kernel_magics.cli")) -> Iterator[Served]:
    """`kernel-magics serve DIR` as a real process (``launcher``: what runs the command line, after the
    interpreter; a benchmark's wrapper of the CLI).

    ``engine="ray"``: on a local Ray Serve the command starts, with replicas; a LocalCluster
    (ray_harness): deployed on that running cluster with ``--address`` (seconds instead of a Ray start).
    One replica unless a test asks for more (each is a Ray worker process: about 4 s of CPU here).
    """
    if engine == "ray":
        args = ("--engine", "ray", "--replicas", str(replicas), *args)
    elif engine != "uvicorn":
        args = ("--engine", "ray", "--replicas", str(replicas), "--address", engine.address, *args)
    port = getattr(engine, "serve_port", None) or free_port()  # a running Serve keeps its port
    fd, name = tempfile.mkstemp(prefix="km-serve-", suffix=".log")
    os.close(fd)
    log = Path(name)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, *launcher, "serve", str(truss_dir), "--port", str(port), *args],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True,
        )
    served = Served(proc, f"http://127.0.0.1:{port}", log)
    try:
        _wait_alive(served, timeout, wait_ready)
        yield served
    finally:
        served.finish(remove=log)


def answer(base: str, method: str, path: str, body, headers) -> tuple:
    """What a differential test compares: status, media type, Truss's error headers and the body.
    A prediction's body byte for byte (a Pydantic result is its own compact JSON, as Truss sends it);
    other JSON answers as data."""
    r = httpx.request(method, base + path, content=body, headers=headers, timeout=30)
    ctype = r.headers.get("content-type", "")
    predicted = r.status_code == 200 and path.endswith(":predict") and "stream" not in ctype
    payload = r.content if predicted or not ctype.startswith("application/json") else r.json()
    return (r.status_code, ctype, r.headers.get("x-baseten-error-source"), r.headers.get("x-baseten-error-code"),
            payload)


def post_concurrently(url: str, bodies: list) -> list[httpx.Response]:
    """POST every body at once (one asyncio client) and return the responses in order."""
    import asyncio

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(url, json=body) for body in bodies))

    return asyncio.run(main())


def post_in_background(url: str, body) -> tuple[threading.Thread, dict]:
    """Start a POST on a thread; the response lands in the returned dict under "r"."""
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(r=httpx.post(url, json=body, timeout=60)))
    thread.start()
    return thread, result


def truss_reference_python() -> Optional[Path]:
    venv = Path(os.environ.get("TRUSS_REF_VENV", Path.home() / ".cache" / "truss-reference" / "venv"))
    python = venv / "bin" / "python"
    return python if python.exists() and TRUSS_REFERENCE.is_dir() else None


def truss_venv_with_models() -> Optional[Path]:
    """A venv that runs Truss's own server with a model's requirements installed, as a deployment has
    them: Truss's packages (its fastapi, starlette ...) from the reference venv, the model libraries
    (torch, scikit-learn, transformers ...) from ours, and numpy at our version ahead of both (Truss's
    server constraints allow numpy < 3, and the models' files were written with ours). Built once."""
    reference = truss_reference_python()
    if reference is None:
        return None
    import numpy
    import site

    ours = Path(site.getsitepackages()[0])
    theirs = next((reference.parent.parent / "lib").glob("python3*/site-packages"))
    venv = reference.parent.parent.parent / f"with-models-numpy{numpy.__version__}"
    if not (venv / "bin" / "python").exists():
        # Built aside and renamed into place: test processes running side by side (pytest -n) may race here.
        building = venv.with_name(f"{venv.name}.building-{os.getpid()}")
        python = building / "bin" / "python"
        subprocess.run([sys.executable, "-m", "venv", str(building)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", f"numpy=={numpy.__version__}"],
                       check=True)
        own = next((building / "lib").glob("python3*/site-packages"))
        (own / "km_0_truss.pth").write_text(f"{theirs}\n")
        (own / "km_1_models.pth").write_text(f"{ours}\n")
        try:
            building.rename(venv)
        except OSError:  # another process finished first
            shutil.rmtree(building, ignore_errors=True)
    return venv


_HELPER: dict = {}  # the running tests/truss_reference_helper.py, under "proc"
_HELPER_LOCK = threading.Lock()
_HELPER_ENV = dict(os.environ)  # as this process started: not a test's monkeypatched variables


def truss_reference(op: str, truss_dir: Path, timeout: float = 120, **fields: Any) -> tuple[int, str]:
    """Ask tests/truss_reference_helper.py (truss's own code, in the reference venv, started once per process) to
    ``prepare`` a directory for Truss's server or ``validate`` it: (exit code, what it printed). A helper that does
    not answer in ``timeout`` seconds, or answers out of turn, is stopped (the next call starts another)."""
    request = {"op": op, "dir": str(Path(truss_dir).resolve()), **fields}
    with _HELPER_LOCK:
        proc = _HELPER.get("proc")
        if proc is None or proc.poll() is not None:
            python = truss_reference_python()
            if python is None:
                raise RuntimeError(f"the truss reference is not set up ({TRUSS_REFERENCE}/setup.sh)")
            proc = _HELPER["proc"] = subprocess.Popen(
                [str(python), str(Path(__file__).with_name("truss_reference_helper.py")), str(TRUSS_REFERENCE)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_HELPER_ENV, cwd=TRUSS_REFERENCE,
                start_new_session=True)  # (a Ctrl-C of the run stops it through its stdin, without a traceback)
        answer: dict = {}
        try:
            proc.stdin.write(json.dumps(request) + "\n")
            proc.stdin.flush()
            reader = threading.Thread(target=lambda: answer.update(line=proc.stdout.readline()), daemon=True)
            reader.start()
            reader.join(timeout)
            try:
                reply = json.loads(answer["line"]) if answer.get("line") else None
            except ValueError:  # (a line that is not its answer: the same message as an answer out of turn)
                reply = None
            if not isinstance(reply, dict) or reply.get("dir") != request["dir"]:
                if "line" not in answer:
                    raise RuntimeError(f"tests/truss_reference_helper.py did not answer {request} in {timeout} s")
                if not answer["line"]:  # end of its output: it exited (its stderr is the run's, above)
                    try:
                        code = proc.wait(10)
                    except subprocess.TimeoutExpired:
                        code = "none yet"
                    raise RuntimeError(f"tests/truss_reference_helper.py closed its output (exit code {code}) "
                                       f"before it answered {request}")
                raise RuntimeError(f"tests/truss_reference_helper.py answered {answer['line']!r} to {request}")
        except BaseException:
            _stop_truss_reference_helper(kill=True)
            raise
    return reply["code"], reply["output"]


def _stop_truss_reference_helper(kill: bool = False) -> None:
    proc = _HELPER.pop("proc", None)
    if proc is None:
        return
    if kill:
        proc.kill()
    else:
        with contextlib.suppress(OSError):
            proc.stdin.close()  # its loop ends
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


atexit.register(_stop_truss_reference_helper)


@contextlib.contextmanager
def serve_truss(truss_dir: Path, env: Optional[dict] = None, timeout: float = 120,
                wait_ready: bool = True, venv: Optional[Path] = None) -> Iterator[Served]:
    """Truss 0.18.36's own server for the same directory, started as ../shared/truss_reference/serve_with_truss.sh
    starts it (its steps below, in order), with the layout prepared by the helper process; ``venv``: the Python
    it runs on (default: the reference venv; :func:`truss_venv_with_models` for models that need libraries)."""
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="truss-ref-"))
    log = work / "server.log"
    try:
        # 1. The directory laid out as Truss's image would have it (_prepare_fs.py): WORK/fs/app, WORK/fs/.serve_env.
        code, output = truss_reference("prepare", truss_dir, work=str(work))
        if code != 0:
            raise RuntimeError(f"truss could not lay out {truss_dir} for its server:\n{output}")
        app, fs = Path(output.strip().splitlines()[-1]), work / "fs"
        # 2. Its environment: the image's ENV lines and the config's environment_variables (`export NAME=VALUE`
        # lines, each value quoted by shlex, a newline inside it too), then the port, the packages, unbuffered
        # output, a home of its own, plain-text logs.
        full_env = {**os.environ, **(env or {})}
        for word in shlex.split((fs / ".serve_env").read_text()):
            if word != "export":
                name, _, value = word.partition("=")
                full_env[name] = value
        full_env["INFERENCE_SERVER_PORT"] = str(port)
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(fs / "packages"), full_env.get("PYTHONPATH")) if p)
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env["HOME"] = str(work / "home")
        for variable in HOME_VARIABLES:
            full_env.pop(variable, None)
        (work / "home").mkdir()
        if full_env.get("TRUSS_SERVE_JSON_LOGS", "0") != "1":
            full_env["DISABLE_JSON_LOGGING"] = "1"
        full_env["PWD"] = str(app)
        # 3. main.py in the app folder, as the image's ENTRYPOINT.
        python = (venv / "bin" / "python") if venv else truss_reference_python()
        with open(log, "w") as out:
            out.write(f"[serve_with_truss] app={app} port={port}\n")
            out.flush()
            proc = subprocess.Popen([str(python), "main.py"], cwd=app, stdout=out, stderr=subprocess.STDOUT,
                                    env=full_env, start_new_session=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    served = Served(proc, f"http://127.0.0.1:{port}", log)
    try:
        _wait_alive(served, timeout, ready=wait_ready)
        yield served
    finally:
        served.finish(remove=work)


# ---------------------------------------------------------------------- a large stream read slowly

BIG_STREAM = '''
import os
from pathlib import Path

MARKS = Path(os.environ["KM_MARKS"])


class Model:
    def predict(self, model_input):
        def chunks():
            for i in range(model_input["mib"]):
                (MARKS / "made").write_text(str(i + 1))
                yield bytes([i % 256]) * (1 << 20)  # a new MiB each time, as real output would be
        return chunks()
'''


def slow_read(url: str, mib: int, rate_mib_s: float, marks: Path, server) -> dict:
    """Read a ``mib`` MiB stream at ``rate_mib_s``; sample the server's memory (``server`` is its psutil
    Process) and how many MiB the generator made ahead of what was read."""
    import psutil

    host, port = url.split("//")[1].split("/")[0].split(":")
    tree = [server, *server.children(recursive=True)]
    base = sum(p.memory_info().rss for p in tree)
    peak, lead, stop = [base], [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree))
                made = int((marks / "made").read_text()) if (marks / "made").exists() else 0
                lead[0] = max(lead[0], made - received[0] // (1 << 20))
            except (psutil.Error, ValueError):
                pass
            time.sleep(0.05)

    received = [0]
    watcher = threading.Thread(target=sample)
    watcher.start()
    body = json.dumps({"mib": mib}).encode()
    started = time.perf_counter()
    with socket.create_connection((host, int(port))) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        sock.sendall(b"POST /v1/models/model:predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        step = 256 * 1024
        while True:
            data = sock.recv(step)
            if not data:
                break
            received[0] += len(data)
            if received[0] >= mib * (1 << 20):
                break
            # Hold the rate: sleep until this many bytes are due.
            due = started + received[0] / (rate_mib_s * (1 << 20))
            time.sleep(max(0.0, due - time.perf_counter()))
    stop.set()
    watcher.join()
    return {"peak_growth_mib": (peak[0] - base) / 2**20, "lead_mib": lead[0], "seconds": time.perf_counter() - started}


def process_gone(pid: int, timeout: float = 30) -> bool:
    """Until process ``pid`` has stopped running (gone, or a zombie its parent has not reaped): True; False
    once ``timeout`` seconds pass (``timeout=0``: whether it is gone now)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def wait_for(path: Path, timeout: float = 10) -> bool:
    """Until a marker file a model or a test writes exists (True), or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.01)
    return False
