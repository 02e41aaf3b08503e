"""Serve a Truss directory on Ray Serve: the same app and runtime, N replicas, one or many machines.

Each replica builds the very FastAPI app `kernel-magics serve` uses (server.create_app)
over its own ModelHost, so routes, status codes, error bodies, headers and
streaming are the same. Ray is imported only here, and only for ``--engine ray``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Optional

from ..core.config import ModelConfig
from ..core.errors import KernelMagicsError

__all__ = ["serve_with_ray", "replica_options", "REPLICA_HEADER"]

APP_NAME = "kernel-magics"
DEPLOYMENT_NAME = "TrussModel"
REPLICA_HEADER = "x-kernel-magics-replica"

# In a replica process: that replica's host (the app's routes read it through _replica_host).
_REPLICA: dict[str, Any] = {"host": None}


def _replica_host():
    return _REPLICA["host"]


def _replica_grpc_on_loopback() -> None:
    """In a Ray we started on this machine only: bind the replica's internal gRPC port to loopback.

    Ray Serve 2.60 hard-codes "[::]:0" for the inter-deployment gRPC server each replica starts
    after its constructor (serve/_private/replica.py), the one port of ours that would listen on
    every interface. Single-node mode (set in _local_ray_env, inherited by the replica) makes the
    node's address 127.0.0.1, so peers reach the port there. A no-op on a real cluster or if
    Ray's code moved.
    """
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        return
    try:
        from ray.serve._private import replica
    except ImportError:
        return
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "_km_loopback", False):
        return

    def add_port(server, address: str):
        return original(server, address.replace("[::]", "127.0.0.1", 1) if address.startswith("[::]") else address)

    add_port._km_loopback = True
    replica.add_port_to_grpc_server = add_port


def _set_replica_host(host) -> None:
    # A module-level function, so Ray pickles it by reference: the replica class below is
    # pickled by value, and a global it touched directly would be a copy in the replica.
    _REPLICA["host"] = host


async def _all_replicas_running() -> bool:
    """Readiness: every replica of the deployment is up (not just the one answering)."""
    from ray import serve

    status = serve.status().applications.get(APP_NAME)
    if status is None:
        return False
    deployment = status.deployments.get(DEPLOYMENT_NAME)
    return deployment is not None and str(deployment.status).endswith("HEALTHY")


class _ReplicaHeader:
    """ASGI middleware: names the replica that answered, so load spread is visible."""

    def __init__(self, app) -> None:
        self.app = app
        self._id: Optional[bytes] = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self._id is None:
            from ray import serve

            self._id = serve.get_replica_context().replica_id.unique_id.encode()

        async def send_with_header(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), self._id)]}
            await send(message)

        await self.app(scope, receive, send_with_header)


_QUEUE_PER_REPLICA = 4


def replica_options(config: ModelConfig) -> dict:
    """Ray resources of one replica, from config.yaml's resources and runtime."""
    resources = config.resources
    concurrency = config.runtime.predict_concurrency
    return {
        "ray_actor_options": {"num_cpus": resources.cpu_cores, "num_gpus": resources.gpu_count,
                              "memory": resources.memory_in_bytes},
        # predict_concurrency bounds predicts inside each replica (the runtime's semaphore, exactly
        # as in `kernel-magics serve`). Serve may hand a replica a few more requests to queue there:
        # with a limit of exactly 1, Serve's router backs off and retries while every replica is
        # busy, which measured 3x slower than letting requests wait in the replica.
        "max_ongoing_requests": concurrency + _QUEUE_PER_REPLICA,
    }


def _deployment(truss_dir: Path, replicas: int, config: ModelConfig, secrets_ref: list):
    from ray import serve

    from .server import create_app

    app = create_app(_replica_host, all_ready=_all_replicas_running)
    app.add_middleware(_ReplicaHeader)

    # No per-request access log: every replica would ship a line per request to the driver.
    @serve.deployment(name=DEPLOYMENT_NAME, num_replicas=replicas, logging_config={"enable_access_log": False},
                      **replica_options(config))
    @serve.ingress(app)
    class TrussModel:
        def __init__(self) -> None:
            import ray

            from ..core.truss_dir import TrussDir

            _replica_grpc_on_loopback()
            host = TrussDir.open(truss_dir).host()
            # Secret values travel in Ray's object store, not in env vars or init args
            # (both show in Ray's dashboard and logs).
            for name, value in ray.get(secrets_ref[0]).items():
                host.secrets.set_value(name, value)
            from .server import redact_logs_of

            redact_logs_of(host)
            host.load()  # once per replica; a failure fails the replica and Ray retries it
            _set_replica_host(host)

    return TrussModel


def _deployment_error() -> str:
    from ray import serve

    try:
        app = serve.status().applications.get(APP_NAME)
        deployment = app.deployments.get(DEPLOYMENT_NAME) if app else None
        message = (deployment.message if deployment else "") or (app.message if app else "")
    except Exception as exc:  # the controller may be gone already
        message = f"(could not read the deployment status: {exc})"
    # Keep the user's own error: the last "Error: ..." style line of the traceback Ray kept.
    lines = [l.strip() for l in message.splitlines() if l.strip()]
    errors = [l for l in lines if re.match(r"^[A-Za-z_.]*(Error|Exception|NotFound)\b.*:", l)]
    return errors[-1] if errors else (lines[-1] if lines else "unknown error")


def _local_ray_env(temp: Path) -> None:
    """A Ray we start keeps to itself. Set before ray is imported (it reads these at import)."""
    # Measured with Ray 2.60 (shared/FIELD-NOTES.md): without these Ray phones home and
    # writes an auth token under the home directory.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["RAY_TMPDIR"] = str(temp)
    # Single-node mode: Ray then takes the loopback address as the node's address, so its
    # GCS, raylet, workers and agents listen on 127.0.0.1 instead of the machine's IP
    # (an explicit _node_ip_address="127.0.0.1" is turned back into the machine's IP).
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def serve_with_ray(path, *, host: str = "127.0.0.1", port: int = 8080, replicas: int = 1,
                   address: Optional[str] = None, secrets_dir=None) -> int:
    """Deploy ``path`` on Ray Serve and serve until SIGTERM/SIGINT; returns the exit code."""
    from ..core.truss_dir import TrussDir

    try:
        truss = TrussDir.open(path)
        truss.check_static()
        store = truss.secret_store(secrets_dir=secrets_dir)
        secret_values = {n: store[n] for n in truss.config.secret_names if store.source_of(n)}
    except KernelMagicsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for warning in truss.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    root, config = truss.root, truss.config
    started_here = address is None
    temp = Path(tempfile.mkdtemp(prefix="km-ray-")) if started_here else None
    if started_here:
        _local_ray_env(temp)
    try:
        import ray
        from ray import serve
    except ImportError:
        print("error: --engine ray needs Ray Serve, which is not installed. Install it with "
              "`pip install 'kernel-magics[ray]'` (ray[serve] 2.60), or serve without --engine ray.", file=sys.stderr)
        return 1

    stop = threading.Event()
    failure: Optional[str] = None
    try:
        if started_here:
            per_replica = replica_options(config)["ray_actor_options"]["num_cpus"]
            ray.init(
                include_dashboard=False,
                # Logical CPUs: enough for the replicas asked for even on a small machine.
                num_cpus=max(os.cpu_count() or 1, int(per_replica * replicas + 0.999)),
                object_store_memory=100 * 2**20,
                _temp_dir=str(temp),
                logging_level="WARNING",
            )
        else:
            ray.init(address=address, logging_level="WARNING")
        # After ray.init: Ray's core worker installs its own SIGTERM handler, which would
        # kill the driver without shutting the deployment down.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        secrets_ref = [ray.put(secret_values)]
        serve.start(http_options={"host": host, "port": port})
        where = f"a local Ray (its files under {temp})" if started_here else f"the Ray cluster at {address}"
        print(f"Deploying {replicas} replica(s) of {root.name} on Ray Serve in {where} ...", file=sys.stderr, flush=True)
        try:
            serve.run(_deployment(root, replicas, config, secrets_ref).bind(), name=APP_NAME, route_prefix="/")
        except Exception:
            failure = (f"error: a replica failed to load the model: {_deployment_error()}. Ray retried and gave up; "
                       "fix load() and start again.")
            return 1
        print(f"Serving on http://{host}:{port}/v1/models/model:predict with {replicas} replica(s) (Ray Serve).",
              file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
        print("Stopping: shutting the deployment down ...", file=sys.stderr, flush=True)
        return 0
    finally:
        try:
            serve.shutdown()
        except Exception:
            pass
        if started_here:
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)
        if failure:
            # Last, after Ray's own shutdown logs: the one paragraph a user (or supervisor) reads.
            print(failure, file=sys.stderr, flush=True)
