"""Live views of a load and of a streaming prediction (ipywidgets / anywidget).

The views only observe: the load view subscribes to ModelHost events, the
stream view is a sink of :class:`kernel_magics.notebook.streaming.StreamConsumer`.
Each has a plain-text twin for frontends without a widget manager.
"""

from __future__ import annotations

import collections
import contextvars
import html
import os
import sys
import threading
import time
from typing import Any, Callable, Optional

import anywidget
import ipywidgets
import traitlets

from ..core import devices
from ..core.runtime import HostEvent, ModelHost
from .streaming import StreamStats

__all__ = ["StreamView", "PlainStream", "LoadView", "frontend_has_widgets", "route_stop_clicks"]


def frontend_has_widgets() -> bool:
    """Best guess whether a widget manager will render our views.

    True when a frontend opened ipywidgets' control channel, or when the kernel
    was started by a Jupyter Server (JupyterLab, Notebook 7, Voila set
    JPY_SESSION_NAME); nbclient, nbconvert and consoles do neither.
    """
    return ipywidgets.Widget._control_comm is not None or bool(os.environ.get("JPY_SESSION_NAME"))


def route_stop_clicks(widget: ipywidgets.Widget, on_stop: Callable[[], None]) -> bool:
    """Make a Stop click reach ``on_stop`` even while the cell that streams is running.

    Why this way: the kernel handles comm messages on its shell thread only
    between cell executions (the running cell holds it), yet the prediction
    must stay the cell's result, so the stream cannot simply move off the
    cell. ipykernel 7's shell-channel thread, which receives every message
    first, asks each comm where its messages go (``_reply_subshell_for``, its
    subshell routing hook). We answer as before but look at the message on the
    way: a stop sets a flag the streaming loop checks after each chunk. Nothing
    else runs on that thread. Without the hook (older ipykernel) the click is
    handled after the cell, and a kernel interrupt still stops the stream.
    """
    def on_msg(_widget, content, _buffers) -> None:
        if isinstance(content, dict) and content.get("type") == "stop":
            on_stop()

    widget.on_msg(on_msg)
    comm = getattr(widget, "comm", None)
    route = getattr(comm, "_reply_subshell_for", None)
    if route is None:
        return False

    def observe(data: Any, default: Any) -> Any:
        content = data.get("content") if isinstance(data, dict) else None
        if isinstance(content, dict) and data.get("method") == "custom" and content.get("type") == "stop":
            on_stop()
        return route(data, default)

    comm._reply_subshell_for = observe
    return True


# ---------------------------------------------------------------------------- stream view

_STREAM_ESM = """
function render({ model, el }) {
  const root = document.createElement("div");
  root.className = "km-stream";
  const out = document.createElement("pre");
  out.className = "km-stream-out";
  const bar = document.createElement("div");
  bar.className = "km-stream-bar";
  const stop = document.createElement("button");
  stop.className = "km-stream-stop jupyter-button";
  stop.textContent = "Stop";
  const stats = document.createElement("span");
  stats.className = "km-stream-stats";
  const error = document.createElement("pre");
  error.className = "km-stream-error";
  bar.append(stop, stats);
  root.append(out, bar, error);
  el.append(root);

  const describe = (s, state) => {
    if (!s || s.chunks === undefined) return state;
    const first = s.first_chunk_ms === null ? "no chunks yet" : `first chunk ${s.first_chunk_ms} ms`;
    return `${state} · ${s.chunks} chunks · ${s.chunks_per_s} chunks/s · ${first} · ${s.elapsed_s} s`;
  };
  const showState = () => {
    const state = model.get("state");
    stop.style.display = state === "streaming" ? "" : "none";
    error.textContent = model.get("error");
    stats.textContent = describe(model.get("stats"), state);
  };
  stop.addEventListener("click", () => {
    model.send({ type: "stop" });
    stop.disabled = true;
    stop.textContent = "Stopping…";
  });
  model.on("msg:custom", (msg) => {
    if (msg.type !== "delta") return;
    out.textContent += msg.text;
    out.scrollTop = out.scrollHeight;
    stats.textContent = describe(msg.stats, "streaming");
  });
  model.on("change:text", () => { out.textContent = model.get("text"); });
  model.on("change:state", showState);
  model.on("change:stats", showState);
  model.on("change:error", showState);
  out.textContent = model.get("text");
  showState();
}
export default { render };
"""

# Words wrap whole: JupyterLab's `.jp-OutputArea-output pre { word-break: break-all }` (Notebook 7 and
# nbconvert's lab template carry it too) would cut a token anywhere (`to|ken13`), so these rules are more
# specific than it; only a token longer than the line breaks (overflow-wrap), never a short one.
_WRAP_WORDS = "white-space: pre-wrap; word-break: normal; overflow-wrap: anywhere;"

_STREAM_CSS = """
.km-stream pre.km-stream-out { max-height: 24em; overflow: auto; margin: 0 0 4px 0; """ + _WRAP_WORDS + """
  font-family: var(--jp-code-font-family, monospace); font-size: var(--jp-code-font-size, 13px); }
.km-stream-bar { display: flex; gap: 8px; align-items: center; font-size: 12px;
  color: var(--jp-ui-font-color2, #666); }
.km-stream-error:empty { display: none; }
.km-stream pre.km-stream-error { color: var(--jp-error-color1, #c00); """ + _WRAP_WORDS + """ }
"""
# The same, inline, for static output (a saved notebook, nbconvert, GitHub), where our stylesheet is absent.
_WRAP_INLINE = _WRAP_WORDS.replace(": ", ":").replace("; ", ";")


class Final:
    """What a finished view leaves in the notebook: HTML and text that need no kernel and no widget state.

    A view displays itself with a display id and, when it is done, replaces itself
    with this, so a saved notebook (and GitHub, nbviewer, nbconvert) shows the final
    state instead of "Error displaying widget".
    """

    def __init__(self, html_text: str, plain: str) -> None:
        self._html, self._plain = html_text, plain

    def _repr_html_(self) -> str:
        return self._html

    def __repr__(self) -> str:
        return self._plain


def show(view: Any) -> Any:
    """Display a widget (or any object) with a display id; returns the handle to replace it later."""
    from IPython.display import display

    return display(view, display_id=True)


def stream_final(text: str, summary: str, error: Optional[str]) -> Final:
    """A finished stream as static output: its text, the summary line, the error if any."""
    shown = (f"<pre class='km-stream-out' style='{_WRAP_INLINE}margin:0 0 4px 0'>{html.escape(text)}</pre>"
             f"<div class='km-stream-bar' style='font-size:12px;opacity:0.75'>{html.escape(summary)}</div>")
    if error:
        shown += f"<pre class='km-stream-error' style='color:#c62828;{_WRAP_INLINE}'>{html.escape(error)}</pre>"
    plain = text + ("" if not text or text.endswith("\n") else "\n") + f"[{summary}]" + (f"\n{error}" if error else "")
    return Final(f"<div class='km-stream'>{shown}</div>", plain)


class StreamView(anywidget.AnyWidget):
    """Shows a streaming prediction: text as it arrives, live statistics, a Stop button.

    While streaming it receives only deltas (custom messages, at most ~30 a
    second); the full text is set once at the end. Then the view replaces itself
    with static output (:func:`stream_final`), which is what a saved notebook keeps.
    """

    _esm = _STREAM_ESM
    _css = _STREAM_CSS
    text = traitlets.Unicode("", help="The whole output, set when the stream ends.").tag(sync=True)
    state = traitlets.Unicode("streaming", help="streaming, done, stopped, interrupted or error.").tag(sync=True)
    stats = traitlets.Dict(help="chunks, first_chunk_ms, chunks_per_s, elapsed_s.").tag(sync=True)
    error = traitlets.Unicode("", help="The error that ended the stream, if any.").tag(sync=True)

    def __repr__(self) -> str:  # cheap on purpose: never serialises the output
        return f"StreamView(state={self.state!r})"

    def update(self, text: str, stats: StreamStats) -> None:
        self.send({"type": "delta", "text": text, "stats": stats.as_dict()})

    handle: Any = None  # the display it was shown in (see show())

    def finish(self, text: str, stats: StreamStats, outcome: str, error: Optional[str]) -> None:
        with self.hold_sync():  # one message: text, stats, error and state together
            self.text = text
            self.stats = stats.as_dict()
            self.error = error or ""
            self.state = outcome
        if self.handle is not None:
            self.handle.update(stream_final(text, f"{outcome}: {stats.describe()}", error))


def _in_a_kernel() -> bool:
    from IPython import get_ipython

    return type(get_ipython()).__name__ == "ZMQInteractiveShell"


class PlainStream:
    """The stream view's twin for frontends without widgets: text as it arrives, then a summary line.

    In a kernel (nbconvert, papermill, a console) the first text is written at once and the rest about twice a
    second, so a saved notebook holds a few stream outputs, not one per update; in a terminal it is written as it
    comes.
    """

    def __init__(self) -> None:
        self._printed = 0
        self._pending = ""
        self._last = float("-inf")  # the first text is written at once: the time to it is what a user waits for
        self.interval = 0.5 if _in_a_kernel() else 0.0

    def update(self, text: str, stats: StreamStats) -> None:
        self._pending += text
        if self._pending and time.monotonic() - self._last >= self.interval:
            self._write()

    def _write(self) -> None:
        sys.stdout.write(self._pending)
        sys.stdout.flush()
        self._printed += len(self._pending)
        self._pending = ""
        self._last = time.monotonic()

    def finish(self, text: str, stats: StreamStats, outcome: str, error: Optional[str]) -> None:
        self._pending = ""
        rest = text[self._printed:]  # what arrived after the last write
        newline = "" if not text or text.endswith("\n") else "\n"
        sys.stdout.write(f"{rest}{newline}[{outcome}: {stats.describe()}]\n")
        sys.stdout.flush()


# ---------------------------------------------------------------------------- load view

def _bytes(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def _memory(mem: Optional[dict]) -> str:
    if not mem:
        return "-"
    return f"{_bytes(mem['allocated'])} allocated, {_bytes(mem['reserved'])} reserved of {_bytes(mem['total'])}"


class LoadView:
    """A live view of ``load()``: state, elapsed time, device, GPU memory, the last lines it printed."""

    colors = {"loading": "#1976d2", "ready": "#2e7d32", "failed": "#c62828"}

    def __init__(self, host: ModelHost, device: Optional[str], lines: int = 8, *,
                 render_traceback: Optional[Callable[[BaseException], Optional[str]]] = None,
                 error_below: bool = False) -> None:
        """``render_traceback`` formats a failed load's traceback (the kernel's own way: ``Cell In[N]``);
        ``error_below``: the cell raises the error itself, so the view only says where it is."""
        self.widget = ipywidgets.HTML()
        self._render_traceback = render_traceback
        self._error_below = error_below
        self.handle: Any = None
        self.state = "loading"
        self.device = device
        self.lines: collections.deque = collections.deque(maxlen=lines)
        self.memory_before: Optional[dict] = None
        self.memory_after: Optional[dict] = None
        self.error: Optional[tuple[str, str]] = None  # (one line, the traceback), secrets redacted
        self.started = time.perf_counter()
        self.seconds: Optional[float] = None
        self._done = threading.Event()
        self._host = host
        self._unsubscribe = host.subscribe(self._on_event)
        ctx = contextvars.copy_context()
        self._ticker = threading.Thread(target=ctx.run, args=(self._tick,), name="load-view", daemon=True)
        self._ticker.start()
        self.render()

    def _on_event(self, event: HostEvent) -> None:
        if event.kind == "load_started":
            self.memory_before = event.data.get("memory")
        elif event.kind == "log":
            self.lines.append(event.data["line"])
        elif event.kind == "load_finished":
            self.state, self.seconds = "ready", event.data["seconds"]
            self.device = event.data["device"]
            self.memory_after = event.data.get("memory")
            self._close()
        elif event.kind == "load_failed":
            self.state, self.seconds = "failed", event.data["seconds"]
            exc = event.data["error"]
            if self._error_below:  # the cell's error output shows it, once
                self.error = (f"load() raised {type(exc).__name__}: the error is below.", "")
            else:  # shown as the host describes it: secrets redacted, the user's frames only
                text = self._render_traceback(exc) if self._render_traceback is not None else None
                self.error = (self._host.describe_error(exc), text or event.data["text"])
            self._close()

    def show(self) -> None:
        """Display the view; when the load ends it replaces itself with its final state as static HTML."""
        self.handle = show(self.widget)

    def _close(self) -> None:
        self._unsubscribe()
        self._done.set()
        self.render()
        if self.handle is not None:
            self.handle.update(Final(self._html(static=True), self.summary()))

    def summary(self) -> str:
        where = devices.describe_device(self.device) if self.device else "chosen by the model"
        line = f"{self._state_and_time(' · ')} · {where}"
        if self.memory_after and self.state == "ready":
            line += f" · GPU memory: {_memory(self.memory_after)}"
        if self.error is not None:
            line += "".join(f"\n{part}" for part in self.error if part)
        return line

    def _state_and_time(self, sep: str) -> str:
        """"ready · 1.2 s"; a load that failed at once (model.py's import, a missing method) shows no time
        of "0.0 s", which would read as a load that ran."""
        elapsed = self.seconds if self.seconds is not None else time.perf_counter() - self.started
        if self.state == "failed":
            return f"failed after {elapsed:.1f} s" if elapsed >= 0.05 else "failed"
        return f"{self.state}{sep}{elapsed:.1f} s"

    def _tick(self) -> None:
        while not self._done.wait(0.25):  # elapsed time ticks while load runs
            self.render()

    def render(self) -> None:
        self.widget.value = self._html()

    def _html(self, static: bool = False) -> str:
        """The view as HTML; ``static`` (what the notebook keeps) shows the whole log, not a scrolled box."""
        color = self.colors[self.state]
        rows = [("device", devices.describe_device(self.device) if self.device else "chosen by the model")]
        # GPU rows only where there is a GPU to speak of.
        if self.memory_before:
            rows.append(("GPU memory before", _memory(self.memory_before)))
        if self.memory_after and self.state == "ready":
            rows.append(("GPU memory after", _memory(self.memory_after)))
        table = "".join(f"<div><span style='opacity:0.7;margin-right:1em'>{html.escape(k)}</span>{html.escape(v)}</div>"
                        for k, v in rows)
        log = ""
        if self.lines:
            box = "" if static else "max-height:10em;overflow:auto;"
            log = (f"<pre class='km-load-log' style='margin:4px 0;{box}font-size:12px;{_WRAP_INLINE}'>"
                   + html.escape("\n".join(self.lines)) + "</pre>")
        error = ""
        if self.error is not None:
            summary, tb = self.error
            error = (f"<details><summary style='color:{color}'>{html.escape(summary)}</summary>"
                     f"<pre style='font-size:12px;{_WRAP_INLINE}'>{html.escape(tb)}</pre></details>" if tb
                     else f"<div style='color:{color}'>{html.escape(summary)}</div>")
        state, _, elapsed = self._state_and_time("\0").partition("\0")
        return (f"<div class='km-load'><b style='color:{color}'>{html.escape(state)}</b>"
                f"{f' &middot; {elapsed}' if elapsed else ''}"
                f"<div style='font-size:12px'>{table}</div>{log}{error}</div>")