"""The HTTP side of the Truss contract: the paths Truss's server answers and what answers each.

One table for our server (serving/server.py builds its routes from it) and for the stand-in that holds
the port before that server is imported (serving/stand_in.py answers from it as our server would before
the model is loaded). Plain data: no HTTP framework is imported here.
"""

from __future__ import annotations

__all__ = ["ENDPOINT_METHODS", "ROUTES"]

# Methods Truss 0.18 serves on routes of their own (OpenAI-compatible), beside predict.
ENDPOINT_METHODS = ("chat_completions", "completions", "embeddings", "messages", "responses")

# (path, HTTP method, what answers): in the order they are matched, as truss_server.py declares them.
# What answers is "liveness", "readiness", "loaded", "schema", "metrics", "predict" or an ENDPOINT_METHODS name.
ROUTES: tuple[tuple[str, str, str], ...] = (
    ("/", "GET", "liveness"),
    ("/v1/models/{model_name}", "GET", "readiness"),
    ("/v1/models/{model_name}/loaded", "GET", "loaded"),
    ("/v1/models/{model_name}/schema", "GET", "schema"),
    ("/v1/models/{model_name}:predict", "POST", "predict"),
    ("/v1/models/{model_name}:predict_binary", "POST", "predict"),
    # SageMaker's names for readiness and predict, as Truss serves them.
    ("/ping", "GET", "loaded"),
    ("/invocations", "POST", "predict"),
    *((f"/v1/{m.replace('_', '/')}", "POST", m) for m in ENDPOINT_METHODS),
    ("/metrics", "GET", "metrics"),
)
