"""A Truss directory: the only code that knows its layout and how Truss reads it.

``TrussDir`` opens ``config.yaml`` (as Truss's own parser does: unknown keys and
secret defaults are accepted with a warning), finds the model file from
``model_module_dir`` / ``model_class_filename`` / ``model_class_name``, puts
``bundled_packages_dir`` and ``external_package_dirs`` on the import path in
Truss's order (after site-packages, bundled first), imports the module under
Truss's name (``model.model``), and builds the ``ModelHost`` whose ``__init__``
kwargs are built as Truss builds them (``config`` is the YAML as written).
``validate``, ``serve``, every Ray replica and the export's fresh-process check
go through it. The check itself is a module command::

    python -I -B -m kernel_magics.core.truss_dir check DIR --report FILE [--load]

(options and secret values arrive as JSON on stdin, never on the command line).
"""

from __future__ import annotations

import _imp
import ast
import contextlib
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from .collector import imports_uncollected
from .config import ModelConfig, parse_config
from .errors import KernelMagicsError, ModelDefinitionError
from .secrets import SecretStore

__all__ = ["TrussDir", "CheckReport", "TrussDirError", "resolve_path"]


class TrussDirError(KernelMagicsError):
    """The directory is not a Truss directory we can use; the message says what to change."""


def resolve_path(path: Any, base: Optional[Path] = None) -> Path:
    """``path`` made absolute against ``base`` (default: the working directory), ``~`` expanded."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_absolute():
        path = (base or Path.cwd()) / path
    return Path(os.path.normpath(path))


class _NoBytecodeLoader(importlib.machinery.SourceFileLoader):
    """A source file's loader that writes no .pyc (importlib's get_code skips the write when ``set_data`` raises
    NotImplementedError)."""

    def set_data(self, path, data, *, _mode=0o666):
        raise NotImplementedError


_NO_BYTECODE: set = set()  # the folders a hook already covers in this process
_NO_BYTECODE_LOCK = threading.Lock()


def _no_bytecode_under(roots: Sequence[Path]) -> None:
    """Modules under ``roots`` are imported without writing ``__pycache__`` there: Truss's server imports a copy of
    the directory (the image's /app), ours imports the user's own, which a later export, diff or upload reads. What
    is installed keeps Python's usual .pyc files (read, and written when missing), so a served model's torch is not
    compiled again at every start."""
    with _NO_BYTECODE_LOCK:
        folders = tuple(f for f in (os.path.realpath(r) for r in roots) if f not in _NO_BYTECODE)
        if folders:
            _install_no_bytecode_hook(folders)
            _NO_BYTECODE.update(folders)  # (after the hook is in: a second caller waits for it, then returns)


def _install_no_bytecode_hook(folders: tuple) -> None:
    # What is installed keeps its .pyc files even when it lies inside the directory (a project root holding .venv).
    import site

    installed = tuple(os.path.realpath(p) for p in {sys.prefix, sys.base_prefix, *site.getsitepackages(),
                                                   site.getusersitepackages()})

    def inside(real: str, roots: tuple) -> bool:
        return any(real == f or real.startswith(f + os.sep) for f in roots)

    def under(path: str) -> bool:
        real = os.path.realpath(path)
        return inside(real, folders) and not inside(real, installed)

    def hook(path: str):
        if not under(path) or not os.path.isdir(path):
            raise ImportError  # (the next hook finds it: Python's own, or zipimport's for a .zip on the path)
        return importlib.machinery.FileFinder(  # (the loaders in Python's own order: an extension module first)
            path, (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
            (_NoBytecodeLoader, importlib.machinery.SOURCE_SUFFIXES),
            (importlib.machinery.SourcelessFileLoader, importlib.machinery.BYTECODE_SUFFIXES))

    # Under the import lock that importlib holds around each find_spec, so that no import in another thread (a Ray
    # replica's) makes a plain finder for these folders between the purge and the hook.
    _imp.acquire_lock()
    try:
        sys.path_hooks.insert(0, hook)
        # Finders made before: the next import asks the hooks again (the keys copied in one step first).
        for path in list(sys.path_importer_cache):
            if under(path):
                sys.path_importer_cache.pop(path, None)
    finally:
        _imp.release_lock()


@dataclass
class TrussDir:
    """An opened Truss directory (nothing imported yet)."""

    root: Path
    config: ModelConfig
    raw_config: dict
    warnings: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: Any, *, base: Optional[Path] = None) -> "TrussDir":
        """Open ``path`` (relative to ``base`` or the working directory) and parse its config."""
        root = resolve_path(path, base)
        shown = str(path) if str(path) == str(root) else f"{path} ({root})"
        if not root.exists():
            raise TrussDirError(f"{shown} does not exist. Give the path of a Truss directory.")
        if not root.is_dir():
            raise TrussDirError(f"{shown} is a file, not a directory. Give the path of a Truss directory.")
        config_path = root / "config.yaml"
        if not config_path.is_file():
            found = sorted(p.name for p in root.glob("config.y*ml") if p.name != "config.yaml")
            hint = f" Found {found[0]}: rename it to config.yaml (Truss reads only that name)." if found else ""
            raise TrussDirError(f"{root} has no config.yaml, so it is not a Truss directory.{hint}")
        try:
            text = config_path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise TrussDirError(f"{config_path} is not UTF-8 text. Save it as UTF-8 YAML.") from None
        except OSError as exc:
            raise TrussDirError(f"Cannot read {config_path}: {exc.strerror}.") from None
        warnings: list[str] = []
        config = parse_config(text, source=str(config_path), made_elsewhere=True, warnings=warnings)
        raw = yaml.safe_load(text) or {}  # safe: parse_config bounded its size
        return cls(root, config, raw, warnings)

    # ------------------------------------------------------------------ layout

    @property
    def model_module_dir(self) -> str:
        return self.raw_config.get("model_module_dir") or "model"

    @property
    def model_file(self) -> Path:
        return self.root / self.model_module_dir / (self.raw_config.get("model_class_filename") or "model.py")

    @property
    def module_name(self) -> str:
        """Truss's module name: ``model/model.py`` is ``model.model`` (it must not take ``model``)."""
        stem, parent = self.model_file.stem, self.model_file.parent.name
        return f"{parent}.{stem}" if parent == stem else stem

    @property
    def package_dirs(self) -> list[Path]:
        """Where model.py's own imports may come from, in Truss's order: the bundled packages
        folder, then each external package dir (Truss copies those into the same folder)."""
        bundled = self.root / (self.raw_config.get("bundled_packages_dir") or "packages")
        external = [resolve_path(d, self.root) for d in self.config.external_package_dirs]
        return [bundled, *external]

    @property
    def data_dir(self) -> Path:
        return self.root / self.config.data_dir

    def relative(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    # ------------------------------------------------------------------ static checks

    def check_static(self) -> ast.ClassDef:
        """Everything that needs no import: the model file parses and defines the class with predict."""
        for path in self.config.external_package_dirs:
            if not resolve_path(path, self.root).is_dir():
                raise TrussDirError(f"external_package_dirs: {path} is not a directory (from {self.root}). "
                                    "Fix the path in config.yaml.")
        model_py = self.model_file
        if not model_py.is_file():
            raise TrussDirError(f"{self.root} has no {self.relative(model_py)}: a Truss keeps the model class there "
                                "(model_module_dir and model_class_filename in config.yaml say where).")
        try:
            tree = ast.parse(model_py.read_bytes(), filename=str(model_py))
        except SyntaxError as exc:
            raise TrussDirError(f"{model_py}{f', line {exc.lineno}' if exc.lineno else ''}: syntax error: "
                                f"{exc.msg}{_shown_line(exc.text)}. Fix model.py.") from None
        classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
        cls = classes.get(self.config.model_class_name)
        if cls is None:
            raise TrussDirError(f"{model_py} defines no class `{self.config.model_class_name}` (model_class_name "
                                f"in config.yaml). Classes found: {', '.join(classes) or 'none'}.")
        methods = {n.name for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        if "predict" not in methods and not cls.bases:
            hint = ""
            if "predict_batch" in methods and self.config.batching is None:
                hint = (" It has predict_batch, but the config declares no batching: add `model_metadata: {batching: "
                        "{max_batch_size: 32, max_wait_ms: 5}}` to %%model_config (config.yaml); an export from the "
                        "notebook then adds the predict that feeds predict_batch, which Truss's server calls.")
            elif "predict_batch" in methods:
                hint = (" It has predict_batch, but Truss's server calls predict: an export from the notebook adds the "
                        "predict that feeds predict_batch (see docs/batching.md).")
            raise TrussDirError(f"`{cls.name}` in {model_py} has no predict method.{hint}")
        # Read from the source alone: only a plain generator `def predict` beside a `def postprocess`, neither
        # decorated nor bound again in the class body (what the class then holds is not what the source shows).
        defs = {n.name: n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        rebound = {t.id for n in cls.body if isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign))
                   for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
        plain = [defs.get(m) for m in ("predict", "postprocess") if m not in rebound and defs.get(m) is not None
                 and not defs[m].decorator_list]
        if len(plain) == 2 and _yields(plain[0]):
            raise TrussDirError(f"`{cls.name}.predict` in {self.relative(model_py)} streams (it yields) and the class "
                                "has postprocess: Truss cannot postprocess a stream, so its server would refuse every "
                                "request (ModelDefinitionError, HTTP 412). Drop postprocess and do that work in predict.")
        return cls

    # ------------------------------------------------------------------ importing

    def prepare_process(self) -> None:
        """What a Truss container has before the model is imported: its env vars, its package dirs.

        And no ``__pycache__`` written into the directory or its package dirs (:func:`_no_bytecode_under`). Only
        processes that serve, check or predict a directory call this, never the kernel."""
        _no_bytecode_under([self.root, *self.package_dirs])
        os.environ.update(self.config.environment_variables)
        if str(self.root) not in sys.path:
            # Truss runs /app/main.py beside the directory's files, so the root is sys.path[0] and model/ is
            # the `model` package: `model.model` (named by pickles of notebook classes) imports from there.
            sys.path.insert(0, str(self.root))
        for path in self.package_dirs:
            if path.is_dir() and str(path) not in sys.path:
                sys.path.append(str(path))  # after site-packages, as Truss appends /packages

    @contextlib.contextmanager
    def as_working_directory(self):
        """Run the model from the directory's root, as Truss's server runs it from /app (which holds model/,
        data/ and config.yaml): a load() that opens ``data/labels.txt`` finds it here as it does deployed,
        and as the export's check found it. The previous working directory comes back afterwards."""
        before = os.getcwd()
        os.chdir(self.root)
        try:
            yield self.root
        finally:
            os.chdir(before)

    def import_model_class(self) -> type:
        """Import the model file as Truss does and return the model class (the user's errors propagate)."""
        self.check_static()
        self.prepare_process()
        name = self.module_name
        spec = importlib.util.spec_from_file_location(name, self.model_file,
                                                      loader=_NoBytecodeLoader(name, str(self.model_file)))
        module = importlib.util.module_from_spec(spec)
        if "." in name:
            module.__package__ = None  # relative imports stay unsupported, as in Truss
            package = name.rpartition(".")[0]
            loaded = sys.modules.get(package)
            if loaded is not None and str(self.model_file.parent) not in list(getattr(loaded, "__path__", [])):
                del sys.modules[package]  # another directory's `model`, imported earlier in this process
        sys.modules[name] = module  # registered first, so pickled values that name it resolve
        try:
            with imports_uncollected():  # (about a fifth of importing torch and transformers was collections)
                spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        cls = getattr(module, self.config.model_class_name, None)
        if not isinstance(cls, type):
            raise ModelDefinitionError(f"{self.model_file} defines no class `{self.config.model_class_name}` "
                                       "(model_class_name in config.yaml).")
        return cls

    def secret_store(self, *, secrets_dir: Optional[Path] = None, hint: str = "") -> SecretStore:
        return SecretStore(self.config.secret_names, secrets_dir=secrets_dir, hint=hint,
                           defaults=self.config.secret_defaults)

    def host(self, *, secrets_dir: Optional[Path] = None, hint: str = "", environment: Optional[dict] = None):
        """A ModelHost with the directory's class defined (not loaded)."""
        from .runtime import ModelHost
        from .tracebacks import trim_traceback

        try:
            cls = self.import_model_class()
        except KernelMagicsError:
            raise
        except BaseException as exc:
            raise trim_traceback(exc)
        host = ModelHost(self.config, secrets=self.secret_store(secrets_dir=secrets_dir, hint=hint),
                         base_dir=self.root, environment=environment, init_config=self.raw_config)
        host.define(cls)
        return host

    # ------------------------------------------------------------------ the fresh-process check

    def check_in_fresh_process(
        self,
        *,
        load: bool = False,
        replay: Sequence[dict] = (),
        secrets: Optional[dict[str, str]] = None,
        python: str = sys.executable,
        timeout: float = 1800,
        fingerprint: Sequence[str] = (),
        spare: bool = False,
    ) -> "CheckReport":
        """Import (and with ``load``, load and replay) the directory in a new interpreter.

        ``-I`` keeps the notebook's working directory, PYTHONPATH and user site out, so only
        what the directory carries (and installed distributions) can be imported; ``-B``
        writes no ``__pycache__`` into it. Raises TrussDirError when the model does not work.
        ``spare``: use this process's spare checker when it can check this directory as a cold
        one would (spare_check.py says when), and start the next one afterwards.
        """
        from .scratch import ScratchDir, remove_tree

        taken = None
        if spare:
            from .spare_check import take

            taken = take(self, python)
        # The check's own folder, locked while it runs (a later check removes it if this process is
        # killed); it is also the child's working directory, so files the model writes there while
        # it loads and replays are thrown away instead of landing in the export.
        scratch = taken.scratch if taken is not None else ScratchDir(Path(tempfile.gettempdir()), "km-check-")
        tmp = scratch.path
        try:
            report_path = tmp / "report.json"
            output_path = tmp / "output.txt"
            options = {"secrets": secrets or {}, "replay": list(replay), "parent": os.getpid(),
                       "fingerprint": list(fingerprint)}
            started = time.perf_counter()
            still_importing = taken is not None and not taken.caught_up()
            if taken is not None:  # the same check, in a Python that imported the model's libraries already
                proc = taken.proc
                taken.send({**options, "dir": str(self.root), "report": str(report_path), "load": load})
            else:
                command = [python, "-I", "-B", "-m", "kernel_magics.core.truss_dir", "check", str(self.root),
                           "--report", str(report_path)] + (["--load"] if load else [])
                # Output goes to a file, not a pipe: a process load() starts inherits the child's output,
                # and a pipe would keep this side waiting until that helper exits. We wait for the child
                # alone; its own session lets us stop whatever it left running once it is done.
                with open(output_path, "wb") as output:
                    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=output, stderr=subprocess.STDOUT,
                                            cwd=tmp, env=_child_env(), start_new_session=True)
            try:
                if taken is None:
                    try:
                        proc.stdin.write(json.dumps(options).encode())
                        proc.stdin.close()
                    except BrokenPipeError:
                        pass  # the child died at once; its output says why
                try:
                    returncode = proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    raise TrussDirError(f"The model in {self.root} took over {timeout:.0f} s to "
                                        f"{'load' if load else 'import'} in a fresh Python. Move slow work out of "
                                        "import time into load(), or skip the check.") from None
            finally:
                _stop_group(proc)
            seconds = time.perf_counter() - started
            text = _tail(output_path)
            if not report_path.is_file():
                tail = (text.strip().splitlines() or ["it exited without a word"])[-1]
                raise TrussDirError(f"The fresh-process check of {self.root} crashed (exit code {returncode}): "
                                    f"{tail}")
            report = CheckReport(**json.loads(report_path.read_text()), seconds=seconds, output=text,
                                 spare=taken.imported() if taken is not None else None)
            if still_importing:  # the job waited for the spare's imports: say so, the stages do not show it
                report.stages = {"waiting": max(0.0, seconds - sum(report.stages.values())), **report.stages}
        finally:
            scratch.release()
            remove_tree(tmp)
            if spare:
                from .spare_check import replenish

                replenish(self, python)  # used once: the next export finds a fresh one
        return report


@dataclass
class Validation:
    """What ``validate`` checked, for a report that says what was done."""

    truss: "TrussDir"
    class_name: str
    imported: bool = False
    loaded: bool = False
    example_replayed: bool = False
    seconds: float = 0.0

    def summary(self) -> str:
        config = self.truss.config
        n = len(config.requirements)
        parts = [f"OK {self.truss.root}: config.yaml is valid ({n} requirement{'s' if n != 1 else ''}), "
                 f"{self.truss.relative(self.truss.model_file)} defines `{self.class_name}` with predict"]
        if not self.imported:
            parts.append("import check skipped (--no-import)")
        elif self.example_replayed:
            parts.append(f"imported, loaded and answered model_metadata.example_model_input in a fresh Python "
                         f"({self.seconds:.1f} s)")
        else:
            parts.append(f"imported and instantiated in a fresh Python ({self.seconds:.1f} s)")
        return "; ".join(parts) + "."


def validate(truss: "TrussDir", *, import_check: bool = True, secrets_dir: Optional[Path] = None) -> Validation:
    """Check a Truss directory as a deployment would take it; raise TrussDirError saying what is wrong.

    Static checks always; then, unless ``import_check`` is off, a fresh Python imports the
    model file and instantiates the class, and, when the config has
    ``model_metadata.example_model_input``, loads the model and answers that input (with the secrets
    ``secrets_dir`` holds, as Truss mounts them, beside the TRUSS_SECRET_<name> variables).
    """
    cls = truss.check_static()
    result = Validation(truss, cls.name)
    if not import_check:
        return result
    example = truss.config.model_metadata.get("example_model_input")
    replay = [{"input": example}] if example is not None else []
    store = truss.secret_store(secrets_dir=Path(secrets_dir).resolve() if secrets_dir is not None else None)
    secrets = {name: store[name] for name in truss.config.secret_names if store.source_of(name)}
    report = truss.check_in_fresh_process(load=bool(replay), replay=replay, secrets=secrets or None)
    if report.error:
        raise TrussDirError(explain_check_failure(report, truss, during="validate"))
    failed = [r for r in report.replayed if not r["ok"]]
    if failed:
        where = f" ({failed[0]['where']})" if failed[0].get("where") else ""
        raise TrussDirError(f"{truss.root}: the model loaded, but predict failed on model_metadata.example_model_input: "
                            f"{failed[0]['why']}{where}.")
    result.imported, result.loaded, result.example_replayed = True, bool(replay), bool(replay)
    result.seconds = report.seconds
    return result


def _yields(function: ast.AST) -> bool:
    """Whether a function's own body yields (a generator), nested functions and classes aside."""
    todo = list(ast.iter_child_nodes(function))
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Yield, ast.YieldFrom)):
            return True
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            todo.extend(ast.iter_child_nodes(node))
    return False


def _shown_line(text: Optional[str], limit: int = 120) -> str:
    """The line a syntax error is on, as Python shows it: its last physical line, cut at ``limit``."""
    lines = (text or "").strip().splitlines()
    if not lines:
        return ""
    line = lines[-1].strip()  # (not blank: the text was stripped)
    return f": `{line[:limit]}...`" if len(line) > limit else f": `{line}`"


def explain_check_failure(report: "CheckReport", truss: "TrussDir", *, during: str,
                          notebook_dir: Optional[Path] = None) -> str:
    """One paragraph on why the fresh-process check failed and what to do, for ``validate`` or an export
    (``notebook_dir``: where the notebook's own files are)."""
    error = report.error or "unknown error"
    what = {"import": f"importing {truss.relative(truss.model_file)}", "init": f"creating `{truss.config.model_class_name}`",
            "load": "load()"}.get(report.stage, report.stage)
    if during == "export":
        head = f"The exported model does not work on its own ({what} failed in a fresh Python), so nothing was exported: {error}."
    else:
        where = f" ({report.where})" if report.where else ""
        head = f"{truss.root}: {what} failed in a fresh Python: {error}{where}."
    module = report.missing_module
    if module:
        top = module.split(".")[0]
        local = any((d / top).exists() or (d / f"{top}.py").exists() for d in truss.package_dirs)
        if during == "validate" and not local:
            return (f"{head} The import check needs `{top}`, which is not installed in this Python "
                    f"({sys.executable}). Install the directory's requirements here, or run validate with "
                    "--no-import to skip the import check (the static checks still run).")
        return f"{head} Add `{top}` to requirements, or put the module beside the notebook so it goes into packages/."
    if error.startswith("NameError"):
        return f"{head} Define that name at the top level of a notebook cell, or inside the model class."
    if during == "validate" and error.startswith("FileNotFoundError"):  # (as `kernel-magics predict` says it)
        reader = "load()" if report.stage == "load" else truss.relative(truss.model_file)
        return f"{head} {missing_file_advice(reader, truss.relative(truss.model_file))}."
    if during == "export" and error.startswith("FileNotFoundError"):
        reader = "load()" if report.stage == "load" else "the model"
        return f"{head} {_file_left_behind_advice(error, reader, truss.root, notebook_dir)}"
    return head


def _file_left_behind_advice(error: str, reader: str, root: Path, notebook_dir: Optional[Path]) -> str:
    """An export whose model reads a file that is not there: the deployment runs in the exported directory
    (Truss's /app, here ``root``), where only data/ and packages/ go with the model."""
    import re

    found = re.search(r"No such file or directory: (['\"])(.+?)\1", error)  # (repr: "it's" in double quotes)
    name = found.group(2) if found else None
    data = root / "data"
    read = Path(os.path.normpath(root / name)) if name else None  # (the check runs in root, as Truss in /app)
    if read is not None and read.is_relative_to(data):
        inside = read.relative_to(data)
        return (f"`data/{inside}` is not in the export: its data/ is the notebook's data/ folder (or data_dir) and "
                f"what --data copies. Put the file there, or fix the name {reader} reads.")
    if name and not Path(name).is_absolute():
        copied = (data / Path(name).name).exists()
        if copied or (notebook_dir is not None and (notebook_dir / name).exists()):
            return (f"{reader} reads `{name}` from the working directory: it is beside the notebook, but a deployment "
                    f"runs in the exported directory, where only data/ goes with the model"
                    f"{' (--data copied it there, as data/' + Path(name).name + ')' if copied else ''}. Move it into "
                    f"a data/ folder beside the notebook and read it in {reader} as `data/{Path(name).name}`: the "
                    f"notebook and the deployment both find it there (`data_dir`, which __init__ can take, is that "
                    f"folder).")
    return ("Keep the files the model reads in a data/ folder beside the notebook and read them from `data/` "
            "(`data_dir`, which __init__ can take, is that folder): the export copies it.")


def missing_file_advice(reader: str, fix_in: str, filename: Optional[str] = None) -> str:
    """What to change when the code ``reader`` names reads a file that is not there: most often the file went
    missing (a data/ file deleted or never copied in), not the code. ``validate`` and ``predict`` both say it."""
    return (f"A file that {reader} reads is missing: put {filename or 'it'} back where it is read, or fix the path in "
            f"{fix_in}")


@dataclass
class CheckReport:
    """What the fresh-process check found."""

    ok: bool
    stage: str  # import, init, load, replay, done
    error: Optional[str] = None  # "ModuleNotFoundError: No module named 'torch'"
    missing_module: Optional[str] = None
    model_line: Optional[int] = None  # where in model.py (top level) the error happened
    where: Optional[str] = None  # the directory's last frame of the error: "model/model.py, line 12, in load"
    replayed: list = field(default_factory=list)  # one dict per replayed input: index, ok, got, why (, where)
    stages: dict = field(default_factory=dict)  # seconds in the child: import, load, replay
    fingerprints: dict = field(default_factory=dict)  # "start"/"after_replay" -> name -> fingerprint
    left_running: list = field(default_factory=list)  # what the model started and left running: threads, processes
    seconds: float = 0.0
    output: str = ""
    spare: Optional[list] = None  # checked by a spare checker: the libraries it had imported in advance

    @property
    def mismatches(self) -> list:
        return [r for r in self.replayed if not r["ok"]]


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop the check child, if it still runs, and every process it started that stayed in its session."""
    import signal

    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait(5)


def _tail(path: Path, limit: int = 64 * 1024) -> str:
    """The last ``limit`` bytes of the child's output (a model may print a lot)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _left_running() -> list[str]:
    """What still runs in this process besides the main thread: threads that would keep Python
    from exiting, and child processes (Linux), each described in a few words."""
    import threading

    found = [f"thread `{t.name}`" for t in threading.enumerate()  # (our own predict pool's threads aside)
             if t is not threading.main_thread() and t.is_alive() and not t.daemon
             and not t.name.startswith(("model-predict", "model-health"))]
    me = os.getpid()
    with contextlib.suppress(OSError):
        for pid in filter(str.isdigit, os.listdir("/proc")):
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{pid}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                if int(fields[1]) != me or fields[0] == b"Z":  # (a child that already ended is no matter)
                    continue
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
                found.append(f"process {pid} `{cmd[:80]}`")
    return found


def _child_env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # -I ignores it too; dropped so nothing else reads it
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


# ---------------------------------------------------------------------- the check command (child process)

def _run_check(root: Path, report_path: Path, load: bool, options: Optional[dict] = None) -> int:
    """The check, in the fresh process; ``options`` from stdin (a spare checker passes what it read)."""
    import asyncio

    if options is None:
        options = json.loads(sys.stdin.read() or "{}")
    from .scratch import die_with_parent

    die_with_parent(options.get("parent"))
    # What load() starts must not hold the parent's end of our stdin either.
    with contextlib.suppress(OSError):
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
    report: dict[str, Any] = {"ok": False, "stage": "import", "stages": {}}
    host = None
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        report["stages"][stage] = now - clock
        clock = now

    def finish() -> int:
        report["left_running"] = _left_running()
        report_path.write_text(json.dumps(report, default=str))
        return 0 if report["ok"] else 1

    try:
        _as_truss_runs_it(root, skip={report_path.name, "output.txt"})
        truss = TrussDir.open(root)
        host = truss.host()
        verify = list(options.get("fingerprint", []))
        module_globals = vars(sys.modules[truss.module_name])
        for name, value in options.get("secrets", {}).items():
            host.secrets.set_value(name, value)
        report["stage"] = "init"
        if not load:
            host.model_class(**host.init_kwargs())
            lap("import")
            _fingerprints(report, "start", module_globals, verify, lap)
            report.update(ok=True, stage="done")
            return finish()
        lap("import")
        report["stage"] = "load"
        host.load()
        lap("load")
        _fingerprints(report, "start", module_globals, verify, lap)
        report["stage"] = "replay"
        from .replay import PRINTED_STREAM, as_printed, compare

        async def replay_all() -> None:
            for i, item in enumerate(options.get("replay", [])):
                try:
                    # A prediction made with a request (%model_predict --header) is replayed with the same one;
                    # one read back from a notebook file with the request a server would make of its input.
                    from .model_request import request_from

                    contract = host.contract
                    takes = any(s is not None and s.takes_request
                                for s in (contract.predict, contract.preprocess, contract.postprocess))
                    described = item.get("request") or ({"headers": []} if takes else None)
                    got = await host.collect(item["input"], request=request_from(described, item["input"],
                                                                                 options.get("secrets", {})))
                except Exception as exc:
                    report["replayed"].append({"index": i, "ok": False, "got": None,
                                               "why": host.describe_error(exc), "where": _where_in(exc, root)})
                    continue
                if item.get("shown") == PRINTED_STREAM:  # a stream known only by the text it printed
                    got = as_printed(got)
                why = compare(item["output"], got) if "output" in item else None
                report["replayed"].append({"index": i, "ok": why is None, "got": got, "why": why})

        report["replayed"] = []
        asyncio.run(replay_all())
        lap("replay")
        if report["replayed"]:
            _fingerprints(report, "after_replay", module_globals, verify, lap)
        report.update(ok=not any(not r["ok"] for r in report["replayed"]), stage="done")
    except BaseException as exc:  # reported to the parent, which explains it
        if isinstance(exc, ModuleNotFoundError):
            report["missing_module"] = exc.name
        report["model_line"] = _model_line(exc, root)
        report["where"] = _where_in(exc, root)
        text = f"{type(exc).__name__}: {exc}"
        report["error"] = host.secrets.redact(text) if host is not None else text
    return finish()


def _as_truss_runs_it(root: Path, skip: set) -> None:
    """Truss runs the model in /app, which holds the directory's model/, data/ and config.yaml, so a load() that
    opens `data/labels.txt` works deployed. The check's own folder (its working directory) gets the same entries:
    real folders, with links to the files, so such a path resolves as deployed while a file the model creates
    lands here and is thrown away with the folder, not in the export."""
    here = Path.cwd().resolve()
    root = root.resolve()
    if here == root or root in here.parents:
        return
    for folder, dirs, files in os.walk(root):
        relative = Path(folder).relative_to(root)
        top = relative == Path(".")
        dirs[:] = [d for d in dirs if d != "__pycache__" and not (top and (d in skip or d.startswith(".")))]
        files = [f for f in files if not (top and (f in skip or f.startswith(".")))]  # (the check's own files)
        with contextlib.suppress(OSError):
            (here / relative).mkdir(exist_ok=True)
            for name in files:
                link = here / relative / name
                if not link.exists() and not link.is_symlink():
                    link.symlink_to(Path(folder) / name)


def _model_line(exc: BaseException, root: Path) -> Optional[int]:
    """The line of model.py where the error happened at the top level (None when it happened elsewhere):
    the export's verification maps it to the statement re-run from source."""
    import traceback

    try:
        model_file = str(TrussDir.open(root).model_file)
    except Exception:
        return None
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == model_file and f.name == "<module>"]
    return lines[-1] if lines else None


def _where_in(exc: BaseException, root: Path) -> Optional[str]:
    """The last frame of ``exc`` in the directory's own code (its model folder or its packages), as a traceback
    names it: what `validate` shows, so that a user who edits the directory knows where to look."""
    import traceback

    base = os.path.realpath(root)
    try:
        truss = TrussDir.open(root)
        folders = [os.path.realpath(p) for p in (truss.model_file.parent, *truss.package_dirs)]
    except Exception:
        return None
    inside = [f for f in traceback.extract_tb(exc.__traceback__)
              if any(os.path.realpath(f.filename).startswith(folder + os.sep) for folder in folders)]
    if not inside:
        return None
    frame = inside[-1]
    return f"{os.path.relpath(os.path.realpath(frame.filename), base)}, line {frame.lineno}, in {frame.name}"


def _fingerprints(report: dict, when: str, module_globals: dict, names: list, lap: Any) -> None:
    """Fingerprints of the names the parent verifies against the notebook's live values (fingerprint.py):
    after load (or import), and after the replay, which shows what predict changes."""
    if not names:
        return
    from .fingerprint import fingerprint_names

    report.setdefault("fingerprints", {})[when] = fingerprint_names(module_globals, names)
    lap(f"verify {when}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kernel_magics.core.truss_dir")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="Import (and optionally load and replay) a Truss directory; JSON report.")
    check.add_argument("dir", type=Path)
    check.add_argument("--report", type=Path, required=True)
    check.add_argument("--load", action="store_true")
    args = parser.parse_args(argv)
    return _run_check(args.dir, args.report, args.load)


if __name__ == "__main__":
    code = main()
    # The report is written: the check's work is done. Threads or processes the model started
    # must not keep this process alive (the parent stops what is left).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
