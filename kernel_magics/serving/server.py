"""A Truss-compatible HTTP server over ModelHost (FastAPI + uvicorn): small handlers, one error table.

Routes, status codes, error bodies and ``x-baseten-error-*`` headers follow Truss 0.18's server
(truss_server.py), so clients written against Truss work unchanged. Each route handler is a
module-level function that finds the model in ``request.app.state`` and raises; the exception
table of serving/errors.py answers. The model is driven by the runtime the notebook uses.
Left out on purpose (see docs/serving.md): ``/v1/websocket`` and ``/hot-reload``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import threading
from typing import Any, Awaitable, Callable, Iterator, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect
from starlette.routing import Route

from ..core.routes import ENDPOINT_METHODS, ROUTES
from ..core.runtime import ChunkStream, ModelHost, ModelState
from ..core.streams import chunk_bytes, join_chunks
from . import errors
from .access import Metrics, RequestLog
from .errors import BodyTooLarge, ClientGone, InvalidPayload, model_code
from .limits import DEFAULT_MAX_BODY, HEAD_LIMIT, http_protocol
from .logs import flush_access_lines, redact_logs_of

__all__ = ["create_app", "uvicorn_config", "MODEL_ERROR_MESSAGE", "redact_logs_of"]

log = logging.getLogger("kernel_magics.server")
MODEL_ERROR_MESSAGE = errors.MODEL_ERROR_MESSAGE
_JSON = "application/json"


# ---------------------------------------------------------------------- the model behind the app

def _host(request: Request) -> Optional[ModelHost]:
    return request.app.state.host()


def _ready_host(request: Request) -> ModelHost:
    host = _host(request)
    if host is None or host.state is not ModelState.READY:
        raise errors.ModelNotReadyError("not ready")
    return host


# ---------------------------------------------------------------------- probes

async def liveness(request: Request) -> Response:
    return Response(b"true", media_type=_JSON)


async def readiness(request: Request) -> Response:
    host = _ready_host(request)
    all_ready = request.app.state.all_ready
    if all_ready is not None and not await all_ready():
        raise errors.ModelNotReadyError("a replica is missing")
    if await host.is_healthy() is False:  # None: no is_healthy, as Truss
        log.warning("Health check failed.")
        raise errors.ModelNotReadyError("unhealthy")
    return Response(b"{}", media_type=_JSON)


async def loaded(request: Request) -> Response:
    _ready_host(request)
    return Response(b"{}", media_type=_JSON)


async def schema(request: Request) -> Response:
    host = _host(request)
    described = host.contract.truss_schema() if host and host.contract else None
    if described is not None:
        return JSONResponse(described)
    if host is not None and host.state is ModelState.READY:
        return errors.error_response(404, "No schema found", "600")
    return errors.error_response(503, "Schema not available, please try again later.", "600")


async def metrics_page(request: Request) -> Response:
    """Prometheus's text format: our request counts and latencies, and anything the model registered."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


# ---------------------------------------------------------------------- predict and the OpenAI-style routes

async def execute(request: Request, method: str = "predict") -> Response:
    """One predict-like request, as Truss's ``_execute_request``: parse, call, send."""
    host = _ready_host(request)  # the route is known here; no body is read for a model that cannot answer
    if host.contract.predict_batch is not None and request.app.state.metrics is not None:
        request.app.state.metrics.watch_batches(host)
    body = await _read_body(request)
    binary = _is_binary(request)
    contract = host.contract
    model_input = None if contract.skips_input_parsing else _parse(host, body, binary)
    _install_disconnect_watcher(request)
    request.state.method = method
    with model_code(host):
        result = await host.predict(model_input, request=request, method=method, encoded=not binary,
                                    gone=functools.partial(_client_left, request))
    if isinstance(result, ChunkStream):
        if _wants_gathered(request):
            with model_code(host):
                async with result:
                    chunks = [c async for c in result]
            return Response(json.dumps(join_chunks(chunks)), media_type=_JSON)
        return _StreamResponse(result, host, host.config.runtime.streaming_read_timeout)
    if isinstance(result, Response):
        if result.status_code >= 300:
            errors.add_error_headers(result)
        return result
    if binary:
        return Response(_msgpack_encode(result), media_type="application/octet-stream")
    return Response(bytes(result), media_type=_JSON)  # a JSONBody


async def _read_body(request: Request) -> bytes:
    """The body, refused past the server's limit without holding more of it than that."""
    limit = request.app.state.max_body
    length = request.headers.get("content-length")
    try:
        if length is not None and length.isdigit():
            if int(length) > limit:
                raise BodyTooLarge(limit)
            return await request.body()  # the protocol reads exactly Content-Length bytes
        parts, size = [], 0
        async for part in request.stream():  # chunked: counted as it comes
            size += len(part)
            if size > limit:
                raise BodyTooLarge(limit)
            parts.append(part)
        return b"".join(parts)
    except ClientDisconnect:
        raise ClientGone() from None


def _is_binary(request: Request) -> bool:
    # As Truss: an octet-stream body is msgpack, and so is the answer.
    return request.headers.get("content-type", "").partition(";")[0].strip().lower() == "application/octet-stream"


def _parse(host: ModelHost, body: bytes, binary: bool) -> Any:
    if binary:
        try:
            data = _msgpack_decode(body)
        except Exception as exc:
            raise InvalidPayload(str(exc)) from None
        return host.validate_input(data) if host.contract.input_type is not None else data
    if host.contract.input_type is not None:
        return host.validate_json_input(body)
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise InvalidPayload(f"Invalid JSON payload: {exc}") from None


def _wants_gathered(request: Request) -> bool:
    # As Truss: Accept: application/json gathers a stream, except for OpenAI clients.
    if "openai" in request.headers.get("user-agent", "").lower():
        return False
    return request.headers.get("accept") == _JSON


async def _client_left(request: Request) -> None:
    """Ends when the client has disconnected (its body is read: what comes now is the end of the connection)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


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


# ---------------------------------------------------------------------- msgpack bodies, as Truss's serialization.py

def _msgpack_decode(data: bytes) -> Any:
    import msgpack

    return msgpack.unpackb(data, object_hook=_truss_msgpack_hook)


def _truss_msgpack_hook(obj: dict) -> Any:
    import datetime
    import decimal
    import uuid

    if obj.get(b"nd") is True and obj.get(b"kind") == b"O":
        raise ValueError("unsupported payload")
    data = obj.get(b"data")
    decoders = {b"__dt_datetime_iso__": datetime.datetime.fromisoformat, b"__dt_date_iso__": datetime.date.fromisoformat,
                b"__dt_time_iso__": datetime.time.fromisoformat, b"__decimal__": decimal.Decimal, b"__uuid__": uuid.UUID,
                b"__dt_timedelta__": lambda d: datetime.timedelta(days=d[0], seconds=d[1], microseconds=d[2])}
    for key, decode in decoders.items():
        if key in obj:
            return decode(data)
    if b"nd" in obj:  # msgpack_numpy's form of an array
        import numpy as np

        if obj[b"nd"]:
            return np.frombuffer(data, dtype=np.dtype(_descr(obj[b"type"]))).reshape(obj[b"shape"])
        return np.dtype(_descr(obj[b"type"])).type(np.frombuffer(data, dtype=np.dtype(_descr(obj[b"type"])))[0])
    return obj


def _descr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):  # a structured dtype
        return [tuple(_descr(v) for v in field) for field in value]
    return value


def _msgpack_encode(data: Any) -> bytes:
    import msgpack

    return msgpack.packb(data)


# ---------------------------------------------------------------------- a stream, chunk by chunk

class _StreamResponse(Response):
    """Sends a model's stream chunk by chunk, each one made only when the previous one is sent.

    A slow reader therefore slows the generator (uvicorn's send waits while the socket's
    buffer is full) instead of piling chunks up in memory. ``read_timeout`` is Truss's
    ``streaming_read_timeout``: a generator that makes no chunk for that long, or a reader that
    takes none for that long, loses the stream; either way the generator is closed (its
    ``finally`` runs) and its predict slot freed. A client that leaves cancels the wait, with
    the same ending. A sync generator stuck inside a chunk cannot be closed until that chunk is
    done: the response ends at once all the same, and the close follows. One timer watches for
    the stall, so a chunk costs no extra task.
    """

    media_type = "application/octet-stream"

    def __init__(self, stream: ChunkStream, host: ModelHost, read_timeout: float) -> None:
        super().__init__(media_type=self.media_type)
        self.raw_headers = [h for h in self.raw_headers if h[0] != b"content-length"]
        self._stream, self._host, self._timeout = stream, host, read_timeout

    async def __call__(self, scope, receive, send) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        gone = asyncio.Event()
        stalled: list[str] = []  # what the stream was waiting for when the timer fired
        phase = ["the model made no chunk"]
        last = [loop.time()]
        timeout = self._timeout
        cut_off = False  # the client left, a stall outlasted the timeout, or the server stopped: no more chunks
        handled = True  # a cancellation that ends here (not passed on to whoever cancelled)

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            task.cancel()

        def check() -> None:
            idle = loop.time() - last[0]
            if idle >= timeout:
                stalled.append(phase[0])
                task.cancel()
            else:
                timer[0] = loop.call_later(timeout - idle, check)

        watcher = asyncio.create_task(watch())
        timer = [loop.call_later(timeout, check)]
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self._stream:
                last[0], phase[0] = loop.time(), "the client read nothing"
                await send({"type": "http.response.body", "body": chunk_bytes(chunk), "more_body": True})
                last[0], phase[0] = loop.time(), "the model made no chunk"
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            cut_off = True
            later = " once the chunk it is making is done" if self._stream.making_chunk else ""
            if stalled:
                # Returning with the response unfinished makes uvicorn close the connection.
                log.warning("Stream cut off: %s for %s s (runtime.streaming_read_timeout); its generator is closed%s.",
                            stalled[0], timeout, later)
            elif gone.is_set():
                pass
            elif getattr(scope["app"].state, "stopping", False):
                # The server is stopping and no longer waits for this request (a forced quit, or its graceful
                # shutdown's time is up): the connection is closed with the response unfinished, as a client must
                # see it, without a traceback for what is no error.
                log.warning("Stream cut off: the server is stopping; its generator is closed%s.", later)
            else:
                handled = False
                raise  # cancelled by whoever runs the app (Ray Serve, when its client leaves): as it asks
        except Exception as exc:
            # Headers are out: as Truss does, the body ends where the error happened, and it is logged.
            log.error("Exception while generating streamed response: %s\n%s", self._host.describe_error(exc),
                      self._host.format_error(exc))
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            timer[0].cancel()
            watcher.cancel()
            if cut_off and self._stream.making_chunk:
                # A sync generator stuck inside a chunk cannot be closed before that next() returns: the response
                # ends now (as Truss's does at the timeout) and the generator is closed, and its slot freed, once the
                # chunk is done.
                _close_later(self._stream, self._host)
            else:
                with contextlib.suppress(BaseException):
                    await asyncio.shield(self._stream.aclose())
            if cut_off and handled and hasattr(task, "uncancel"):
                task.uncancel()  # handled (Python 3.11+ counts cancellations)


_CLOSING: set = set()  # streams being closed after their response ended (the loop keeps only weak references)


def _close_later(stream: ChunkStream, host: ModelHost) -> None:
    async def close() -> None:
        await stream.aclose()
        if stream.late_error is not None:  # the chunk it was making failed after the response ended
            log.error("Exception while generating streamed response (after the response ended): %s\n%s",
                      host.describe_error(stream.late_error), host.format_error(stream.late_error))

    closing = asyncio.ensure_future(close())  # (in the request's context: what `finally` logs keeps its id)
    _CLOSING.add(closing)
    closing.add_done_callback(_CLOSING.discard)


# ---------------------------------------------------------------------- the app

def _routes() -> list[Route]:
    handlers = {"liveness": liveness, "readiness": readiness, "loaded": loaded, "schema": schema,
                "metrics": metrics_page, "predict": execute,
                **{m: functools.partial(execute, method=m) for m in ENDPOINT_METHODS}}
    return [Route(path, handlers[name], methods=[method]) for path, method, name in ROUTES]


def create_app(host: Union[ModelHost, Callable[[], Optional[ModelHost]]], *,
               all_ready: Optional[Callable[[], Awaitable[bool]]] = None,
               on_shutdown: Optional[Callable[[], None]] = None,
               log_requests: bool = True, metrics: bool = True, max_body: int = DEFAULT_MAX_BODY) -> FastAPI:
    """The FastAPI app serving ``host``.

    ``host`` may also be a function returning it (or None while there is none yet: a server that
    binds before it imports the model, a Ray replica that builds the app before its host).
    ``on_shutdown`` runs when the server stops (``kernel-magics serve`` starts its load thread once the
    port listens: serving/uvicorn_engine.py). ``all_ready``, when given, must also say yes
    before readiness is 200 (every replica of a scaled-out deployment, say). ``max_body``: the
    largest request body accepted, in bytes (413 beyond).
    """
    current = host if callable(host) and not isinstance(host, ModelHost) else (lambda: host)
    if isinstance(host, ModelHost):
        redact_logs_of(host)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            yield
        finally:
            try:
                flush_access_lines()  # (the last requests' lines before uvicorn's lines that it stopped)
            finally:
                if on_shutdown is not None:
                    on_shutdown()

    app = FastAPI(title="kernel-magics model server", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan, routes=_routes(), exception_handlers=dict(errors.HANDLERS))
    app.state.host, app.state.all_ready, app.state.max_body = current, all_ready, max_body
    app.state.stopping = False  # the server that runs it says when it stops (serving/uvicorn_engine.py)
    app.state.metrics = Metrics.get() if metrics else None
    app.add_middleware(RequestLog, metrics=app.state.metrics, log_requests=log_requests)
    return app


def uvicorn_config(app: FastAPI, host: str, port: int, **kw: Any):
    """uvicorn settings shared by the CLI and the notebook server: request heads bounded as Truss's are."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=kw.pop("log_level", "info"),
                          timeout_graceful_shutdown=kw.pop("timeout_graceful_shutdown", 30),
                          access_log=kw.pop("access_log", False), http=http_protocol(),
                          h11_max_incomplete_event_size=HEAD_LIMIT, **kw)
