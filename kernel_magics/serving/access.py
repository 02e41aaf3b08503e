"""Per-request bookkeeping, cheap on the request path: a request id, /metrics counters, the access line.

One ASGI middleware sees every request, unmatched ones (404) included, and the whole of a
streamed response, so a stream's line carries its full duration. Health checks and /metrics
are counted but not logged (as Truss's server filters them). The line joins the event loop's
burst (serving/logs.access_line): the loop makes a burst's lines at once, the writer thread
writes them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
import weakref
from typing import Optional

from .errors import stopping_response
from .logs import REQUEST_ID, access_line

__all__ = ["RequestLog", "Metrics"]

log = logging.getLogger("kernel_magics.server")

# Route templates of the probes a load balancer or Kubernetes calls every few seconds.
_QUIET = frozenset({"/", "/v1/models/{model_name}", "/v1/models/{model_name}/loaded", "/ping", "/metrics"})
_FIXED = frozenset({"/", "/ping", "/invocations", "/metrics", "/v1/chat/completions", "/v1/completions",
                    "/v1/embeddings", "/v1/messages", "/v1/responses"})


def route_of(path: str) -> str:
    """The route template a path belongs to (the metrics' label), by its shape: no regex, no cache."""
    if path in _FIXED:
        return path
    if path.startswith("/v1/models/"):
        rest = path[11:]
        if "/" not in rest:
            if ":" not in rest:
                return "/v1/models/{model_name}"
            verb = rest.rsplit(":", 1)[1]
            return "/v1/models/{model_name}:" + verb if verb in ("predict", "predict_binary") else "unmatched"
        name, _, tail = rest.partition("/")
        if tail in ("loaded", "schema") and ":" not in name:
            return "/v1/models/{model_name}/" + tail
    return "unmatched"


class Metrics:
    """Request counts and latency per route, in the Prometheus text format (prometheus_client).

    One set per process (the default registry refuses duplicates); label children are cached,
    so a request costs a dict look-up, an increment and a histogram observation.
    """

    _instance: Optional["Metrics"] = None

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.requests = Counter("kernel_magics_requests", "HTTP requests handled", ["route", "status"])
        self.latency = Histogram("kernel_magics_request_seconds", "Time to the response's start", ["route"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        # A model with predict_batch (core/batching.py): how full its batches are, and what filling them cost.
        self.batch_size = Histogram("kernel_magics_batch_size", "Requests in each predict_batch call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096))
        self.batch_wait = Histogram("kernel_magics_batch_wait_seconds",
                                    "How long each batch's first request waited before the batch started",
                                    buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 10))
        self._counters: dict = {}
        self._histograms: dict = {}
        self._watched: "weakref.WeakSet" = weakref.WeakSet()  # (an id could be reused by a later host)

    @classmethod
    def get(cls) -> "Metrics":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def watch_batches(self, host) -> None:
        """Observe the batches ``host`` runs (once per host; a Ray replica's own host included)."""
        if host in self._watched:
            return
        self._watched.add(host)

        def on_event(event) -> None:
            if event.kind == "batch":
                self.batch_size.observe(event.data["size"])
                self.batch_wait.observe(event.data["wait"])

        host.subscribe(on_event)

    def record(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self.requests.labels(route, str(status))
        histogram = self._histograms.get(route)
        if histogram is None:
            histogram = self._histograms[route] = self.latency.labels(route)
        counter.inc()
        histogram.observe(seconds)


class RequestLog:
    """ASGI middleware: request id, metrics and the access line of every HTTP request."""

    def __init__(self, app, *, metrics: Optional[Metrics] = None, log_requests: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self.log_requests = log_requests
        self._ids = itertools.count(1)
        self._prefix = os.urandom(3).hex()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        state = [500, None]  # status, time of the response's start

        async def send_and_note(message) -> None:
            if message["type"] == "http.response.start":
                state[0], state[1] = message["status"], time.perf_counter()
            await send(message)

        request_id = None
        for name, value in scope["headers"]:
            if name == b"x-baseten-request-id":  # as Truss: the caller's id, when it sends one
                request_id = value.decode("latin-1")
                break
        if request_id is None:
            request_id = f"{self._prefix}-{next(self._ids)}"
        REQUEST_ID.set(request_id)
        try:
            await self.app(scope, receive, send_and_note)
        except asyncio.CancelledError:
            app = scope.get("app")  # (Starlette's, with the state the server that runs it sets)
            if state[1] is not None or app is None or not getattr(app.state, "stopping", False):
                raise  # cancelled by whoever runs the app (Ray Serve, when its client leaves): as it asks
            # A forced quit cancels the requests in flight (serving/uvicorn_engine.py). Passed on, uvicorn would log
            # "Exception in ASGI application" with a traceback and answer a plain-text 500; the client gets Truss's
            # 503 instead, and the log one line. (A sync predict's thread runs on; the command says so.)
            task = asyncio.current_task()
            if task is not None and hasattr(task, "uncancel"):
                task.uncancel()
            log.warning("Request cut off: the server is stopping before the model answered it.")
            await stopping_response()(scope, receive, send_and_note)
        finally:
            ended = time.perf_counter()
            template = route_of(scope["path"])
            status = state[0]
            if self.metrics is not None and template != "/metrics":
                self.metrics.record(template, status, (state[1] or ended) - started)
            if self.log_requests and template not in _QUIET:
                access_line(scope["method"], scope["path"], status, (ended - started) * 1000, request_id)
