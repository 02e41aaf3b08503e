"""Write a Truss directory: config.yaml, model/model.py, data/ (with the notebook's values), packages/.

The directory is built next to the target and renamed into place only after it
passed the fresh-process check: it imports and instantiates on its own and,
when the notebook recorded predictions, loads and answers each of them as the
notebook did. A failure at any step leaves nothing behind and never touches a
previous export. An export of the same notebook (its marker file names the notebook and
lists what it wrote) is replaced when nothing in it changed since, so that Run All works
twice; ``--force`` replaces another export too (never a folder that holds the notebook or
the working directory); files the export did not write need ``--force`` twice, and a
``.git`` is never deleted. The swap is one atomic exchange
where the OS has one; a build a killed export left behind is removed by the next
export to the same target.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import stat
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from .config import ModelConfig, check_folder_setting, yaml_text
from .errors import KernelMagicsError
from .replay import MAX_RECORDED, PredictionRecord
from .secrets import ENV_PREFIX, SecretScanner
from .scratch import ScratchDir, exchange, locked, remove_tree, sweep_stale
from .source import MaterializeError, ModelSource, build_model_source, is_stdlib
from .values import VALUES_DIR
from .verification import Verification

__all__ = [
    "ExportError", "ExportResult", "Materialized", "materialize", "materialize_config", "pin_requirements",
    "export_model", "refuse_target", "format_tree", "MARKER",
]

MARKER = ".kernel-magics-export"  # in every export's root: what --force may replace


class ExportError(KernelMagicsError):
    """The export cannot be written; nothing was left behind."""


@dataclass
class Materialized:
    """Everything an export writes, before it touches the disk."""

    source: ModelSource
    config: ModelConfig
    config_yaml: str
    local_modules: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    record: Optional[PredictionRecord] = None  # the notebook's predictions, to replay
    live: Optional[dict] = None  # the kernel's namespace: the values the fresh process is verified against
    # Builds this again with more names travelling as values (name -> why): see verification.py.
    rebuild: Optional[Any] = field(default=None, repr=False)
    model_cell: str = ""  # the %%model cell's text (what verification.remembered keys on besides the live values)


@dataclass
class ExportResult:
    target: Path
    files: list[tuple[str, int]]
    warnings: list[str] = field(default_factory=list)
    replayed: int = 0
    replay_note: str = ""
    timings: dict[str, float] = field(default_factory=dict)  # seconds: capture, check (incl. replay)
    source: Optional[ModelSource] = None  # model.py as exported (verification may have changed it)
    replaced: bool = False  # an earlier export was there, and this one took its place

    def tree(self) -> str:
        """The files with their sizes, under the target as seen from here (relative when below)."""
        return format_tree(shown_path(self.target), self.files)


def shown_path(target: Path, seen_from: Optional[Path] = None) -> Path:
    """``target`` as a user in ``seen_from`` (default: the working directory) reads it: relative when below it."""
    try:
        shown = Path(os.path.relpath(target, seen_from))
    except (ValueError, OSError):  # another drive; a working directory that an export replaced meanwhile
        return target
    return target if shown.parts and shown.parts[0] == ".." else shown


# ------------------------------------------------------------------ requirements and config

def _python_version() -> str:
    return f"py{sys.version_info.major}{sys.version_info.minor}"


def _made_at_run_time(module: str) -> bool:
    """A module another library put in sys.modules as it ran, with no file and no import spec (Cython's
    ``_cython_3_1_2``, which holds the types its compiled functions share): nothing installs it; the library
    that made it is what the deployment needs."""
    found = sys.modules.get(module)
    return found is not None and getattr(found, "__spec__", None) is None and getattr(found, "__file__", None) is None


def distribution_of(module: str, packages: dict[str, list[str]]) -> Optional[str]:
    """The installed distribution that provides ``module`` (dotted): for a namespace several
    distributions share (``google.protobuf``), the one whose files hold the module itself."""
    parts = module.split(".")
    dists = sorted(set(packages.get(parts[0], [])))
    if len(dists) <= 1:
        return dists[0] if dists else None
    for depth in range(len(parts), 1, -1):
        prefix = "/".join(parts[:depth])
        owners = [d for d in dists
                  if any(str(f).startswith(prefix + "/") or str(f) == prefix + ".py"
                         for f in (importlib.metadata.files(d) or []))]
        if len(owners) == 1:
            return owners[0]
        if owners:
            dists = owners
    return dists[0]


_PACKAGES: dict[tuple, dict] = {}


def _packages_distributions() -> dict[str, list[str]]:
    """importlib.metadata.packages_distributions(), cached until an install changes a site-packages folder
    (it reads every distribution's file list: most of an export's analysis time in a big environment)."""
    key = tuple((p, os.stat(p).st_mtime_ns) for p in sys.path if p.endswith("-packages") and os.path.isdir(p))
    if key not in _PACKAGES:
        _PACKAGES.clear()
        _PACKAGES[key] = importlib.metadata.packages_distributions()
    return _PACKAGES[key]


def pin_requirements(written: Sequence[str], modules: Iterable[str], local: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """Requirements for config.yaml and warnings.

    Lines written in the config win: kept as written, except a bare name, which
    gets the installed version. Then one ``name==version`` per distribution the
    code imports (standard library, local modules and kernel_magics excluded),
    local version tags like ``+cpu`` dropped.
    """
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    def installed(dist: str) -> Optional[str]:
        try:
            return Version(importlib.metadata.version(dist)).public
        except importlib.metadata.PackageNotFoundError:
            return None

    out: list[str] = []
    seen: set[str] = set()
    warnings: list[str] = []
    for line in written:
        req = Requirement(line)  # the config validated every line
        seen.add(canonicalize_name(req.name))
        version = installed(req.name) if not (req.specifier or req.url) else None
        if version:
            extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
            marker = f"; {req.marker}" if req.marker else ""
            out.append(f"{req.name}{extras}=={version}{marker}")
        else:
            out.append(line)
            ran = installed(req.name) if req.specifier and not req.url else None
            if ran and (req.marker is None or req.marker.evaluate()):
                # Kept as written (the user's choice): said where a deployment may install another version than
                # the one the check ran with (compared with its local tag: `torch==2.13.0+cpu` matches it).
                full = importlib.metadata.version(req.name)
                only = next(iter(req.specifier)) if len(req.specifier) == 1 else None
                exact = only is not None and only.operator in ("==", "===") and "*" not in only.version
                if not req.specifier.contains(full, prereleases=True):
                    warnings.append(f"requirement `{line}` excludes {req.name} {ran}, which the export was checked "
                                    f"with: a deployment installs another version. Write `{req.name}=={ran}` in "
                                    f"%%model_config, or install a version it allows here.")
                elif not exact:
                    warnings.append(f"requirement `{line}` is a range: the export was checked with {req.name} {ran}, "
                                    f"and a deployment may install another version. Write `{req.name}=={ran}` in "
                                    f"%%model_config to serve what the notebook ran.")
    packages = _packages_distributions()
    local = set(local)
    for module in modules:
        top = module.split(".")[0]
        if is_stdlib(module) or top in local or _made_at_run_time(top):
            continue
        if top == "kernel_magics":
            raise MaterializeError(
                "The model imports kernel_magics, which a deployment does not install. Use plain Python "
                "(for example torch.cuda.is_available() instead of kernel_magics.devices) in the model's code."
            )
        dist = distribution_of(module, packages)
        if not dist:
            warnings.append(f"could not tell which distribution provides module `{module}`; add it to requirements yourself.")
            continue
        name = canonicalize_name(dist)
        if name in seen:
            continue
        seen.add(name)
        version = installed(dist)
        out.append(f"{dist}=={version}" if version else dist)
    return out, warnings


_FIRST_KEYS = ("model_name", "model_class_name", "python_version", "requirements")


def materialize_config(config: ModelConfig, requirements: list[str], example_input: Any = None) -> str:
    """config.yaml's text: the user's config, python_version from this interpreter,
    pinned requirements, data under ``data/``, secret names with null values only, and
    (unless the config sets one) the notebook's first recorded input as Truss's example."""
    data = config.to_dict()
    data["python_version"] = config.python_version or _python_version()
    data["requirements"] = requirements
    data.pop("data_dir", None)  # the export always puts data in data/, Truss's default
    if example_input is not None and "example_model_input" not in config.model_metadata:
        data["model_metadata"] = {**config.model_metadata, "example_model_input": example_input}
    ordered = {k: data[k] for k in _FIRST_KEYS if k in data}
    ordered.update((k, v) for k, v in data.items() if k not in ordered)
    return yaml_text(ordered)


def _local_module(base_dir: Path, module: str) -> Optional[Path]:
    for candidate in (base_dir / f"{module}.py", base_dir / module):
        if candidate.is_file() or (candidate.is_dir() and any(candidate.glob("*.py"))):
            return candidate
    return None


def materialize(cells: Sequence[str], config: ModelConfig, base_dir: Path, notebook: str, *,
                live: Optional[dict] = None, record: Optional[PredictionRecord] = None,
                as_values: Optional[dict] = None, replay: bool = True,
                unsure_cells: Sequence[int] = ()) -> Materialized:
    """Build model.py and config.yaml in memory from the cells (no files written).

    ``live`` is the kernel's namespace (values that cannot be rebuilt travel as files);
    ``record`` the notebook's predictions, replayed against the export (unless not ``replay``); ``as_values``
    names that must travel as values (name -> why), which the verification found different
    (without it, what earlier verifications of the same kernel found and still holds).
    """
    from .source import last_cell_of
    from .verification import remembered

    model = last_cell_of(list(cells), "model")
    model_cell = cells[model] if model is not None else ""
    if as_values is None:
        as_values = remembered(live, model_cell)
    replay_proves = replay and record is not None and len(record) > 0
    source = build_model_source(cells, config.model_class_name, notebook, live, as_values=as_values,
                                local=lambda m: _local_module(base_dir, m), replay_proves=replay_proves,
                                unsure_cells=unsure_cells)
    tops = list(dict.fromkeys(m.split(".")[0] for m in source.modules))
    local = {m: p for m in tops if (p := _local_module(base_dir, m)) is not None}
    requirements, warnings = pin_requirements(config.requirements, source.modules, local)
    for name, cell in source.absent:
        warnings.append(f"the model uses `{name}`, which the notebook no longer has (deleted since cell {cell + 1} set "
                        f"it): model.py sets it as cell {cell + 1} did, so the deployment answers where the notebook's "
                        "model now fails with a NameError. Run that cell again, or remove the `del`, to make the two "
                        "agree.")
    example = record.first_input if record is not None and len(record) else None

    def rebuild(more: dict) -> Materialized:
        return materialize(cells, config, base_dir, notebook, live=live, record=record,
                           as_values={**as_values, **more}, replay=replay, unsure_cells=unsure_cells)

    return Materialized(source, config, materialize_config(config, requirements, example),
                        sorted(local.values()), warnings, record, live, rebuild, model_cell)


# ------------------------------------------------------------------ where an export may go

def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_target(target: Path, force: int, protected: Sequence[Path], origin: Optional[str]) -> Optional[str]:
    """Refuse a target that would lose data; returns the marker id of an earlier export there.
    ``force``: how many times --force was given (twice also replaces files the export did not write).
    ``origin``: the notebook exporting (None when unknown); its own earlier export, unchanged since, is
    replaced without --force."""
    if target.is_symlink():
        raise ExportError(f"{target} is a symbolic link. Export to a real directory path (or remove the link).")
    for kept in protected:
        if _inside(kept, target):
            what = "the working directory" if kept == Path.cwd().resolve() else str(kept)
            raise ExportError(f"{target} holds {what}; an export there would replace it. Export to a directory "
                              "of its own (for example a new folder next to the notebook).")
    if target.exists() and not target.is_dir():
        raise ExportError(f"{target} is a file, not a directory. Choose a directory path for the export.")
    if not target.is_dir():
        return None
    earlier = _read_marker(target)
    marker = earlier.get("id")
    try:
        empty = not any(target.iterdir())
    except OSError as exc:
        raise ExportError(f"Cannot read {target}: {exc.strerror}.") from None
    if empty:
        return marker
    # Each refusal names what would work: never "pass --force" where --force would be refused too.
    if marker is None:
        raise ExportError(f"{target} exists and is not empty, and no export made it (it has no {MARKER} file), so "
                          "no export replaces it, not even with --force. Choose a new directory, or empty this one "
                          "yourself.")
    if (target / ".git").exists():
        raise ExportError(f"{target} holds a .git folder, and an export never deletes one. Move the export's "
                          "files elsewhere or export to a new directory (then copy the .git there yourself).")
    mine = origin is not None and earlier.get("origin") == origin_key(origin)
    try:
        foreign = _changes_since(target, earlier)
    except OSError as exc:
        raise ExportError(f"Cannot read {target}: {exc.strerror}.") from None
    if foreign is None and force < 2:
        raise ExportError(f"{target} holds an export made before exports listed their files, so whether anything in "
                          "it changed since cannot be told. Pass --force twice to replace it, whatever it holds, or "
                          "choose a new directory.")
    if foreign and force < 2:
        shown = _listed(foreign)
        then = "" if force or mine else " and pass --force (it is not this notebook's export)"
        raise ExportError(f"{target} holds files added or changed since the earlier export ({shown}), so "
                          f"{'--force' if force else 'an export'} will not replace it. Move them out first{then}, or "
                          "pass --force twice to replace the folder, deleting them.")
    if not force and not mine:
        raise ExportError(f"{target} holds an earlier export{_made_by(earlier, origin)}. Pass --force to replace it, "
                          "or choose a new directory.")
    # (Not forced: Run All again, where nothing is there but what this notebook's last export wrote.)
    return marker


def refuse_target(target: Path, force: int, protected: Sequence[Path] = (),
                  cwd: Optional[Path] = None, origin: Optional[str] = None) -> Optional[str]:
    """Raise the ExportError :func:`export_model` raises for ``target`` before it builds anything (it calls this);
    else the marker id of an earlier export there. Also for work that comes before an export (``export --execute``
    runs the whole notebook), so that it is not done in vain. ``cwd``: the working directory of the process that
    will export (default this one's), which it protects; ``origin``: the notebook that exports, as
    :func:`export_model` takes it."""
    target = Path(os.path.abspath(target))
    _check_name(target)
    return _check_target(target, force, [Path(os.path.abspath(p)) for p in [*protected, cwd or Path.cwd()]], origin)


def _read_marker(folder: Path) -> dict:
    """What an earlier export's marker says (empty when there is none, or it cannot be read)."""
    try:
        found = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def origin_key(origin: str) -> str:
    """What a marker keeps of the notebook that exported: a digest of its path, never the path (the directory is
    pushed and built elsewhere, and a path names the user and the project)."""
    return hashlib.sha256(origin.encode()).hexdigest()[:16]


def _notebook_of(origin: Optional[str]) -> Optional[str]:
    """The notebook's file name in an origin that is a path (not a kernel's own token), as a marker keeps it."""
    if origin and (origin.endswith(".ipynb") or os.sep in origin):
        return os.path.basename(origin)
    return None


def _listed(names: Sequence[str], most: int = 5) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _made_by(earlier: dict, origin: Optional[str]) -> str:
    """How a refusal names who made an earlier export that is not this notebook's (" of nb.ipynb")."""
    name = earlier.get("notebook")
    if isinstance(name, str) and name:
        name = os.path.basename(name)
        if origin is not None and _notebook_of(origin) is None:  # this kernel knows no notebook: it may be that one
            return (f" of {name} (this kernel cannot tell whether it runs {name}: no Jupyter server started it, "
                    "nbconvert's say)")
        same_name = _notebook_of(origin) == name
        return f" of another notebook named {name} (in another folder)" if same_name else f" of {name}"
    if earlier.get("origin"):  # a kernel that knew no notebook (ModelMagics.export_origin)
        return (" made by another kernel (a kernel that no Jupyter server started, nbconvert's say, cannot tell which "
                "notebook it runs)")
    return ""


def _snapshot(root: Path) -> dict[str, list[int]]:
    """Every file under ``root`` (relative path -> [size, mtime in ns]) and every folder ("path/" -> [0, 0]), what a
    marker records. A link to a folder counts as a file: os.walk lists it as a folder but never goes into it."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        kept = []
        for name in dirnames:
            if name == "__pycache__":
                continue
            path = here / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                info = path.lstat()
                found[rel] = [info.st_size, info.st_mtime_ns]
            else:
                found[rel + "/"] = [0, 0]  # so that a folder added empty is seen
                kept.append(name)
        dirnames[:] = kept
        for name in filenames:
            path = here / name
            rel = path.relative_to(root).as_posix()
            if rel == MARKER:
                continue
            info = path.lstat()
            found[rel] = [info.st_size, info.st_mtime_ns]
    return found


def _changes_since(target: Path, earlier: dict) -> Optional[list[str]]:
    """What in an earlier export it did not write as it is now: files and folders added, files changed. None when
    its marker lists no files (an export from before markers did), so nothing is known."""
    written = earlier.get("files")
    if not isinstance(written, dict):
        return None
    # A marker from before folders were listed knows none (an empty one it wrote included): folders are not judged.
    lists_folders = any(rel.endswith("/") for rel in written)
    found = []
    for rel, seen in _snapshot(target).items():
        if rel.endswith("/"):
            if lists_folders and rel not in written:
                found.append(rel)
        elif written.get(rel) != seen:
            found.append(rel + (" (changed)" if rel in written else ""))
    return sorted(found)


def _check_data(sources: Sequence[Path], target: Path) -> None:
    for src in sources:
        if _inside(target, src):
            raise ExportError(f"The data folder {src} contains the export target {target}; copying it would copy "
                              "the export into itself. Choose a data folder that does not contain the target, or "
                              "export somewhere outside it.")


def _check_name(target: Path) -> None:
    """Refuse a directory name the file system cannot hold beside its hidden build (which adds 19 bytes)."""
    try:
        limit = os.pathconf(target.parent if target.parent.is_dir() else "/", "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    size = len(os.fsencode(target.name))
    if size + len(".x.building-") + 8 > limit:
        raise ExportError(f"The directory name {target.name[:40]}... is {size} bytes long; this file system allows "
                          f"{limit} bytes in a name, and the export builds beside it under a longer one. Choose a "
                          f"name of at most {limit - 20} bytes.")


def _symlink_loop(folder: Path) -> Optional[Path]:
    """A symbolic link under ``folder`` that leads to a folder containing it (copying would never end)."""
    for dirpath, dirnames, _ in os.walk(folder):
        for name in dirnames:
            link = Path(dirpath) / name
            if link.is_symlink():
                try:
                    real = link.resolve(strict=True)
                except (OSError, RuntimeError):
                    return link  # a loop the OS itself refuses to follow
                if _inside(link.parent.resolve(), real):
                    return link
    return None


def _copy_data(sources: Iterable[Path], data_dir: Path) -> None:
    for src in sources:
        if not os.access(src, os.R_OK):
            raise ExportError(f"Data path {src} cannot be read (permission denied). Fix its permissions or leave it out.")
        loop = _symlink_loop(src) if src.is_dir() else None
        if loop is not None:
            raise ExportError(f"{loop} is a symbolic link to a folder that contains it ({os.readlink(loop)}), so "
                              f"copying {src} would never end. Remove the link or point it elsewhere.")
        try:
            if src.is_dir():
                shutil.copytree(src, data_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                data_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, data_dir / src.name)
        except (OSError, shutil.Error) as exc:
            first = exc.args[0][0] if isinstance(exc, shutil.Error) and exc.args and exc.args[0] else exc
            raise ExportError(f"Could not copy data from {src}: {first}. Check the files' permissions.") from None


# ------------------------------------------------------------------ writing

def export_model(
    target: Path,
    materialized: Materialized,
    *,
    base_dir: Path,
    data: Sequence[Path] = (),
    force: int = 0,
    protected: Sequence[Path] = (),
    secrets: Optional[dict[str, str]] = None,
    secret_values: Iterable[str] = (),
    replay: bool = True,
    explain_mismatch: Optional[Any] = None,
    python: str = sys.executable,
    origin: Optional[str] = None,
) -> ExportResult:
    """Write the Truss directory at ``target`` atomically, after it proved itself in a fresh process.

    ``force``: replace an earlier export at ``target`` (2: even with files it did not write).
    ``protected``: paths an export must never replace (the notebook, the working directory).
    ``secrets``: values the fresh process may read (never written anywhere); ``secret_values``:
    values no saved file may contain. ``replay`` off skips replaying the recorded predictions;
    ``explain_mismatch(index)`` may name the most likely cause when a replayed answer differs. ``origin``:
    the notebook exporting (its real path; None when unknown), which the marker records: an earlier export of
    the same origin, unchanged since, is replaced without ``force``.
    """
    target = Path(os.path.abspath(target))
    marker = refuse_target(target, force, protected, origin=origin)
    config = materialized.config
    notes = [note for setting, value in [("data_dir", config.data_dir)] + [
             ("external_package_dirs", d) for d in config.external_package_dirs]
             if (note := check_folder_setting(setting, value, base_dir))]
    data_sources: list[Path] = []
    config_data = base_dir / config.data_dir
    if config_data.is_dir():
        data_sources.append(config_data.resolve())
    elif "data_dir" in config.model_fields_set:
        raise ExportError(f"data_dir {config.data_dir!r} in the config does not exist at {config_data}. Create it or fix the path.")
    for path in data:
        path = Path(path) if Path(path).is_absolute() else base_dir / path
        if not path.exists():
            raise ExportError(f"Data path {path} does not exist. Check the --data argument.")
        data_sources.append(path.resolve())
    _check_data(data_sources, target)
    _refuse_secret_env_reads(materialized.source)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Held (flock) while this export runs: a later export to the same target removes it if we are killed.
        scratch = ScratchDir(target.parent, f".{target.name}.building-")
        sweep_stale(target.parent, f".{target.name}.old-")
    except OSError as exc:
        raise ExportError(f"Cannot write in {target.parent}: {exc.strerror}. Choose a folder you can write to.") from None
    build = scratch.path
    result = ExportResult(target, [], list(materialized.warnings) + notes)
    try:
        _write(build, materialized, data_sources)
        started = time.perf_counter()
        _save_values(build, materialized, secret_values)
        result.timings["capture"] = time.perf_counter() - started
        started = time.perf_counter()
        scanner = secret_scanner(secret_values, config)
        scanned = refuse_secrets(build, materialized, scanner)
        result.timings["secret_scan"] = time.perf_counter() - started
        record = materialized.record if replay else None
        started = time.perf_counter()
        verification = Verification(materialized, lambda m: _rewrite(build, m, data_sources, secret_values, scanner))
        result.replayed, stages, notes = _check(build, record, secrets, python, explain_mismatch, verification,
                                                shown=(target, base_dir))
        result.source = verification.materialized.source
        result.warnings += notes
        result.timings["check"] = time.perf_counter() - started
        result.timings.update(stages)
        refuse_secrets(build, materialized, scanner, skip=scanned)  # what the check wrote in the build
        result.replay_note = _replay_note(materialized.record, replay, result.replayed)
        result.replay_note += " " + _check_note(result.timings, result.replayed)
        # mkdtemp's 0700 kept the build to this user while values were saved and scanned for secrets: now the mode
        # any new folder gets here (the umask's, as model/ has it), so that another user or a container build reads it.
        # (A folder already there, empty or an earlier export, keeps the mode it has: one made private stays so.)
        mode = target.stat().st_mode if target.is_dir() and not target.is_symlink() else (build / "model").stat().st_mode
        os.chmod(build, stat.S_IMODE(mode))
        (build / MARKER).write_text(json.dumps({
            "exported_by": "kernel-magics", "id": uuid.uuid4().hex, "files": _snapshot(build),
            "notebook": _notebook_of(origin), "origin": origin_key(origin) if origin else None}) + "\n")
        result.warnings += _swap_into_place(build, target, marker, scratch, force)
        result.replaced = marker is not None
    except BaseException:
        remove_tree(build)
        raise
    finally:
        scratch.release()
    result.files = _list_files(target)
    return result


def _write(build: Path, materialized: Materialized, data_sources: Sequence[Path]) -> None:
    (build / "model").mkdir()
    (build / "model" / "__init__.py").write_text("")
    (build / "model" / "model.py").write_text(materialized.source.text + batching_tail(materialized.config))
    (build / "config.yaml").write_text(materialized.config_yaml)
    _copy_data(data_sources, build / "data")
    if materialized.config.batching is not None:
        (build / "packages").mkdir(exist_ok=True)
        shutil.copy2(Path(__file__).with_name("batching.py"), build / "packages" / f"{BATCHING_MODULE}.py")
    for module in materialized.local_modules:
        dest = build / "packages" / module.name
        dest.parent.mkdir(exist_ok=True)
        if module.is_dir():
            shutil.copytree(module, dest, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(module, dest)


BATCHING_MODULE = "kernel_magics_batching"  # core/batching.py, as packages/ holds it


def batching_tail(config: ModelConfig) -> str:
    """What model.py ends with when the model batches: Truss's own server calls ``predict`` once per
    request, so a subclass of the same name gets a ``predict`` that feeds the batcher (our runtime,
    which calls predict_batch itself, sees it is that one). Written as a method, so a static reading
    of model.py (Truss's, ours) finds predict."""
    settings = config.batching
    if settings is None:
        return ""
    name = config.model_class_name
    return (f"\n\nimport {BATCHING_MODULE}  # noqa: E402  (packages/{BATCHING_MODULE}.py)\n\n\n"
            f"class {name}({name}):\n"
            f"    @{BATCHING_MODULE}.batched(max_batch_size={settings.max_batch_size}, "
            f"max_wait_ms={settings.max_wait_ms})\n"
            f"    async def predict(self, model_input):\n"
            f'        """Dynamic batching (model_metadata.batching in config.yaml): a server calls predict once per\n'
            f'        request; concurrent requests are gathered into calls of predict_batch."""\n')


def _save_values(build: Path, materialized: Materialized, secret_values: Iterable[str]) -> None:
    """Save the notebook's values (the kernel's live objects) into data/notebook_values/."""
    plans = [p for p in materialized.source.values if p.save is not None]
    if not plans:
        return
    folder = build / "data" / VALUES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    scanner = SecretScanner(dict.fromkeys(secret_values, ""))  # (names unused: the refusal names the value)
    for plan in plans:
        try:
            plan.save(folder)
        except Exception as exc:
            raise ExportError(f"Could not save the value of `{plan.name}` ({plan.format}): {type(exc).__name__}: "
                              f"{exc}. Build it inside load() instead.") from None
        if (folder / plan.filename).is_file() and scanner.find_in_file(folder / plan.filename) is not None:
            raise ExportError(_value_refusal(folder / plan.filename, plan, secret_values))
    # Every value file with the mode any file written here gets (the umask's, as config.yaml has it): safetensors
    # writes 0600, which a container that runs the model as another user than the one who built it cannot read.
    mode = stat.S_IMODE((build / "config.yaml").stat().st_mode)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


# ------------------------------------------------------------------ no secret in any exported byte

_NOTHING_EXPORTED = "so nothing was exported (any previous export is unchanged)"


def secret_scanner(secret_values: Iterable[str], config: ModelConfig) -> SecretScanner:
    """What no exported byte may hold: ``secret_values`` (a mapping of value to the secret's name, or
    bare values) and the environment's ``TRUSS_SECRET_<name>`` of every secret the config declares."""
    known = dict(secret_values) if isinstance(secret_values, dict) else dict.fromkeys(secret_values, "")
    for name in config.secret_names:
        value = os.environ.get(ENV_PREFIX + name)
        if value:
            known[value] = known.get(value) or name
    return SecretScanner(known)


def refuse_secrets(build: Path, materialized: Materialized, scanner: SecretScanner,
                   skip: Iterable[Path] = ()) -> set[Path]:
    """Refuse the export when any file under ``build`` holds a secret's value, in any form or encoding
    (:class:`SecretScanner`; each file read in chunks). Returns the files scanned."""
    skipped = set(skip)
    files = {p for p in build.rglob("*") if p.is_file() and not p.is_symlink()} - skipped
    if not scanner:
        return files
    for path in sorted(files):
        hit = scanner.find_in_file(path)
        if hit is not None:
            rel = path.relative_to(build).as_posix()
            raise ExportError(secret_refusal(rel, hit[0], _holder_of(path, rel, hit[1], materialized),
                                             _NOTHING_EXPORTED))
    return files


def find_secret(materialized: Materialized, scanner: SecretScanner) -> Optional[str]:
    """The refusal an export of ``materialized`` would give for a secret in model.py or config.yaml
    (what %model_show checks before showing them), or None."""
    for rel, text in (("model/model.py", materialized.source.text), ("config.yaml", materialized.config_yaml)):
        hit = scanner.find_in_text(text)
        if hit is not None:
            holder = _holder_in_text(rel, text, hit[1], materialized)
            return secret_refusal(rel, hit[0], holder, "so %model_export will refuse it")
    return None


def secret_refusal(where: str, name: str, holder: Optional[str], consequence: str) -> str:
    """The one-paragraph refusal: where, which secret (its name, never its value), what to change."""
    secret = f"secret `{name}`" if name else "a secret"
    held = f" through {holder}" if holder else ""
    reading = f'self._secrets["{name}"]' if name else 'self._secrets["NAME"]'
    return (f"{where} would hold the value of {secret}{held}, and secret values are never written to disk, "
            f"{consequence}. Read the secret in load() instead: keep `secrets` from __init__'s keyword arguments "
            f"(self._secrets = kwargs[\"secrets\"]) and use {reading} in load() or predict(), not a notebook "
            "variable the model uses.")


def _value_refusal(path: Path, plan: Any, secret_values: Iterable[str]) -> str:
    """The refusal for a saved notebook value that holds a secret (found while saving it)."""
    known = dict(secret_values) if isinstance(secret_values, dict) else {}
    hit = SecretScanner(known).find_in_file(path) if known and path.is_file() else None
    return secret_refusal(f"data/{VALUES_DIR}/{plan.filename}", hit[0] if hit else "",
                          f"the notebook value `{plan.name}` (saved as {plan.format})", _NOTHING_EXPORTED)


def _holder_of(path: Path, rel: str, offset: int, materialized: Materialized) -> Optional[str]:
    """Which notebook value (or part of the config) put the secret in an exported file."""
    parts = rel.split("/")
    if parts[:2] == ["data", VALUES_DIR] and len(parts) > 2:
        for plan in materialized.source.values:
            if plan.filename and Path(plan.filename).parts[0] == parts[2]:
                return f"the notebook value `{plan.name}` (saved as {plan.format})"
        return None
    if rel in ("model/model.py", "config.yaml"):
        text = path.read_bytes()[:offset].decode("utf-8", "replace")
        return _holder_in_text(rel, path.read_text("utf-8", "replace"), len(text), materialized)
    return None


def _holder_in_text(rel: str, text: str, index: int, materialized: Materialized) -> Optional[str]:
    import ast

    line = text.count("\n", 0, index) + 1
    if rel == "config.yaml":
        keys = [ln.split(":", 1)[0] for ln in text.splitlines()[:line] if ln[:1].isalpha()]
        return f"its `{keys[-1]}` entry" if keys else None
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    for node in tree.body:
        if node.lineno <= line <= (node.end_lineno or node.lineno):
            names = [n.id for t in getattr(node, "targets", [getattr(node, "target", None)]) if t is not None
                     for n in ast.walk(t) if isinstance(n, ast.Name)]
            names = names or [getattr(node, "name", "")]
            shown = ", ".join(f"`{n}`" for n in names if n)
            return f"the notebook value {shown}" if shown else None
    return None


def _refuse_secret_env_reads(source: Any) -> None:
    """model.py must not read a secret from the environment: a Truss deployment mounts secrets as files
    and passes them to ``Model.__init__`` as ``secrets``, so ``os.environ["TRUSS_SECRET_x"]`` that works
    in the notebook (and in the check, which has the kernel's secrets) raises KeyError when deployed."""
    import io
    import re
    import tokenize

    lines = source.text.splitlines()
    try:  # code only: a comment that mentions the variable reads nothing
        tokens = [t for t in tokenize.generate_tokens(io.StringIO(source.text).readline) if t.type != tokenize.COMMENT]
    except (tokenize.TokenError, SyntaxError):
        return
    for token in tokens:
        found = re.search(r"TRUSS_SECRET_(\w+)", token.string)
        if found:
            number = token.start[0]
            line = lines[number - 1]
            holder = source.name_at_line(number)
            raise ExportError(
                f"model.py line {number}{f' (`{holder}`)' if holder else ''} reads secret `{found.group(1)}` from "
                f"the environment ({line.strip()[:80]}), which works in the notebook but not when deployed: Truss "
                f"mounts secrets as files and passes them to the model as `secrets`. Read it in load() instead, "
                f"from `self._secrets[{found.group(1)!r}]` with `def __init__(self, secrets): self._secrets = "
                f"secrets`. Nothing was exported.")


def _rewrite(build: Path, materialized: Materialized, data_sources: Sequence[Path], secret_values: Any,
             scanner: Any) -> None:
    """Write the build again from scratch for a new plan (the verification moved names to values)."""
    for child in list(build.iterdir()):
        if child.is_dir() and not child.is_symlink():
            remove_tree(child)
        else:
            child.unlink()
    _write(build, materialized, data_sources)
    _save_values(build, materialized, secret_values)
    refuse_secrets(build, materialized, scanner)


def _check(build: Path, record: Optional[PredictionRecord], secrets: Optional[dict], python: str,
           explain_mismatch: Any, verification: "Verification",
           shown: tuple[Path, Path]) -> tuple[int, dict, list[str]]:
    """The fresh-process check; with recorded predictions, load and replay each. Names re-run from
    source are verified against the kernel's live values on the way (see verification.py).
    Returns how many were replayed, the child's seconds per stage, and warnings. ``shown``: the target and the
    notebook's folder, for what a failed check says."""
    from .truss_dir import explain_check_failure

    replay = [r.as_dict() for r in record] if record is not None else []
    report, truss = verification.run(lambda fingerprint: _run_fresh(build, replay, secrets, python, fingerprint))
    if report.error:
        # (paths in the build folder, which the user never sees, as they will be in the export)
        target, notebook_dir = shown
        message = explain_check_failure(report, truss, during="export", notebook_dir=notebook_dir)
        raise ExportError(message.replace(str(build), str(target)).replace(build.name, target.name))
    measured = verification.measured_cause(report)
    for item in report.mismatches:
        explain = (lambda index: measured) if measured else explain_mismatch
        raise ExportError(_mismatch_message(record, item, explain))
    notes = verification.notes(len(replay))
    if report.left_running:
        notes.append(f"the model left {', '.join(report.left_running[:3])} running when the fresh-process check "
                     "ended; the check did not wait for it and stopped it. A deployment would keep it running: "
                     "make it a daemon thread, or stop it when the model is done.")
    return len(replay), {**report.stages, "spare": report.spare}, notes


def _run_fresh(build: Path, replay: list, secrets: Optional[dict], python: str, fingerprint: Sequence[str]):
    from .truss_dir import TrussDir

    truss = TrussDir.open(build)
    # spare: a kernel's spare checker, when it can check this directory as a cold Python would (spare_check.py)
    return truss.check_in_fresh_process(load=bool(replay), replay=replay, secrets=secrets, python=python,
                                        fingerprint=fingerprint, spare=True), truss


def _replay_note(record: Optional[PredictionRecord], replay: bool, replayed: int) -> str:
    if not replay:
        return "Replay skipped (--no-replay): this export was not checked against the notebook's predictions."
    if replayed:
        # A user who made 30 predictions must not read "20" as all of them.
        dropped, skipped = record.dropped, record.skipped
        notes = ([f"{dropped} earlier {'ones were' if dropped != 1 else 'one was'} not kept: the kernel keeps the last "
                  f"{MAX_RECORDED}"] if dropped else []) + (
                 [f"{skipped} {'were' if skipped != 1 else 'was'} left out: over 1 MB, or not JSON"] if skipped else [])
        left = f" ({'; '.join(notes)})" if notes else ""
        return (f"Replayed {replayed} recorded prediction{'s' if replayed != 1 else ''} in a fresh Python{left}: "
                "the export answers as the notebook did.")
    return ("No predictions recorded yet, so nothing was replayed: run %model_predict before exporting to have the "
            "export prove it answers as the notebook does.")


def _check_note(timings: dict, replayed: int) -> str:
    """Where the proof's time went, so a user sees what an export costs and why."""
    parts = [f"{stage} {timings[stage]:.1f} s" for stage in ("import", "load", "replay") if stage in timings]
    if "replay" in timings:
        parts[-1] += f" ({replayed} prediction{'s' if replayed != 1 else ''})"
    if timings.get("waiting", 0) >= 0.1:  # (an export soon after the last one: its spare was still importing)
        parts.insert(0, f"waiting for the libraries being imported in advance {timings['waiting']:.1f} s")
    spare = timings.get("spare")
    rounds = timings.get("verify rounds", 1)
    from .spare_check import modules_of

    ahead = sorted({m.split(".")[0] for statement in spare or () for m in modules_of(statement)})
    how = (f"; its libraries were imported in advance ({', '.join(ahead)})"
           if spare else "; its Python was started in advance" if spare is not None else "")
    again = f", {rounds} fresh processes" if rounds > 1 else ""
    return f"Checked in {timings.get('check', 0):.1f} s{again}: {', '.join(parts)}{how}."


@dataclass(frozen=True)
class MismatchHint:
    """What ``explain_mismatch(index)`` may answer: the most likely cause of a replayed answer that differs, and
    what to do about it where that is more than fixing the cause (a plain string is a cause alone)."""

    cause: str
    remedy: str = "Fix that and export again"


_UNKNOWN_CAUSE = MismatchHint(
    "something the model reads at run time is not the same in a fresh process (a value changed without "
    "kernel-magics seeing it, files, environment variables, or randomness without a fixed seed)")


def _mismatch_message(record: PredictionRecord, item: dict, explain: Any) -> str:
    from .replay import short

    recorded = list(record)[item["index"]]
    hint = (explain(item["index"]) if callable(explain) else None) or _UNKNOWN_CAUSE
    if isinstance(hint, str):
        hint = MismatchHint(hint)
    return (
        "The exported model does not answer as the notebook did, so nothing was exported (any previous export is "
        f"unchanged). Input: {short(recorded.input)}. The notebook answered {short(recorded.output)}; the export "
        f"answers {short(item['got'])} ({item['why']}). Most likely cause: {hint.cause}. {hint.remedy}; "
        "--no-replay skips this check (the export may then answer differently)."
    )


def _swap_into_place(build: Path, target: Path, marker: Optional[str], scratch: ScratchDir, force: int) -> list[str]:
    """Put the build at the target; refuse if the target changed since the export began.

    Over an earlier export the two folders are exchanged in one step where the OS can
    (Linux renameat2); elsewhere two renames leave the target missing for a moment."""
    with locked(target.parent):
        there = _read_marker(target)
        if target.is_symlink() or (target.exists() and there.get("id") != marker) or (
                marker is None and target.is_dir() and any(target.iterdir())):
            raise ExportError(f"{target} changed while this export ran (another export to the same place at the same "
                              "time?), so this one stopped and changed nothing. Run it again once the other is done.")
        # Checked again now: a file added or edited in the earlier export while this one was built is not replaced.
        try:
            added = _changes_since(target, there) if marker is not None and force < 2 else None
        except OSError as exc:
            raise ExportError(f"Cannot read {target}: {exc.strerror}; this export stopped and changed nothing.") from None
        if added:
            raise ExportError(f"{target} changed while this export ran ({_listed(added)}), so this one stopped and "
                              "changed nothing. Run it again, with --force twice to replace those files too.")
        if not target.exists():
            os.rename(build, target)
            return []
        if not any(target.iterdir()):
            target.rmdir()
            os.rename(build, target)
            return []
        scratch.hold(target)  # the previous export stays locked while it is removed under a scratch name
        if exchange(build, target):
            old = build
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            old.rmdir()
            os.rename(target, old)
            try:
                os.rename(build, target)
            except BaseException:
                os.rename(old, target)  # put the previous export back
                raise
    if remove_tree(old):
        return []
    return [f"the previous export was replaced, but {old} could not be deleted; delete it yourself."]


def _list_files(root: Path) -> list[tuple[str, int]]:
    return sorted(
        (p.relative_to(root).as_posix(), p.stat().st_size)
        for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.name != MARKER
    )


def format_tree(root: Path, files: list[tuple[str, int]]) -> str:
    """The exported files as an indented tree with sizes."""
    lines = [f"{root}/"]
    shown: set[str] = set()
    for rel, size in files:
        parts = rel.split("/")
        for depth in range(len(parts) - 1):
            folder = "/".join(parts[: depth + 1])
            if folder not in shown:
                shown.add(folder)
                lines.append("  " * (depth + 1) + parts[depth] + "/")
        lines.append("  " * len(parts) + f"{parts[-1]}  ({_size(size)})")
    return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
