"""One table from an exception to Truss's answer: status, ``{"error": ...}`` body, x-baseten-error-* headers.

As Truss 0.18's server (``_truss_common/errors.py``): route handlers raise, the app's exception
handlers answer. Model code runs inside :func:`model_code`, which logs the user's traceback (secrets
redacted) and turns any exception of theirs into :class:`UserCodeError`, so the answer never leaks it.
The same table serves ``kernel-magics serve``, ``%model_serve`` and every Ray replica.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, Response

from ..core.errors import InputValidationError, ModelDefinitionError, ModelNotReadyError, NotSerializableError
from ..core.runtime import MethodNotFound
from ..core.slots import CallerGone

__all__ = ["MODEL_ERROR_MESSAGE", "HANDLERS", "UserCodeError", "InvalidPayload", "BodyTooLarge", "ClientGone",
           "model_code", "error_response", "stopping_response", "add_error_headers"]

log = logging.getLogger("kernel_magics.server")

MODEL_NAME = "model"  # Truss answers for any name in the path, and calls its model this
MODEL_ERROR_MESSAGE = "Internal Server Error (in model/chainlet)."
_SOURCE = "04"  # x-baseten-error-source of a Truss server
_DOWNSTREAM, _CLIENT, _UNEXPECTED = "600", "700", "500"


class UserCodeError(Exception):
    """The model's code raised (already logged with its traceback)."""


class InvalidPayload(Exception):
    """The body is not what the route takes (Truss's InputParsingError)."""


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"The request body is larger than this server's limit of {limit} bytes "
                         "(kernel-magics serve --max-body-size).")


class ClientGone(Exception):
    """The client left while sending its request."""


def error_response(status: int, message: Any, code: str) -> JSONResponse:
    """Truss's error response: ``{"error": message}`` plus the x-baseten-error headers."""
    return JSONResponse({"error": message}, status_code=status,
                        headers={"X-BASETEN-ERROR-SOURCE": _SOURCE, "X-BASETEN-ERROR-CODE": code})


STOPPING_MESSAGE = "The server is stopping; the request was not answered."


def stopping_response() -> JSONResponse:
    """The answer to a request a forced quit cut off before the model answered it (serving/access.py)."""
    return error_response(503, STOPPING_MESSAGE, _DOWNSTREAM)


def add_error_headers(response: Response) -> None:
    """A model's own error response gets the headers Truss adds to it."""
    response.headers.update({"X-BASETEN-ERROR-SOURCE": _SOURCE, "X-BASETEN-ERROR-CODE": _CLIENT})


def _redact(request: Request, text: str) -> str:
    host = request.app.state.host()
    return host.secrets.redact(text) if host is not None else text


_ANSWERED = (ModelNotReadyError, InputValidationError, ModelDefinitionError, NotSerializableError, HTTPException,
             CallerGone)


@contextlib.contextmanager
def model_code(host) -> Iterator[None]:
    """Around a call into the model: its exceptions are logged, then answered without their text."""
    try:
        yield
    except _ANSWERED:
        raise  # the runtime's own refusals, or an answer the model chose: the table knows them
    except Exception as exc:
        log.error("%s\n%s", MODEL_ERROR_MESSAGE, host.format_error(exc))
        raise UserCodeError() from exc


def _format_input_error(exc: InputValidationError) -> str:
    """Truss's text for a Pydantic validation error of the request."""
    errors = exc.errors or []
    parts = ["Input Parsing Error:" if len(errors) == 1 else "Input Parsing Errors:"]
    for err in errors:
        loc = "".join((f".{p}" if i else p) if isinstance(p, str) else f"[{p}]" for i, p in enumerate(err["loc"]))
        parts.append(f"  `{loc}`: {err['msg']}.")
    return "\n".join(parts)


async def _not_ready(request: Request, exc: Exception) -> Response:
    return error_response(503, f"Model with name {MODEL_NAME} is not ready.", _DOWNSTREAM)


async def _no_such_method(request: Request, exc: Exception) -> Response:
    method = getattr(request.state, "method", "predict")
    return error_response(404, f"`{method}` must only be called if model has it.", _CLIENT)


async def _input_error(request: Request, exc: InputValidationError) -> Response:
    return error_response(400, _format_input_error(exc), _CLIENT)


async def _invalid_payload(request: Request, exc: Exception) -> Response:
    return error_response(400, str(exc), _CLIENT)


async def _too_large(request: Request, exc: Exception) -> Response:
    return error_response(413, str(exc), _CLIENT)


async def _client_gone(request: Request, exc: Exception) -> Response:
    # One line, as Truss: the client left while sending; there is no one to answer.
    log.warning("Client disconnected while reading request.")
    return error_response(499, "Client disconnected while reading request.", _DOWNSTREAM)


async def _caller_gone(request: Request, exc: Exception) -> Response:
    # As Truss (model_wrapper.raise_if_disconnected): the client left while its request waited, so the model's code
    # never ran for it.
    message = f"Client disconnected, skipping `{getattr(request.state, 'method', 'predict')}`."
    log.warning(message)
    return error_response(499, message, _DOWNSTREAM)


async def _model_http_exception(request: Request, exc: HTTPException) -> Response:
    log.error("Model raised HTTPException: %s", _redact(request, str(exc.detail)))
    return error_response(exc.status_code, exc.detail, _DOWNSTREAM)


async def _definition_error(request: Request, exc: ModelDefinitionError) -> Response:
    log.error("%s", _redact(request, f"{type(exc).__name__}: {exc}"))
    return error_response(412, f"ModelDefinitionError: {exc}", _DOWNSTREAM)


async def _not_serializable(request: Request, exc: NotSerializableError) -> Response:
    log.error("%s", _redact(request, str(exc)))
    return error_response(500, f"Unhandled exception: {exc.truss_type}: {exc.truss_message}", _UNEXPECTED)


async def _user_code(request: Request, exc: Exception) -> Response:
    return error_response(500, MODEL_ERROR_MESSAGE, _DOWNSTREAM)


async def _unexpected(request: Request, exc: Exception) -> Response:
    return error_response(500, f"Unhandled exception: {type(exc).__name__}: {exc}", _UNEXPECTED)


# The most specific class wins (Starlette looks a raised exception's classes up in MRO order):
# MethodNotFound is a ModelNotReadyError, and gets its own answer.
HANDLERS = {
    ModelNotReadyError: _not_ready,
    MethodNotFound: _no_such_method,
    InputValidationError: _input_error,
    InvalidPayload: _invalid_payload,
    BodyTooLarge: _too_large,
    ClientGone: _client_gone,
    CallerGone: _caller_gone,
    HTTPException: _model_http_exception,  # FastAPI's, raised by a model; the router's own 404s stay FastAPI's
    ModelDefinitionError: _definition_error,
    NotSerializableError: _not_serializable,
    UserCodeError: _user_code,
    Exception: _unexpected,
}
