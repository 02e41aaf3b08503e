"""A saved .ipynb as the CLI sees it: its code cells, its config, and the predictions it recorded.

The CLI has no kernel, so the notebook's own predictions are the outputs saved
with ``%model_predict JSON`` cells (after the last ``%%model`` cell): their
inputs and their results, read back as Python literals, are what an export
from the file must answer too.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Optional, Sequence

from .config import ModelConfig, parse_config
from .errors import KernelMagicsError
from .replay import PredictionRecord
from .source import last_cell_of, split_cell_magic

__all__ = ["NotebookFileError", "SavedNotebook", "read_notebook", "config_from_cells"]

_MAX_NOTEBOOK_BYTES = 200 * 2**20


class NotebookFileError(KernelMagicsError):
    """The file is not a notebook we can read; the message says what is wrong."""


class SavedNotebook:
    """The code cells of an .ipynb up to the first ``%model_export``, with their saved outputs."""

    def __init__(self, path: Path, cells: list[str], outputs: list[list]) -> None:
        self.path, self.cells, self.outputs = path, cells, outputs

    def recorded_predictions(self) -> PredictionRecord:
        """``%model_predict JSON`` cells after the last ``%%model`` cell whose saved result reads back."""
        record = PredictionRecord()
        start = (last_cell_of(self.cells, "model") or 0) + 1
        for source, outputs in zip(self.cells[start:], self.outputs[start:]):
            line = source.strip()
            if "\n" in line or not line.startswith("%model_predict "):
                continue
            text = line[len("%model_predict "):].strip()
            if text.startswith("--"):
                continue  # flags (headers, a method): not a plain predict
            try:
                model_input = json.loads(text)
            except ValueError:
                continue
            result = _saved_result(outputs)
            if result is not None:
                record.add(model_input, result[0])
        return record


def _saved_result(outputs: list) -> Optional[tuple]:
    for output in outputs or []:
        if isinstance(output, dict) and output.get("output_type") == "error":
            return None
    for output in outputs or []:
        if isinstance(output, dict) and output.get("output_type") == "execute_result":
            text = output.get("data", {}).get("text/plain")
            text = "".join(text) if isinstance(text, list) else text
            try:
                return (ast.literal_eval(text),)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                return None
    return None


def read_notebook(path: Path) -> SavedNotebook:
    """The code cells of an .ipynb, up to the first one that runs %model_export (as the kernel saw them)."""
    path = Path(path)
    try:
        if path.is_dir():
            raise NotebookFileError(f"{path} is a directory, not a notebook file. Give the .ipynb file.")
        if path.stat().st_size > _MAX_NOTEBOOK_BYTES:
            raise NotebookFileError(f"{path} is over {_MAX_NOTEBOOK_BYTES // 2**20} MB; clear its outputs and try again.")
        raw = path.read_bytes()
    except FileNotFoundError:
        kind = "is a broken symbolic link" if path.is_symlink() else "does not exist"
        raise NotebookFileError(f"Cannot read notebook {path}: it {kind}.") from None
    except OSError as exc:
        raise NotebookFileError(f"Cannot read notebook {path}: {exc.strerror}.") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotebookFileError(f"{path} is not a notebook: it is not UTF-8 text (byte {exc.start}). Notebooks are "
                                "JSON in UTF-8; re-save it from Jupyter.") from None
    try:
        nb = json.loads(text)
        cells = nb["cells"]
        if not isinstance(cells, list):
            raise TypeError
    except json.JSONDecodeError as exc:
        raise NotebookFileError(f"{path} is not a notebook: invalid JSON at line {exc.lineno}, column {exc.colno} "
                                f"({exc.msg}).") from None
    except RecursionError:
        raise NotebookFileError(f"{path} is not a notebook: its JSON nests too deeply to read.") from None
    except (KeyError, TypeError):
        raise NotebookFileError(f"{path} is not a Jupyter notebook: it has no list of `cells`.") from None
    sources: list[str] = []
    outputs: list[list] = []
    for cell in cells:
        if not isinstance(cell, dict) or cell.get("cell_type") != "code":
            continue
        src = cell.get("source", "")
        src = "".join(src) if isinstance(src, list) else str(src)
        if any(line.lstrip().startswith("%model_export") for line in src.splitlines()):
            break
        sources.append(src)
        outputs.append(cell.get("outputs") or [])
    if last_cell_of(sources, "model") is None:
        raise NotebookFileError(f"{path} has no `%%model` cell (before any %model_export), so there is no model to export.")
    return SavedNotebook(path, sources, outputs)


def config_from_cells(cells: Sequence[str], source: str = "notebook") -> ModelConfig:
    """The config the last ``%%model_config`` cell sets (defaults without one)."""
    index = last_cell_of(list(cells), "model_config")
    if index is None:
        return ModelConfig()
    _, _, body = split_cell_magic(cells[index])
    return parse_config(body, source=f"{source}, %%model_config cell {index + 1}", line_offset=1)


