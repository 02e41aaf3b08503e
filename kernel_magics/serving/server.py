"""A Truss-compatible HTTP server over ModelHost (FastAPI + uvicorn).

Routes, status codes, error bodies and ``x-baseten-error-*`` headers follow
Truss 0.18's server, so clients written against Truss work unchanged. The
model is driven by the same runtime the notebook uses.
"""

from __future__ import annotations

import json
import logging
import threading
import traceback
from typing import Any, Awaitable, Callable, Optional, Union

import anyio
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..core.errors import InputValidationError
from ..core.runtime import ChunkStream, ModelHost, ModelState
from ..core.serialization import to_jsonable

__all__ = ["create_app", "MODEL_ERROR_MESSAGE"]

log = logging.getLogger("kernel_magics.server")

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


class _ClosingStreamingResponse(StreamingResponse):
    """Closes the model's stream however the response ends (done, error, client gone)."""

    def __init__(self, stream: ChunkStream) -> None:
        super().__init__(_encoded(stream), media_type="application/octet-stream")
        self._stream = stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # A disconnect cancels the response; closing must still finish so the
            # generator's `finally` runs and the predict slot is freed.
            with anyio.CancelScope(shield=True):
                await self._stream.aclose()


def _chunk_bytes(chunk: Any) -> bytes:
    if isinstance(chunk, (bytes, bytearray, memoryview)):
        return bytes(chunk)
    if isinstance(chunk, str):
        return chunk.encode()
    # Truss sends only str/bytes chunks; other chunks go out as JSON lines.
    return (json.dumps(to_jsonable(chunk, what="a streamed chunk")) + "\n").encode()


async def _encoded(stream: ChunkStream):
    try:
        async for chunk in stream:
            yield _chunk_bytes(chunk)
    except Exception as exc:
        # Headers are sent: as Truss does, the body is cut off and the error logged.
        log.error("Exception while generating streamed response: %s", exc, exc_info=_user_exc_info(exc))


def _user_exc_info(exc: BaseException):
    return (type(exc), exc, exc.__traceback__)


def _format_input_error(exc: InputValidationError) -> str:
    """Truss's text for a Pydantic validation error of the request."""
    errors = exc.errors or []
    parts = ["Input Parsing Error:" if len(errors) == 1 else "Input Parsing Errors:"]
    for err in errors:
        loc = "".join((f".{p}" if i else p) if isinstance(p, str) else f"[{p}]" for i, p in enumerate(err["loc"]))
        parts.append(f"  `{loc}`: {err['msg']}.")
    return "\n".join(parts)


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

    async def lifespan(app: FastAPI):
        if load_at_start:
            def load() -> None:
                try:
                    current().load()
                except BaseException as exc:  # reported by the caller, which exits
                    if on_load_failed is not None:
                        on_load_failed(exc)

            threading.Thread(target=load, name="model-load", daemon=True).start()
        yield

    async def liveness(request: Request) -> Response:
        return Response(b"true", media_type="application/json")

    async def readiness(request: Request) -> Response:
        model = current()
        if model is None or model.state is not ModelState.READY or (all_ready is not None and not await all_ready()):
            return _not_ready()
        return Response(b"{}", media_type="application/json")

    async def schema(request: Request) -> Response:
        host = current()
        described = host.contract.truss_schema() if host and host.contract else None
        if described is None:
            if host is not None and host.state is ModelState.READY:
                return _error(404, "No schema found", _DOWNSTREAM)
            return _error(503, "Schema not available, please try again later.", _DOWNSTREAM)
        return JSONResponse(described)

    async def predict(request: Request) -> Response:
        host = current()
        if host is None or host.state is not ModelState.READY:
            return _not_ready()
        body = await request.body()
        contract = host.contract
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
        try:
            result = await host.predict(model_input)
        except HTTPException as exc:
            log.error("Model raised HTTPException", exc_info=_user_exc_info(exc))
            return _error(exc.status_code, exc.detail, _DOWNSTREAM)
        except Exception as exc:
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            log.error("%s\n%s", MODEL_ERROR_MESSAGE, host.secrets.redact(text))
            return _error(500, MODEL_ERROR_MESSAGE, _DOWNSTREAM)
        if isinstance(result, ChunkStream):
            if _wants_gathered(request):
                try:
                    async with result:
                        chunks = [_chunk_bytes(c) async for c in result]
                except Exception as exc:
                    log.error("%s", MODEL_ERROR_MESSAGE, exc_info=_user_exc_info(exc))
                    return _error(500, MODEL_ERROR_MESSAGE, _DOWNSTREAM)
                return Response(json.dumps(b"".join(chunks).decode()), media_type="application/json")
            return _ClosingStreamingResponse(result)
        return Response(json.dumps(result), media_type="application/json")

    routes = [
        Route("/", liveness, methods=["GET"]),
        Route("/v1/models/{model_name}", readiness, methods=["GET"]),
        Route("/v1/models/{model_name}/loaded", readiness, methods=["GET"]),
        Route("/v1/models/{model_name}/schema", schema, methods=["GET"]),
        Route("/v1/models/{model_name}:predict", predict, methods=["POST"]),
    ]
    app = FastAPI(title="kernel-magics model server", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan, routes=routes)

    async def unexpected(request: Request, exc: Exception) -> Response:
        return _error(500, f"Unhandled exception: {type(exc).__name__}: {exc}", _UNEXPECTED)

    app.add_exception_handler(Exception, unexpected)
    return app


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
    import importlib.metadata

    from packaging.requirements import InvalidRequirement, Requirement

    out = []
    for line in requirements:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            out.append(f"warning: requirement {line!r} in config.yaml is not valid pip syntax")
            continue
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            out.append(f"warning: config.yaml requires {line} but {req.name} is not installed")
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            out.append(f"warning: config.yaml requires {line} but {req.name} {version} is installed")
    return out


def serve_directory(path, *, host: str = "127.0.0.1", port: int = 8080, secrets_dir=None) -> int:
    """Serve a Truss directory until SIGTERM/SIGINT; the exit code (1 when the model fails)."""
    import sys
    from pathlib import Path

    import uvicorn

    from ..core.errors import KernelMagicsError
    from ..core.truss_dir import load_truss_dir
    from ..core.tracebacks import trim_traceback

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = Path(path)
    try:
        model_host = load_truss_dir(root, secrets_dir=secrets_dir,
                                    secrets_hint="or put a file named {name} in the --secrets-dir folder")
    except KernelMagicsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BaseException as exc:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        print(text, file=sys.stderr)
        print(f"error: importing {root}/model failed: {type(exc).__name__}: {exc}. Fix model.py (its traceback "
              "is above) and start the server again.", file=sys.stderr)
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
    server = uvicorn.Server(uvicorn_config(app, host, port))
    server.run()
    if failure:
        exc = failure[0]
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        print(model_host.secrets.redact(text), file=sys.stderr)
        message = model_host.secrets.redact(f"{type(exc).__name__}: {exc}")
        print(f"error: the model failed to load: {message}. The server stopped; fix load() "
              "(its traceback is above) and start it again.", file=sys.stderr)
        return 1
    return 0
