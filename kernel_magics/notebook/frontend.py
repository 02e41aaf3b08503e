"""Tell the JupyterLab extension what the model is doing, over a comm.

Why the kernel opens the comm itself: a request from the browser (an execute or a
comm_open) waits behind every queued cell, so during Run All the panel would say
"not loaded" until the run ends, and when Run All stops at a failing cell ipykernel
cancels the queued request and the panel never connects. A comm the kernel opens
from the ``%load_ext`` cell reaches the browser at once (kernel-to-frontend
messages are fine during a busy cell). It opens one only in a kernel a Jupyter
server started (``JPY_SESSION_NAME``), so nbconvert, papermill and a console see no
comm. The target stays registered too: a page reloaded after ``%load_ext`` opens
its own comm to it.

Changes only raise a flag; a small thread sends the whole status at most ten times
a second, so a predict pays for an ``Event.set()`` and a view that missed a
message is right again at the next one. Secret values are never part of it.
The extension sends its settings back over the same comm; :func:`apply_settings`
applies those that concern the kernel.
"""

from __future__ import annotations

import collections
import contextvars
import os
import threading
import time
from typing import Any, Callable, Optional

from .. import __version__


__all__ = ["FrontendChannel", "TARGET", "apply_settings", "model_status"]

TARGET = "kernel_magics.status"
HISTORY = 30  # predictions kept for the panel's latency plot


class FrontendChannel:
    """Pushes :meth:`status` to every connected extension view."""

    def __init__(self, status: Callable[[], dict], interval: float = 0.1) -> None:
        self._status = status
        self._comms: list[Any] = []
        self._lock = threading.Lock()
        self._dirty = threading.Event()
        self._interval = interval
        self._sender: Optional[threading.Thread] = None
        self._on_settings: Optional[Callable[[dict], None]] = None
        # (total ms, first chunk ms or None) of the latest predictions, oldest first.
        self.history: collections.deque = collections.deque(maxlen=HISTORY)
        self.exports = 0  # exports finished in this kernel
        # Loads ended (loaded or failed) since this channel began: the extension's notification compares counts,
        # because a load quicker than one status update (0.1 s) is never seen in the "loading" state. The channel's
        # id says which count a status carries (after %reload_ext a new channel counts from 0).
        self.loads = 0
        self.id = os.urandom(4).hex()
        self.last_replayed: Optional[int] = None
        self._unsubscribe: Optional[Callable[[], None]] = None
        self._stopped = False

    def start(self, host: Any = None, on_settings: Optional[Callable[[dict], None]] = None) -> None:
        """Follow ``host``'s events, register the kernel-side target and, under a Jupyter
        server, open the comm to the extension now."""
        self._on_settings = on_settings
        if host is not None:
            self._unsubscribe = host.subscribe(self.observe)
        try:
            import comm

            comm.get_comm_manager().register_target(TARGET, self._on_open)
        except Exception:  # not in a kernel (a plain IPython shell): nothing to talk to
            return
        if os.environ.get("JPY_SESSION_NAME"):
            try:
                opened = comm.create_comm(target_name=TARGET, data={"status": self._status()})
            except Exception:  # a kernel without comm support: the extension's own probe still works
                return
            self._connect(opened)

    def stop(self) -> None:
        """``%unload_ext`` / ``%reload_ext``: close this channel's comms (the extension drops a closed one and
        follows the channel the next ``%load_ext`` opens), stop following the host, let the sender thread end.
        Without it the old channel kept sending the old magics' status beside the new one's."""
        self._stopped = True
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        with self._lock:
            comms, self._comms = self._comms, []
        for opened in comms:
            try:
                opened.close()
            except Exception:  # (a comm the frontend already closed)
                pass
        self._dirty.set()  # wakes the sender, which sees the flag and ends

    def observe(self, event: Any) -> None:
        """A host event: predictions feed the latency plot; a new load starts a fresh one."""
        kind = getattr(event, "kind", "")
        data = getattr(event, "data", {}) or {}
        if kind == "predicted" and data.get("seconds") is not None:
            first = data.get("first_chunk")
            self.history.append((round(data["seconds"] * 1000, 2), None if first is None else round(first * 1000, 2)))
        elif kind in ("load_started", "load_failed"):
            self.history.clear()
        if kind in ("load_finished", "load_failed"):
            self.loads += 1
        self.publish()

    def exported(self, replayed: int) -> None:
        """An export finished: the extension's notification counts exports and says how many
        predictions it replayed."""
        self.exports += 1
        self.last_replayed = replayed
        self.publish()

    def _on_open(self, opened: Any, msg: dict) -> None:
        if self._stopped:  # (a page reloaded after %unload_ext: nothing will answer on it)
            opened.close()
            return
        self._connect(opened)
        opened.send({"status": self._status()})

    def _connect(self, opened: Any) -> None:
        self._add(opened)
        opened.on_msg(self._on_msg)
        if self._sender is None:
            # Comm messages carry the parent header of the context they are sent from.
            ctx = contextvars.copy_context()
            self._sender = threading.Thread(target=ctx.run, args=(self._send_loop,), name="km-status", daemon=True)
            self._sender.start()

    def _on_msg(self, msg: dict) -> None:
        data = (msg.get("content") or {}).get("data") or {}
        settings = data.get("settings")
        if isinstance(settings, dict) and self._on_settings is not None:
            self._on_settings(settings)
            self.publish()

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
            if self._stopped:
                return
            self._send_now()
            time.sleep(self._interval)  # coalesce bursts (a predict loop) into one update

    def _send_now(self) -> None:
        with self._lock:
            comms = list(self._comms)
        if not comms:
            return
        status = self._status()
        for opened in comms:
            if self._stopped:  # (stop() closed them meanwhile)
                return
            try:
                opened.send({"status": status})
            except Exception:
                self._remove(opened)


def apply_settings(magics: Any, settings: dict) -> None:
    """The extension's settings that the kernel applies: views (auto/always/never) and the
    stream update rate. A value the kernel refuses is left as it was (the Settings Editor
    already validated it against the schema)."""
    for key, trait in (("views", "widgets"), ("streamUpdateRate", "stream_rate")):
        if key in settings:
            try:
                setattr(magics, trait, settings[key])
            except Exception:
                pass


def _relative(path: Any) -> Optional[str]:
    """``path`` relative to the kernel's working directory, when it is below it (what the
    extension joins to the notebook's folder to open a file in Lab)."""
    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive
        return None
    return None if rel == ".." or rel.startswith(".." + os.sep) else rel.replace(os.sep, "/")


def model_status(magics: Any) -> dict:
    """The status the extension shows: the host's snapshot, the package version, the last
    export, the running server and the recent predictions."""
    export = magics.last_export
    server = getattr(magics, "server", None)
    port = getattr(server, "port", None) if server is not None else None
    return {
        **magics.host.status(),
        "version": __version__,
        "last_export": str(export) if export else None,
        "last_export_relative": _relative(export) if export else None,
        "last_export_replayed": magics.frontend.last_replayed,
        "exports": magics.frontend.exports,
        "loads": magics.frontend.loads,
        "channel": magics.frontend.id,
        "serve_url": f"http://127.0.0.1:{port}" if port else None,
        "history": [list(h) for h in magics.frontend.history],
        "settings": {"views": magics.widgets, "streamUpdateRate": magics.stream_rate},
    }
