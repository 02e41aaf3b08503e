"""Tell the JupyterLab extension what the model is doing, over a comm.

The kernel registers the ``kernel_magics.status`` target and answers the comm
the extension opens to it (the extension asks first whether kernel_magics is
loaded, so no kernel ever gets a comm for a target it lacks); the kernel never
opens one itself, so a client without the extension (nbconvert, papermill, a
console) sees no comm at all. Changes only raise a flag; a small thread sends
the whole status at most ten times a second, so a predict pays for an
``Event.set()`` and a view that missed a message is right again at the next
one. Secret values are never part of it.
"""

from __future__ import annotations

import contextvars
import threading
import time
from typing import Any, Callable, Optional

from .. import __version__


__all__ = ["FrontendChannel", "TARGET"]

TARGET = "kernel_magics.status"


class FrontendChannel:
    """Pushes :meth:`status` to every connected extension view."""

    def __init__(self, status: Callable[[], dict], interval: float = 0.1) -> None:
        self._status = status
        self._comms: list[Any] = []
        self._lock = threading.Lock()
        self._dirty = threading.Event()
        self._interval = interval
        self._sender: Optional[threading.Thread] = None

    def start(self) -> None:
        """Register the kernel-side target; the extension opens the comm when it is there."""
        import comm

        try:
            comm.get_comm_manager().register_target(TARGET, self._on_open)
        except Exception:  # not in a kernel (a plain IPython shell): nothing to talk to
            return

    def _on_open(self, opened: Any, msg: dict) -> None:
        self._add(opened)
        opened.send({"status": self._status()})
        if self._sender is None:
            # Comm messages carry the parent header of the context they are sent from.
            ctx = contextvars.copy_context()
            self._sender = threading.Thread(target=ctx.run, args=(self._send_loop,), name="km-status", daemon=True)
            self._sender.start()

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
        """Mark the status changed; the sender thread sends it soon (safe from any thread, cheap)."""
        self._dirty.set()

    def _send_loop(self) -> None:
        while True:
            self._dirty.wait()
            self._dirty.clear()
            self._send_now()
            time.sleep(self._interval)  # coalesce bursts (a predict loop) into one update

    def _send_now(self) -> None:
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


def model_status(magics: Any) -> dict:
    """The status the extension shows: the host's snapshot, the package version and the last export."""
    return {**magics.host.status(), "version": __version__,
            "last_export": str(magics.last_export) if magics.last_export else None}
