"""Write a Truss directory: config.yaml, model/model.py, data/, packages/.

The directory is built next to the target and renamed into place only after
the new model.py imported and instantiated in a fresh Python process, so a
failure at any step leaves nothing behind and never half-overwrites a
previous export.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import yaml

from .config import ModelConfig, parse_config
from .errors import ConfigError, KernelMagicsError
from .source import (
    MaterializeError, ModelSource, build_model_source, is_stdlib, last_cell_of, split_cell_magic,
)

__all__ = [
    "ExportError", "ExportResult", "Materialized", "materialize", "materialize_config", "pin_requirements",
    "export_model", "check_export", "read_notebook", "config_from_cells", "format_tree",
]


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


@dataclass
class ExportResult:
    target: Path
    files: list[tuple[str, int]]
    warnings: list[str] = field(default_factory=list)

    def tree(self) -> str:
        return format_tree(self.target, self.files)


# ------------------------------------------------------------------ requirements and config

def _python_version() -> str:
    return f"py{sys.version_info.major}{sys.version_info.minor}"


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
    packages = importlib.metadata.packages_distributions()
    local = set(local)
    for module in modules:
        if is_stdlib(module) or module in local:
            continue
        if module == "kernel_magics":
            raise MaterializeError(
                "The model imports kernel_magics, which a deployment does not install. Use plain Python "
                "(for example torch.cuda.is_available() instead of kernel_magics.devices) in the model's code."
            )
        dists = packages.get(module)
        if not dists:
            warnings.append(f"could not tell which distribution provides module `{module}`; add it to requirements yourself.")
            continue
        dist = sorted(dists)[0]
        name = canonicalize_name(dist)
        if name in seen:
            continue
        seen.add(name)
        version = installed(dist)
        out.append(f"{dist}=={version}" if version else dist)
    return out, warnings


_FIRST_KEYS = ("model_name", "model_class_name", "python_version", "requirements")


def materialize_config(config: ModelConfig, requirements: list[str]) -> str:
    """config.yaml's text: the user's config, python_version from this interpreter,
    pinned requirements, data under ``data/``, secret names with null values only."""
    data = config.to_dict()
    data["python_version"] = config.python_version or _python_version()
    data["requirements"] = requirements
    data.pop("data_dir", None)  # the export always puts data in data/, Truss's default
    ordered = {k: data[k] for k in _FIRST_KEYS if k in data}
    ordered.update((k, v) for k, v in data.items() if k not in ordered)
    return yaml.safe_dump(ordered, sort_keys=False, default_flow_style=False, allow_unicode=True)


def _local_module(base_dir: Path, module: str) -> Optional[Path]:
    for candidate in (base_dir / f"{module}.py", base_dir / module):
        if candidate.is_file() or (candidate.is_dir() and any(candidate.glob("*.py"))):
            return candidate
    return None


def materialize(cells: Sequence[str], config: ModelConfig, base_dir: Path, notebook: str) -> Materialized:
    """Build model.py and config.yaml in memory from the cells (no files written)."""
    source = build_model_source(cells, config.model_class_name, notebook)
    local = {m: p for m in source.modules if (p := _local_module(base_dir, m)) is not None}
    requirements, warnings = pin_requirements(config.requirements, source.modules, local)
    return Materialized(source, config, materialize_config(config, requirements), sorted(local.values()), warnings)


# ------------------------------------------------------------------ notebooks (for the CLI)

def read_notebook(path: Path) -> list[str]:
    """The code cells of an .ipynb, up to the first one that runs %model_export (as the kernel saw them)."""
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ExportError(f"Cannot read notebook {path}: {exc.strerror}.") from None
    try:
        nb = json.loads(raw)
        cells = nb["cells"]
        if not isinstance(cells, list):
            raise TypeError
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path} is not a notebook: invalid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg}).") from None
    except (KeyError, TypeError):
        raise ExportError(f"{path} is not a Jupyter notebook: it has no list of `cells`.") from None
    out: list[str] = []
    for cell in cells:
        if not isinstance(cell, dict) or cell.get("cell_type") != "code":
            continue
        src = cell.get("source", "")
        src = "".join(src) if isinstance(src, list) else str(src)
        if any(line.lstrip().startswith("%model_export") for line in src.splitlines()):
            break
        out.append(src)
    if last_cell_of(out, "model") is None:
        raise ExportError(f"{path} has no `%%model` cell (before any %model_export), so there is no model to export.")
    return out


def config_from_cells(cells: Sequence[str], source: str = "notebook") -> ModelConfig:
    """The config the last ``%%model_config`` cell sets (defaults without one)."""
    index = last_cell_of(list(cells), "model_config")
    if index is None:
        return ModelConfig()
    _, _, body = split_cell_magic(cells[index])
    return parse_config(body, source=f"{source}, %%model_config cell {index + 1}", line_offset=1)


# ------------------------------------------------------------------ writing

def _check_target(target: Path, force: bool) -> None:
    if target.exists() and not target.is_dir():
        raise ExportError(f"{target} is a file, not a directory. Choose a directory path for the export.")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise ExportError(f"{target} exists and is not empty. Pass --force to replace it, or choose a new directory.")
    if Path.cwd().resolve() == target.resolve() or target.resolve() in Path.cwd().resolve().parents:
        raise ExportError(f"{target} contains the current directory; export to a directory of its own.")


def _copy_data(sources: Iterable[Path], data_dir: Path) -> None:
    for src in sources:
        if not os.access(src, os.R_OK):
            raise ExportError(f"Data path {src} cannot be read (permission denied). Fix its permissions or leave it out.")
        try:
            if src.is_dir():
                shutil.copytree(src, data_dir, dirs_exist_ok=True)
            else:
                data_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, data_dir / src.name)
        except (OSError, shutil.Error) as exc:
            raise ExportError(f"Could not copy data from {src}: {exc}. Check the files' permissions.") from None


def export_model(
    target: Path,
    materialized: Materialized,
    *,
    base_dir: Path,
    data: Sequence[Path] = (),
    force: bool = False,
    python: str = sys.executable,
) -> ExportResult:
    """Write the Truss directory at ``target`` atomically and check that it imports."""
    target = Path(target).absolute()
    _check_target(target, force)
    config = materialized.config
    data_sources: list[Path] = []
    config_data = (base_dir / config.data_dir)
    if config_data.is_dir():
        data_sources.append(config_data)
    elif "data_dir" in config.model_fields_set:
        raise ExportError(f"data_dir {config.data_dir!r} in the config does not exist at {config_data}. Create it or fix the path.")
    for path in data:
        path = Path(path) if Path(path).is_absolute() else base_dir / path
        if not path.exists():
            raise ExportError(f"Data path {path} does not exist. Check the --data argument.")
        data_sources.append(path)

    target.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        (build / "model").mkdir()
        (build / "model" / "__init__.py").write_text("")
        (build / "model" / "model.py").write_text(materialized.source.text)
        (build / "config.yaml").write_text(materialized.config_yaml)
        _copy_data(data_sources, build / "data")
        for module in materialized.local_modules:
            dest = build / "packages" / module.name
            dest.parent.mkdir(exist_ok=True)
            if module.is_dir():
                shutil.copytree(module, dest, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(module, dest)
        check_export(build, python=python)
        _swap_into_place(build, target)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return ExportResult(target, _list_files(target), materialized.warnings)


def check_export(build: Path, *, python: str = sys.executable) -> None:
    """The fresh-process check of a directory being exported: it must import and instantiate on its own."""
    from .truss_dir import TrussDir, explain_check_failure

    truss = TrussDir.open(build)
    report = truss.check_in_fresh_process(python=python)
    if not report.ok:
        raise ExportError(explain_check_failure(report, truss, during="export"))


def _swap_into_place(build: Path, target: Path) -> None:
    if not target.exists():
        os.rename(build, target)
        return
    if not any(target.iterdir()):
        target.rmdir()
        os.rename(build, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old.rmdir()
    os.rename(target, old)
    try:
        os.rename(build, target)
    except BaseException:
        os.rename(old, target)  # put the previous export back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _list_files(root: Path) -> list[tuple[str, int]]:
    return sorted(
        (p.relative_to(root).as_posix(), p.stat().st_size)
        for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
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


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
