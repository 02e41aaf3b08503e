"""Tell the JupyterLab extension what the model is doing, over a comm.

The kernel opens a comm to the extension's ``kernel_magics.status`` target when
the magics load (live once the extension answers "hello"), and also answers
comms the extension opens to the same target in the kernel (after a page
reload, or a second notebook view). Every change sends the whole status: it is
small, and a view that missed a message is right again at the next one. With
no extension listening nothing is sent. Secret values are never part of it.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from . import __version__, devices

__all__ = ["FrontendChannel", "TARGET"]

TARGET = "kernel_magics.status"


class FrontendChannel:
    """Pushes :meth:`status` to every connected extension view."""

    def __init__(self, status: Callable[[], dict]) -> None:
        self._status = status
        self._comms: list[Any] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        """Register the kernel-side target and announce ourselves to the frontend."""
        import comm

        try:
            comm.get_comm_manager().register_target(TARGET, self._on_open)
        except Exception:  # not in a kernel (a plain IPython shell): nothing to talk to
            return
        announced = comm.create_comm(target_name=TARGET, data={"status": self._status()})
        # Live only once the extension says hello on it: a frontend without the extension
        # (nbclient, a console) never answers, and then no status is ever sent.
        announced.on_msg(lambda msg: self._add(announced) if _is_hello(msg) else None)

    def _on_open(self, opened: Any, msg: dict) -> None:
        self._add(opened)
        opened.send({"status": self._status()})

    def _add(self, opened: Any) -> None:
        with self._lock:
            if opened in self._comms:
                return
            self._comms.append(opened)
        opened.on_close(lambda _msg: self._remove(opened))

    def _remove(self, closed: Any) -> None:
        with self._lock:
            if closed in self._comms:
                self._comms.remove(closed)

    def publish(self) -> None:
        """Send the current status to every open view (safe from any thread)."""
        with self._lock:
            comms = list(self._comms)
        if not comms:
            return
        status = self._status()
        for opened in comms:
            try:
                opened.send({"status": status})
            except Exception:
                self._remove(opened)


def _is_hello(msg: dict) -> bool:
    data = msg.get("content", {}).get("data")
    return isinstance(data, dict) and data.get("type") == "hello"


def model_status(magics: Any) -> dict:
    """The status the extension shows: model, state, device, timings, secrets by name, last export."""
    host = magics.host
    config = host.config
    gpu = host.device if (host.device or "").startswith("cuda") else None
    return {
        "version": __version__,
        "class_name": config.model_class_name if host.model_class is not None else None,
        "model_name": config.model_name,
        "state": host.state.value,
        "device": devices.describe_device(host.device) if host.device else None,
        "gpu_memory": devices.memory_stats(gpu),
        "load_seconds": host.load_seconds,
        "last_predict_ms": None if host.last_predict_seconds is None else round(host.last_predict_seconds * 1000, 2),
        "first_chunk_ms": None if host.last_first_chunk_seconds is None else round(host.last_first_chunk_seconds * 1000, 2),
        "secrets": [{"name": n, "set": host.secrets.source_of(n) is not None} for n in config.secret_names],
        "last_export": str(magics.last_export) if magics.last_export else None,
        "error": f"{type(host.error).__name__}: {host.error}" if host.error is not None else None,
    }
