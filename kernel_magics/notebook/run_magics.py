"""``%model_load``, ``%model_predict`` and ``%%predict``: run the model as the servers run it, and show it live."""

from __future__ import annotations

import ast
import json
import re
import sys
from typing import Any, Optional

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments

from ..core.contract import ENDPOINT_METHODS
from ..core.runtime import ChunkStream, ModelState
from ..core.serialization import is_response, truss_refuses_chunk
from ..core.streams import join_chunks
from .magics import ModelMagics, allows_comment, parse_arguments

__all__ = ["RunMagics"]

_FLAG = re.compile(r"""--(?P<flag>[\w-]+)(?:[ \t]+(?P<value>"[^"]*"|'[^']*'|[^\s"']+))?""")
_VALUED = {"header", "method"}


def _predict_flags(fn):
    """The flags %model_predict and %%predict share."""
    fn = argument("--method", default="predict", choices=("predict", *ENDPOINT_METHODS),
                  help="Call another model method, as its route would (chat_completions ...).")(fn)
    fn = argument("--header", action="append", default=[], metavar="NAME:VALUE",
                  help="A request header, for a predict that takes the request (repeatable).")(fn)
    return argument("--no-widget", action="store_true",
                    help="Print a stream as plain text instead of the live view.")(fn)


@magics_class
class RunMagics(Magics):
    """%model_load, %model_predict, %%predict."""

    def __init__(self, shell, model: ModelMagics) -> None:
        super().__init__(shell)
        self.model = model

    # ------------------------------------------------------------------ %model_load

    @magic_arguments()
    @argument("--device", default="auto",
              help="auto (the kernel's GPU when the notebook uses torch and has one), cpu, cuda or cuda:N: "
                   "torch's default device while load runs.")
    @argument("--background", action="store_true",
              help="Return at once; the view keeps updating, and a predict waits for the load to finish.")
    @argument("--no-widget", action="store_true", help="Plain text progress instead of the live view.")
    @line_magic
    @allows_comment
    def model_load(self, line: str):
        """Instantiate the model class and call ``load()`` in a worker thread (as Truss does), showing state,
        elapsed time, device and GPU memory. A kernel interrupt stops it at its next Python line.

        __init__ receives the Truss keyword arguments its signature accepts:
        config, data_dir, secrets, environment. What load prints or logs shows
        in the view as it happens (once: not also below it).

            %model_load --device cuda
            %model_load --background
        """
        from ..core import devices

        args = parse_arguments(self.model_load, line)
        host = self.model.host
        if host.loading:
            raise UsageError("A load is still running (a background load, or one an interrupt could not stop yet because "
                             "it is inside a long call); %model_status shows when it ends, and %model_predict waits for it.")
        device = self.model.run(devices.resolve_device, args.device)
        if host.contract is None:
            raise UsageError("No model is defined yet: run a %%model cell (a class with predict) first.")
        view = None
        if self.model.use_widgets(args.no_widget):
            from .widgets import LoadView

            # A foreground load's error is the cell's own (below the view, once); a background load has no cell.
            view = LoadView(host, device, render_traceback=self._render_traceback, error_below=not args.background)
            view.show()
        else:
            print(f"Loading `{host.config.model_class_name}` (device: {device or 'chosen by the model'}) ...", flush=True)
        outcome: dict = {}
        from ..core import load_snapshot
        from ..core.source import globals_for_load

        # What load() changes in the notebook's globals is exported as it was before (core/load_snapshot.py).
        used = globals_for_load(self.model.cells, host.config.model_class_name)
        load_snapshot.before_load(self.shell.user_ns, used, used)
        # This cell's index (where the snapshot was taken); a load outside the history (the lab panel's command)
        # comes between the last cell and the next: N - 0.5.
        from .magics import running_a_stored_cell

        self.model.loaded_at.append(len(self.model.cells) - (0 if running_a_stored_cell(self.shell) else 0.5))

        def done(exc: Optional[BaseException]) -> None:
            load_snapshot.after_load(self.shell.user_ns)
            outcome["error"] = exc
            if args.background and view is None:
                print(f"Background load failed: {host.describe_error(exc)}" if exc else self._loaded_line(), flush=True)

        try:  # from the start: an interrupt may land while the thread starts
            self.model.run(host.start_load, device, echo=view is None, on_done=done)
            if args.background:
                print("Loading in the background; %model_predict waits for it to finish.")
                return None
            while not host.wait_load(0.1):
                pass
        except KeyboardInterrupt:
            stopped = host.interrupt_load()
            print("Interrupted: load() was stopped; the model's state is 'failed'." if stopped else
                  "Interrupted, but load() is inside a long call and still runs; %model_status tells when it ends.")
            raise
        exc = outcome.get("error")
        if exc is None:
            if view is None:
                print(self._loaded_line(), flush=True)
            self._start_spare_checker()
            return None
        from ..core.errors import KernelMagicsError

        if isinstance(exc, KernelMagicsError):
            raise UsageError(host.describe_error(exc).split(": ", 1)[1]) from None
        if view is None or isinstance(exc, KeyboardInterrupt):
            print(f"Load failed after {host.load_seconds or 0:.2f} s; the model state is 'failed'.", flush=True)
        raise self.model.user_error(exc) from None

    def _start_spare_checker(self) -> None:
        """Start the next export's fresh Python now (core/spare_check.py): it imports the libraries model.py
        imports in the background, so the export's proof does not wait for them. It stops with %model_unload.
        Planned in a thread (planning the values imports their libraries): the cell ends when the load does, and
        the next execution waits for the thread (:func:`wait_for_spare_planning`)."""
        if not self.model.spare_checker:  # (%config ModelMagics.spare_checker = False)
            return
        from ..core import spare_check
        from ..core.export import materialize

        model, host = self.model, self.model.host
        if not getattr(model, "_spare_watch", None):
            model._spare_watch = host.subscribe(
                lambda event: spare_check.discard(disable=True) if event.kind == "state"
                and event.state in (ModelState.DEFINED, ModelState.NOT_DEFINED) else None)
        cells, namespace, before = list(model.cells), self.shell.user_ns, spare_check.current()

        def prepare() -> None:
            try:  # (the analysis an export starts with; what it cannot export, the export says)
                materialized = materialize(cells, host.config, host.base_dir, model.notebook_name, live=namespace)
            except Exception:
                return
            if host.state is not ModelState.READY or spare_check.current() is not before:
                return  # unloaded or redefined meanwhile, or an export started the next spare already
            spare = spare_check.prepare_for(materialized.source.text, host.config.environment_variables)
            if spare is None:
                return  # the kernel is exiting, or spares were turned off meanwhile
            # The modules the saved values will unpickle (an encoder's transformers code: seconds) are known once
            # they are saved: saved once into a scratch folder, so the first export finds them imported.
            spare_check.import_values_ahead(spare, materialized)

        spare_check.in_background(prepare, "km-spare-prepare")

    def _render_traceback(self, exc: BaseException) -> str:
        """The user's traceback as plain text for the load view, cells named as IPython names them
        (``Cell In[N], line L``) and IPython's own frames left out, as its traceback does; secrets redacted.

        Why not IPython's formatter: the view renders it on the load's thread, and IPython's formatter
        imports stack_data lazily; an import racing the kernel's own first traceback crashed CPython 3.11.
        This reads only the frames, the compiler's cell names and linecache.
        """
        import linecache
        import traceback

        from ..core.tracebacks import user_traceback

        cells = getattr(getattr(self.shell, "compile", None), "_filename_map", {})
        lines = ["Traceback (most recent call last):"]
        tb = user_traceback(exc.__traceback__)
        while tb is not None:
            frame, code = tb.tb_frame, tb.tb_frame.f_code
            hidden = frame.f_locals.get("__tracebackhide__") and tb.tb_next is not None
            if not hidden and str(frame.f_globals.get("__name__", "")).split(".")[0] != "IPython":
                number = cells.get(code.co_filename)
                where = (f"Cell In[{number}], line {tb.tb_lineno}" if number is not None
                         else f'File "{code.co_filename}", line {tb.tb_lineno}')
                lines.append(f"  {where}, in {getattr(code, 'co_qualname', code.co_name)}")
                source = linecache.getline(code.co_filename, tb.tb_lineno).strip()
                if source:
                    lines.append(f"    {source}")
            tb = tb.tb_next
        lines.append("".join(traceback.format_exception_only(type(exc), exc)).rstrip())
        return self.model.host.secrets.redact("\n".join(lines))

    def _loaded_line(self) -> str:
        from ..core import devices

        host = self.model.host
        return f"Ready in {host.load_seconds:.2f} s on {devices.describe_device(host.device)}."

    # ------------------------------------------------------------------ %model_predict / %%predict

    @magic_arguments()
    @_predict_flags
    @argument("--again", action="store_true",
              help="Predict every recorded input again (after a retrain), replacing the answers the export replays.")
    @argument("input", nargs="*", help='The model input: JSON like {"prompt": "hi"}, or a Python expression.')
    @no_var_expand
    @line_magic
    @allows_comment
    def model_predict(self, line: str):
        """Run the loaded model on an input (JSON, or a Python expression) and return the prediction.

        A streaming predict shows its chunks as they arrive and returns the whole output (shown once).

            %model_predict {"prompt": "To be"}
            r = %model_predict my_input
            %model_predict --header x-user:alice {"prompt": "hi"}
            %model_predict --method chat_completions {"messages": [{"role": "user", "content": "hi"}]}
            %model_predict --again    # every recorded input, after the model changed
        """
        flags, text = self._split_flags(line)
        # `%model_predict {...};` hides the result as `;` does in any cell (IPython hands the `;` to the magic).
        text = text.strip()
        quiet = text.endswith(";")
        text = text.removesuffix(";").strip()
        if flags.pop("again"):
            if text or flags["headers"] or flags["method"] != "predict":
                raise UsageError("%model_predict --again takes no input, --header or --method: it predicts every "
                                 "recorded input again, each with the headers it was recorded with.")
            return self._predict_again(flags["no_widget"])
        if not text:
            raise UsageError('Usage: %model_predict [--no-widget] [--header NAME:VALUE] [--method NAME] INPUT, where '
                             'INPUT is JSON like {"prompt": "hi"} or a Python expression (or --again).')
        value = self._predict(self._parse_input(text), **flags)
        if quiet:
            self.model.hide_result(value, always=True)
        return value

    @magic_arguments()
    @_predict_flags
    @cell_magic
    @allows_comment
    def predict(self, line: str, cell: str):
        """Run the loaded model on the value of the cell's last expression and return the prediction.

            %%predict
            prompt = "To be"
            {"prompt": prompt, "max_tokens": 20}
        """
        args = parse_arguments(self.predict, line)
        try:
            tree = ast.parse("\n" + cell)
        except SyntaxError as exc:
            raise UsageError(f"Syntax error in the %%predict cell, line {exc.lineno}: {exc.msg}.") from None
        if not tree.body or not isinstance(tree.body[-1], ast.Expr):
            raise UsageError("The last line of a %%predict cell must be an expression: the model input, "
                             'for example {"prompt": "hi"}.')
        last = ast.Expression(tree.body.pop().value)
        number = max(self.shell.execution_count - 1, 0)
        filename = self.shell.compile.cache(f"%%predict {line}".rstrip() + f"\n{cell}", number)
        ns = self.shell.user_ns
        try:
            exec(compile(tree, filename, "exec"), ns)
            model_input = eval(compile(last, filename, "eval"), ns)
        except Exception as exc:
            raise self.model.user_error(exc) from None
        return self._predict(model_input, no_widget=args.no_widget, headers=args.header, method=args.method)

    def _split_flags(self, line: str) -> tuple[dict, str]:
        """Leading ``--flags`` of %model_predict (the input itself may hold any characters)."""
        flags: dict[str, Any] = {"no_widget": False, "headers": [], "method": "predict", "again": False}
        rest = line.lstrip()
        while rest.startswith("--"):
            match = _FLAG.match(rest)
            flag = match["flag"] if match else rest.split()[0][2:]
            if flag not in ("no-widget", "again", *_VALUED):
                from ..core.suggest import did_you_mean

                near = did_you_mean([f"--{flag}"], [f"--{name}" for name in ("no-widget", "again", *_VALUED)])
                raise UsageError(f"Unknown option --{flag} for %model_predict{near}. Options: --no-widget, "
                                 "--header NAME:VALUE, --method NAME, --again (see %model_predict?).")
            value = match["value"] if flag in _VALUED else None
            if flag in _VALUED and not value:
                raise UsageError(f"--{flag} needs a value, for example "
                                 f"{'--header x-user:alice' if flag == 'header' else '--method chat_completions'}.")
            if flag in ("no-widget", "again"):
                flags[flag.replace("-", "_")] = True
                rest = rest[len(flag) + 2:].lstrip()
                continue
            value = value[1:-1] if value[0] in "\"'" else value
            if flag == "header":
                flags["headers"].append(value)
            elif value not in ("predict", *ENDPOINT_METHODS):
                raise UsageError(f"--method {value}: the model methods with routes are predict, "
                                 f"{', '.join(ENDPOINT_METHODS)}.")
            else:
                flags["method"] = value
            rest = rest[match.end():].lstrip()
        return flags, rest

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

    def _predict_again(self, no_widget: bool) -> None:
        """Every recorded input predicted again, in order, each with the request it was recorded with: after a
        retrain the record's answers are the old model's, and the export's replay would refuse the new one until
        each input was predicted again by hand. Says which answers changed; the record keeps the new ones."""
        from ..core.model_request import request_from
        from ..core.replay import again_line, compare

        model = self.model
        recorded = list(model.record)
        if not recorded:
            print("No predictions are recorded for this model yet: run %model_predict INPUT first.")
            return None
        changed = []
        for item in recorded:
            request = request_from(item.request, item.input, model.host.secrets) if item.request else None
            value = self._predict(item.input, no_widget=no_widget, recorded_request=request)
            if compare(item.output, value) is not None:
                changed.append(again_line(item.input, item.output, value))
        count = f"{len(recorded)} recorded input{'s' if len(recorded) != 1 else ''}"
        if not changed:
            print(f"Predicted the {count} again: each answers as recorded.")
        else:
            print(f"Predicted the {count} again; {len(changed)} answer{'s' if len(changed) == 1 else ''} "
                  f"differently now, and the record keeps the new answers (the export replays them):")
            for line in changed:
                print(line)
        return None

    def _predict(self, model_input: Any, *, no_widget: bool = False, headers: list[str] = (),
                 method: str = "predict", recorded_request: Any = None) -> Any:
        model, host = self.model, self.model.host
        model.wait_for_background_load()
        request = recorded_request if recorded_request is not None else (
            self._request(headers, method, model_input) if self._takes_request(method) else None)
        if headers and request is None:
            raise UsageError(f"--header is for a model whose {method} takes the request (`request: fastapi.Request`); "
                             f"this one's does not.")
        result = model.run(model.runner.run, host.predict(model_input, request=request, method=method))
        streamed = isinstance(result, ChunkStream)
        if streamed:
            value = self._consume(result, model.use_widgets(no_widget))
        elif is_response(result):
            value = _response_value(result)
        else:
            value = result
        # Only a whole answer is a prediction an export must reproduce: a stream the Stop button ended
        # returns its partial output, which the deployment (that runs it to the end) never gives.
        whole = not streamed or model.last_stream.outcome == "done"
        if method == "predict" and host.state is ModelState.READY and whole:
            from ..core.model_request import describe_request

            # The replay builds the same request (method, path, headers); a header's secret is kept as a
            # reference by name, which the replay resolves from its own secrets (never the value).
            model.note_prediction(model_input, value, request=describe_request(
                request, host.secrets.redact, secret_names=host.secrets.known_values()))
            self._warn_if_truss_would_refuse(result, streamed)
        if streamed:
            model.hide_result(value)  # the view (or the printed text) showed it already
        return value

    def _takes_request(self, method: str) -> bool:
        contract = self.model.host.contract
        if contract is None:
            return False
        specs = [contract.endpoint(method)] if method != "predict" else [contract.predict, contract.preprocess,
                                                                         contract.postprocess]
        return any(s is not None and s.takes_request for s in specs)

    def _request(self, headers: list[str], method: str, model_input: Any):
        """A Starlette request built for this call, so request-taking model code runs as on a server:
        POST to the route's path, the given headers, the input as its JSON body."""
        from ..core.model_request import build_request, route_path

        pairs = []
        for header in headers:
            name, sep, value = header.partition(":")
            if not sep or not name.strip():
                raise UsageError(f"--header {header!r}: write it as NAME:VALUE, for example --header x-user:alice.")
            pairs.append((name, value))
        try:
            return build_request(model_input, headers=pairs, path=route_path(method))
        except ImportError:
            raise UsageError("This model's predict takes the request, which needs Starlette: "
                             "`pip install 'kernel-magics[serve]'`.") from None

    def _consume(self, stream: ChunkStream, widget: bool) -> Any:
        """Stream into a live view (or plain text) and return the joined result."""
        from .streaming import StreamConsumer
        from .widgets import PlainStream, StreamView, route_stop_clicks

        model = self.model
        consumer = model.last_stream = StreamConsumer(PlainStream(), rate=model.stream_rate,
                                                      describe=model.host.describe_error)
        if widget:
            # Shown before the first chunk, so the first update carries only text.
            from .widgets import show

            consumer.sink = StreamView()
            route_stop_clicks(consumer.sink, consumer.request_stop)
            consumer.sink.handle = show(consumer.sink)
        if stream.is_async:
            try:
                model.runner.run(consumer.consume_async(stream))
            except KeyboardInterrupt:
                consumer.outcome = "interrupted"
        else:
            consumer.consume_sync(stream)
        if consumer.outcome == "interrupted":
            raise KeyboardInterrupt
        if consumer.outcome == "error":
            raise model.user_error(consumer.error) from None
        if consumer.chunks and truss_refuses_chunk(consumer.chunks[0]):
            consumer.truss_issue = type(consumer.chunks[0]).__name__
        return model.run(join_chunks, consumer.chunks)

    def _warn_if_truss_would_refuse(self, result: Any, streamed: bool) -> None:
        model = self.model
        if streamed:
            kind = getattr(model.last_stream, "truss_issue", None)
            if kind and "stream" not in model.warned:
                model.warned.add("stream")
                print(f"warning: predict streams {kind} chunks. kernel-magics serve sends them as JSON lines, but "
                      "Truss's own server streams only str or bytes and would cut the response off after the "
                      "headers. Yield text instead, for example `yield json.dumps(chunk) + \"\\n\"`.")
            return
        where = model.host.last_raw_issue
        if where and "result" not in model.warned:
            model.warned.add("result")
            print(f"warning: Truss's own server could not send this result: {where} is not JSON it can encode "
                  "(kernel-magics serve sends it, a deployment on Baseten would answer 500). Convert it before "
                  "returning, for example with .item(), bool(...) or .tolist().")


def _response_value(response: Any) -> Any:
    body = bytes(getattr(response, "body", b"") or b"")
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")


_PLANNING_BOUND = 60.0  # seconds an execution waits at most for the planning (a value's own pickling code could hang)


def wait_for_spare_planning() -> None:
    """IPython's ``pre_execute``: an execution first waits for the thread that plans the next export's spare after
    %model_load. That thread reads the notebook's values (it pickles them to plan and save them); a cell running
    meanwhile could change them under it, or use an object that is not thread-safe (a fast tokenizer raises
    "Already borrowed"). So it runs while the kernel is idle, the time a user takes to type the next cell, and a
    cell that comes sooner (Run All) waits, as %model_load itself waited before; %model_export then finds the spare."""
    spare_check = sys.modules.get("kernel_magics.core.spare_check")  # (none before the first %model_load)
    if spare_check is not None:
        spare_check.settled(_PLANNING_BOUND)
