"""Serve a Truss directory in this process with uvicorn, as Truss's own server does it.

The port is bound first; model.py is imported and the model loaded in a load thread, so
liveness answers at once and readiness says 503 until the load ends. A failed import is a
failed load: its traceback (the user's frames, secrets redacted) goes to the log, the server
stops, and :class:`ModelLoadFailed` says what to fix in one paragraph.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..core.collector import freeze_what_loaded
from ..core.errors import KernelMagicsError
from ..core.runtime import ModelHost
from ..core.tracebacks import trim_traceback
from ..core.truss_dir import TrussDir
from .limits import DEFAULT_MAX_BODY

if TYPE_CHECKING:
    from .stand_in import StandIn

__all__ = ["serve_truss", "ModelLoadFailed", "load_in_background", "import_and_load"]

log = logging.getLogger("kernel_magics.server")


class ModelLoadFailed(KernelMagicsError):
    """The model could not be imported or loaded; the server stopped."""


def unloaded_host(truss: TrussDir, *, secrets_dir: Optional[Path] = None, hint: str = "") -> ModelHost:
    """A host for the directory with nothing imported yet (the load thread imports model.py)."""
    return ModelHost(truss.config, secrets=truss.secret_store(secrets_dir=secrets_dir, hint=hint),
                     base_dir=truss.root, init_config=truss.raw_config)


def import_and_load(truss: TrussDir, host: ModelHost) -> Optional[tuple[str, str]]:
    """Import model.py, define its class and load the model, as Truss's load thread does: None once loaded,
    else ``(what to fix, the failure's one line)``; the traceback (the user's frames, secrets redacted) is
    logged first. The load thread of `kernel-magics serve` and of every Ray replica."""
    model_file = truss.relative(truss.model_file)
    started = time.perf_counter()
    try:
        cls = truss.import_model_class()
    except BaseException as exc:
        error = _user_frames(exc)
        log.error("Importing %s failed:\n%s", model_file, host.format_error(error))
        return model_file, f"importing {model_file} raised {host.describe_error(error)}"
    imported = time.perf_counter()
    try:
        host.define(cls)
        # Before readiness says 200: a full collection walked torch's objects, a 300 ms stall of every request
        # in flight (core/collector.py).
        host.load(before_ready=freeze_what_loaded)
    except KernelMagicsError as exc:  # a secret with no value, a broken contract: its message says what to do
        message = host.secrets.redact(str(exc))
        log.error("%s", message)
        return "", message
    except BaseException as exc:
        log.error("%s", host.error_text or host.format_error(exc))
        return ("the model class" if host.contract is None else "load()"), host.describe_error(exc)
    # (importing model.py, with torch and the saved values, is often most of it: said apart from load()'s own time)
    log.info("Model loaded in %.2f s (importing %s %.2f s, load() %.2f s); ready for predictions.",
             time.perf_counter() - started, model_file, imported - started, host.load_seconds or 0.0)
    return None


def load_in_background(truss: TrussDir, host: ModelHost, on_failure) -> threading.Thread:
    """Import model.py and load the model in one thread, as Truss's load thread does.

    ``on_failure`` gets a one-paragraph description once the error's traceback is logged.
    """

    def run() -> None:
        failed = import_and_load(truss, host)
        if failed is not None:
            fix, line = failed
            then = f"fix {fix} (its traceback is above) and start it again" if fix else "start it again once that is done"
            on_failure(f"{line.rstrip('.')}. The server stopped; {then}.")

    thread = threading.Thread(target=run, name="model-load", daemon=True)
    thread.start()
    return thread


def _user_frames(exc: BaseException) -> BaseException:
    """The import's traceback from the user's first frame on (not ours, not importlib's)."""
    trim_traceback(exc)
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and tb.tb_frame.f_code.co_filename.startswith("<frozen"):
        tb = tb.tb_next
    exc.__traceback__ = tb
    return exc


def serve_truss(truss: TrussDir, *, host: str = "127.0.0.1", port: int = 8080, secrets_dir: Optional[Path] = None,
                secrets: Optional[dict] = None, log_level: str = "info", log_format: str = "text",
                max_body: int = DEFAULT_MAX_BODY, metrics: bool = True, stand_in: Optional["StandIn"] = None) -> None:
    """Serve ``truss`` until SIGTERM/SIGINT; raises ModelLoadFailed when the model cannot load.

    ``stand_in``: the listener that answered liveness while this module was imported (serving/stand_in.py);
    uvicorn serves on its socket."""
    import uvicorn

    from .logs import configure, flush_access_lines
    from .server import create_app, uvicorn_config

    stop_logs = configure(log_level, log_format)
    secrets_dir = Path(secrets_dir).resolve() if secrets_dir is not None else None  # (the model runs from the root)
    model_host = unloaded_host(truss, secrets_dir=secrets_dir, hint="or put a file named {name} in the --secrets-dir folder")
    for name, value in (secrets or {}).items():
        model_host.secrets.set_value(name, value)
    failure: list[str] = []
    server: Optional[uvicorn.Server] = None

    def failed(paragraph: str) -> None:
        failure.append(paragraph)
        if server is not None:
            server.should_exit = True

    class Server(uvicorn.Server):
        def __init__(self, config: Any) -> None:
            super().__init__(config)
            self.loop: Optional[asyncio.AbstractEventLoop] = None
            self.cut_off: set = set()  # the requests a forced quit cancelled

        async def startup(self, sockets: Optional[list] = None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets)  # (the app's startup, then it listens)
            if not self.started:
                return
            address = _address(self.servers[0].sockets[0])  # (the port the system chose for --port 0)
            if sockets is not None:  # uvicorn says this only for a socket it bound itself: said as it says it
                logging.getLogger("uvicorn.error").info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)",
                                                        *address)
            message = "Serving %s on http://%s:%d: loading the model (readiness answers 503 until it is loaded)."
            if port or log.isEnabledFor(logging.INFO):
                log.info(message, truss.root, *address)
            else:  # a port the system chose, said at any --log-level (nothing else tells it): an INFO line all the same
                log.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, message, (truss.root, *address), None))
            load_in_background(truss, model_host, failed)  # (after that line: a fast load's line comes after it)

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            if self.force_exit and self.loop is not None:
                # At once, not after uvicorn's shutdown: from Python 3.12 (without uvloop) that shutdown's
                # wait_closed() waits for the open connections, so a request still in flight held the forced quit
                # for the whole graceful timeout. (A signal handler: the loop does the work, as soon as it can.)
                with contextlib.suppress(RuntimeError):  # (a loop already closed: nothing is in flight)
                    self.loop.call_soon_threadsafe(self.cut_off_requests)

        def cut_off_requests(self) -> None:
            # A forced quit (a second Ctrl-C) stops waiting for the requests in flight, and uvicorn then raises the
            # signal inside the loop: they ended in that KeyboardInterrupt's clean-up, each with a traceback, and a
            # stream now and then as if it were complete. They end here instead: a stream cut off (its client sees
            # an unfinished response), a request still waiting for the model answered 503 (serving/access.py).
            # A sync predict's thread cannot be stopped; its request does not wait for it.
            app.state.stopping = True
            for task in self.server_state.tasks - self.cut_off:  # (once each: one answering 503 is not cut again)
                self.cut_off.add(task)
                task.cancel()

        async def shutdown(self, sockets: Optional[list] = None) -> None:
            flush_access_lines()  # the requests answered so far are logged before "Shutting down"
            app.state.stopping = True  # (a stream cancelled from now on is cut off by the stop, not by its client)
            await super().shutdown(sockets)
            if self.force_exit and self.server_state.tasks:  # (cancelled by cut_off_requests: they end first)
                tasks = list(self.server_state.tasks)
                self.cut_off_requests()
                await asyncio.wait(tasks, timeout=1)
            done = getattr(self.lifespan, "shutdown_event", None)
            if self.force_exit and done is not None and not done.is_set():
                # uvicorn skips the app's shutdown on a forced quit (unless the quit came while it ran); ours only
                # writes the last access lines and lets the worker threads go, and without it the lifespan task
                # ended in the same clean-up.
                await self.lifespan.shutdown()

    app = create_app(model_host, on_shutdown=model_host.close, max_body=max_body, metrics=metrics)
    server = Server(uvicorn_config(app, host, port, log_level=log_level, log_config=None))
    _flush_logs_before_a_signal_ends_us(stop_logs)
    sockets = [stand_in.release()] if stand_in is not None else None
    try:
        with truss.as_working_directory():
            server.run(sockets=sockets)
    finally:
        for sock in sockets or ():  # uvicorn closes them only in a shutdown after a start
            sock.close()
        stop_logs()  # every line out before the CLI's last words
    if failure:
        raise ModelLoadFailed(f"the model failed to load: {failure[0]}")


def _address(sock) -> tuple[str, int]:
    host, port = sock.getsockname()[:2]
    return (f"[{host}]" if ":" in host else host), port


def _flush_logs_before_a_signal_ends_us(stop_logs: Callable[[], None]) -> None:
    """After a graceful shutdown uvicorn restores the handlers it found and raises the signal again (so a
    supervisor sees "terminated by SIGTERM"); the default action would end the process before the log
    writer thread wrote its last lines ("Finished server process"). The handlers it finds are these: write
    the queued lines out, then let the signal do what it did before."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(sig)

        def flush_then_raise(number: int, frame: Any, previous: Any = previous) -> None:
            stop_logs()
            signal.signal(number, previous)
            signal.raise_signal(number)

        signal.signal(sig, flush_then_raise)
