"""IPython magics: thin adapters from notebook cells to the core.

Each magic parses its arguments, calls :mod:`kernel_magics.runtime` (or config,
secrets), and turns our errors into one-line ``UsageError`` messages. A user's
own exception keeps its type and shows only the user's frames, pointing at the
notebook cell and line.
"""

from __future__ import annotations

import ast
import contextvars
import getpass
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Optional

from traitlets import Enum, Float, TraitError, validate

from IPython.core.error import StdinNotImplementedError, UsageError
from IPython.core.magic import (
    Magics, cell_magic, line_cell_magic, line_magic, magics_class, no_var_expand,
)
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from ..core.config import parse_config
from ..core.errors import KernelMagicsError
from ..core.loop import BackgroundLoop
from ..core.runtime import ChunkStream, ModelHost, ModelState, join_chunks
from ..core.secrets import SecretStore
from ..core.source import split_cell_magic
from ..core.tracebacks import user_traceback

__all__ = ["ModelMagics"]

_MISSING = object()


def _unquote(text: str) -> str:
    """IPython's argument splitting keeps quotes (``%model_export "my dir"``); drop a matching pair."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


def _strip_flag(text: str, flag: str) -> tuple[str, bool]:
    """``text`` without a leading ``flag``, and whether it was there."""
    if text == flag or text.startswith(flag + " "):
        return text[len(flag):].strip(), True
    return text, False


@magics_class
class ModelMagics(Magics):
    """Turn notebook cells into a Truss model: config, class, load, predict."""

    widgets = Enum(("auto", "always", "never"), "auto", help=(
        "Live widget views: auto (when a widget manager is likely, as in JupyterLab), always, or never (plain text)."
    )).tag(config=True)
    stream_rate = Float(30.0, help="Most widget or text updates a second while streaming.").tag(config=True)

    @validate("stream_rate")
    def _check_rate(self, proposal):
        if proposal["value"] <= 0:
            raise TraitError("stream_rate must be positive")
        return proposal["value"]

    def __init__(self, shell=None, **kwargs: Any) -> None:
        super().__init__(shell, **kwargs)
        self.host = ModelHost(secrets=SecretStore(hint="or run %model_secret {name} in this notebook"))
        self.runner = BackgroundLoop()
        self.model_cell: Optional[str] = None  # source of the last good %%model cell
        self.config_cell: Optional[str] = None
        # Every executed cell, in order: what export analyses (as the CLI reads an .ipynb).
        self.cells: list[str] = []
        self.last_export: Optional[Path] = None
        self._load_thread: Optional[threading.Thread] = None
        from .frontend import FrontendChannel, model_status

        # The JupyterLab extension's view of the model: every host event, config,
        # definition, secret and export updates it.
        self.frontend = FrontendChannel(lambda: model_status(self))
        self.host.subscribe(lambda event: self.frontend.publish())
        self.last_stream = None  # the last StreamConsumer: its chunks stay reachable after an error or interrupt

    def record_cell(self, result) -> None:
        """post_run_cell hook: keep the cell's source for export.

        A %%model or %%model_config cell that failed changed nothing, so it is
        left out; other cells count even when they failed part-way, since what
        they defined before the error is live in the kernel.
        """
        raw = result.info.raw_cell if result.info is not None else None
        if not raw or result.error_before_exec is not None:
            return
        magic = split_cell_magic(raw)[0]
        if magic in ("model", "model_config") and not result.success:
            return
        self.cells.append(raw)

    # ------------------------------------------------------------------ helpers

    def _compile_cell(self, magic_line: str, body: str, tree: Optional[ast.Module] = None):
        """Compile a cell body so tracebacks say ``Cell In[N], line L`` with the cell's own line numbers.

        ``tree``, when given, is the body already parsed from ``"\n" + body``.
        """
        # IPython bumps execution_count before it runs a cell (frontends store history),
        # so the running cell is In[execution_count - 1].
        number = max(self.shell.execution_count - 1, 0)
        filename = self.shell.compile.cache(f"{magic_line}\n{body}", number)
        # The body starts on the cell's second line (the first holds the magic).
        source = tree if tree is not None else "\n" + body
        return compile(source, filename, "exec"), filename

    def _user_error(self, exc: BaseException) -> BaseException:
        """Make ``exc`` render with the user's frames only, then return it for raising."""
        tb = user_traceback(exc.__traceback__)
        shell = self.shell

        def render() -> list[str]:
            return shell.InteractiveTB.structured_traceback(type(exc), exc, tb)

        try:
            exc._render_traceback_ = render
        except AttributeError:  # an exception type without __dict__: show it in full
            pass
        return exc

    def _use_widgets(self, no_widget: bool = False) -> bool:
        if no_widget or self.widgets == "never":
            return False
        if self.widgets == "always":
            return True
        from .widgets import frontend_has_widgets

        return frontend_has_widgets()

    def _run(self, call, *args: Any) -> Any:
        """Call the core; our errors become UsageError, the user's keep their type."""
        try:
            return call(*args)
        except KernelMagicsError as exc:
            raise UsageError(str(exc)) from None
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            raise self._user_error(exc) from None

    # ------------------------------------------------------------------ %%model_config

    @line_cell_magic
    def model_config(self, line: str, cell: Optional[str] = None):
        """Set the model's config.yaml from YAML in the cell; on a line, show the current config.

        Field names are Truss's: model_name, model_class_name, requirements,
        resources (accelerator, cpu, memory), secrets (names only, null values),
        environment_variables, model_metadata, data_dir, runtime.predict_concurrency ...

            %%model_config
            model_name: tiny-chargen
            requirements: [torch]
            secrets: {hf_access_token: null}
        """
        if cell is None:
            from IPython.display import Code, display

            display(Code(self.host.config.to_yaml(verbose=bool(line.strip() == "--all")) or "{}\n", language="yaml"))
            return None
        try:
            config = parse_config(cell, source="%%model_config cell", line_offset=1)
        except KernelMagicsError as exc:
            raise UsageError(f"{exc} The previous config stays in effect.") from None
        self.host.config = config
        self.config_cell = cell
        self.frontend.publish()
        secrets = ", ".join(
            f"{n} ({'set' if self.host.secrets.source_of(n) else 'not set'})" for n in config.secret_names
        )
        name = config.model_name or "(no model_name)"
        print(f"Config set for {name}; class {config.model_class_name}" + (f"; secrets: {secrets}" if secrets else "") + ".")
        return None

    # ------------------------------------------------------------------ %%model

    @cell_magic
    def model(self, line: str, cell: str):
        """Define the model class (a Truss ``Model``) from the cell.

        The class is named by model_class_name in the config (default ``Model``)
        and needs ``predict(self, model_input)``; ``__init__(**kwargs)`` and
        ``load(self)`` are optional. Re-running the cell while the model is loaded
        swaps the live instance's code and keeps its loaded state. An error keeps
        the previous model active.

            %%model
            class Model:
                def load(self):
                    self.scale = 2
                def predict(self, model_input):
                    return {"y": model_input["x"] * self.scale}
        """
        name = self.host.config.model_class_name
        had_model = self.host.model_class is not None
        keep = " The previous model stays active." if had_model else ""
        try:
            code, _ = self._compile_cell(f"%%model {line}".rstrip(), cell)
        except SyntaxError as exc:
            text = f": {exc.text.strip()}" if exc.text and exc.text.strip() else ""
            raise UsageError(
                f"Syntax error in the %%model cell, line {exc.lineno}: {exc.msg}{text}. Fix it and run the cell again.{keep}"
            ) from None
        ns = self.shell.user_ns
        previous = ns.get(name, _MISSING)
        started = time.perf_counter()

        def restore() -> None:
            if previous is _MISSING:
                ns.pop(name, None)
            else:
                ns[name] = previous

        try:
            exec(code, ns)
        except Exception as exc:
            restore()
            if had_model:
                exc.add_note("The previous model stays active.")
            raise self._user_error(exc) from None
        cls = ns.get(name)
        if cls is None or cls is previous or not isinstance(cls, type):
            restore()
            defined = sorted(
                n for n, v in ns.items() if isinstance(v, type) and not n.startswith("_") and v is not previous
                and getattr(v, "__module__", None) == "__main__" and n in cell
            )
            found = f" It defines: {', '.join(defined)}." if defined else ""
            raise UsageError(
                f"The %%model cell defines no class named `{name}`.{found} Name the class `{name}`, or set "
                f"`model_class_name` in %%model_config to the class you mean.{keep}"
            )
        try:
            report = self.host.define(cls)
        except KernelMagicsError as exc:
            restore()
            raise UsageError(f"{exc}{keep}") from None
        self.model_cell = cell
        ms = (time.perf_counter() - started) * 1000
        if report.swap_error:
            print(f"`{name}` redefined, but the live instance could not take the new class ({report.swap_error}); "
                  "it keeps running the old code. Run %model_load to load the new one.")
        elif report.hot_swapped:
            print(f"Hot-swapped `{name}` into the loaded model in {ms:.1f} ms; its loaded state is kept.")
            for method in report.changed:
                print(f"  `{method}` changed: the live instance still holds what the old {method} made. "
                      "Run %model_load to reload with the new code.")
        else:
            spec = self.host.contract.predict
            kind = ("async " if spec.is_async else "") + ("generator " if spec.is_generator else "")
            print(f"Model `{name}` defined ({kind}predict). Run %model_load to load it.")
        return None

    # ------------------------------------------------------------------ %model_load / unload / status

    @magic_arguments()
    @argument("--device", default="auto",
              help="auto (the kernel's GPU when the notebook uses torch and has one), cpu, cuda or cuda:N: "
                   "torch's default device while load runs.")
    @argument("--background", action="store_true",
              help="Return at once; the view keeps updating, and a predict waits for the load to finish.")
    @argument("--no-widget", action="store_true", help="Plain text progress instead of the live view.")
    @line_magic
    def model_load(self, line: str):
        """Instantiate the model class and call ``load()``, showing state, elapsed time, device and GPU memory.

        __init__ receives the Truss keyword arguments its signature accepts:
        config, data_dir, secrets, environment. What load prints or logs shows
        in the view as it happens.

            %model_load --device cuda
            %model_load --background
        """
        args = parse_argstring(self.model_load, line)
        from ..core import devices

        if self._load_thread is not None and self._load_thread.is_alive():
            raise UsageError("A background load is still running; wait for it (any %model_predict does) first.")
        device = self._run(devices.resolve_device, args.device)
        if self.host.contract is None:
            raise UsageError("No model is defined yet: run a %%model cell (a class with predict) first.")
        view = None
        if self._use_widgets(args.no_widget):
            from IPython.display import display

            from .widgets import LoadView

            view = LoadView(self.host, device)
            display(view.widget)
        else:
            print(f"Loading `{self.host.config.model_class_name}` (device: {device or 'chosen by the model'}) ...",
                  flush=True)
        if args.background:
            ctx = contextvars.copy_context()  # its output belongs to this cell
            self._load_thread = threading.Thread(target=ctx.run, args=(self._load_quietly, device, view is None),
                                                 name="model-load", daemon=True)
            self._load_thread.start()
            print("Loading in the background; %model_predict waits for it to finish.")
            return None
        try:
            self._run(self.host.load, device)
        except UsageError:
            raise
        except BaseException as exc:
            if view is not None and not isinstance(exc, KeyboardInterrupt):
                raise UsageError(f"load() failed: {type(exc).__name__}: {exc}. The model's state is 'failed'; "
                                 "its traceback is in the view above (click the error to open it).") from None
            print(f"Load failed after {self.host.load_seconds or 0:.2f} s; the model state is 'failed'.", flush=True)
            raise
        if view is None:
            self._print_loaded()
        return None

    def _print_loaded(self) -> None:
        from ..core import devices

        print(f"Ready in {self.host.load_seconds:.2f} s on {devices.describe_device(self.host.device)}.", flush=True)

    def _load_quietly(self, device: Optional[str], plain: bool) -> None:
        """A background load: the state and the view tell the outcome; nothing is raised."""
        try:
            self.host.load(device)
        except BaseException as exc:
            if plain:
                print(f"Background load failed: {type(exc).__name__}: {exc}", flush=True)
            return
        if plain:
            self._print_loaded()

    def _wait_for_background_load(self) -> None:
        thread = self._load_thread
        if thread is None or not thread.is_alive():
            return
        print("Waiting for the background load to finish ...", flush=True)
        while thread.is_alive():
            thread.join(0.1)  # short joins keep a kernel interrupt deliverable

    @line_magic
    def model_unload(self, line: str):
        """Drop the loaded instance and free its memory (GPU memory too)."""
        from ..core import devices

        self._wait_for_background_load()
        gpu = self.host.device if (self.host.device or "").startswith("cuda") else None
        before = devices.memory_stats(gpu)
        if not self.host.unload():
            print("No model was loaded.")
            return
        after = devices.memory_stats(gpu)
        if before and after:
            print(f"Model unloaded; {gpu} memory allocated: {before['allocated'] / 2**20:,.0f} MiB -> "
                  f"{after['allocated'] / 2**20:,.0f} MiB.")
        else:
            print("Model unloaded; memory freed.")

    @line_magic
    def model_status(self, line: str):
        """Show the model's class, state, device, load time and last predict time."""
        host = self.host
        rows = [
            ("class", host.config.model_class_name if host.model_class else "(none)"),
            ("state", host.state.value),
            ("device", host.device or "-"),
            ("load time", f"{host.load_seconds:.3f} s" if host.load_seconds is not None else "-"),
            ("last predict", f"{host.last_predict_seconds * 1000:.1f} ms" if host.last_predict_seconds is not None else "-"),
        ]
        if host.last_first_chunk_seconds is not None:
            rows.append(("first chunk", f"{host.last_first_chunk_seconds * 1000:.1f} ms"))
        if host.state is ModelState.FAILED and host.error is not None:
            rows.append(("error", f"{type(host.error).__name__}: {host.error}"))
        print("\n".join(f"{k:>12}: {v}" for k, v in rows))

    @line_magic
    def model_secret(self, line: str):
        """Prompt for a secret's value and keep it in memory only (never on disk or in output).

            %model_secret hf_access_token
        """
        name = line.strip()
        if not name.isidentifier():
            raise UsageError("Usage: %model_secret NAME, with NAME one of the secrets declared in %%model_config.")
        if name not in self.host.config.secrets:
            raise UsageError(f"Secret `{name}` is not declared in the config. Add `{name}: null` under `secrets:` "
                             "in %%model_config first, so the export knows the deployment needs it.")
        try:
            value = getpass.getpass(f"Value for secret {name}: ")
        except StdinNotImplementedError:
            raise UsageError(f"This frontend cannot prompt for input. Set TRUSS_SECRET_{name} in the kernel's "
                             "environment instead.") from None
        if not value:
            raise UsageError(f"No value entered; secret `{name}` is unchanged.")
        self.host.secrets.set_value(name, value)
        self.frontend.publish()
        print(f"Secret `{name}` set for this session (kept in memory only).")

    # ------------------------------------------------------------------ predict

    def _predict(self, model_input: Any, no_widget: bool = False) -> Any:
        self._wait_for_background_load()
        result = self._run(self.runner.run, self.host.predict(model_input))
        if not isinstance(result, ChunkStream):
            return result
        return self._consume(result, self._use_widgets(no_widget))

    def _consume(self, stream: ChunkStream, widget: bool) -> Any:
        """Stream into a live view (or plain text) and return the joined result."""
        from .streaming import StreamConsumer

        from .widgets import PlainStream, StreamView, route_stop_clicks

        consumer = self.last_stream = StreamConsumer(PlainStream(), rate=self.stream_rate)
        if widget:
            # Shown before the first chunk, so the first update carries only text.
            from IPython.display import display

            consumer.sink = StreamView()
            route_stop_clicks(consumer.sink, consumer.request_stop)
            display(consumer.sink)
        if stream.is_async:
            try:
                self.runner.run(consumer.consume_async(stream))
            except KeyboardInterrupt:
                consumer.outcome = "interrupted"
        else:
            consumer.consume_sync(stream)
        if consumer.outcome == "interrupted":
            raise KeyboardInterrupt
        if consumer.outcome == "error":
            raise self._user_error(consumer.error) from None
        return self._run(join_chunks, consumer.chunks)

    @no_var_expand
    @line_magic
    def model_predict(self, line: str):
        """Run the loaded model on an input (JSON, or a Python expression) and return the prediction.

            %model_predict {"prompt": "To be"}
            r = %model_predict my_input
        """
        text, no_widget = _strip_flag(line.strip(), "--no-widget")
        if not text:
            raise UsageError('Usage: %model_predict [--no-widget] INPUT, where INPUT is JSON like {"prompt": "hi"} '
                             "or a Python expression.")
        return self._predict(self._parse_input(text), no_widget)

    def _parse_input(self, text: str) -> Any:
        try:
            return json.loads(text)
        except json.JSONDecodeError as json_error:
            try:
                return eval(text, self.shell.user_ns)  # noqa: S307 - the user's own expression
            except Exception as py_error:
                raise UsageError(
                    f"Could not read the model input: it is not JSON ({json_error.msg} at column {json_error.colno}) "
                    f"and not a Python expression ({type(py_error).__name__}: {py_error}). "
                    'Pass JSON such as {"prompt": "hi"} or the name of a variable.'
                ) from None

    @cell_magic
    def predict(self, line: str, cell: str):
        """Run the loaded model on the value of the cell's last expression and return the prediction.

            %%predict
            prompt = "To be"
            {"prompt": prompt, "max_tokens": 20}
        """
        try:
            tree = ast.parse("\n" + cell)
        except SyntaxError as exc:
            raise UsageError(f"Syntax error in the %%predict cell, line {exc.lineno}: {exc.msg}.") from None
        if not tree.body or not isinstance(tree.body[-1], ast.Expr):
            raise UsageError("The last line of a %%predict cell must be an expression: the model input, "
                             'for example {"prompt": "hi"}.')
        last = ast.Expression(tree.body.pop().value)
        code, filename = self._compile_cell(f"%%predict {line}".rstrip(), cell, tree)
        ns = self.shell.user_ns
        try:
            exec(code, ns)
            model_input = eval(compile(last, filename, "eval"), ns)
        except Exception as exc:
            raise self._user_error(exc) from None
        return self._predict(model_input, no_widget="--no-widget" in line.split())

    # ------------------------------------------------------------------ materialize and export

    @property
    def notebook_name(self) -> str:
        # Jupyter Server tells kernels which notebook they run for; nbclient and consoles do not.
        session = os.environ.get("JPY_SESSION_NAME")
        return os.path.basename(session) if session else "a notebook"

    def _materialize(self):
        from ..core.export import materialize

        return self._run(materialize, self.cells, self.host.config, self.host.base_dir, self.notebook_name)

    @magic_arguments()
    @argument("file", nargs="?", default="model.py", choices=["model.py", "config.yaml"], help="Which file to show.")
    @argument("--why", action="store_true", help="List every name model.py includes and the reference that pulled it in.")
    @line_magic
    def model_show(self, line: str):
        """Show the model.py or config.yaml that an export would write, syntax-highlighted.

            %model_show
            %model_show config.yaml
            %model_show --why
        """
        args = parse_argstring(self.model_show, line)
        result = self._materialize()
        if args.why:
            print(result.source.why())
            return None
        from IPython.display import Code, display

        if args.file == "config.yaml":
            display(Code(result.config_yaml, language="yaml"))
        else:
            display(Code(result.source.text, language="python"))
        for warning in result.warnings:
            print(f"warning: {warning}")
        return None

    @magic_arguments()
    @argument("dir", help="Directory to write the Truss to.")
    @argument("--force", action="store_true", help="Replace DIR if it exists and is not empty.")
    @argument("--data", action="append", default=[], metavar="PATH", help="A file or folder to copy into data/ (repeatable).")
    @line_magic
    def model_export(self, line: str):
        """Export the model as a deployable Truss directory (config.yaml, model/model.py, data/, packages/).

        The directory is written atomically and only after the new model.py
        imported and instantiated in a fresh Python process.

            %model_export ./tiny-chargen --force
        """
        from ..core.export import export_model

        args = parse_argstring(self.model_export, line)
        materialized = self._materialize()
        target = Path(os.path.expanduser(_unquote(args.dir)))
        if not target.is_absolute():
            target = self.host.base_dir / target
        result = self._run(lambda: export_model(
            target, materialized, base_dir=self.host.base_dir, data=[Path(_unquote(p)) for p in args.data],
            force=args.force,
        ))
        for warning in result.warnings:
            print(f"warning: {warning}")
        print(f"Exported `{self.host.config.model_class_name}` as a Truss:")
        print(result.tree())
        self.last_export = result.target
        self.frontend.publish()
        return None

    # ------------------------------------------------------------------ serve the live model

    @magic_arguments()
    @argument("--port", type=int, default=8080, help="Port on 127.0.0.1 (default 8080).")
    @argument("--stop", action="store_true", help="Stop the server this notebook started.")
    @line_magic
    def model_serve(self, line: str):
        """Serve the live notebook model over Truss's HTTP API on 127.0.0.1, in the background.

        Hot reloads take effect on the next request; the kernel stays usable.

            %model_serve --port 8080
            !curl -s -X POST localhost:8080/v1/models/model:predict -d '{"x": 1}'
            %model_serve --stop
        """
        args = parse_argstring(self.model_serve, line)
        current = getattr(self, "_server", None)
        if args.stop:
            if current is None:
                print("No model server is running.")
                return None
            server, future, port = current
            server.should_exit = True
            try:
                future.result(timeout=35)
            except Exception:
                pass
            self._server = None
            print(f"Stopped the model server on port {port}.")
            return None
        if current is not None:
            raise UsageError(f"The model is already served on port {current[2]}; run %model_serve --stop first.")
        self._check_port_free(args.port)
        import uvicorn

        from ..serving.server import create_app, uvicorn_config

        app = create_app(self.host)
        # log_config=None: uvicorn's logs go through logging, not into whichever cell runs.
        server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", args.port, log_level="warning", log_config=None))
        future = self.runner.submit(server.serve())
        deadline = time.monotonic() + 10
        while not server.started and not future.done() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not server.started:
            server.should_exit = True
            raise UsageError(f"The model server did not start on 127.0.0.1:{args.port}; pick another --port.")
        self._server = (server, future, args.port)
        state = "" if self.host.state is ModelState.READY else f" (the model is {self.host.state.value}: predictions answer 503 until %model_load)"
        print(f"Serving the notebook model at http://127.0.0.1:{args.port}/v1/models/model:predict{state}. "
              "Stop it with %model_serve --stop.")
        return None

    @staticmethod
    def _check_port_free(port: int) -> None:
        import socket

        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                raise UsageError(f"Port {port} on 127.0.0.1 is in use; pick another with --port.") from None
