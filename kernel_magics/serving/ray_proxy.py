"""Ray Serve's HTTP proxy, bounded as `kernel-magics serve` is: request heads of at most 16 KiB and 100 headers.

Ray Serve 2.60's proxy parses requests with uvicorn's httptools protocol, which holds a request head of any
size (`kernel-magics serve` bounds it in serving/limits.py, as h11 does under Truss's server). Serve calls
the function named by ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` in every proxy it starts, before the
proxy's uvicorn loads its protocol: Ray's own hook for configuring the proxy. :func:`bound_request_heads`
is that function; the variable must be in the environment of the Ray node the proxy runs on (a local Ray
started by `serve --engine ray` has it; on a cluster, set it where `ray start` runs).
"""

from __future__ import annotations

__all__ = ["CALLBACK_VARIABLE", "CALLBACK", "bound_request_heads"]

CALLBACK_VARIABLE = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "kernel_magics.serving.ray_proxy:bound_request_heads"


def bound_request_heads() -> list:
    """In a Serve proxy: uvicorn's "auto" protocol (the proxy's) becomes the bounded one; adds no middleware."""
    from uvicorn.protocols.http import auto

    from .limits import http_protocol

    protocol = http_protocol()
    if protocol != "h11":  # without httptools "auto" is h11, bounded already
        # uvicorn resolves "auto" by this module attribute when the server loads its config.
        auto.AutoHTTPProtocol = protocol
    return []
