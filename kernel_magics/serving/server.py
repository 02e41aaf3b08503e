"""A Truss-compatible HTTP server over ModelHost (FastAPI + uvicorn).

Routes, status codes, error bodies and ``x-baseten-error-*`` headers follow
Truss 0.18's server (truss_server.py), so clients written against Truss work
unchanged. The model is driven by the same runtime the notebook uses. Left out
on purpose (see the README): ``:predict_binary`` (msgpack), ``/v1/websocket``
and ``/hot-reload``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import traceback
import weakref
from typing import Any, Awaitable, Callable, Iterator, Optional, Union

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect
from starlette.routing import Route

from ..core.contract import ENDPOINT_METHODS
from ..core.errors import InputValidationError, ModelDefinitionError, ModelNotReadyError, NotSerializableError
from ..core.runtime import ChunkStream, MethodNotFound, ModelHost, ModelState
from ..core.streams import join_chunks
from ..core.serialization import to_jsonable

__all__ = ["create_app", "MODEL_ERROR_MESSAGE", "uvicorn_config", "serve_directory"]

log = logging.getLogger("kernel_magics.server")
access = logging.getLogger("kernel_magics.access")

MODEL_NAME = "model"  # Truss answers for any name in the path, and calls its model this
MODEL_ERROR_MESSAGE = "Internal Server Error (in model/chainlet)."
_SOURCE = "04"  # x-baseten-error-source of a Truss server
_DOWNSTREAM, _CLIENT, _UNEXPECTED = "600", "700", "500"


def _error(status: int, message: Any, code: str) -> JSONResponse:
    """Truss's error response: ``{"error": message}`` plus the x-baseten-error headers."""
    return JSONResponse({"error": message}, status_code=status,
                        headers={"X-BASETEN-ERROR-SOURCE": _SOURCE, "X-BASETEN-ERROR-CODE": code})


def _not_ready() -> JSONResponse:
    return _error(503, f"Model with name {MODEL_NAME} is not ready.", _DOWNSTREAM)


def _chunk_bytes(chunk: Any) -> bytes:
    if isinstance(chunk, (bytes, bytearray, memoryview)):
        return bytes(chunk)
    if isinstance(chunk, str):
        return chunk.encode()
    # Truss sends only str/bytes chunks; other chunks go out as JSON lines (the notebook warns).
    return (json.dumps(to_jsonable(chunk, what="a streamed chunk")) + "\n").encode()


class _StreamResponse(Response):
    """Sends a model's stream chunk by chunk, each one made only when the previous one is sent.

    A slow reader therefore slows the generator (uvicorn's send waits while the socket's
    buffer is full) instead of piling chunks up in memory. A client that leaves cancels
    the wait, and the stream is closed for real (its generator's ``finally`` runs, then
    its predict slot is freed). ``read_timeout`` is Truss's ``streaming_read_timeout``: a
    longer gap between chunks cuts the response off, as Truss's server does.
    """

    media_type = "application/octet-stream"

    def __init__(self, stream: ChunkStream, host: ModelHost, read_timeout: float) -> None:
        super().__init__(media_type=self.media_type)
        self.raw_headers = [h for h in self.raw_headers if h[0] != b"content-length"]
        self._stream, self._host, self._timeout = stream, host, read_timeout

    async def __call__(self, scope, receive, send) -> None:
        task = asyncio.current_task()
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            task.cancel()

        watcher = asyncio.create_task(watch())
        complete = False
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in _with_timeout(self._stream, self._timeout):
                await send({"type": "http.response.body", "body": _chunk_bytes(chunk), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            complete = True
        except _ReadTimeout:
            log.warning("Stream cut off: no chunk for %s s (runtime.streaming_read_timeout).", self._timeout)
        except asyncio.CancelledError:
            if not gone.is_set():
                raise  # the server is shutting down, not the client leaving
        except Exception as exc:
            # Headers are out: as Truss does, the body ends where the error happened, and it is logged.
            log.error("Exception while generating streamed response: %s\n%s", self._host.describe_error(exc),
                      self._host.format_error(exc))
            if not complete:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                complete = True
        finally:
            watcher.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.shield(self._stream.aclose())
            if gone.is_set() and hasattr(task, "uncancel"):
                task.uncancel()  # handled: the client left (Python 3.11+ counts cancellations)


class _ReadTimeout(Exception):
    pass


async def _with_timeout(stream: ChunkStream, timeout: float):
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), timeout)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise _ReadTimeout() from None
        yield chunk


def _format_input_error(exc: InputValidationError) -> str:
    """Truss's text for a Pydantic validation error of the request."""
    errors = exc.errors or []
    parts = ["Input Parsing Error:" if len(errors) == 1 else "Input Parsing Errors:"]
    for err in errors:
        loc = "".join((f".{p}" if i else p) if isinstance(p, str) else f"[{p}]" for i, p in enumerate(err["loc"]))
        parts.append(f"  `{loc}`: {err['msg']}.")
    return "\n".join(parts)


def _install_disconnect_watcher(request: Request) -> None:
    """Truss's ``request.state.watch_disconnect()``: a context manager yielding a threading.Event
    set when the client goes away, usable from async code or a worker thread."""
    loop = asyncio.get_running_loop()

    @contextlib.contextmanager
    def watch_disconnect() -> Iterator[threading.Event]:
        disconnected = threading.Event()

        async def watch() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(1)
            disconnected.set()

        future = asyncio.run_coroutine_threadsafe(watch(), loop)
        try:
            yield disconnected
        finally:
            future.cancel()

    request.state.watch_disconnect = watch_disconnect


class _RedactSecrets(logging.Filter):
    """Every log line of the servers goes out with secret values replaced (one filter, every logger)."""

    def __init__(self) -> None:
        super().__init__()
        self._hosts: list[weakref.ref] = []

    def add(self, host: ModelHost) -> None:
        self._hosts = [ref for ref in self._hosts if ref() is not None] + [weakref.ref(host)]

    def filter(self, record: logging.LogRecord) -> bool:
        hosts = [h for ref in self._hosts if (h := ref()) is not None]
        if not hosts:
            return True
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        for host in hosts:
            text = host.secrets.redact(text)
        record.msg, record.args, record.exc_info, record.exc_text = text, (), None, None
        return True


_REDACT = _RedactSecrets()


def redact_logs_of(host: ModelHost) -> None:
    """Every server log line from now on has ``host``'s secret values replaced (a Ray replica's host
    exists only after its app does, so the replica calls this itself)."""
    _REDACT.add(host)
for _name in ("kernel_magics.server", "kernel_magics.access", "uvicorn.error", "uvicorn.access", "uvicorn"):
    logging.getLogger(_name).addFilter(_REDACT)


class _Metrics:
    """Request counts and latency per route, in the Prometheus text format (prometheus_client)."""

    _instance: Optional["_Metrics"] = None

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.requests = Counter("kernel_magics_requests", "HTTP requests handled", ["route", "status"])
        self.latency = Histogram("kernel_magics_request_seconds", "Time to the response's start", ["route"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))

    @classmethod
    def get(cls) -> "_Metrics":
        if cls._instance is None:  # one set per process: the default registry refuses duplicates
            cls._instance = cls()
        return cls._instance

    def measured(self, route: str, endpoint: Callable[[Request], Awaitable[Response]]):
        async def handle(request: Request) -> Response:
            started = time.perf_counter()
            response = await endpoint(request)
            seconds = time.perf_counter() - started
            self.latency.labels(route).observe(seconds)
            self.requests.labels(route, str(response.status_code)).inc()
            if access.isEnabledFor(logging.INFO):  # one line per handled request, as Truss's server writes
                access.info("Handled request - %s %s %d (%.1f ms)", request.method, request.url.path,
                            response.status_code, seconds * 1000)
            return response

        return handle


async def _metrics_page(request: Request) -> Response:
    """Prometheus's text format: our request counts and latencies, and anything the model registered."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


def create_app(host: Union[ModelHost, Callable[[], ModelHost]], *, load_at_start: bool = False,
               on_load_failed=None, all_ready: Optional[Callable[[], Awaitable[bool]]] = None) -> FastAPI:
    """The FastAPI app serving ``host``.

    ``host`` may also be a function returning it: a Ray replica builds the app
    before its host exists. ``load_at_start`` loads the model in a background
    thread when the server starts (as Truss does), so liveness answers while it
    loads; ``on_load_failed`` is called with the exception when that load fails.
    ``all_ready``, when given, must also say yes before readiness is 200 (every
    replica of a scaled-out deployment, say).
    """
    current = host if callable(host) and not isinstance(host, ModelHost) else (lambda: host)
    if isinstance(host, ModelHost):
        redact_logs_of(host)
    metrics = _Metrics.get()

    async def lifespan(app: FastAPI):
        if load_at_start:
            current().start_load(on_done=lambda exc: exc is not None and on_load_failed and on_load_failed(exc))
        yield

    async def liveness(request: Request) -> Response:
        return Response(b"true", media_type="application/json")

    def loaded() -> Optional[ModelHost]:
        model = current()
        return model if model is not None and model.state is ModelState.READY else None

    async def readiness(request: Request) -> Response:
        model = loaded()
        if model is None or (all_ready is not None and not await all_ready()):
            return _not_ready()
        if await model.is_healthy() is False:  # None: no is_healthy, as Truss
            log.warning("Health check failed.")
            return _not_ready()
        return Response(b"{}", media_type="application/json")

    async def loaded_route(request: Request) -> Response:
        return _not_ready() if loaded() is None else Response(b"{}", media_type="application/json")

    async def schema(request: Request) -> Response:
        model = current()
        described = model.contract.truss_schema() if model and model.contract else None
        if described is None:
            if model is not None and model.state is ModelState.READY:
                return _error(404, "No schema found", _DOWNSTREAM)
            return _error(503, "Schema not available, please try again later.", _DOWNSTREAM)
        return JSONResponse(described)

    def route_for(method: str):
        async def handle(request: Request) -> Response:
            return await _execute(current(), request, method)

        return handle

    routes = [
        Route("/", metrics.measured("/", liveness), methods=["GET"]),
        Route("/v1/models/{model_name}", metrics.measured("/v1/models/{model_name}", readiness), methods=["GET"]),
        Route("/v1/models/{model_name}/loaded", metrics.measured("/v1/models/{model_name}/loaded", loaded_route),
              methods=["GET"]),
        Route("/v1/models/{model_name}/schema", metrics.measured("/v1/models/{model_name}/schema", schema),
              methods=["GET"]),
        Route("/v1/models/{model_name}:predict", metrics.measured("/v1/models/{model_name}:predict",
                                                                   route_for("predict")), methods=["POST"]),
        # SageMaker's names for readiness and predict, as Truss serves them.
        Route("/ping", metrics.measured("/ping", loaded_route), methods=["GET"]),
        Route("/invocations", metrics.measured("/invocations", route_for("predict")), methods=["POST"]),
        *(Route(f"/v1/{m.replace('_', '/')}", metrics.measured(f"/v1/{m.replace('_', '/')}", route_for(m)),
                methods=["POST"]) for m in ENDPOINT_METHODS),
    ]
    routes.append(Route("/metrics", _metrics_page, methods=["GET"]))
    app = FastAPI(title="kernel-magics model server", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan, routes=routes)

    async def unexpected(request: Request, exc: Exception) -> Response:
        return _error(500, f"Unhandled exception: {type(exc).__name__}: {exc}", _UNEXPECTED)

    app.add_exception_handler(Exception, unexpected)
    return app


async def _execute(host: Optional[ModelHost], request: Request, method: str) -> Response:
    """One predict-like request, as Truss's ``_execute_request``: parse, call, send."""
    if host is None or host.state is not ModelState.READY:
        return _not_ready()
    try:
        body = await request.body()
    except ClientDisconnect:
        # One line, as Truss: the client left while sending; there is no one to answer.
        log.warning("Client disconnected while reading request.")
        return _error(499, "Client disconnected while reading request.", _DOWNSTREAM)
    contract = host.contract
    model_input = None
    if not contract.skips_input_parsing:
        if contract.input_type is not None:
            try:
                model_input = host.validate_json_input(body)
            except InputValidationError as exc:
                return _error(400, _format_input_error(exc), _CLIENT)
        else:
            try:
                model_input = json.loads(body)
            except json.JSONDecodeError as exc:
                return _error(400, f"Invalid JSON payload: {exc}", _CLIENT)
    _install_disconnect_watcher(request)
    try:
        result = await host.predict(model_input, request=request, method=method, encoded=True)
    except MethodNotFound:
        return _error(404, f"`{method}` must only be called if model has it.", _CLIENT)
    except ModelNotReadyError:
        return _not_ready()  # a reload started between the check above and the call
    except HTTPException as exc:
        log.error("Model raised HTTPException: %s", host.secrets.redact(str(exc.detail)))
        return _error(exc.status_code, exc.detail, _DOWNSTREAM)
    except ModelDefinitionError as exc:
        log.error("%s", host.describe_error(exc))
        return _error(412, f"ModelDefinitionError: {exc}", _DOWNSTREAM)
    except NotSerializableError as exc:
        log.error("%s", host.secrets.redact(str(exc)))
        return _error(500, f"Unhandled exception: TypeError: {exc.truss_message}", _UNEXPECTED)
    except Exception as exc:
        log.error("%s\n%s", MODEL_ERROR_MESSAGE, host.format_error(exc))
        return _error(500, MODEL_ERROR_MESSAGE, _DOWNSTREAM)
    if isinstance(result, ChunkStream):
        if _wants_gathered(request):
            try:
                async with result:
                    chunks = [c async for c in result]
            except Exception as exc:
                log.error("%s\n%s", MODEL_ERROR_MESSAGE, host.format_error(exc))
                return _error(500, MODEL_ERROR_MESSAGE, _DOWNSTREAM)
            return Response(json.dumps(join_chunks(chunks)), media_type="application/json")
        return _StreamResponse(result, host, host.config.runtime.streaming_read_timeout)
    if isinstance(result, Response):
        if result.status_code >= 300:
            result.headers.update({"X-BASETEN-ERROR-SOURCE": _SOURCE, "X-BASETEN-ERROR-CODE": _CLIENT})
        return result
    return Response(bytes(result), media_type="application/json")  # a JSONBody


def _wants_gathered(request: Request) -> bool:
    # As Truss: Accept: application/json gathers a stream, except for OpenAI clients.
    if "openai" in request.headers.get("user-agent", "").lower():
        return False
    return request.headers.get("accept") == "application/json"


def uvicorn_config(app: FastAPI, host: str, port: int, **kw: Any):
    """uvicorn settings shared by the CLI and the notebook server."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=kw.pop("log_level", "info"),
                          timeout_graceful_shutdown=kw.pop("timeout_graceful_shutdown", 30),
                          access_log=kw.pop("access_log", False), **kw)


def requirement_warnings(requirements: list[str]) -> list[str]:
    """One line per pinned requirement that the installed distributions do not satisfy."""
    from ..core.config import unmet_requirements

    return [f"warning: config.yaml requires {line} but {name} " + (f"{version} is installed" if version else "is not installed")
            for line, name, version in unmet_requirements(requirements)]


def serve_directory(path, *, host: str = "127.0.0.1", port: int = 8080, secrets_dir=None,
                    log_level: str = "info", log_format: str = "text") -> int:
    """Serve a Truss directory until SIGTERM/SIGINT; the exit code (1 when the model fails)."""
    import sys

    import uvicorn

    from ..core.errors import KernelMagicsError
    from ..core.truss_dir import TrussDir
    from ..core.tracebacks import trim_traceback
    from .logs import configure

    configure(log_level, log_format)
    truss = None
    try:
        truss = TrussDir.open(path)
        for warning in truss.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        model_host = truss.host(secrets_dir=secrets_dir,
                                hint="or put a file named {name} in the --secrets-dir folder")
    except KernelMagicsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BaseException as exc:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        print(text, file=sys.stderr)
        print(f"error: importing {truss.relative(truss.model_file)} failed: {type(exc).__name__}: {exc}. Fix it "
              "(its traceback is above) and start the server again.", file=sys.stderr)
        return 1
    for warning in requirement_warnings(model_host.config.requirements):
        print(warning, file=sys.stderr)
    failure: list[BaseException] = []
    server: Optional[uvicorn.Server] = None

    def load_failed(exc: BaseException) -> None:
        failure.append(trim_traceback(exc))
        if server is not None:
            server.should_exit = True

    def loaded(event) -> None:
        if event.kind == "load_finished":
            log.info("Model loaded in %.2f s; ready for predictions.", event.data["seconds"])

    model_host.subscribe(loaded)
    app = create_app(model_host, load_at_start=True, on_load_failed=load_failed)
    server = uvicorn.Server(uvicorn_config(app, host, port, log_level=log_level, log_config=None))
    server.run()
    if failure:
        exc = failure[0]
        print(model_host.error_text or model_host.format_error(exc), file=sys.stderr)
        print(f"error: the model failed to load: {model_host.describe_error(exc)}. The server stopped; fix load() "
              "(its traceback is above) and start it again.", file=sys.stderr)
        return 1
    return 0
