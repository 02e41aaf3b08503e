"""Start real servers (ours and Truss's own) on free 127.0.0.1 ports, and stop them."""

from __future__ import annotations

import contextlib
import os
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
from typing import Iterator, Optional

import httpx

REPO = Path(__file__).resolve().parents[1]
TRUSS_REFERENCE = REPO.parent / "shared" / "truss_reference"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

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
               timeout: float = 90, engine: str = "uvicorn", replicas: int = 2) -> Iterator[Served]:
    """`kernel-magics serve DIR` as a real process (``engine="ray"``: on a local Ray Serve with replicas)."""
    if engine == "ray":
        args = ("--engine", "ray", "--replicas", str(replicas), *args)
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="km-serve-", suffix=".log")[1])
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kernel_magics.cli", "serve", str(truss_dir), "--port", str(port), *args],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True,
        )
    served = Served(proc, f"http://127.0.0.1:{port}", log)
    try:
        _wait_alive(served, timeout, wait_ready)
        yield served
    finally:
        _stop(proc)


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
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", f"numpy=={numpy.__version__}"],
                       check=True)
        own = next((venv / "lib").glob("python3*/site-packages"))
        (own / "km_0_truss.pth").write_text(f"{theirs}\n")
        (own / "km_1_models.pth").write_text(f"{ours}\n")
    return venv


@contextlib.contextmanager
def serve_truss(truss_dir: Path, env: Optional[dict] = None, timeout: float = 120,
                wait_ready: bool = True, venv: Optional[Path] = None) -> Iterator[Served]:
    """Truss 0.18.36's own server for the same directory (../shared/truss_reference); ``venv``: the
    Python it runs on (default: the reference venv; :func:`truss_venv_with_models` for models that need
    libraries)."""
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="truss-ref-"))
    log = work / "server.log"
    extra = {"TRUSS_REF_VENV": str(venv)} if venv else {}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(TRUSS_REFERENCE / "serve_with_truss.sh"), str(truss_dir), str(port), str(work)],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **extra, **(env or {})}, start_new_session=True,
        )
    served = Served(proc, f"http://127.0.0.1:{port}", log)
    try:
        _wait_alive(served, timeout, ready=wait_ready)
        yield served
    finally:
        _stop(proc)
