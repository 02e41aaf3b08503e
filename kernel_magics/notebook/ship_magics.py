"""``%model_show``, ``%model_export`` and ``%model_serve``: the Truss directory and the HTTP API, from the kernel."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from ..core.runtime import ModelState
from .magics import ModelMagics, unquote

__all__ = ["ShipMagics"]


@magics_class
class ShipMagics(Magics):
    """%model_show, %model_export, %model_serve."""

    def __init__(self, shell, model: ModelMagics) -> None:
        super().__init__(shell)
        self.model = model

    def _materialize(self):
        from ..core.export import materialize

        model = self.model
        return model.run(materialize, model.cells, model.host.config, model.host.base_dir, model.notebook_name,
                         live=self.shell.user_ns, record=model.record)

    @magic_arguments()
    @argument("file", nargs="?", default="model.py", choices=["model.py", "config.yaml"], help="Which file to show.")
    @argument("--why", action="store_true",
              help="List every name model.py includes, the reference that pulled it in, and how it travels "
                   "(source, or a value saved from the kernel and in which format).")
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
    @argument("--force", action="store_true",
              help="Replace DIR if an earlier export made it (never a folder holding the notebook or your files).")
    @argument("--data", action="append", default=[], metavar="PATH", help="A file or folder to copy into data/ (repeatable).")
    @argument("--no-replay", action="store_true",
              help="Skip replaying the notebook's recorded predictions against the export (it is then not checked "
                   "to answer as the notebook did).")
    @line_magic
    def model_export(self, line: str):
        """Export the model as a deployable Truss directory (config.yaml, model/model.py, data/, packages/).

        Values the notebook computed (a fitted pipeline, changed weights, a filled dict) travel with
        it as files under data/. The directory is written atomically and only after it imported,
        loaded and answered the notebook's recorded predictions in a fresh Python process.

            %model_export ./tiny-chargen --force
        """
        from ..core.export import export_model

        args = parse_argstring(self.model_export, line)
        model = self.model
        host = model.host
        model.wait_for_background_load()
        started = time.perf_counter()
        materialized = self._materialize()
        analysis = time.perf_counter() - started
        target = Path(os.path.expanduser(unquote(args.dir)))
        if not target.is_absolute():
            target = Path.cwd() / target  # as the user typed it: relative to where the kernel is now
        secrets = {n: host.secrets[n] for n in host.config.secret_names if host.secrets.source_of(n)}
        result = model.run(
            export_model, target, materialized, base_dir=host.base_dir,
            data=[Path(unquote(p)) for p in args.data], force=args.force, protected=[host.base_dir],
            secrets=secrets, secret_values=host.secrets.known_values(), replay=not args.no_replay,
            explain_mismatch=lambda index: self._explain_mismatch(materialized, index),
        )
        result.timings["analysis"] = analysis
        model.last_export_timings = result.timings
        for warning in result.warnings:
            print(f"warning: {warning}")
        print(f"Exported `{host.config.model_class_name}` as a Truss:")
        print(result.tree())
        values = [i for i in materialized.source.included if i.travels == "value"]
        if values:
            print(f"Notebook values saved with it: {', '.join(f'`{i.name}` ({i.how})' for i in values)}; "
                  "%model_show --why says why.")
        print(result.replay_note)
        model.last_export = result.target
        model.frontend.publish()
        return None

    def _explain_mismatch(self, materialized, index: int) -> Optional[str]:
        """The most likely reason a replayed answer differs, from what the kernel knows."""
        model = self.model
        recorded_at = model.recorded_cell_count(index)
        source = materialized.source
        if recorded_at is not None:
            for inc in source.included:
                changed_in = [c for c in source.changes.get(inc.name, []) if c.cell >= recorded_at]
                if changed_in:
                    return (f"`{inc.name}` changed after this prediction was recorded ({changed_in[0].describe()}); "
                            "the export carries its value now. Run %model_predict again to record answers for the "
                            "current values")
        candidates = [i.name for i in source.included if i.travels == "source" and i.kind in ("constant", "block")]
        if candidates:
            return (f"a value the notebook changed where kernel-magics cannot see it (inside a function, through "
                    f"another name): {', '.join(f'`{n}`' for n in candidates)} travel as source and are re-run from "
                    "their assignment. Change them at the top level of a cell, or build them inside load()")
        return None

    # ------------------------------------------------------------------ serve the live model

    @magic_arguments()
    @argument("--port", type=int, default=8080, help="Port on 127.0.0.1 (default 8080; 0 picks a free one).")
    @argument("--stop", action="store_true", help="Stop the server this notebook started.")
    @line_magic
    def model_serve(self, line: str):
        """Serve the live notebook model over Truss's HTTP API on 127.0.0.1, in the background; returns its
        base URL (``url = %model_serve --port 0``).

        Hot reloads take effect on the next request; the kernel stays usable.

            %model_serve --port 8080
            !curl -s -X POST localhost:8080/v1/models/model:predict -d '{"x": 1}'
            %model_serve --stop
        """
        args = parse_argstring(self.model_serve, line)
        model = self.model
        current = model.server
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
            model.server = None
            print(f"Stopped the model server on port {port}.")
            return None
        if current is not None:
            raise UsageError(f"The model is already served on port {current[2]}; run %model_serve --stop first.")
        _check_port_free(args.port)
        try:
            import uvicorn

            from ..serving.server import create_app, uvicorn_config
        except ImportError as exc:
            raise UsageError(f"%model_serve needs the server, which is not installed ({exc.name} is missing). "
                             "Install it with `pip install 'kernel-magics[serve]'`.") from None
        app = create_app(model.host)
        # log_config=None: uvicorn's logs go through logging, not into whichever cell runs.
        server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", args.port, log_level="warning", log_config=None))
        import logging

        logging.getLogger("kernel_magics.access").setLevel(logging.WARNING)  # no line per request in the notebook
        future = model.runner.submit(server.serve())
        deadline = time.monotonic() + 10
        while not server.started and not future.done() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not server.started:
            server.should_exit = True
            raise UsageError(f"The model server did not start on 127.0.0.1:{args.port}; pick another --port.")
        port = server.servers[0].sockets[0].getsockname()[1]  # the one it bound (--port 0 picks one)
        model.server = (server, future, port)
        state = ("" if model.host.state is ModelState.READY
                 else f" (the model is {model.host.state.value}: predictions answer 503 until %model_load)")
        print(f"Serving the notebook model at http://127.0.0.1:{port}/v1/models/model:predict{state}. "
              "Stop it with %model_serve --stop.")
        model.hide_result(url := f"http://127.0.0.1:{port}")
        return url  # `url = %model_serve --port 0` gives the address to talk to


def _check_port_free(port: int) -> None:
    import socket

    if port == 0:
        return
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise UsageError(f"Port {port} on 127.0.0.1 is in use; pick another with --port.") from None
