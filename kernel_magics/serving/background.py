"""`kernel-magics serve DIR ...` as a child process of the kernel: started, waited for, stopped.

What `%model_serve --engine ray` runs: the deployment lives in its own process (and its own
Ray), so the kernel stays light and a Ctrl-C in a cell does not take the deployment down.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

from ..core.errors import KernelMagicsError
from ..core.secrets import ENV_PREFIX

__all__ = ["ServeProcess", "free_port", "first_free", "ports_beside_ephemeral", "exit_with_parent"]

# Set by ServeProcess for its child: the kernel's pid. A kernel that dies (killed, restarted)
# runs no atexit handler, and the child is in its own session; it watches for itself.
PARENT_ENV = "KERNEL_MAGICS_PARENT_PID"


def exit_with_parent() -> None:
    """In a `serve` child of a kernel: SIGTERM ourselves (a clean shutdown) once the kernel is gone."""
    import threading

    parent = os.environ.pop(PARENT_ENV, None)
    if not parent:
        return

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="kernel-magics-parent-watch", daemon=True).start()


def ports_beside_ephemeral() -> range:
    """Ports no outgoing connection is given: the larger gap beside the system's ephemeral range, from 20000
    (Ray's workers take 10002-19999). Without Linux's /proc, 20000-32767: below Linux's and macOS's defaults."""
    try:
        first, last = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2])
    except (OSError, ValueError):
        return range(20000, 32768)
    low, high = max((20000, first), (last + 1, 65536), key=lambda gap: gap[1] - gap[0])
    return range(low, high) if high - low >= 100 else range(0)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on, for a server another process starts in a moment.

    Not one the system picks (bind to port 0): those come from the ephemeral range, where every outgoing
    connection also takes its local port, and one could take it before the server binds ("address already
    in use"). A random port beside that range, checked free; the system's pick where that range leaves none.
    (Drawn from a generator of its own: a notebook's ``random.seed`` neither decides it nor is disturbed.)"""
    import random

    ports = ports_beside_ephemeral()
    port = first_free(random.SystemRandom().sample(ports, min(len(ports), 50)))
    if port is not None:
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_free(ports: Iterable[int]) -> Optional[int]:
    """The first of ``ports`` that binds on 127.0.0.1 (nothing listens there now), or None."""
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return None


class ServeProcess:
    """One `kernel-magics serve` child on 127.0.0.1:port; its output goes to a log file."""

    def __init__(self, proc: subprocess.Popen, port: int, log: Path, engine: str) -> None:
        self.proc, self.port, self.log, self.engine = proc, port, log, engine
        self.keep_log = False  # set when an error message names the log: the user may want to read it

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, directory: Path, args: Sequence[str], *, port: int, secrets: Optional[dict] = None,
              engine: str = "uvicorn") -> "ServeProcess":
        """Start serving ``directory``; ``secrets`` reach the child through a pipe on its stdin (never a
        file, an argument or an environment variable, which Ray's processes would inherit and show)."""
        env = {name: value for name, value in os.environ.items() if not name.startswith(ENV_PREFIX)}
        env["PYTHONUNBUFFERED"] = "1"
        env[PARENT_ENV] = str(os.getpid())
        fd, log = tempfile.mkstemp(prefix="km-serve-", suffix=".log")
        with os.fdopen(fd, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kernel_magics", "serve", str(directory), "--host", "127.0.0.1",
                 "--port", str(port), "--engine", engine, "--secrets-from-stdin", *args],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.PIPE, env=env,
                start_new_session=True,  # a Ctrl-C (SIGINT to the kernel) does not reach it
            )
        proc.stdin.write(json.dumps(secrets or {}).encode() + b"\n")
        proc.stdin.close()
        return cls(proc, port, Path(log), engine)

    def last_line(self) -> str:
        try:
            lines = [l for l in self.log.read_text(errors="replace").splitlines() if l.strip()]
        except OSError:
            return ""
        return lines[-1].removeprefix("error: ") if lines else ""

    def wait_ready(self, timeout: float, progress=None) -> None:
        """Until readiness answers 200; raises with the server's own last words if it exits or times out."""
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.keep_log = True
                raise KernelMagicsError(f"The server stopped before it was ready: {self.last_line() or 'no output'} "
                                        f"(its log: {self.log}).")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models/model", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if progress:
                progress(self.last_line())
            time.sleep(0.5)
        self.keep_log = True
        self.stop()
        raise KernelMagicsError(f"The server was not ready after {timeout:.0f} s of waiting for readiness "
                                f"(GET /v1/models/model); its last words: {self.last_line() or 'none'} "
                                f"(its log: {self.log}). It was stopped.")

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM (the deployment comes down cleanly), SIGKILL to the group after ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if not self.keep_log:
            self.log.unlink(missing_ok=True)
