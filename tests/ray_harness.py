"""A Ray cluster of several nodes on this machine, for tests and benchmarks: benchmarks/local_ray_cluster.py in a child process."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from kernel_magics.serving.ray_proxy import CALLBACK, CALLBACK_VARIABLE

REPO = Path(__file__).resolve().parents[1]
WITHOUT_IRI_GRAMMAR = Path(__file__).resolve().parent / "without_iri_grammar"


def ray_environment(env: Optional[dict] = None) -> dict:
    """``env`` (default: this process's) for a process that starts or joins a Ray: rfc3987_syntax kept out of it
    and of every Ray process it starts (tests/without_iri_grammar says why)."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(WITHOUT_IRI_GRAMMAR), env.get("PYTHONPATH")) if p)
    return env


class LocalCluster:
    def __init__(self, workers: int, cpus: float = 1, serve_port: Optional[int] = None) -> None:
        """``serve_port``: start Ray Serve on the cluster, its proxy there (deployments then use that port)."""
        self.serve_port = serve_port
        # Ray gives a node's raylet 30 s to register, which a loaded machine can miss: a cluster that exits
        # before it is ready is started again, a few times.
        for attempt in range(3):
            self._start(workers, cpus, serve_port)
            try:
                for line in self._lines("READY"):
                    if line.startswith("ADDRESS "):
                        self.address = line.split()[1]
                return
            except RuntimeError:
                self.close()  # a cluster that never got ready leaves no processes or files either
                if attempt == 2:
                    raise
            except BaseException:
                self.close()
                raise

    def _start(self, workers: int, cpus: float, serve_port: Optional[int]) -> None:
        # Short: Ray's socket paths under it must stay within the 107 bytes a Unix socket path allows.
        self.temp = Path(tempfile.mkdtemp(prefix="kr"))
        self.proc = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "local_ray_cluster.py"),
                                      "--workers", str(workers), "--cpus", str(cpus), "--temp-dir", str(self.temp),
                                      *(["--serve-port", str(serve_port)] if serve_port else [])], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, start_new_session=True,
                                     # Its Serve proxy bounds request heads, as docs/ray.md has a cluster's nodes started.
                                     env={**ray_environment(), CALLBACK_VARIABLE: CALLBACK})
        self.nodes: dict[str, str] = {}
        self.address = ""

    def _lines(self, until: str):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().strip()
            if not line and self.proc.poll() is not None:
                raise RuntimeError("the local Ray cluster exited")
            if line.startswith("NODE "):
                _, name, node_id = line.split()
                self.nodes[name] = node_id
            yield line
            if line.startswith(until):
                return
        raise TimeoutError(f"no {until} from the local Ray cluster")

    def command(self, text: str, until: str) -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        for _ in self._lines(until):
            pass

    def name_of(self, node_id: str) -> str:
        return next(name for name, nid in self.nodes.items() if nid == node_id)

    def alive(self) -> bool:
        host, port = self.address.split(":")
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return True
        except OSError:
            return False

    def close(self) -> None:
        try:
            self.proc.stdin.write("exit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except Exception:
            pass
        try:  # whatever of the cluster's process group is still there (nothing, after a clean exit)
            os.killpg(self.proc.pid, 9)
        except ProcessLookupError:
            pass
        self.proc.wait()
        shutil.rmtree(self.temp, ignore_errors=True)
        # Ray's cluster helper writes the head's address where every later bare `ray.init()` on this
        # machine would find it and join a cluster that is gone: remove it (only if it is this cluster's).
        ray_dir = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray"
        address_file = ray_dir / "ray_current_cluster"
        if self.address and address_file.is_file() and address_file.read_text().strip() == self.address:
            address_file.unlink()
        if ray_dir.is_dir() and not any(ray_dir.iterdir()):
            ray_dir.rmdir()
