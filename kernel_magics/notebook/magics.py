"""IPython magics: thin adapters from notebook cells to the core, split by concern as IPython splits its own.

``ModelMagics`` holds the notebook's session (the ModelHost, the executed cells,
the recorded predictions, the live views' settings) and the small magics
(status, secret, unload); :mod:`.define_magics`, :mod:`.run_magics` and
:mod:`.ship_magics` hold the others and share this session. Our errors become
one-line ``UsageError`` messages; a user's own exception keeps its type and
shows only the user's frames, with every secret value redacted.
"""

from __future__ import annotations

import functools
import getpass
import os
import sys
import traceback
import uuid
from pathlib import Path
from typing import Any, Optional

from traitlets import Bool, Enum, Float, TraitError, observe, validate

from IPython.core.error import StdinNotImplementedError, UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from ..core.errors import KernelMagicsError
from ..core.loop import BackgroundLoop
from ..core.magic_line import strip_comment
from ..core.replay import PredictionRecord
from ..core.runtime import ModelHost, clear_traceback, release_frames
from ..core.secrets import ENV_PREFIX, SecretStore
from ..core.source import split_cell_magic
from ..core.tracebacks import user_traceback

__all__ = ["ModelMagics", "unquote", "allows_comment", "parse_arguments", "no_arguments"]


def unquote(text: str) -> str:
    """IPython's argument splitting keeps quotes (``%model_export "my dir"``); drop a matching pair."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


def parse_arguments(magic, line: str):
    """``parse_argstring``, with a line it cannot split (a quote never closed) as a one-line UsageError."""
    try:
        return parse_argstring(magic, line)
    except UsageError as exc:  # argparse's words ("the following arguments are required: dir"): add the usage
        from ..core.suggest import did_you_mean

        usage = " ".join(magic.parser.format_usage().replace("::", "").split())  # IPython's usage is reST
        usage = usage.replace("usage: ", "").replace("[-h] ", "")
        name = usage.split()[0]
        said = str(exc).rstrip(".")
        if said.startswith("unrecognized arguments: "):  # `--devise cpu`: did you mean --device?
            known = [o for o in magic.parser._option_string_actions if o not in ("-h", "--help")]
            said += did_you_mean(said.removeprefix("unrecognized arguments: ").split(), known)
        raise UsageError(f"{said}. Usage: {usage} ({name}? says more).") from None
    except ValueError as exc:
        raise UsageError(f"Cannot read the arguments {line.strip()!r}: {str(exc).lower()}. Close the quote (a path "
                         "with a space is written \"my dir\"), or drop it.") from None


def no_arguments(name: str, line: str) -> None:
    """A magic that takes no arguments refuses them instead of ignoring them."""
    if line.strip():
        raise UsageError(f"%{name} takes no arguments (got {line.strip()!r}); see %{name}?.")


def allows_comment(magic):
    """Decorate a line magic (below ``@line_magic``) so a trailing ``# comment`` is not an argument,
    as ``%timeit x  # why`` users expect."""
    import functools

    @functools.wraps(magic)
    def wrapper(self, line: str, *rest: Any):
        return magic(self, strip_comment(line), *rest)

    return wrapper


def cells_before(shell: Any) -> list[str]:
    """The cells this kernel ran before the extension was loaded, from IPython's input history: cell N is In[N].
    The history holds a cell from the moment it starts: the one loading the extension, which record_cell keeps
    when it ends, is left out. A %%model or %%model_config cell among them defined no model of this extension's
    (none was loaded, or %reload_ext started a new one): kept empty, as record_cell keeps a failed one."""
    history = getattr(getattr(shell, "history_manager", None), "input_hist_raw", None)
    if not isinstance(history, list) or len(history) < 2:
        return []
    earlier = history[1:-1] if running_a_stored_cell(shell) else history[1:]
    return ["" if split_cell_magic(raw)[0] in ("model", "model_config") else raw for raw in earlier]


def _cell_label(shell: Any, filename: str) -> Optional[str]:
    """"Cell In[3]" for the file ipykernel compiled that cell as (IPython's own tracebacks say so), else None."""
    try:
        named = shell.compile.format_code_name(filename)
    except Exception:  # (a shell without IPython's caching compiler)
        return None
    return f"{named[0]} {named[1]}" if named else None


def running_a_stored_cell(shell: Any) -> bool:
    """Whether what runs now is a cell that has its In[N] (in the history already): not the kernel's start (the
    extension loaded with --ext), a silent request or one outside the history (the lab panel's commands)."""
    kernel = getattr(shell, "kernel", None)
    if kernel is None or not hasattr(kernel, "get_parent"):
        return True  # a terminal IPython: every cell is stored
    parent = kernel.get_parent() or {}
    content = parent.get("content") or {}
    return (parent.get("header", {}).get("msg_type") == "execute_request" and content.get("store_history", True)
            and not content.get("silent", False))


@magics_class
class ModelMagics(Magics):
    """The notebook's model session, and %model_status, %model_secret, %model_unload."""

    widgets = Enum(("auto", "always", "never"), "auto", help=(
        "Live widget views: auto (when a widget manager is likely, as in JupyterLab), always, or never (plain text)."
    )).tag(config=True)
    stream_rate = Float(30.0, help="Most widget or text updates a second while streaming.").tag(config=True)
    spare_checker = Bool(True, help=(
        "Start the next export's fresh Python after %model_load and after each export, so the export's proof does "
        "not wait for the model's imports (core/spare_check.py). Off: no process waits beside the kernel (it holds "
        "the model's libraries, torch's hundreds of MB included) and each export's check imports them itself; "
        "turned on again, from the next %model_load."
    )).tag(config=True)

    @observe("spare_checker")
    def _spare_checker_changed(self, change) -> None:
        spare_check = sys.modules.get("kernel_magics.core.spare_check")  # (none before the first %model_load)
        if spare_check is not None:
            spare_check.turn(change["new"])

    @validate("stream_rate")
    def _check_rate(self, proposal):
        if proposal["value"] <= 0:
            raise TraitError("stream_rate must be positive")
        return proposal["value"]

    def __init__(self, shell=None, **kwargs: Any) -> None:
        super().__init__(shell, **kwargs)
        self.host = ModelHost(secrets=SecretStore(hint="or run %model_secret {name} in this notebook"))
        self.host.code_label = functools.partial(_cell_label, shell)
        self.runner = BackgroundLoop()
        self.model_cell: Optional[str] = None  # source of the last good %%model cell
        self.config_cell: Optional[str] = None
        # Every executed cell, in order: what export analyses (as the CLI reads an .ipynb). The cells run before
        # %load_ext count too: a notebook may train its model first and load the extension later.
        self.cells: list[str] = cells_before(shell)
        # The current definition's successful predictions, replayed against every export;
        # recorded_at[i] is how many cells had run when prediction i was made.
        self.record = PredictionRecord()
        self.recorded_at: dict[int, int] = {}  # id of a recorded item -> cells run when it was made
        # cells run when each %model_load started (its cell's index; run_magics, as it takes the globals' snapshot)
        self.loaded_at: list[float] = []
        self.warned: set[str] = set()  # Truss-compatibility warnings given for this definition
        self.last_export: Optional[Path] = None
        self.last_stream = None  # the last StreamConsumer: its chunks stay reachable after an error or interrupt
        self.server: Optional[tuple] = None  # (uvicorn.Server, future, port) of %model_serve
        self.host.check_truss_compat = True
        self._hidden: Any = None
        self.running_cell = ""
        self._install_result_hider()
        from .redaction import install as redact_errors_and_logs

        # Every error the kernel sends and every log record, redacted (Jupyter saves str(exc)).
        if shell is not None:
            redact_errors_and_logs(shell, self.host.secrets.redact)
        from .frontend import FrontendChannel, model_status

        # The JupyterLab extension's view of the model: every host event, config,
        # definition, secret and export updates it.
        self.frontend = FrontendChannel(lambda: model_status(self))
        self.host.subscribe(lambda event: self.frontend.publish())
        self._health_poll = None
        self.host.subscribe(self._watch_health)

    # ------------------------------------------------------------------ what every magic shares

    def record_cell(self, result) -> None:
        """post_run_cell hook: keep the cell's source for export.

        A %%model or %%model_config cell that failed changed nothing, so it is
        kept empty (as is a cell that could not run); other cells count even when
        they failed part-way, since what they defined before the error is live.
        """
        self._hidden = None
        raw = result.info.raw_cell if result.info is not None else None
        if not raw:
            return
        if not getattr(result.info, "store_history", True) and all(
                line.lstrip().startswith("%model_") for line in raw.splitlines() if line.strip()):
            # A command of the lab panel (`%model_load --no-widget`, run outside the history): it defines nothing,
            # and it gets no In[N], so keeping it would shift every later "cell N" off the number the notebook shows.
            return
        if result.error_before_exec is not None or (split_cell_magic(raw)[0] in ("model", "model_config")
                                                    and not result.success):
            # Kept as an empty cell: "cell N" in what the user reads stays the In[N] the notebook shows.
            self.cells.append("")
            return
        self.cells.append(raw)

    def _watch_health(self, event) -> None:
        """A loaded model with is_healthy() is asked every 10 s, as Truss's readiness probe asks it,
        so %model_status and the JupyterLab panel show what a deployment's probe would."""
        if event.kind != "load_finished" or self.host.contract.is_healthy is None:
            return
        if self._health_poll is None or self._health_poll.done():
            self._health_poll = self.runner.submit(self._poll_health())

    async def _poll_health(self) -> None:
        import asyncio

        while self.host.contract is not None and self.host.contract.is_healthy is not None:
            await self.host.is_healthy()
            await asyncio.sleep(10)

    def _install_result_hider(self) -> None:
        """A streamed result was shown as it arrived: its Out[n] would show it twice. The display
        formatter gives that one object no output, while `_` and `r = %model_predict ...` still get it."""
        formatter = getattr(self.shell, "display_formatter", None)
        if formatter is None or getattr(formatter.format, "_kernel_magics", False):
            return
        original = formatter.format

        def format(obj, *args: Any, **kwargs: Any):
            if self._hidden is not None and obj is self._hidden[0]:
                self._hidden = None
                return {}, {}
            return original(obj, *args, **kwargs)

        format._kernel_magics = True
        formatter.format = format

    def hide_result(self, value: Any, *, always: bool = False) -> None:
        """Show ``value`` only once: the cell's result display skips it, if the cell ends with the
        predict itself (``r = %model_predict ...`` followed by ``r`` still shows ``r``)."""
        lines = [line for line in self.running_cell.strip().splitlines() if line.strip()]
        last = lines[-1].lstrip() if lines else ""
        if always or last.startswith("%model_predict") or self.running_cell.lstrip().startswith("%%predict"):
            self._hidden = (value,)

    def note_cell(self, info) -> None:
        """pre_run_cell hook: which cell runs (hide_result looks at its last line)."""
        self.running_cell = getattr(info, "raw_cell", "") or ""

    def new_definition(self) -> None:
        """A new %%model (or a hot reload) starts a new record of predictions."""
        self.record.clear()
        self.recorded_at.clear()
        self.warned.clear()

    def note_prediction(self, model_input: Any, value: Any, request: Optional[dict] = None) -> None:
        """Record a successful prediction (for replay), and when it was made; never one that holds a secret."""
        held = self.host.secrets.held_in(model_input, value, request)
        if held is not None:
            print(f"Not recorded for the export (replay, example input): this prediction holds the value of "
                  f"secret `{held}`, and secret values are never written to disk.")
            return
        if self.record.add(model_input, value, request=request) >= 0:
            self.recorded_at[id(list(self.record)[-1])] = len(self.cells)

    def recorded_cell_count(self, index: int) -> Optional[int]:
        items = list(self.record)
        return self.recorded_at.get(id(items[index])) if index < len(items) else None

    def loaded_again_after(self, index: int) -> Optional[float]:
        """The cell (its index) of the last load started in a later cell than recorded prediction ``index``:
        that prediction answered from what an earlier load() made, the export answers from a fresh one."""
        recorded_at = self.recorded_cell_count(index)
        if recorded_at is None:
            return None
        return next((cell for cell in reversed(self.loaded_at) if cell > recorded_at), None)

    def run(self, call, *args: Any, **kwargs: Any) -> Any:
        """Call the core; our errors become UsageError, the user's keep their type."""
        try:
            return call(*args, **kwargs)
        except KernelMagicsError as exc:
            raise UsageError(self.host.secrets.redact(str(exc))) from None
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            raise self.user_error(exc) from None

    def user_error(self, exc: BaseException) -> BaseException:
        """Make ``exc`` show the user's frames only, secrets redacted, then return it for raising."""
        redact = self.host.secrets.redact
        # The message itself is what Jupyter saves as the error's `evalue`: redact it at the source.
        try:
            exc.args = tuple(redact(a) if isinstance(a, str) else a for a in exc.args)
        except (AttributeError, TypeError):
            pass
        tb = user_traceback(exc.__traceback__)
        shell = self.shell
        # What it was raised from (predict_batch's own StopIteration, say), read now: the caller raises it `from
        # None`, which hides the chain from every later display.
        cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)

        def render() -> list[str]:
            if tb is None:
                # No frame of the user's (an error the runtime raised about the model's result, or an exception
                # instance predict_batch returned for one input): the message, after its cause from the user's
                # first frame on, without an empty "Traceback (most recent call last)" above it.
                lines = []
                if cause is not None:
                    lines += traceback.format_exception(type(cause), cause, user_traceback(cause.__traceback__),
                                                        chain=False)
                    lines.append("\nThe above exception was the direct cause of the following exception:\n")
                lines += traceback.format_exception_only(type(exc), exc)
                return [redact(line.rstrip("\n")) for line in lines]
            # (tb_offset 0: tb is what to show; the shell's own offset of 1, for its run_code frame, hid the only user
            # frame with IPython 8)
            shown = shell.InteractiveTB.structured_traceback(type(exc), exc, tb, tb_offset=0)
            return [redact(line) for line in shown]

        try:
            exc._render_traceback_ = render
        except AttributeError:  # an exception type without __dict__: show it in full
            pass
        return exc

    def use_widgets(self, no_widget: bool = False) -> bool:
        if no_widget or self.widgets == "never":
            return False
        if self.widgets == "always":
            return True
        from .widgets import frontend_has_widgets

        return frontend_has_widgets()

    def wait_for_background_load(self) -> None:
        if not self.host.loading:
            return
        print("Waiting for the background load to finish ...", flush=True)
        while not self.host.wait_load(0.1):
            pass

    def _session_path(self) -> Optional[str]:
        # Jupyter Server tells kernels which notebook they run for (VS Code sets a name in the namespace instead);
        # nbclient and consoles do neither.
        session = os.environ.get("JPY_SESSION_NAME") or self.shell.user_ns.get("__vsc_ipynb_file__")
        return session if isinstance(session, str) and session else None

    @property
    def notebook_name(self) -> str:
        session = self._session_path()
        return os.path.basename(session) if session else "a notebook"

    @property
    def export_origin(self) -> str:
        """Who exports, as an export's marker records it: the notebook's real path where Jupyter Server (or
        ``kernel-magics export --execute``) names it, as the CLI's export of the file records it; else this
        kernel, so that exporting again from it works as from a named notebook."""
        session = self._session_path()
        if session is None:
            # Kept on the shell, so that %reload_ext (a new ModelMagics) is still this kernel.
            token = self.shell.__dict__.setdefault("_kernel_magics_token", uuid.uuid4().hex[:12])
            return f"kernel {os.getpid()} {token}"
        return os.path.realpath(session) if os.path.isabs(session) else session

    # ------------------------------------------------------------------ %model_unload / status / secret

    @line_magic
    @allows_comment
    def model_unload(self, line: str):
        """Drop the loaded instance and free its memory (GPU memory too), a failed load's or predict's included."""
        from ..core import devices

        no_arguments("model_unload", line)
        self.wait_for_background_load()
        gpu = self.host.device if (self.host.device or "").startswith("cuda") else devices.guess_gpu()
        before = devices.memory_stats(gpu)
        released = had_model = self.host.unload()
        # What IPython keeps of the last error (its frames hold the locals of a failed load or predict).
        for holder in ("last_traceback", "last_value", "last_exc"):
            kept = getattr(sys, holder, None)
            if isinstance(kept, BaseException):
                release_frames(kept)
                released = True
            elif kept is not None and holder == "last_traceback":
                clear_traceback(kept)
                released = True
            if kept is not None:
                setattr(sys, holder, None)
        shown = getattr(self.shell, "InteractiveTB", None)
        if getattr(shown, "tb", None) is not None:  # the traceback it last formatted
            clear_traceback(shown.tb)
            shown.tb = None
        result = getattr(self.shell, "last_execution_result", None)
        if result is not None and result.error_in_exec is not None:
            release_frames(result.error_in_exec)
        if released:
            from ..core.devices import free_memory

            free_memory()
        after = devices.memory_stats(gpu)
        if not had_model:  # (what the last error of another cell held is freed all the same, without a word)
            print("No model was loaded.")
        elif before and after:
            print(f"Model unloaded; {gpu} memory allocated: {before['allocated'] / 2**20:,.0f} MiB -> "
                  f"{after['allocated'] / 2**20:,.0f} MiB.")
        else:
            print("Model unloaded; memory freed.")

    @line_magic
    @allows_comment
    def model_status(self, line: str):
        """Show the model's class, state, device, load time and last predict time (and, for a model with
        ``is_healthy()``, its answer now: a loaded model that says no is 'unhealthy', as a probe sees it)."""
        no_arguments("model_status", line)
        if self.host.contract is not None and self.host.contract.is_healthy is not None:
            self.runner.run(self.host.is_healthy())
        status = self.host.status()
        rows = [
            ("class", status["class_name"] or "(none)"),
            ("state", status["state"]),
            ("device", status["device"] or "-"),
            ("load time", f"{status['load_seconds']:.3f} s" if status["load_seconds"] is not None else "-"),
            ("last predict", f"{status['last_predict_ms']:.1f} ms" if status["last_predict_ms"] is not None else "-"),
        ]
        if status["first_chunk_ms"] is not None:
            rows.append(("first chunk", f"{status['first_chunk_ms']:.1f} ms"))
        batching = status.get("batching")
        if batching is not None:
            sizes = ", ".join(map(str, batching["last_batch_sizes"][-8:])) or "none yet"
            settings = (f"up to {batching['max_batch_size']}, wait {batching['max_wait_ms']:g} ms"
                        if batching["max_batch_size"] is not None else "not declared in the config")
            rows.append(("batching", f"{settings}; last batch sizes: {sizes}"))
        if status["error"] and status["state"] == "failed":
            rows.append(("error", status["error"]))
        print("\n".join(f"{k:>12}: {v}" for k, v in rows))

    @magic_arguments()
    @argument("name", help="A secret declared in %%model_config (secrets: {NAME: null}).")
    @line_magic
    @allows_comment
    def model_secret(self, line: str):
        """Prompt for a secret's value and keep it in memory only (never on disk or in output).

        Where ``TRUSS_SECRET_<NAME>`` is already set (a headless run: nbconvert,
        papermill), that value is used and nothing is asked.

            %model_secret hf_access_token
        """
        name = parse_arguments(self.model_secret, line).name
        if not name.isidentifier():
            raise UsageError("Usage: %model_secret NAME, with NAME one of the secrets declared in %%model_config.")
        if name not in self.host.config.secrets:
            raise UsageError(f"Secret `{name}` is not declared in the config. Add `{name}: null` under `secrets:` "
                             "in %%model_config first, so the export knows the deployment needs it.")
        if os.environ.get(ENV_PREFIX + name):
            print(f"Secret `{name}` comes from the environment variable {ENV_PREFIX}{name}; nothing to enter.")
            return
        try:
            value = getpass.getpass(f"Value for secret {name}: ")
        except StdinNotImplementedError:
            raise UsageError(f"This frontend cannot prompt for input. Set {ENV_PREFIX}{name} in the kernel's "
                             "environment instead.") from None
        if not value:
            raise UsageError(f"No value entered; secret `{name}` is unchanged.")
        self.host.secrets.set_value(name, value)
        self.frontend.publish()
        print(f"Secret `{name}` set for this session (kept in memory only).")
