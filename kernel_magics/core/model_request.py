"""The request a model method that takes one gets outside a server: in the notebook and in the export's replay.

``%model_predict --header ...`` calls a request-taking predict with a Starlette request built
here; the same description (method, path, headers; the body is the input as JSON) is kept with
the recorded prediction, so the export's fresh-process check replays it with the same request.
Starlette is imported only when a request is built.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, Optional, Sequence

__all__ = ["PREDICT_PATH", "route_path", "build_request", "describe_request"]

PREDICT_PATH = "/v1/models/model:predict"


def route_path(method: str) -> str:
    """The path a model method's route has on a Truss server."""
    return PREDICT_PATH if method == "predict" else f"/v1/{method.replace('_', '/')}"


def build_request(model_input: Any, *, headers: Sequence[tuple[str, str]] = (), method: str = "POST",
                  path: str = PREDICT_PATH) -> Any:
    """A Starlette request as a server would hand it to the model: the headers (names lower-cased),
    the input as its JSON body (none for an input that is not JSON), a client that never leaves."""
    from starlette.requests import Request

    try:
        body = json.dumps(model_input).encode()
    except (TypeError, ValueError):
        body = b""  # a Python object input: the request carries no body
    pairs = [(name.strip().lower().encode("latin-1"), value.strip().encode("latin-1")) for name, value in headers]
    if not any(name == b"content-type" for name, _ in pairs):
        pairs.append((b"content-type", b"application/json"))
    pairs = [(n, v) for n, v in pairs if n != b"content-length"] + [(b"content-length", str(len(body)).encode())]
    sent = []

    async def receive() -> dict:
        if not sent:
            sent.append(True)
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never leaves: is_disconnected() stays False
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": pairs, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0), "scheme": "http",
             "http_version": "1.1", "root_path": "", "state": {}}
    return Request(scope, receive)


def _secret_ref(name: str) -> str:
    return "{{secret:" + name + "}}"


def describe_request(request: Any, redact: Any = None, secret_names: Optional[dict] = None) -> Optional[dict]:
    """What a replay needs to build the same request again (JSON): method, path and headers. A secret's
    value is never kept: where a header holds one (``secret_names``: value -> name) it is kept as a
    reference by name that the replay resolves from its own secrets (a model that checks the token gets
    the same request); any other form of it goes through ``redact``. None for no request."""
    if request is None:
        return None
    scope = request.scope
    headers = [[n.decode("latin-1"), v.decode("latin-1")] for n, v in scope.get("headers", ())
               if n != b"content-length"]
    for value, name in sorted((secret_names or {}).items(), key=lambda item: -len(item[0])):
        if value:
            headers = [[n, v.replace(value, _secret_ref(name))] for n, v in headers]
    if redact is not None:
        headers = [[n, redact(v)] for n, v in headers]
    return {"method": scope.get("method", "POST"), "path": scope.get("path", PREDICT_PATH), "headers": headers}


def request_from(description: Optional[dict], model_input: Any, secrets: Any = None) -> Any:
    """The request :func:`describe_request` described, for ``model_input``, its secret references
    resolved from ``secrets`` (a mapping of name to value); None for None."""
    if not description:
        return None

    def resolve(value: str) -> str:
        for name in re.findall(r"\{\{secret:(\w+)\}\}", value):
            try:
                value = value.replace(_secret_ref(name), secrets[name])
            except (KeyError, TypeError, LookupError):
                pass  # not available here: the reference stays, and the replay shows the difference
        return value

    return build_request(model_input, headers=[(n, resolve(v)) for n, v in description.get("headers", [])],
                         method=description.get("method", "POST"), path=description.get("path", PREDICT_PATH))
