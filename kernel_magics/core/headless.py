"""``kernel-magics export NOTEBOOK DIR --execute``: run the notebook headlessly, export from that kernel.

A notebook saved without outputs holds no values and no predictions, so the file alone cannot
prove that what model.py re-runs gives what the notebook had. This runs its code cells (up to the
first ``%model_export``) in a fresh kernel of the current Python environment with nbclient, in the
notebook's folder, one progress line per cell, and then runs ``%model_export`` in that kernel: every
check the notebook's own export makes (values saved from the kernel, verification, the replay of the
predictions this run recorded). The notebook file is read, never written.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from .errors import KernelMagicsError
from .source import last_cell_of

__all__ = ["HeadlessRunError", "export_by_running"]


# A line of the notebook's own that loads the extension (`%reload_ext` too), not one in a comment or a string.
_LOADS_EXT = re.compile(r"\s*%?(re)?load_ext\s+kernel_magics\s*(#.*)?$")


class HeadlessRunError(KernelMagicsError):
    """A cell failed while the notebook ran headlessly; nothing was exported."""


def _kernel_manager(folder: Path, load_ext: bool):
    """A kernel of this very interpreter (not whatever `python3` kernel spec is installed); ``load_ext``: with
    kernel_magics loaded as it starts."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = folder / "kernels" / "kernel-magics-current"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        # ipykernel_launcher without the debugger: nobody debugs this kernel, and importing debugpy was 0.7 s of CPU.
        "argv": [sys.executable, "-m", "kernel_magics.notebook.kernel_launcher", "-f", "{connection_file}",
                 *(["--ext=kernel_magics"] if load_ext else [])],
        "display_name": "kernel-magics (current environment)", "language": "python"}))
    # Over Unix sockets in that folder where there are any, not TCP: jupyter_client picks free TCP ports by binding
    # and closing them, so another process can take one before the kernel binds it; and the kernel would warn
    # that it runs over TCP without encryption. (A socket's path has about 100 bytes at most.)
    socket = str(folder / "k")
    ipc = {"transport": "ipc", "ip": socket} if os.name == "posix" and len(socket) < 90 else {}
    return KernelManager(kernel_name="kernel-magics-current",
                         kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(folder / "kernels")]), **ipc)


def _first_line(source: str) -> str:
    lines = [line.strip() for line in source.splitlines() if line.strip() and not line.strip().startswith("#")]
    text = lines[0] if lines else "(empty)"
    return text if len(text) <= 60 else text[:59] + "…"


def _error_of(exc: Exception) -> str:
    """``Type: message`` of a cell's error, without a final full stop (the sentence around it has one)."""
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    return (f"{ename}: {evalue}" if ename else str(exc).strip().splitlines()[-1]).rstrip(".")


def _stream_text(outputs: list) -> str:
    return "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream" and o.get("name") == "stdout")


def export_by_running(notebook: Path, out: Path, *, force: int = 0, data: Sequence[Path] = (), replay: bool = True,
                      timeout: Optional[float] = None, progress: Callable[[str], None] = print) -> str:
    """Run ``notebook``'s code cells in a fresh kernel and export from it; returns what the export printed.
    Raises HeadlessRunError (naming the cell) when a cell fails or the export refuses."""
    from .export import refuse_target

    notebook = Path(notebook).resolve()
    out = Path(out).resolve()  # what the kernel is told, and checked as it will check it, before the notebook runs
    refuse_target(out, force, protected=[notebook], cwd=notebook.parent, origin=str(notebook))
    import nbformat  # (after the refusal: seconds of imports for nothing otherwise)
    from nbclient import NotebookClient

    nb = nbformat.read(str(notebook), as_version=4)
    code = []
    for cell in nb.cells:
        if cell.cell_type != "code" or not cell.source.strip():
            continue  # (an empty cell gets no In [N]: not run, not counted, as the CLI counts)
        if any(line.lstrip().startswith("%model_export") for line in cell.source.splitlines()):
            break  # as the CLI reads a notebook: what runs before the first export
        code.append(cell)
    if last_cell_of([cell.source for cell in code], "model") is None:
        raise HeadlessRunError(f"{notebook} has no `%%model` cell (before any %model_export), so there is no model "
                               "to export.")
    args = [shlex.quote(str(out))] + ["--force"] * int(force) + [
        arg for path in data for arg in ("--data", shlex.quote(str(Path(path).resolve())))]
    if not replay:
        args.append("--no-replay")
    # The kernel names the notebook in model.py's header as Jupyter Server would tell it.
    export_cell = nbformat.v4.new_code_cell(
        f"import os as _km_os\n_km_os.environ['JPY_SESSION_NAME'] = {str(notebook)!r}\n"
        f"%model_export {' '.join(args)}")
    with tempfile.TemporaryDirectory(prefix="km-execute-") as tmp:
        # What runs, in memory: the code cells and the export (nbclient keeps each cell's outputs in it).
        run = nbformat.v4.new_notebook(cells=[*code, export_cell], metadata=nb.metadata)
        # A notebook without `%load_ext kernel_magics` gets it as the kernel starts, not from an added cell: then
        # every In [N] the kernel's messages name is still the Nth code cell, as the progress lines and the CLI count.
        loads_it = any(_LOADS_EXT.match(line) for cell in code for line in cell.source.splitlines())
        km = _kernel_manager(Path(tmp), load_ext=not loads_it)  # nbclient does not shut down a manager it was given
        client = NotebookClient(run, km=km, timeout=timeout, allow_errors=False,
                                resources={"metadata": {"path": str(notebook.parent)}})
        try:
            _run_cells(client, code, export_cell, notebook, progress)
        finally:
            if km.has_kernel:
                km.shutdown_kernel(now=False)
    printed = _stream_text(export_cell.outputs)
    # The kernel showed the target from the notebook's folder, its working directory; the user reads it from here.
    from .export import shown_path

    there, here = shown_path(out, notebook.parent), shown_path(out)
    return printed.replace(f"\n{there}/\n", f"\n{here}/\n", 1) if there != here else printed


def _run_cells(client, code: list, export_cell, notebook: Path, progress: Callable[[str], None]) -> None:
    from nbclient.exceptions import CellExecutionError

    total = len(code)
    with client.setup_kernel(cwd=str(notebook.parent)):
        for n, cell in enumerate(code, 1):
            where = f"cell {n}"  # the Nth code cell: In[N] of a fresh kernel, as the kernel's own messages count
            progress(f"[{n}/{total}] {where}: {_first_line(cell.source)}")
            started = time.perf_counter()
            try:
                client.execute_cell(cell, n - 1)
            except CellExecutionError as exc:
                raise HeadlessRunError(
                    f"Running {notebook.name} headlessly failed in {where} (`{_first_line(cell.source)}`): "
                    f"{_error_of(exc)}. Nothing was exported, and the notebook file is unchanged. Fix the cell "
                    "(it must run from a fresh kernel, top to bottom) and try again."
                ) from None
            elapsed = time.perf_counter() - started
            if elapsed >= 10:
                progress(f"      ({elapsed:.0f} s)")
        progress(f"exporting from the kernel that ran {notebook.name} ...")
        try:
            client.execute_cell(export_cell, total)
        except CellExecutionError as exc:
            raise HeadlessRunError(_error_of(exc).removeprefix("UsageError: ") + ".") from None
