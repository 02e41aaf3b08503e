"""Serve a Truss directory on Ray Serve: the same app and runtime, N replicas, one or many machines.

Each replica builds the very FastAPI app `kernel-magics serve` uses (server.create_app)
over its own ModelHost, so routes, status codes, error bodies, headers and
streaming are the same. Ray is imported only here, and only for ``--engine ray``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from ..core.config import ModelConfig
from ..core.errors import KernelMagicsError
from ..core.secrets import ENV_PREFIX
from .limits import DEFAULT_MAX_BODY
from .ray_proxy import CALLBACK, CALLBACK_VARIABLE
from .stand_in import stand_in

__all__ = ["serve_with_ray", "replica_options", "REPLICA_HEADER", "RayServeError", "Scale"]

APP_NAME = "kernel-magics"
DEPLOYMENT_NAME = "TrussModel"
REPLICA_HEADER = "x-kernel-magics-replica"

log = logging.getLogger("kernel_magics.server")

class RayServeError(KernelMagicsError):
    """`serve --engine ray` cannot serve: the one paragraph the CLI prints last."""


class ReplicaLoadError(Exception):
    """A replica's load failed; its text is the user's traceback with the secrets redacted."""


# In a replica process: that replica's host (the app's routes read it through _replica_host), and whether its
# load thread has ended (loaded or failed).
_REPLICA: dict[str, Any] = {"host": None, "settled": threading.Event()}


def _replica_host():
    return _REPLICA["host"]


def _replica_grpc_on_loopback() -> None:
    """On a node whose address is 127.0.0.1: bind the replica's internal gRPC port to loopback.

    Ray Serve 2.60 hard-codes "[::]:0" for the inter-deployment gRPC server each replica starts
    after its constructor (serve/_private/replica.py), the one port of ours that would listen on
    every interface. A node on 127.0.0.1 (a local Ray in single-node mode, or the nodes of a
    cluster simulated on one machine) is reached there by its peers. A no-op on a real cluster's
    nodes (their own addresses) or if Ray's code moved.
    """
    try:
        import ray

        if ray.util.get_node_ip_address() != "127.0.0.1":
            return
    except Exception:
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


# ---------------------------------------------------------------------- each replica's load, seen from anywhere

# A replica imports model.py and loads in a thread (liveness answers meanwhile); how each load went is kept in
# Ray's key-value store (the GCS), under the deployment's run and the replica's id, so that readiness on any
# replica and the command's deploy-and-wait see every replica's load, not only their own.
_LOADS = "kernel_magics"  # the store's namespace
LOADING, LOADED, FAILED = "loading", "loaded", "failed"
_THEN = "\x1f"  # between a failed load's line and what the command says to do next, in what a replica publishes


def _load_key(run: str, replica: str = "") -> str:
    return f"load/{run}/{replica}"


def _publish_load(run: str, replica: str, state: str, text: str = "") -> None:
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(_load_key(run, replica), f"{state}\n{text}", namespace=_LOADS)


def _forget_loads(run: str, replica: str = "") -> None:
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(_load_key(run, replica), del_by_prefix=not replica, namespace=_LOADS)


def _loads(run: str) -> dict[str, tuple[str, str]]:
    """Replica id -> (state, the failure's one line) for every replica of the run that began a load."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list

    found = {}
    for key in _internal_kv_list(_load_key(run), namespace=_LOADS):
        value = _internal_kv_get(key, namespace=_LOADS)
        if value is not None:
            state, _, text = value.decode().partition("\n")
            found[key.decode().rpartition("/")[2]] = (state, text)
    return found


def _deployment_progress(run: str) -> tuple[bool, Optional[str]]:
    """(whether every replica runs and has loaded the model, the failure of a replica's load or None)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    details = ServeInstanceDetails(**_get_global_client().get_serve_details())  # what serve.status() reads
    app = details.applications.get(APP_NAME)
    deployment = app.deployments.get(DEPLOYMENT_NAME) if app else None
    loads = _loads(run)
    failed = next((text for state, text in loads.values() if state == FAILED), None)
    if deployment is None or not deployment.replicas:
        return False, failed
    # HEALTHY alone lags a lost replica by a health-check period; a replica starting, stopping or
    # recovering shows in its state at once.
    running = [r.replica_id for r in deployment.replicas if str(getattr(r.state, "value", r.state)) == "RUNNING"]
    healthy = str(getattr(deployment.status, "value", deployment.status)) == "HEALTHY"
    ready = healthy and len(running) == len(deployment.replicas) >= deployment.target_num_replicas and all(
        loads.get(r, ("",))[0] == LOADED for r in running)
    return ready, failed


async def _all_replicas_loaded(run: str) -> bool:
    """Readiness: every replica of the deployment runs and has loaded the model (not just the one answering)."""
    import asyncio

    try:
        # The controller and the store answer over the network: off the replica's event loop.
        return (await asyncio.to_thread(_deployment_progress, run))[0]
    except Exception:  # the controller restarting, say: not ready, rather than a 500
        return False


def _load_replica(truss, host, publish: Callable[..., None]) -> None:
    """A replica's load thread, `kernel-magics serve`'s (import model.py, define the class, load): a failure
    is logged with the user's frames (secrets redacted) and published with its one line."""
    from .uvicorn_engine import import_and_load

    try:
        failed = import_and_load(truss, host)
        if failed is None:
            publish(LOADED)
        else:
            fix, line = failed  # (no fix named: our own error, whose line says what to do)
            publish(FAILED, line, "Its traceback is in the replica's log above; fix the model and start again"
                    if fix else "Start again once that is done")
    finally:
        _REPLICA["settled"].set()


class _WaitForLoad:
    """ASGI middleware: a request for the model (a POST) that reaches a replica still loading waits for the load.

    Kubernetes sends Truss's server no traffic before its readiness says 200; Ray Serve routes to a replica as
    soon as it runs (a new replica of an autoscaled or recovering deployment, say), so the request waits here
    instead of getting 503. Probes and GETs answer at once; after a failed load, the routes answer 503.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not _REPLICA["settled"].is_set():
            import asyncio

            while not _REPLICA["settled"].is_set():
                await asyncio.sleep(0.05)
        await self.app(scope, receive, send)


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


@dataclass(frozen=True)
class Scale:
    """How many replicas, and where: fixed or autoscaled, at most ``per_node`` on one node."""

    replicas: int = 1
    min_replicas: Optional[int] = None
    max_replicas: Optional[int] = None
    target_ongoing_requests: float = 2.0
    per_node: Optional[int] = None
    upscale_delay_s: float = 3.0
    downscale_delay_s: float = 10.0

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    @property
    def at_least(self) -> int:
        return (self.min_replicas or 1) if self.autoscaling else self.replicas

    def describe(self) -> str:
        where = f", at most {self.per_node} per node" if self.per_node else ""
        if self.autoscaling:
            return (f"{self.min_replicas or 1} to {self.max_replicas or self.min_replicas} replicas (autoscaling at "
                    f"{self.target_ongoing_requests:g} ongoing requests per replica{where})")
        return f"{self.replicas} replica(s){where}"


def replica_options(config: ModelConfig, scale: Scale = Scale()) -> dict:
    """Ray Serve options of the deployment, from config.yaml's resources and runtime and the scale asked for."""
    resources = config.resources
    concurrency = config.runtime.predict_concurrency
    options = {
        "ray_actor_options": {"num_cpus": resources.cpu_cores, "num_gpus": resources.gpu_count,
                              "memory": resources.memory_in_bytes},
        # predict_concurrency bounds predicts inside each replica (the runtime's bound, core/slots.py, exactly
        # as in `kernel-magics serve`). Serve may hand a replica a few more requests to queue there:
        # with a limit of exactly 1, Serve's router backs off and retries while every replica is
        # busy, which measured 3x slower than letting requests wait in the replica.
        "max_ongoing_requests": concurrency + _QUEUE_PER_REPLICA,
    }
    if scale.autoscaling:
        low = scale.min_replicas or 1
        options["autoscaling_config"] = {
            "min_replicas": low, "initial_replicas": low, "max_replicas": max(scale.max_replicas or low, low),
            "target_ongoing_requests": scale.target_ongoing_requests,
            "upscale_delay_s": scale.upscale_delay_s, "downscale_delay_s": scale.downscale_delay_s,
        }
    else:
        options["num_replicas"] = scale.replicas
    if scale.per_node:
        options["max_replicas_per_node"] = scale.per_node  # Serve spreads the replicas over the nodes
    return options


def _deployment(truss_dir: Path, scale: Scale, config: ModelConfig, secrets_ref: list, run: str, max_body: int):
    from ray import serve

    from .server import create_app

    # No per-request access line: every replica would ship one per request to the driver.
    app = create_app(_replica_host, all_ready=functools.partial(_all_replicas_loaded, run), log_requests=False,
                     max_body=max_body)
    app.add_middleware(_WaitForLoad)
    app.add_middleware(_ReplicaHeader)

    # Nor Ray Serve's own access log, for the same reason.
    @serve.deployment(name=DEPLOYMENT_NAME, logging_config={"enable_access_log": False},
                      **replica_options(config, scale))
    @serve.ingress(app)
    class TrussModel:
        """One replica: binds (Ray routes to it) at once, imports model.py and loads in its load thread, as
        Truss's server does: liveness answers meanwhile, readiness says 503 until every replica has loaded."""

        def __init__(self) -> None:
            import ray

            from ..core.secrets import redact_log_records
            from ..core.truss_dir import TrussDir
            from .server import redact_logs_of
            from .uvicorn_engine import unloaded_host

            _replica_grpc_on_loopback()
            truss = TrussDir.open(truss_dir)
            os.chdir(truss.root)  # as Truss's server runs from /app (a replica is a process of its own)
            host = unloaded_host(truss)
            # Secret values travel in Ray's object store, not in env vars or init args
            # (both show in Ray's dashboard and logs).
            for name, value in ray.get(secrets_ref[0]).items():
                host.secrets.set_value(name, value)
            redact_logs_of(host)
            # The model's own logging in a replica goes to Ray's handlers, not our log queue: redact each
            # record as it is made, before any handler (Ray's log files, the driver's console) sees it.
            redact_log_records(host.secrets.redact)
            self._replica = serve.get_replica_context().replica_id.unique_id
            self._failure: list[str] = []
            _set_replica_host(host)

            def publish(state: str, text: str = "", then: str = "") -> None:
                """``then``: what the command says to do after a failed load's ``text`` (Ray's health check,
                which replaces the replica, gives the text alone)."""
                if state == FAILED:
                    self._failure.append(text)
                _publish_load(run, self._replica, state, f"{text}{_THEN}{then}" if then else text)

            publish(LOADING)
            threading.Thread(target=_load_replica, args=(truss, host, publish), name="model-load", daemon=True).start()

        def check_health(self) -> None:
            """Ray's liveness check: fine while loading; after a failed load the replica is unhealthy, so
            Ray replaces it (and says why). Only the redacted one line leaves."""
            if self._failure:
                raise ReplicaLoadError(f"the model failed to load: {self._failure[0]}")

        def __del__(self) -> None:
            with contextlib.suppress(Exception):
                _forget_loads(run, self._replica)

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
    # Serve's HTTP proxy bounds request heads as `kernel-magics serve` does (a user's own hook stays).
    os.environ.setdefault(CALLBACK_VARIABLE, CALLBACK)


# ---------------------------------------------------------------------- before deploying: can the cluster run it?

def _check_requirements(requirements: list[str]) -> dict:
    """On one node: which requirement lines its Python does not satisfy (run as a Ray task there)."""
    import socket

    from ..core.config import unmet_requirements

    missing = [f"{line} ({version} is installed)" if version else f"{line} (not installed)"
               for line, _, version in unmet_requirements(requirements)]
    return {"host": socket.gethostname(), "missing": missing}


def preflight(config: ModelConfig, scale: Scale, timeout: float = 60.0) -> Optional[str]:
    """Why the connected cluster cannot run the model, in one paragraph, or None.

    Checks, with bounded waits: that some node has the resources one replica asks for (GPUs
    from resources.accelerator, CPUs, memory), that enough such nodes exist for the replicas
    asked for at most ``per_node`` on a node, and that every node that could host a replica has
    the requirements installed (a small task pinned to each node looks).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ask = replica_options(config, scale)["ray_actor_options"]
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    fits = [n for n in nodes if n["Resources"].get("CPU", 0) >= ask["num_cpus"]
            and n["Resources"].get("GPU", 0) >= ask["num_gpus"] and n["Resources"].get("memory", 0) >= ask["memory"]]
    where = ", ".join(f"{n['NodeManagerAddress']} ({n['Resources'].get('CPU', 0):g} CPU, {n['Resources'].get('GPU', 0):g} GPU, "
                      f"{n['Resources'].get('memory', 0) / 2**30:.1f} GiB)" for n in nodes)
    if not fits:
        gpu = f" and {ask['num_gpus']} GPU ({config.resources.accelerator})" if ask["num_gpus"] else ""
        return (f"No node of the cluster can host a replica: each asks for {ask['num_cpus']:g} CPU{gpu} and "
                f"{ask['memory'] / 2**30:.1f} GiB of memory (resources in config.yaml), and the nodes have: {where}. "
                "Add a node with those resources, or lower resources in config.yaml.")
    if scale.per_node and len(fits) * scale.per_node < scale.at_least:
        return (f"{scale.at_least} replicas at most {scale.per_node} per node need {-(-scale.at_least // scale.per_node)} "
                f"nodes that can host one, and the cluster has {len(fits)}: {where}. Add nodes, or raise "
                "--replicas-per-node.")
    if not config.requirements:
        return None
    checks = {n["NodeID"]: ray.remote(num_cpus=0)(_check_requirements).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(config.requirements)
        for n in fits}
    problems = []
    for node in fits:
        try:
            found = ray.get(checks[node["NodeID"]], timeout=timeout)
        except Exception as exc:  # a node that does not answer within the bound
            problems.append(f"node {node['NodeManagerAddress']} ({node['NodeID'][:8]}) did not answer within "
                            f"{timeout:.0f} s ({type(exc).__name__})")
            continue
        if found["missing"]:
            problems.append(f"node {node['NodeManagerAddress']} ({node['NodeID'][:8]}) lacks "
                            + ", ".join(found["missing"]))
    if problems:
        return ("The cluster cannot run the model: " + "; ".join(problems) + ". Install the requirements in "
                "config.yaml on every node (the same versions), or take those nodes out of the cluster.")
    return None


def _serve_running() -> bool:
    """Whether Ray Serve already runs on the connected cluster (its controller exists)."""
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client(raise_if_no_controller_running=False) is not None
    except Exception:  # a private API of Ray's: if it moved, assume it runs (we then never shut it down)
        return True


def _serve_http_address() -> Optional[tuple]:
    """(host, port) of the HTTP proxy the running Serve uses, or None if it cannot be read."""
    try:
        from ray.serve.context import _get_global_client

        config = _get_global_client().http_config
        return config.host, config.port
    except Exception:  # a private API of Ray's: if it moved, skip the check rather than fail
        return None


def _wait_deployed(run: str, timeout: float) -> None:
    """Wait (bounded) until every replica runs and has loaded the model; raises RayServeError with what it
    was waiting for, or with the first replica's failed load."""
    import time

    from ray import serve

    deadline = time.monotonic() + timeout
    last, said_loading = "", False
    while time.monotonic() < deadline:
        status = serve.status().applications.get(APP_NAME)
        if status is not None:
            state = str(status.status)
            ready, failed = _deployment_progress(run)
            if failed:
                # As `kernel-magics serve` (and Truss's server) stop on a failed load: the replicas would fail alike.
                line, _, then = failed.partition(_THEN)
                raise RayServeError(f"a replica failed to load the model: {line.rstrip('.')}. {then}.")
            if state.endswith("DEPLOY_FAILED"):
                raise RayServeError(f"a replica failed to start: {_deployment_error()}. Ray retried and gave "
                                    "up; fix it and start again.")
            if ready:
                return
            if state.endswith("RUNNING"):
                last = "the replicas run and are loading the model"
                if not said_loading:
                    print("The replicas run (liveness answers); loading the model (readiness answers 503 until "
                          "every replica has loaded) ...", file=sys.stderr, flush=True)
                    said_loading = True
            else:
                deployment = status.deployments.get(DEPLOYMENT_NAME)
                last = (deployment.message if deployment else "") or status.message or state
        time.sleep(0.5)
    raise RayServeError(f"the deployment was not ready after {timeout:.0f} s (Ray Serve says: "
                        f"{last.strip() or 'no status'}). The cluster may lack free resources (see `ray status`) "
                        "or the model takes longer to load; raise --deploy-timeout.")


def _import_ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise RayServeError("--engine ray needs Ray Serve, which is not installed. Install it with "
                            "`pip install 'kernel-magics[ray]'` (ray[serve] 2.60), or serve without --engine ray.") from None
    return ray, serve


def _on_loopback(address: Optional[str]) -> bool:
    return address is None or address.split(":")[0] in ("127.0.0.1", "localhost")


@contextlib.contextmanager
def local_ray(config: ModelConfig, scale: Scale) -> Iterator[str]:
    """A private Ray on this machine for the command's life; its files go when it stops.

    Its folder is a ScratchDir (locked while this command runs): when a command is killed (kill -9), its Ray
    dies with it (Ray's processes share its fate) and the next command that starts a local Ray removes the folder,
    or, where what was left of that Ray still wrote there (its agents log for a minute), when it stops.
    """
    from ..core.scratch import ScratchDir, remove_tree, sweep_stale

    scratch = ScratchDir(Path(tempfile.gettempdir()), "km-ray-")
    temp = scratch.path
    _local_ray_env(temp)
    try:
        ray, serve = _import_ray()
        per_replica = replica_options(config, scale)["ray_actor_options"]["num_cpus"]
        most = scale.max_replicas or scale.min_replicas or scale.replicas
        try:
            try:
                ray.init(
                    include_dashboard=False,
                    # Logical CPUs: enough for the replicas asked for even on a small machine.
                    num_cpus=max(os.cpu_count() or 1, int(per_replica * most + 0.999)),
                    object_store_memory=100 * 2**20,
                    _temp_dir=str(temp),
                    logging_level="WARNING",
                )
            except Exception as exc:
                raise RayServeError(f"could not start a local Ray: {type(exc).__name__}: {exc} Its logs are under "
                                    f"{temp} until this command ends; on a busy machine, try again.") from None
            yield f"a local Ray (its files under {temp})"
        finally:  # a half-started Ray too
            with contextlib.suppress(Exception):
                if ray.is_initialized():
                    serve.shutdown()
            ray.shutdown()
    finally:
        remove_tree(temp)
        scratch.release()
        sweep_stale(temp.parent, "km-ray-")


@contextlib.contextmanager
def joined_cluster(address: str) -> Iterator[str]:
    """This process as a driver of the running cluster at ``address``; leaving disconnects only it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if _on_loopback(address):
        # A cluster on this machine's loopback: join it there (Ray would turn 127.0.0.1 into the
        # machine's address, where such a cluster does not listen).
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray, _ = _import_ray()
    try:
        ray.init(address=address, logging_level="WARNING")
    except Exception as exc:
        raise RayServeError(f"could not join the Ray cluster at {address}: {type(exc).__name__}: {exc}. Check the "
                            "head's address (ray start --head prints it) and that it is running.") from None
    try:
        yield f"the Ray cluster at {address}"
    finally:
        ray.shutdown()  # disconnects this driver only


@contextlib.contextmanager
def deployed(root: Path, config: ModelConfig, scale: Scale, secret_values: dict, *, host: str, port: int,
             address: Optional[str], where: str, deploy_timeout: float,
             max_body: int = DEFAULT_MAX_BODY) -> Iterator[None]:
    """The deployment, running on the connected Ray (bounded wait); taken down on exit, with Serve
    when this command started it and nothing else runs on it."""
    import ray
    from ray import serve

    started_here = address is None
    run = uuid.uuid4().hex[:12]  # this deployment's replicas' loads, apart from an earlier one's on the cluster
    serve_was_running = started_here or _serve_running()
    if not started_here and APP_NAME in serve.status().applications:
        raise RayServeError(f"another `kernel-magics serve` deployment ({APP_NAME!r}) runs on the Ray cluster at "
                            f"{address}; both would answer on the same routes. Stop that one first (Ctrl-C where it "
                            "runs, or `serve shutdown` for the whole of Serve).")
    # One HTTP proxy, on the head, where every node is this machine (they would all want the same port);
    # on a real cluster one on every node, as Serve does by default.
    serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly" if _on_loopback(address) else "EveryNode")
    deployed_app = False
    try:
        running = _serve_http_address()
        if running and running != (host, port):
            # Serve was already running on the cluster: it keeps its HTTP options and ignores ours.
            raise RayServeError(f"Ray Serve already runs on the cluster at {address} with its HTTP proxy on "
                                f"{running[0]}:{running[1]}, and a running Serve keeps its address. Serve there with "
                                f"--host {running[0]} --port {running[1]}, or shut Serve down first (`serve shutdown`).")
        print(f"Deploying {scale.describe()} of {root.name} on Ray Serve in {where} ...", file=sys.stderr, flush=True)
        # Secret values travel in Ray's object store, not in env vars or init args.
        secrets_ref = [ray.put(secret_values)]
        # Not waiting inside Serve (it would wait for ever on a replica that cannot start): we wait, bounded.
        serve.run_many([serve.RunTarget(_deployment(root, scale, config, secrets_ref, run, max_body).bind(), name=APP_NAME,
                                        route_prefix="/")], wait_for_applications_running=False)
        deployed_app = True
        _wait_deployed(run, deploy_timeout)
        yield
    finally:
        with contextlib.suppress(Exception):
            _forget_loads(run)
        with contextlib.suppress(Exception):
            if not started_here:
                if deployed_app:
                    serve.delete(APP_NAME)  # the user's cluster keeps running; only our deployment goes
                if not serve_was_running and not serve.status().applications:
                    serve.shutdown()  # Serve, if this command started it and nothing else runs on it


def _forget_secret_environment() -> None:
    """The secrets are in the store now: the Ray processes this command starts must not inherit them."""
    for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
        del os.environ[name]


def serve_with_ray(truss, *, host: str = "127.0.0.1", port: int = 8080, address: Optional[str] = None,
                   secrets_dir=None, secrets: Optional[dict] = None, scale: Optional[Scale] = None,
                   deploy_timeout: float = 300.0, max_body: int = DEFAULT_MAX_BODY) -> None:
    """Deploy the Truss directory ``truss`` on Ray Serve and serve until SIGTERM/SIGINT.

    Without ``address`` on a private local Ray; with it, on that running cluster (on exit only this
    deployment goes, and Serve when nothing else of it runs; the cluster keeps running). Raises
    RayServeError (printed last by the CLI, after Ray's own shutdown lines) when it cannot serve.
    ``max_body``: the largest request body a replica accepts, in bytes (413 beyond).
    """
    scale = scale or Scale()
    truss.check_static()
    store = truss.secret_store(secrets_dir=secrets_dir)
    for name, value in (secrets or {}).items():
        store.set_value(name, value)
    secret_values = {n: store[n] for n in truss.config.secret_names if store.source_of(n)}
    _forget_secret_environment()
    config = truss.config
    with _early_liveness(host, port, address) as early:
        session = local_ray(config, scale) if address is None else joined_cluster(address)
        with session as where:
            try:
                stop = threading.Event()
                # After ray.init: Ray's core worker installs its own SIGTERM handler, which would
                # kill the driver without shutting the deployment down.
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, lambda *_: stop.set())
                problem = preflight(config, scale)
                if problem:
                    raise RayServeError(problem)
                with deployed(truss.root, config, scale, secret_values, host=host, port=port, address=address,
                              where=where, deploy_timeout=deploy_timeout, max_body=max_body):
                    print(f"Serving on http://{host}:{port}/v1/models/model:predict with {scale.describe()} "
                          "(Ray Serve).", file=sys.stderr, flush=True)
                    while not stop.wait(0.5):
                        pass
                    print("Stopping: taking the deployment down ...", file=sys.stderr, flush=True)
            finally:
                if early is not None:
                    early.close()  # before Ray stops: a command that ends no longer says "alive"


def _early_liveness(host: str, port: int, address: Optional[str]):
    """The stand-in that answers liveness (readiness 503) on the port until Serve's proxy answers through our
    replicas (serving/stand_in.py), or nothing: on a cluster elsewhere (its proxy is not on this machine), when
    something listens on the port already, or when Serve's proxy would not share the port."""
    if not _on_loopback(address) or os.environ.get("SERVE_SOCKET_REUSE_PORT_ENABLED", "1") != "1":
        return contextlib.nullcontext()
    return stand_in(host, port, handed_over_when=REPLICA_HEADER.encode())
