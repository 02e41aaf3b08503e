"""Per-request bookkeeping, cheap on the request path: a request id, /metrics counters, the access line.

One ASGI middleware sees every request, unmatched ones (404) included, and the whole of a
streamed response, so a stream's line carries its full duration. Health checks are counted but
not logged (as Truss's server filters them); /metrics is neither. The line joins the event loop's
burst (serving/logs.access_line): the loop makes a burst's lines at once, the writer thread
writes them.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import os
import sys
import threading
import time
import weakref
from typing import Optional

from ..core.secrets import printable
from .errors import stopping_response
from .logs import REQUEST_ID, access_line

__all__ = ["RequestLog", "Metrics"]

log = logging.getLogger("kernel_magics.server")

# Route templates of the probes a load balancer or Kubernetes calls every few seconds.
_QUIET = frozenset({"/", "/v1/models/{model_name}", "/v1/models/{model_name}/loaded", "/ping", "/metrics"})
_FIXED = frozenset({"/", "/ping", "/invocations", "/metrics", "/v1/chat/completions", "/v1/completions",
                    "/v1/embeddings", "/v1/messages", "/v1/responses"})


def route_of(path: str, method: str = "POST") -> str:
    """The route template a request belongs to (the metrics' label), by its path's shape: no regex, no cache.
    (A GET of ``/v1/models/m:predict`` is readiness's, as under Truss: its ``{model_name}`` takes the colon.)"""
    if path in _FIXED:
        return path
    if path.startswith("/v1/models/"):
        rest = path[11:]
        if rest.startswith("/") or not rest:  # (no name: no route)
            return "unmatched"
        if "/" not in rest:
            if ":" not in rest or method == "GET" or method == "HEAD":
                return "/v1/models/{model_name}"
            verb = rest.rsplit(":", 1)[1]
            return "/v1/models/{model_name}:" + verb if verb in ("predict", "predict_binary") else "unmatched"
        name, _, tail = rest.partition("/")
        if tail in ("loaded", "schema"):  # (the name may hold a colon here too)
            return "/v1/models/{model_name}/" + tail
    return "unmatched"


# Held while metrics are made (prometheus_client's registry refuses a name made twice).
_MAKING = threading.Lock()
# The request latency histogram's upper bounds (seconds), +Inf after them.
_LATENCY_BOUNDS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)


class Metrics:
    """Request counts and latency per route, in the Prometheus text format (prometheus_client).

    One set per process (``get``: the default registry refuses duplicates). A request's counts are plain
    numbers in lists, kept by ``record``; prometheus_client's custom-collector API (``_RequestCounts``)
    renders them when /metrics is read. Why not its Counter and Histogram: each increment takes a lock
    and checks its metric's kind, three of them a request, and they cost four times what these lists
    do (benchmarks/README.md, "The bookkeeping within one server"). With the GIL the increments need no
    lock: CPython does not switch threads between a list element's load and store in ``+=`` (no call,
    no backward jump between them; checked on 3.10 to 3.13). A free-threaded build does, and there
    ``record`` takes a lock.
    """

    _instance: Optional["Metrics"] = None

    def __init__(self, registry=None) -> None:
        """``registry``: where the metrics are registered (prometheus_client's default one, which /metrics shows)."""
        from prometheus_client import REGISTRY

        registry = REGISTRY if registry is None else registry
        # (None with the GIL; a lock where there is none: sys._is_gil_enabled, Python 3.13 and later)
        self._lock = None if getattr(sys, "_is_gil_enabled", lambda: True)() else threading.Lock()
        self._requests: dict = {}  # (route, status) -> [count, created]
        self._latency: dict = {}  # route -> [requests per bucket (the last one +Inf)..., sum of seconds, created]
        registry.register(_RequestCounts(self))
        self._registry = registry
        self.batch_size = self.batch_wait = None  # (made by the first watch_batches: only a batching model has them)
        self._watched: "weakref.WeakSet" = weakref.WeakSet()  # (an id could be reused by a later host)

    @classmethod
    def get(cls) -> "Metrics":
        with _MAKING:
            if cls._instance is None:
                cls._instance = cls()
        return cls._instance

    def watch_batches(self, host) -> None:
        """Observe the batches ``host`` runs (once per host; a Ray replica's own host included)."""
        if host in self._watched:  # (each batching request asks)
            return
        with _MAKING:  # (two servers' loops in one kernel: the histograms made once, each host watched once)
            if host not in self._watched:
                self._watch(host)

    def _watch(self, host) -> None:
        if self.batch_size is None:
            from prometheus_client import Histogram

            # How full a predict_batch model's batches are (core/batching.py), and what filling them cost.
            # (Observed once a batch, not once a request: prometheus_client's Histogram as it is.)
            self.batch_size = Histogram("kernel_magics_batch_size", "Requests in each predict_batch call",
                                        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
                                        registry=self._registry)
            self.batch_wait = Histogram("kernel_magics_batch_wait_seconds",
                                        "How long each batch's first request waited before the batch started",
                                        buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 10),
                                        registry=self._registry)

        def on_event(event) -> None:
            if event.kind == "batch":
                self.batch_size.observe(event.data["size"])
                self.batch_wait.observe(event.data["wait"])

        host.subscribe(on_event)
        self._watched.add(host)

    def record(self, route: str, status: int, seconds: float) -> None:
        lock = self._lock
        if lock is not None:
            lock.acquire()
        try:
            counts = self._requests.get((route, status))
            if counts is None:
                counts = self._requests.setdefault((route, status), [0, time.time()])
            counts[0] += 1
            latency = self._latency.get(route)
            if latency is None:
                latency = self._latency.setdefault(route, [0] * (len(_LATENCY_BOUNDS) + 1) + [0.0, time.time()])
            latency[bisect.bisect_left(_LATENCY_BOUNDS, seconds)] += 1  # (a bucket counts what is at most its bound)
            latency[-2] += seconds
        finally:
            if lock is not None:
                lock.release()


class _RequestCounts:
    """Metrics' request counts as prometheus_client's Counter and Histogram would show them (the same names,
    labels, samples and ``_created`` times, unless its PROMETHEUS_DISABLE_CREATED_SERIES or
    ``disable_created_metrics()`` leaves those out), made when /metrics is read."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list:
        return self._families([], [])

    def collect(self) -> list:
        # The counts as they are at one moment: each list copied in one step of the interpreter (under the lock
        # where there is no GIL), so a request recorded meanwhile breaks no loop and no sum here.
        metrics = self.metrics
        with metrics._lock or contextlib.nullcontext():
            requests = [(key, values[:]) for key, values in list(metrics._requests.items())]
            latency = [(route, values[:]) for route, values in list(metrics._latency.items())]
        return self._families(requests, latency)

    @staticmethod
    def _families(requests: list, latency: list) -> list:
        from prometheus_client import metrics as client
        from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily
        from prometheus_client.samples import Sample
        from prometheus_client.utils import floatToGoString

        with_created = getattr(client, "_use_created", True)  # (its own metrics read the same switch)
        counter = CounterMetricFamily("kernel_magics_requests", "HTTP requests handled", labels=["route", "status"])
        for (route, status), (count, created) in requests:
            counter.add_metric([route, str(status)], count, created=created if with_created else None)
        histogram = HistogramMetricFamily("kernel_magics_request_seconds", "Time to the response's start",
                                          labels=["route"])
        bounds = [floatToGoString(bound) for bound in _LATENCY_BOUNDS] + ["+Inf"]
        created = []
        for route, values in latency:
            cumulative = list(itertools.accumulate(values[:len(bounds)]))
            histogram.add_metric([route], list(zip(bounds, cumulative)), values[-2])
            created.append(Sample("kernel_magics_request_seconds_created", {"route": route}, values[-1]))
        if with_created:
            histogram.samples.extend(created)
        return [counter, histogram]


def _header_text(value: bytes) -> str:
    """A header's text as its sender wrote it, so that a secret in it is found in the log: UTF-8 where it is
    (curl, httpx), Latin-1 where it is not (``http.client`` sends a str header as Latin-1; Starlette and Truss read
    every header so); with what does not print escaped (core/secrets.printable)."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        text = value.decode("latin-1")
    return printable(text)


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
            if name == b"x-baseten-request-id" and value:  # as Truss: the caller's id, when it sends one
                request_id = _header_text(value)
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
            template = route_of(scope["path"], scope["method"])
            status = state[0]
            if self.metrics is not None and template != "/metrics":
                self.metrics.record(template, status, (state[1] or ended) - started)
            # (quiet: the probes; a GET of a predict path answers as readiness, and is logged, as Truss logs it)
            if self.log_requests and (template not in _QUIET or ":" in scope["path"]):
                access_line(scope["method"], scope["path"], status, (ended - started) * 1000, request_id)
