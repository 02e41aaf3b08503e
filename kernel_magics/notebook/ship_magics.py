"""``%model_show``, ``%model_export`` and ``%model_serve``: the Truss directory and the HTTP API, from the kernel."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from ..core.errors import in_words
from ..core.ports import port_number
from ..core.runtime import ModelState
from .magics import ModelMagics, allows_comment, parse_arguments, unquote

__all__ = ["ShipMagics"]


def _unchecked_failed_load(host, replay: bool, again: str) -> str:
    """What an export whose check never loaded the model must say when the kernel's last load did not finish."""
    from ..core.errors import SecretNotFound

    error = host.error
    unchecked = ("the export's check did not load it (it loads only to replay predictions, and --no-replay skipped "
                 "them)" if not replay else "with no prediction to replay, the export's check did not load it")
    if isinstance(error, KeyboardInterrupt):
        return (f"the model's last %model_load was interrupted, and {unchecked}: run %model_load to the end and a "
                f"%model_predict, then {again}, to have the export prove it loads.")
    if isinstance(error, SecretNotFound):
        return (f"the model's last %model_load failed for a secret the kernel has no value for "
                f"({host.describe_error(error)}), and {unchecked}. A deployment provides its secrets, so it may load "
                f"there: give the kernel the value (%model_secret NAME), run %model_load and a %model_predict, then "
                f"{again}, to have the export prove it.")
    return (f"the model's last %model_load failed ({host.describe_error(error)}), and {unchecked}: served, this "
            f"directory will likely fail to load too. Fix load(), run %model_load and a %model_predict, then {again}.")


def _load_place(loaded: float) -> str:
    """Where a %model_load ran (ModelMagics.loaded_at): its cell, or, run outside the history (the lab panel's
    command, N.5), before which cell."""
    if loaded == int(loaded):
        return f"cell {int(loaded) + 1}"
    return f"outside the notebook's cells, before cell {int(loaded) + 2}"


def _global_names(code) -> set:
    """The names a function's code (its nested functions and comprehensions included) looks up as globals or
    attributes: a superset of the globals it reads, enough to tell which notebook names it may read."""
    names, stack = set(), [code]
    while stack:
        current = stack.pop()
        names.update(current.co_names)
        stack.extend(c for c in current.co_consts if hasattr(c, "co_names"))
    return names


# (A user who just ran %model_predict, on another input, read "Run %model_predict again" as done: the record keeps
# every input's latest answer, so it is that input that must be predicted again.)
_PREDICT_IT_AGAIN = ("Predict that input again (%model_predict with the same input: its latest answer replaces the "
                     "one recorded; `%model_predict --again` predicts every recorded input again; running the %%model "
                     "cell again clears the record)")


def _named_change(changes):
    """The change to name to a user among ``changes`` of one name (in notebook order): a method called on what
    holds it (`opt.step()`) before the statement that handed it over, else the first."""
    from ..core.source import named_through

    changes = list(changes)
    return named_through([c for c in changes if c.kind == "through"]) or next(
        (c for c in changes if c.kind != "through"), None)


@magics_class
class ShipMagics(Magics):
    """%model_show, %model_export, %model_serve."""

    def __init__(self, shell, model: ModelMagics) -> None:
        super().__init__(shell)
        self.model = model

    def _materialize(self, replay: bool = True):
        from ..core.export import materialize

        model = self.model
        return model.run(materialize, model.cells, model.host.config, model.host.base_dir, model.notebook_name,
                         live=self.shell.user_ns, record=model.record, replay=replay)

    @magic_arguments()
    @argument("file", nargs="?", default="model.py", choices=["model.py", "config.yaml"], help="Which file to show.")
    @argument("--why", action="store_true",
              help="List every name model.py includes, the reference that pulled it in, and how it travels "
                   "(source, or a value saved from the kernel and in which format).")
    @line_magic
    @allows_comment
    def model_show(self, line: str):
        """Show the model.py or config.yaml that an export would write, syntax-highlighted.

            %model_show
            %model_show config.yaml
            %model_show --why
        """
        from ..core.export import batching_tail, find_secret

        args = parse_arguments(self.model_show, line)
        result = self._materialize()
        secrets = self.model.host.secrets
        # A secret in what an export would write is shown as *** and named (never its value): the
        # export refuses it, and this output is saved with the notebook.
        refusal = find_secret(result, secrets.scanner())
        if refusal:
            print(f"warning: {refusal}")
        if args.why:
            print(secrets.redact(result.source.why()))
            return None
        from IPython.display import Code, display

        if args.file == "config.yaml":
            display(Code(secrets.redact(result.config_yaml), language="yaml"))
        else:
            display(Code(secrets.redact(result.source.text + batching_tail(result.config)), language="python"))
        for warning in result.warnings:
            print(f"warning: {warning}")
        return None

    @magic_arguments()
    @argument("dir", help="Directory to write the Truss to.")
    @argument("--force", action="count", default=0,
              help="Replace DIR when an earlier export made it (this notebook's own, unchanged since, is replaced "
                   "without it; never a folder holding the notebook); twice to replace it even with files the "
                   "export did not write (never a .git).")
    @argument("--data", action="append", default=[], metavar="PATH", help="A file or folder to copy into data/ (repeatable).")
    @argument("--no-replay", action="store_true",
              help="Skip replaying the notebook's recorded predictions against the export (it is then not checked "
                   "to answer as the notebook did).")
    @line_magic
    @allows_comment
    def model_export(self, line: str):
        """Export the model as a deployable Truss directory (config.yaml, model/model.py, data/, packages/).

        Values the notebook computed (a fitted pipeline, changed weights, a filled dict) travel with
        it as files under data/. The directory is written atomically and only after it imported,
        loaded and answered the notebook's recorded predictions in a fresh Python process.

            %model_export ./tiny-chargen --force
        """
        args = parse_arguments(self.model_export, line)
        target = Path(os.path.expanduser(unquote(args.dir)))
        if not target.is_absolute():
            target = Path.cwd() / target  # as the user typed it: relative to where the kernel is now
        self._export(target, force=args.force, data=[Path(unquote(p)) for p in args.data], replay=not args.no_replay)
        return None

    def _export(self, target: Path, *, force: int, data: list, replay: bool, quiet: bool = False):
        from ..core.export import export_model

        model = self.model
        host = model.host
        model.wait_for_background_load()
        started = time.perf_counter()
        materialized = self._materialize(replay)  # (what only the replay can prove is refused without it)
        self._refuse_changes_after_load(materialized.source)
        self._refuse_what_load_read_before_a_change(materialized.source)
        analysis = time.perf_counter() - started
        secrets = {n: host.secrets[n] for n in host.config.secret_names if host.secrets.source_of(n)}
        result = model.run(
            export_model, target, materialized, base_dir=host.base_dir, data=data, force=force,
            protected=[host.base_dir], secrets=secrets, secret_values=host.secrets.known_values(), replay=replay,
            explain_mismatch=lambda index: self._explain_mismatch(materialized, index), origin=model.export_origin,
        )
        result.timings["analysis"] = analysis
        model.last_export_timings = result.timings
        for warning in result.warnings:
            print(f"warning: {warning}")
        if not result.replayed and host.state is ModelState.FAILED and host.error is not None:
            # The check loads the model only to replay predictions: with none, this load was never tried on it.
            print(f"warning: {_unchecked_failed_load(host, replay, 'run %model_serve again' if quiet else 'export again')}")
        if quiet:
            print(result.replay_note)
            return result
        replacing = " (replacing the earlier export there)" if result.replaced else ""
        print(f"Exported `{host.config.model_class_name}` as a Truss{replacing}:")
        print(result.tree())
        values = [i for i in (result.source or materialized.source).included if i.travels == "value"]
        if values:
            print(f"Notebook values saved with it: {', '.join(f'`{i.name}` ({i.how})' for i in values)}; "
                  "%model_show --why says why.")
        print(result.replay_note)
        model.last_export = result.target
        model.frontend.exported(result.replayed)  # publishes; the lab notification says how many replayed
        return result

    def _refuse_changes_after_load(self, source) -> None:
        """A global that load() changes travels as it was before the load, so that the deployment's load() starts
        where the notebook's started. One that a cell changed again after %model_load (its value is not the one
        load left, or cannot be measured, and a later cell changes it or hands it to a function) has a value no
        deployment can reach (it runs load() alone): refused, naming the cell, before the check (whose replay
        might not read the change). What predict changes since (a cache) is no cell's: the replay judges."""
        from ..core.load_snapshot import changed_since_load, where_load_changes

        model, live = self.model, self.shell.user_ns
        if not model.loaded_at:
            return
        loaded = model.loaded_at[-1]
        for name in changed_since_load(live, (inc.name for inc in source.included)):
            later = [c for c in source.changes.get(name, []) if c.cell > loaded and c.kind not in ("alias", "held")]
            change = _named_change(later) or next((c for c in later if c.kind == "through"), None)
            if change is None:
                continue
            raise UsageError(
                f"`{name}` is changed by load() ({where_load_changes(live, name)}) and again after %model_load ran "
                f"({_load_place(loaded)}): {change.describe()}. A deployment runs load() alone, starting from the "
                f"value the notebook had before its load, so it would not have that change. Run %model_load again "
                f"after that cell (load() then starts from the value as the notebook has it now), %model_predict again "
                f"for the inputs recorded before it (they answered from the old value), then export again; or make "
                f"the change before %model_load, or inside load(). Nothing was exported.")

    def _refuse_what_load_read_before_a_change(self, source) -> None:
        """load() read a value a cell changed since (`self.t = CONFIG['threshold']`, then `CONFIG['threshold'] =
        2.5`): the notebook's loaded model answers from the old value, the export's load() reads the new one. A
        new user's replay passed by chance (no recorded input crossed the threshold) and the deployment answered
        otherwise: refused whether or not a recorded answer shows it."""
        stale = self._read_by_load_and_changed_before(source, len(self.model.cells) + 1, in_sight=True)
        if stale is None:
            return
        load_cell, names = stale
        one = len(names) == 1
        raise UsageError(
            f"{in_words(names)} changed after %model_load ran ({_load_place(load_cell)}), and load() reads "
            f"{'it' if one else 'them'}: the notebook's loaded model still holds what its load() read then, while "
            f"the export's load() reads the value as it is now, so the two would answer differently. Run %model_load "
            f"again (then `%model_predict --again` records the answers of the model as it is now), then export again. "
            f"Nothing was exported.")

    def _explain_mismatch(self, materialized, index: int) -> "Optional[MismatchHint]":
        """The most likely reason a replayed answer differs, from what the kernel knows."""
        model = self.model
        recorded_at = model.recorded_cell_count(index)
        source = materialized.source
        if recorded_at is not None:
            # Every name that changed since, not the first: a user who fixes one would meet the next refusal.
            # (recorded_at is the index of the cell that made the prediction: a cell runs before it is kept.)
            from ..core.export import MismatchHint

            causes = []
            for inc in source.included:
                if inc.kind == "import" and inc.travels == "source":
                    continue  # `torch.no_grad()` changes nothing the export carries: torch is imported afresh
                cell, text = source.redefined.get(inc.name, (-1, ""))
                change = _named_change(c for c in source.changes.get(inc.name, []) if c.cell > recorded_at)
                if cell > recorded_at:
                    causes.append((cell, f"`{inc.name}` (cell {cell + 1} defines it again: `{text}`)"))
                elif change is not None:
                    causes.append((change.cell, f"`{inc.name}` ({change.describe()})"))
            reloaded = model.loaded_again_after(index)
            # A prediction made before %model_load ran again answered from what an earlier load() made (a hot
            # swap that changed load() warns that the live instance keeps it until then).
            again = ""
            if reloaded is not None:
                place = _load_place(reloaded)
                again = (f"%model_load ran again {'in ' if place.startswith('cell') else ''}{place}, after this "
                         "prediction was recorded: the notebook answered from what an earlier load() made, the export "
                         "from a fresh load()")
            if causes:
                causes = [text for _, text in sorted(causes, key=lambda cause: cause[0])]
                one = len(causes) == 1
                return MismatchHint(
                    f"{in_words(causes)} changed after this prediction was recorded; the export carries "
                    f"{'its value' if one else 'their values'} now" + (f". Also, {again}" if again else ""),
                    f"{_PREDICT_IT_AGAIN} to record answers for the current values, then export again")
            if again:
                return MismatchHint(again[0].upper() + again[1:], f"{_PREDICT_IT_AGAIN} to record answers of the "
                                    "model as it is loaded now, then export again")
            swapped = model.host.swapped_since_load
            if swapped:
                # (the hot swap warned when it happened; this is the export's turn)
                what = " and ".join(f"`{n}`" for n in swapped)
                return MismatchHint(
                    f"the %%model cell ran again with another {what} after %model_load: the notebook's live model "
                    f"still holds what the old {what} made, the export runs the new one",
                    "Run %model_load again (and %model_predict again for the inputs recorded before it), then export "
                    "again")
            stale = self._read_by_load_and_changed_before(source, recorded_at)
            if stale is not None:
                load_cell, names = stale
                one = len(names) == 1
                return MismatchHint(
                    f"{in_words(names)} changed after %model_load ran ({_load_place(load_cell)}) and before this "
                    f"prediction was recorded, and load() reads {'it' if one else 'them'}: the notebook's model still "
                    f"holds what its load() read then, the export's load() reads the value as it is now",
                    "Run %model_load again (and %model_predict again for the inputs recorded before it), then export "
                    "again")
        replaced = self._holding_replaced_definitions(materialized)
        if replaced:
            from ..core.export import MismatchHint

            causes = []
            for reason in dict.fromkeys(replaced.values()):
                names = [f"`{n}`" for n, r in replaced.items() if r == reason]
                causes.append(f"{' and '.join(names)} {'hold' if len(names) > 1 else 'holds'} {reason}")
            return MismatchHint("; ".join(causes), "Run the cell that makes "
                                + " and ".join(f"`{n}`" for n in replaced) + " again, then export again")
        if source.unproven:
            # Re-run from source with no live value to compare (the value a name had before a later cell bound it
            # again, read by a default or a class body then; a name deleted since): only the replay could judge.
            from ..core.export import MismatchHint

            names = ", ".join(f"`{n}`" for n in source.unproven)
            return MismatchHint(
                f"model.py re-runs the statement that set {names} as the model read "
                f"{'it' if len(source.unproven) == 1 else 'them'} (before a later cell bound the name again, or "
                "deleted it), with no live value to compare, and running it again may give another value "
                "(randomness, files, the environment)",
                "Give the later binding another name (or run the cell that sets it again), then export again")
        # What travels as source was verified against the live values (core/verification.py), and the
        # export names what it measured differently before asking here: no guess at the source names.
        return None

    def _holding_replaced_definitions(self, materialized) -> dict[str, str]:
        """The values that hold a notebook class or function a cell defined again with other code since: name -> what
        the strict check says they hold (allowed while predictions were recorded: the replay judges). Saved ones, and
        those re-run from source (`s = S()` before `class S` was edited: an instance compares by its attributes, and
        the fresh process found them the same)."""
        from ..core import notebook_pickle

        live = self.shell.user_ns
        source = materialized.source
        found: dict[str, str] = {}
        for inc in source.included:
            if inc.kind in ("import", "model") or inc.name not in live:
                continue
            # (re-run from source after an earlier definition model.py holds too, it holds that one there as well)
            replaced = source.replaced if inc.travels != "source" else {
                name: edited for name, edited in source.replaced.items() if name not in source.earlier_held}
            try:
                notebook_pickle.references(live[inc.name], live, saving=inc.name, replaced=replaced)
            except notebook_pickle.CannotPickle as exc:
                if exc.superseded:
                    found[inc.name] = exc.reason.removeprefix("it holds ")
        return found

    def _read_by_load_and_changed_before(self, source, recorded_at: int, in_sight: bool = False):
        """``(cell of the load, causes)``: what the model's load() reads (in its own code, or a notebook function
        it calls) that a cell changed after the last %model_load before the prediction in cell ``recorded_at``, and
        before that prediction (`THRESH = 0.9` after a load() that did `self.th = THRESH`); else None. ``in_sight``:
        only a binding or a change the cells show (`CONFIG['t'] = 2.5`), not a call the name was passed to
        (`json.dump(CONFIG, f)` changes nothing)."""
        model = self.model
        load_cell = next((cell for cell in reversed(model.loaded_at) if cell < recorded_at), None)
        load = getattr(model.host.model_class, "load", None)
        code = getattr(load, "__code__", None)
        if load_cell is None or code is None:
            return None
        read = set(_global_names(code))
        for name in list(read):  # a notebook function load() calls: what it reads counts too
            helper = getattr(self.shell.user_ns.get(name), "__code__", None)
            if helper is not None and getattr(self.shell.user_ns[name], "__module__", None) == "__main__":
                read.update(_global_names(helper))
        causes = []
        for inc in source.included:
            if inc.name not in read or inc.kind == "import" and inc.travels == "source":
                continue
            cell, text = source.redefined.get(inc.name, (-1, ""))
            change = _named_change(c for c in source.changes.get(inc.name, []) if load_cell < c.cell < recorded_at
                                   and (not in_sight or c.kind in ("rebind", "into", "method")))
            if load_cell < cell < recorded_at:
                causes.append((cell, f"`{inc.name}` (cell {cell + 1} defines it again: `{text}`)"))
            elif change is not None:
                causes.append((change.cell, f"`{inc.name}` ({change.describe()})"))
        if not causes:
            return None
        return load_cell, [text for _, text in sorted(causes, key=lambda cause: cause[0])]

    # ------------------------------------------------------------------ serve the live model

    @magic_arguments()
    @argument("--port", type=port_number, default=8080, help="Port on 127.0.0.1 (default 8080; 0 picks a free one).")
    @argument("--engine", choices=["kernel", "ray"], default="kernel",
              help="kernel (default): the live model, served from this kernel (hot reloads apply at once). "
                   "ray: export the model to a temporary directory (every check of %%model_export) and serve "
                   "that on Ray Serve in a separate process.")
    @argument("--replicas", type=int, default=1, help="With --engine ray: how many replicas (default 1).")
    @argument("--address", default=None, help="With --engine ray: join this Ray cluster (its GCS host:port) "
                                              "instead of starting a local Ray.")
    @argument("--stop", action="store_true", help="Stop the server this notebook started.")
    @line_magic
    @allows_comment
    def model_serve(self, line: str):
        """Serve the notebook model over Truss's HTTP API on 127.0.0.1, in the background; returns its
        base URL (``url = %model_serve --port 0``).

        By default the live model is served from the kernel: hot reloads take effect on the next
        request, and the kernel stays usable. ``--engine ray`` serves an export of the model as it
        is now on Ray Serve (hot reloads need a new %model_serve).

            %model_serve --port 8080
            !curl -s -X POST localhost:8080/v1/models/model:predict -d '{"x": 1}'
            %model_serve --stop
            %model_serve --engine ray --replicas 2 --port 8000
        """
        args = parse_arguments(self.model_serve, line)
        model = self.model
        current = model.server
        if args.stop:
            if current is None:
                print("No model server is running.")
                return None
            current.stop()
            model.server = None
            model.frontend.publish()  # the lab panel drops the URL
            print(f"Stopped the model server on port {current.port}.")
            return None
        if current is not None:
            raise UsageError(f"The model is already served on port {current.port}; run %model_serve --stop first.")
        if args.engine != "ray" and (args.replicas != 1 or args.address):
            raise UsageError("--replicas and --address need --engine ray (the kernel serves one model).")
        if args.replicas < 1:
            raise UsageError(f"--replicas must be 1 or more, not {args.replicas}.")
        if not args.address:  # on a cluster, the port is its Serve's proxy's
            _check_port_free(args.port)
        served = self._serve_on_ray(args) if args.engine == "ray" else self._serve_in_kernel(args.port)
        model.server = served
        model.frontend.publish()  # the lab panel shows the URL
        url = f"http://127.0.0.1:{served.port}"
        if args.engine == "ray":
            print(f"Serving an export of the notebook model on Ray Serve ({args.replicas} replica(s)) at "
                  f"{url}/v1/models/model:predict. It does not follow hot reloads: run %model_serve --stop and "
                  "%model_serve again after changing the model.")
        else:
            state = ("" if model.host.state is ModelState.READY
                     else f" (the model is {model.host.state.value}: predictions answer 503 until %model_load)")
            print(f"Serving the notebook model at {url}/v1/models/model:predict{state}. "
                  "Stop it with %model_serve --stop.")
        model.hide_result(url)
        return url  # `url = %model_serve --port 0` gives the address to talk to

    def _serve_in_kernel(self, port: int) -> "_InKernel":
        model = self.model
        try:
            import uvicorn

            from ..serving.server import create_app, uvicorn_config
        except ImportError as exc:
            raise UsageError(f"%model_serve needs the server, which is not installed ({exc.name} is missing). "
                             "Install it with `pip install 'kernel-magics[serve]'`.") from None
        app = create_app(model.host)
        # log_config=None: uvicorn's logs go through logging, not into whichever cell runs.
        server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, log_level="warning", log_config=None))
        import logging

        logging.getLogger("kernel_magics.access").setLevel(logging.WARNING)  # no line per request in the notebook
        future = model.runner.submit(server.serve())
        deadline = time.monotonic() + 10
        while not server.started and not future.done() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not server.started:
            server.should_exit = True
            raise UsageError(f"The model server did not start on 127.0.0.1:{port}; pick another --port.")
        return _InKernel(server, future, server.servers[0].sockets[0].getsockname()[1])  # the port it bound

    def _serve_on_ray(self, args) -> "_OnRay":
        import importlib.util
        import shutil
        import tempfile

        from ..serving.background import ServeProcess, free_port

        if importlib.util.find_spec("ray") is None:
            raise UsageError("%model_serve --engine ray needs Ray Serve, which is not installed. Install it with "
                             "`pip install 'kernel-magics[ray]'`, or serve from the kernel without --engine.")
        model = self.model
        host = model.host
        temp = Path(tempfile.mkdtemp(prefix="km-model-serve-"))
        try:
            self._export(temp / "truss", force=False, data=[], replay=True, quiet=True)
            port = args.port or free_port()
            secrets = {n: host.secrets[n] for n in host.config.secret_names if host.secrets.source_of(n)}
            extra = ["--replicas", str(args.replicas), *(["--address", args.address] if args.address else [])]
            proc = ServeProcess.start(temp / "truss", extra, port=port,
                                      secrets=secrets, engine="ray")
            print(f"Starting Ray Serve with {args.replicas} replica(s) ...", flush=True)
            try:
                model.run(proc.wait_ready, 300)
            except BaseException:
                proc.stop()
                raise
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        return _OnRay(proc, temp)

def _check_port_free(port: int) -> None:
    from ..serving.background import first_free

    if port != 0 and first_free([port]) is None:
        raise UsageError(f"Port {port} on 127.0.0.1 is in use; pick another with --port.")


class _InKernel:
    """The live model, served by uvicorn on the kernel's runner loop."""

    def __init__(self, server, future, port: int) -> None:
        self.server, self.future, self.port = server, future, port

    def stop(self) -> None:
        self.server.should_exit = True
        try:
            self.future.result(timeout=35)
        except Exception:
            pass


class _OnRay:
    """An export of the model, served on Ray Serve by a `kernel-magics serve` child; its directory is temporary."""

    def __init__(self, proc, temp: Path) -> None:
        self.proc, self.temp, self.port = proc, temp, proc.port
        import atexit

        atexit.register(self.stop)  # a kernel that shuts down takes its deployment with it

    def stop(self) -> None:
        import shutil

        self.proc.stop()
        shutil.rmtree(self.temp, ignore_errors=True)
