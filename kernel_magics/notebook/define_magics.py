"""``%%model_config`` and ``%%model``: the config and the class, with hot reload."""

from __future__ import annotations

import time
from typing import Optional

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_cell_magic, magics_class

from ..core.config import parse_config
from ..core.errors import KernelMagicsError
from .magics import ModelMagics, allows_comment

__all__ = ["DefineMagics"]

_MISSING = object()


@magics_class
class DefineMagics(Magics):
    """%%model_config and %%model."""

    def __init__(self, shell, model: ModelMagics) -> None:
        super().__init__(shell)
        self.model = model

    def _compile_cell(self, magic_line: str, body: str):
        """Compile a cell body so tracebacks say ``Cell In[N], line L`` with the cell's own line numbers."""
        # IPython bumps execution_count before it runs a cell, so the running cell is In[count - 1].
        number = max(self.shell.execution_count - 1, 0)
        filename = self.shell.compile.cache(f"{magic_line}\n{body}", number)
        return compile("\n" + body, filename, "exec")  # the body starts on the cell's second line

    @line_cell_magic
    @allows_comment
    def model_config(self, line: str, cell: Optional[str] = None):
        """Set the model's config.yaml from YAML in the cell; on a line, show the current config.

        Field names are Truss's: model_name, model_class_name, requirements,
        resources (accelerator, cpu, memory), secrets (names only, null values),
        environment_variables, model_metadata, data_dir, runtime.predict_concurrency ...
        ``%model_config --all`` shows the defaults too.

            %%model_config
            model_name: tiny-chargen
            requirements: [torch]
            secrets: {hf_access_token: null}
        """
        host = self.model.host
        if cell is None:
            from IPython.display import Code, display

            if line.strip() not in ("", "--all"):
                raise UsageError(f"Unknown argument {line.strip()!r}: %model_config shows the config; --all adds "
                                 "the defaults.")
            display(Code(host.config.to_yaml(verbose=line.strip() == "--all") or "{}\n", language="yaml"))
            return None
        if line.strip():
            raise UsageError(f"%%model_config takes no arguments (got {line.strip()!r}): the cell's YAML is the whole "
                             "config. The previous config stays in effect.")
        notes: list[str] = []
        try:
            config = parse_config(cell, source="%%model_config cell", line_offset=1, warnings=notes)
        except KernelMagicsError as exc:
            raise UsageError(f"{exc} The previous config stays in effect.") from None
        host.config = config
        self.model.config_cell = cell
        self.model.frontend.publish()
        secrets = ", ".join(f"{n} ({'set' if host.secrets.source_of(n) else 'not set'})" for n in config.secret_names)
        name = config.model_name or "(no model_name)"
        print(f"Config set for {name}; class {config.model_class_name}" + (f"; secrets: {secrets}" if secrets else "") + ".")
        for note in notes:
            print(f"note: {note}")
        if "data_dir" in config.model_fields_set and not host.data_dir.is_dir():
            # Not an error: a later cell may make it. But a typo would otherwise show only as load()'s FileNotFoundError.
            print(f"note: data_dir {config.data_dir!r} does not exist ({host.data_dir}); the model's data_dir points "
                  "there, and an export copies it from there. Create it, or fix the path.")
        return None

    @cell_magic
    @allows_comment
    def model(self, line: str, cell: str):
        """Define the model class (a Truss ``Model``) from the cell.

        The class is named by model_class_name in the config (default ``Model``)
        and needs ``predict(self, model_input)``; ``__init__(**kwargs)`` and
        ``load(self)`` are optional. Re-running the cell while the model is loaded
        swaps the live instance's code and keeps its loaded state. An error keeps
        the previous model active. During a background load, it waits for the load.

            %%model
            class Model:
                def load(self):
                    self.scale = 2
                def predict(self, model_input):
                    return {"y": model_input["x"] * self.scale}
        """
        if line.strip():
            raise UsageError(f"%%model takes no arguments (got {line.strip()!r}); the cell is the model class.")
        host = self.model.host
        name = host.config.model_class_name
        had_model = host.model_class is not None
        keep = " The previous model stays active." if had_model else ""
        try:
            code = self._compile_cell("%%model", cell)
        except SyntaxError as exc:
            text = f": {exc.text.strip()}" if exc.text and exc.text.strip() else ""
            raise UsageError(
                f"Syntax error in the %%model cell, line {exc.lineno}: {exc.msg}{text}. Fix it and run the cell again.{keep}"
            ) from None
        self.model.wait_for_background_load()  # a definition applies to what the load made, never half-way
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
            if had_model:  # (Python 3.10 has no add_note; IPython shows __notes__ all the same)
                exc.__notes__ = [*getattr(exc, "__notes__", []), "The previous model stays active."]
            raise self.model.user_error(exc) from None
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
            report = host.define(cls)
        except KernelMagicsError as exc:
            restore()
            raise UsageError(f"{exc}{keep}") from None
        self.model.model_cell = cell
        self.model.new_definition()
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
            spec = host.contract.predict
            kind = ("async " if spec.is_async else "") + ("generator " if spec.is_generator else "")
            what = f"batched: {kind}predict_batch" if host.contract.predict_batch else f"{kind}predict"
            print(f"Model `{name}` defined ({what}). Run %model_load to load it.")
        if host.contract.predict.is_generator and host.contract.postprocess is not None:
            # Truss accepts the class and refuses each request (ModelDefinitionError, HTTP 412): said here, once.
            print(f"warning: `{name}.predict` streams (it yields), and Truss cannot postprocess a stream, so every "
                  "predict will fail, here and when served. Drop postprocess and do that work in predict.")
        return None
