"""A spare checker: the export's fresh Python, started early so its imports are paid before the export.

Every export proves itself in a Python that has never seen the notebook (truss_dir's
``check_in_fresh_process``). Most of that proof's time is the interpreter importing the model's
libraries (torch, transformers: seconds). A kernel that loaded a model starts one spare checker
in the background: ``python -I -B -m kernel_magics.core.spare_check``, with the environment the
check would get, in its own empty ``km-check-*`` folder. It imports the modules the model's
model.py starts by importing (in that order), then waits on its stdin for one job: the
directory to check with the recorded predictions, exactly what the cold check reads. It runs the
same check code (``truss_dir._run_check``) and exits; the next export finds a fresh spare.

The proof stays as strong as the cold one because the spare only ever holds what the cold check
would have imported anyway before model.py's own code ran:

- it is used only when the modules it imported are the ones the new model.py starts by importing, in
  the same order (so a forgotten ``import`` still fails; a submodule the model never imports is not
  there either; nothing is imported ahead of a statement that could change what an import does);
- the kernel's environment, the config's environment_variables, the Python, the installed
  packages (site-packages' modification time) and the source files it imported from elsewhere (an
  editable install) must be what they were when it started;
- nothing of the kernel reaches it: it starts with ``-I`` and the check's clean environment, and
  receives only the directory path, the recorded predictions and the secret values, over a pipe.

Otherwise the check starts cold, as before. The spare dies with the kernel (it is killed with its
parent; an exiting kernel stops it), and with ``%model_unload``.
"""

from __future__ import annotations

import ast
import atexit
import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

__all__ = ["Spare", "prepare", "prepare_for", "take", "replenish", "discard", "turn", "current", "top_level_imports",
           "check_imports", "imports_before_export", "import_values_ahead", "in_background", "settled"]

READY = "ready.json"  # in the spare's folder once its imports are done: which it imported
# What the cold check imports before model.py (TrussDir.host); not the model's, so not matched.
_OURS = ["import kernel_magics.core.runtime"]


def top_level_imports(text: str) -> list[str]:
    """The import statements model.py starts with, in order, as text: its leading block of absolute
    imports, up to the first other statement (a statement before an import, ``os.environ[...] = ...``
    say, may change what the import does, so nothing after it is imported in advance). The spare runs
    these very statements, so ``from transformers import GPT2LMHeadModel`` also imports what the name
    pulls in (transformers imports its models lazily, on first use of the name)."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []
    found: list[str] = []
    for i, node in enumerate(tree.body):
        if isinstance(node, ast.Import) or (isinstance(node, ast.ImportFrom) and node.level == 0
                                            and node.module and node.module != "__future__"):
            found.append(ast.unparse(node))
        elif isinstance(node, ast.ImportFrom) and node.module == "__future__":
            continue
        elif not (i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):  # (a docstring)
            break
    return found


def check_imports(truss: Any) -> list[str]:
    """What a spare for the export ``truss`` imports: model.py's leading imports, then the modules its
    pickled values import as model.py loads them (core/value_imports.py says why that is safe)."""
    from .values import VALUES_DIR

    return _with_value_imports(truss.model_file.read_text(encoding="utf-8"), truss.root / "data" / VALUES_DIR,
                               _local_names(truss), truss.config.requirements)


def _with_value_imports(text: str, values: Path, local: set[str], requirements: Sequence[str]) -> list[str]:
    from .value_imports import value_imports

    leading = top_level_imports(text)
    try:
        body = ast.parse(text).body
    except SyntaxError:
        return leading
    start = next((i for i, node in enumerate(body) if not isinstance(node, (ast.Import, ast.ImportFrom))
                  and not (i == 0 and isinstance(node, ast.Expr))), len(body))
    if len([n for n in body[:start] if isinstance(n, (ast.Import, ast.ImportFrom))]) != len(leading):
        return leading  # (a relative or __future__ import among them: keep to the leading imports)
    allowed = _requirement_modules(requirements)
    return leading + [s for s in value_imports(body, start, values, local, allowed) if s not in leading]


# Bytes of arrays and tensors: larger values are not saved twice (once ahead, once by the export) just to read the
# modules their pickles name; nor when the temp dir (a tmpfs in memory, often) lacks room for twice as much.
_AHEAD_LIMIT = 512 * 2**20
_ahead: dict = {}  # thread -> its scratch folder, while a thread saves values aside (imports_before_export)


@atexit.register
def _at_exit() -> None:
    """A kernel that ends while a thread plans or saves values aside: nothing new starts (``closing``), the threads
    stop (bounded: the discarded spare cancels a save before its next value), the spare goes, then their folders."""
    from .scratch import remove_tree

    _state.closing = True
    settled(5)
    discard()
    for thread, folder in list(_ahead.items()):
        thread.join(5)
        remove_tree(folder)


def imports_before_export(materialized: Any, cancelled: Callable[[], bool] = lambda: False) -> Optional[list[str]]:
    """What :func:`check_imports` will say of the export of ``materialized`` (core/export.py), before it is
    exported: its torch.save and pickle values are saved, as the export saves them, into a scratch folder that
    is then removed, and read as an export's are. None when that adds nothing to model.py's leading imports,
    when a value cannot be saved, or is too large to save twice (the export's check then imports those modules
    itself, as it did before), or when ``cancelled()`` says so between values. For the first export after
    ``%model_load`` (a spare the export before started has them already)."""
    import yaml

    from .export import BATCHING_MODULE
    from .scratch import ScratchDir, remove_tree
    from .value_imports import PLAIN_PICKLE_LIMIT

    plans = [p for p in materialized.source.values
             if p.save is not None and p.filename and p.filename.endswith((".pt", ".pkl"))]
    sizes = {p.name: _data_bytes((materialized.live or {}).get(p.name)) for p in plans}
    # (a plain pickle larger than the limit is not read at export either: leaving it out predicts the same)
    plans = [p for p in plans if p.filename.endswith(".pt") or sizes[p.name] <= PLAIN_PICKLE_LIMIT]
    total = sum(sizes[p.name] for p in plans)
    if not plans or total > _AHEAD_LIMIT or shutil.disk_usage(tempfile.gettempdir()).free < 2 * total:
        return None
    requirements = (yaml.safe_load(materialized.config_yaml) or {}).get("requirements") or []
    local = {"model", "config", "data"} | {p.stem for p in materialized.local_modules}  # as _local_names(export)
    if materialized.local_modules or materialized.config.batching is not None:
        local |= {"packages"} | ({BATCHING_MODULE} if materialized.config.batching is not None else set())
    scratch = ScratchDir(Path(tempfile.gettempdir()), "km-ahead-")
    _ahead[threading.current_thread()] = scratch.path
    try:
        for plan in plans:
            if cancelled():
                return None
            plan.save(scratch.path)
        found = _with_value_imports(materialized.source.text, scratch.path, local, requirements)
    except Exception:
        return None
    finally:
        scratch.release()
        remove_tree(scratch.path)
        _ahead.pop(threading.current_thread(), None)
    return found if len(found) > len(top_level_imports(materialized.source.text)) else None


def _data_bytes(value: Any, depth: int = 3) -> int:
    """The array and tensor bytes a value holds (containers followed a few levels): what makes a save long."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.nn.Module):
        return sum(t.numel() * t.element_size() for t in [*value.parameters(), *value.buffers()])
    if isinstance(getattr(value, "nbytes", None), int):  # numpy arrays, tensors
        return value.nbytes
    if depth and isinstance(value, (list, tuple, set, frozenset)):
        return sum(_data_bytes(v, depth - 1) for v in list(value)[:10000])
    if depth and isinstance(value, dict):
        return sum(_data_bytes(v, depth - 1) for v in list(value.values())[:10000])
    return len(value) if isinstance(value, (bytes, bytearray, str)) else 0


def _requirement_modules(requirements: Sequence[str]) -> set[str]:
    """The top-level import names of the distributions ``requirements`` name."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    from .export import _packages_distributions

    wanted = set()
    for line in requirements:
        with contextlib.suppress(InvalidRequirement):
            wanted.add(canonicalize_name(Requirement(line).name))
    return {module for module, dists in _packages_distributions().items()
            if any(canonicalize_name(d) in wanted for d in dists)}


def _local_names(truss: Any) -> set[str]:
    """The top-level module names the export's own folders provide (never imported in advance)."""
    local = {"model"}
    for folder in [truss.root, *truss.package_dirs]:
        with contextlib.suppress(OSError):
            local |= {Path(n).stem for n in os.listdir(folder)}
    return local


def modules_of(statement: str) -> list[str]:
    """The modules an import statement imports (``from a.b import c``: a.b)."""
    node = ast.parse(statement).body[0]
    return [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]


def _site_stamp() -> tuple:
    """Changes when a package is installed or removed (pip touches site-packages itself)."""
    paths = sysconfig.get_paths()
    stamp = []
    for key in ("purelib", "platlib"):
        with contextlib.suppress(OSError):
            stamp.append((paths[key], os.stat(paths[key]).st_mtime_ns))
    return tuple(stamp)


def _sources_outside_site() -> list:
    """The source files (and their modification times) of the modules this process imported from neither the
    standard library nor site-packages (an editable install, a PYTHONPATH folder): the site stamp does not see
    an edit there, so a spare that imported one is stale once it changed."""
    paths = sysconfig.get_paths()
    roots = tuple(os.path.join(paths[key], "") for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths)
    found = []
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if not isinstance(file, str) or file.startswith(roots):
            continue
        with contextlib.suppress(OSError):
            found.append([file, os.stat(file).st_mtime_ns])
    return sorted(found)


class Spare:
    """One spare checker process (the kernel's side)."""

    def __init__(self, modules: Sequence[str], env_vars: dict, python: str) -> None:
        from .scratch import ScratchDir
        from .truss_dir import _child_env

        self.modules = list(modules)
        self.env_vars = {str(k): str(v) for k, v in env_vars.items()}
        self.python = python
        self.env = _child_env()
        self.stamp = _site_stamp()
        # The check's own folder, held by this process (as the cold check's): its cwd and where it reports.
        self.scratch = ScratchDir(Path(tempfile.gettempdir()), "km-check-")
        self.path = self.scratch.path
        self.proc: Optional[subprocess.Popen] = None  # (modules: the import statements it runs, in order)
        self.error: Optional[BaseException] = None
        self.started = threading.Event()
        self.superseded = threading.Event()  # taken by an export, or stopped: nothing more to prepare for it

    def _start(self) -> None:
        """Run by the starter thread, which lives as long as the kernel: the spare's parent-death signal is
        tied to the thread that started it, so a short-lived thread would take the spare with it."""
        try:
            with open(self.path / "output.txt", "wb") as output:
                self.proc = subprocess.Popen(
                    [self.python, "-I", "-B", "-m", "kernel_magics.core.spare_check"], stdin=subprocess.PIPE,
                    stdout=output, stderr=subprocess.STDOUT, cwd=self.path, env=self.env, start_new_session=True)
            self.proc.stdin.write(json.dumps({"parent": os.getpid(), "modules": _OURS + self.modules,
                                              "env": self.env_vars}).encode() + b"\n")
            self.proc.stdin.flush()
        except BaseException as exc:  # (the check then starts cold)
            self.error = exc
        finally:
            self.started.set()

    @property
    def ready(self) -> bool:
        return (self.path / READY).is_file()

    def caught_up(self) -> bool:
        """Whether it has dealt with every import it was sent (imported, or not: one before could not be)."""
        try:
            return json.loads((self.path / READY).read_text())["handled"] == len(_OURS) + len(self.modules)
        except (OSError, ValueError, KeyError):
            return False

    def imported(self) -> list[str]:
        """What it imported (once ready): model.py's first imports, up to one not installed or that failed."""
        try:
            return [m for m in json.loads((self.path / READY).read_text())["imported"] if m not in _OURS]
        except (OSError, ValueError, KeyError):
            return []

    def edited(self) -> Optional[str]:
        """A source file it imported from outside site-packages that changed since (None when none did)."""
        try:
            sources = json.loads((self.path / READY).read_text()).get("sources", [])
        except (OSError, ValueError):
            return None
        for file, mtime in sources:
            try:
                if os.stat(file).st_mtime_ns != mtime:
                    return file
            except OSError:
                return file
        return None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def mismatch(self, truss: Any, python: str) -> Optional[str]:
        """Why this spare cannot check ``truss`` as a cold check would (None when it can)."""
        from .truss_dir import _child_env

        if python != self.python:
            return "another Python"
        if _child_env() != self.env:
            return "the kernel's environment changed"
        if _site_stamp() != self.stamp:
            return "installed packages changed"
        if {str(k): str(v) for k, v in truss.config.environment_variables.items()} != self.env_vars:
            return "the config's environment_variables changed"
        try:
            needed = top_level_imports(truss.model_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            return "model.py unreadable"
        if len(self.modules) > len(needed):  # (a spare an export started: the values' modules too)
            try:
                needed = check_imports(truss)
            except Exception:  # (a value file that cannot be read ahead: the check says what is wrong with it)
                return "the saved values could not be read ahead"
        if self.modules != needed[:len(self.modules)]:  # what it imports, cold imports first, in that order
            return f"model.py does not start with `{'; '.join(self.modules)}`"
        local = _local_names(truss)
        shadowed = [m for s in self.modules for m in modules_of(s) if m.split(".")[0] in local]
        if shadowed:
            return f"the directory holds {', '.join(shadowed)}"
        if not self.started.wait(30) or not self.alive():
            return "the spare is not running"
        edited = self.edited()
        if edited:
            return f"{edited} changed since the spare imported it"
        return None

    def extend(self, statements: Sequence[str]) -> bool:
        """Have it run ``statements`` too, after its imports and before its job (False when it cannot take them).
        Called with the slot's lock held, once it started."""
        if not self.started.is_set() or not self.alive():
            return False
        try:
            self.proc.stdin.write(json.dumps({"more": list(statements)}).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return False
        self.modules += list(statements)
        return True

    def send(self, job: dict) -> None:
        """Give it its one job (it reads a line, then closes its end of the pipe)."""
        try:
            self.proc.stdin.write(json.dumps(job).encode() + b"\n")
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass  # it died; its output says why

    def stop(self) -> None:
        from .scratch import remove_tree

        self.superseded.set()
        self.started.wait(30)
        if self.proc is not None:
            from .truss_dir import _stop_group

            _stop_group(self.proc)
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        self.scratch.release()
        remove_tree(self.path)


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spare: Optional[Spare] = None
        self.enabled = False  # this process keeps a spare (a kernel that loaded a model; not the CLI)
        self.last_miss: Optional[str] = None  # why the last check could not use the spare
        self.starter: Optional[queue.Queue] = None
        self.closing = False  # the process is exiting: no spare starts any more
        self.off = False  # turned off (ModelMagics.spare_checker): no spare starts until it is turned on


_state = _State()


def _starter() -> queue.Queue:
    if _state.starter is None:
        jobs: queue.Queue = queue.Queue()

        def run() -> None:
            while True:
                jobs.get()._start()

        threading.Thread(target=run, name="km-spare-starter", daemon=True).start()  # (_at_exit discards the spare)
        _state.starter = jobs
    return _state.starter


def prepare(modules: Sequence[str], env_vars: Optional[dict] = None, python: str = sys.executable) -> Optional[Spare]:
    """Have a spare that imports ``modules`` ready (the one running already, when it is that one); None in a
    process that is exiting."""
    env_vars = env_vars or {}
    with _state.lock:
        if _state.closing or _state.off:
            return None
        _state.enabled = True
        old = _state.spare
        if (old is not None and old.modules == list(modules) and old.python == python and old.error is None
                and old.env_vars == {str(k): str(v) for k, v in env_vars.items()}
                and (not old.started.is_set() or old.alive())):
            return old
        _state.spare = spare = Spare(modules, env_vars, python)
        _starter().put(spare)
    if old is not None:
        old.stop()
    return spare


def prepare_for(model_py_text: str, env_vars: Optional[dict] = None,
                python: str = sys.executable) -> Optional[Spare]:
    """A spare for the model.py ``model_py_text``: its top-level imports."""
    return prepare(top_level_imports(model_py_text), env_vars, python)


def take(truss: Any, python: str) -> Optional[Spare]:
    """The spare, removed from its slot, if it can check ``truss`` as a cold check would; else None
    (a spare that cannot is stopped)."""
    with _state.lock:
        spare, _state.spare = _state.spare, None
    if spare is None:
        _state.last_miss = "no spare" if _state.enabled else None
        return None
    spare.superseded.set()
    why = spare.mismatch(truss, python)
    _state.last_miss = why
    if why is not None:
        spare.stop()
        return None
    return spare


def replenish(truss: Any, python: str) -> None:
    """After a check: a fresh spare for this model.py, in a process that keeps one."""
    if not _state.enabled:
        return
    with contextlib.suppress(Exception):
        prepare(check_imports(truss), truss.config.environment_variables, python)


def import_values_ahead(spare: Spare, materialized: Any) -> None:
    """The spare ``%model_load`` started for ``materialized``'s model.py (its leading imports) also imports what
    the values will unpickle (:func:`imports_before_export`), unless an export took it or it was replaced
    meanwhile (which also stops the saving between values). Run in a thread (:func:`in_background`)."""
    found = imports_before_export(materialized, cancelled=spare.superseded.is_set)
    if found is None or not spare.started.wait(30):
        return
    with _state.lock:  # (an export takes the spare under it: it sees the spare before or after, never between)
        if _state.spare is spare and len(found) > len(spare.modules) and found[:len(spare.modules)] == spare.modules:
            spare.extend(found[len(spare.modules):])


_helpers: list = []  # threads preparing a spare (in_background)


def in_background(work: Callable[[], None], name: str) -> None:
    """Run ``work`` in a thread of its own: what %model_load starts for the next export never holds up the kernel
    (planning the values imports their libraries: skops walks all of scikit-learn's estimators, seconds)."""
    thread = threading.Thread(target=work, name=name, daemon=True)
    _helpers[:] = [t for t in _helpers if t.is_alive()] + [thread]
    thread.start()


def settled(timeout: Optional[float] = None) -> bool:
    """Wait for the threads preparing a spare, at most ``timeout`` seconds in all (True once none runs). The kernel
    waits for them before each execution (notebook/run_magics.py), tests and benchmarks too."""
    import time

    deadline = None if timeout is None else time.monotonic() + timeout
    for thread in list(_helpers):
        thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    return not any(t.is_alive() for t in _helpers)


def current() -> Optional[Spare]:
    return _state.spare


def turn(on: bool) -> None:
    """Turn spares on or off for this process (``ModelMagics.spare_checker``). Off stops the one there is, and
    none starts, a planning thread's that was under way included; on takes effect at the next ``prepare``."""
    with _state.lock:
        _state.off = not on
    if not on:
        discard(disable=True)


def discard(*, disable: bool = False) -> None:
    """Stop the spare (``%model_unload``, the kernel exiting); ``disable``: start none until the next prepare."""
    with _state.lock:
        spare, _state.spare = _state.spare, None
        if disable:
            _state.enabled = False
    if spare is not None:
        spare.stop()


# ---------------------------------------------------------------------- the spare process itself

def _serve() -> int:
    """Import what the kernel named, say so, wait for one job and run the check (truss_dir's code)."""
    spec = json.loads(sys.stdin.buffer.readline() or b"{}")
    parent = spec.get("parent")
    here = Path.cwd()

    def gone(*_: Any) -> None:  # the kernel died while this spare waited: leave nothing behind
        from .scratch import remove_tree

        remove_tree(here)
        os._exit(0)

    signal.signal(signal.SIGTERM, gone)
    if not parent:
        gone()
    from .scratch import die_with_parent

    # SIGTERM, not a kill: `gone` removes this spare's folder (also when the kernel died before the signal was set).
    die_with_parent(parent, signal.SIGTERM, orphaned=gone)
    os.environ.update(spec.get("env", {}))  # as TrussDir.prepare_process does before the cold import
    imported: list[str] = []
    handled = len(spec.get("modules", []))  # statements imported, or not because one before could not be
    failed = _import_in_advance(spec.get("modules", []), imported)
    _say_ready(here, imported, handled)
    while True:
        line = sys.stdin.buffer.readline()
        if not line:
            gone()
        job = json.loads(line)
        if "more" not in job:
            break
        if not failed:  # the values' modules, read from their pickles once they were saved (import_values_ahead)
            failed = _import_in_advance(job["more"], imported)
        handled += len(job["more"])
        _say_ready(here, imported, handled)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # from here on, exactly the cold check
    from .truss_dir import _run_check

    return _run_check(Path(job.pop("dir")), Path(job.pop("report")), bool(job.pop("load")), options=job)


def _import_in_advance(statements: Sequence[str], imported: list) -> bool:
    """Run the import statements in order, up to the first that cannot run (True when one could not)."""
    import importlib.util

    from .collector import imports_uncollected

    for statement in statements:
        try:
            tops = {m.split(".")[0] for m in modules_of(statement)}
            if any(importlib.util.find_spec(top) is None for top in tops):
                return True  # not installed (one the export carries in packages/): the check imports it and what follows
            with imports_uncollected():  # as the cold check imports model.py (core/collector.py)
                if "skops" in tops:
                    from .skops_import import import_skops_io

                    import_skops_io()  # (without the torch that its import of scikit-learn would bring)
                exec(compile(statement, "<import in advance>", "exec"), {})  # the names go nowhere: model.py binds its own
        except BaseException:
            return True  # the cold check stops at this import too; it fails there again, in model.py's order
        imported.append(statement)
    return False


def _say_ready(here: Path, imported: list, handled: int) -> None:
    (here / (READY + ".tmp")).write_text(json.dumps({"imported": imported, "handled": handled,
                                                     "sources": _sources_outside_site()}))
    os.replace(here / (READY + ".tmp"), here / READY)


if __name__ == "__main__":
    code = _serve()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
