"""A saved .ipynb as the CLI sees it: its code cells, its config, and the predictions it recorded.

The CLI has no kernel, so the notebook's own predictions are the outputs saved
with ``%model_predict JSON`` and literal ``%%predict`` cells (after the last
``%%model`` cell): their inputs and their results, read back as Python literals
(or, for a stream, the text it saved), are what an export from the file must
answer too.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from .config import ModelConfig, parse_config
from .errors import KernelMagicsError
from .magic_line import strip_comment
from .replay import PRINTED_STREAM, PredictionRecord
from .replay import AGAIN_INDENT, read_again_line
from .source import last_cell_of, python_of_cell, split_cell_magic

__all__ = ["NotebookFileError", "SavedNotebook", "read_notebook", "config_from_cells"]

_MAX_NOTEBOOK_BYTES = 200 * 2**20


class NotebookFileError(KernelMagicsError):
    """The file is not a notebook we can read; the message says what is wrong."""


class SavedNotebook:
    """The code cells of an .ipynb up to the first ``%model_export``, with their saved outputs."""

    def __init__(self, path: Path, cells: list[str], outputs: list[list], exports: Sequence[int] = (),
                 counts: Sequence[Optional[int]] = ()) -> None:
        self.path, self.cells, self.outputs = path, cells, outputs
        self.exports = list(exports)  # the code cells (numbered from 1) that run %model_export
        self.counts = list(counts)  # each cell's saved execution count (In [N]), None where it has none
        self.prediction_cells: dict[int, int] = {}  # id of a recorded prediction -> its cell (recorded_predictions)
        self.unread_again = False  # a `%model_predict --again` printed an answer too long to read back

    @property
    def unsure_cells(self) -> list[int]:
        """The cells the saved file shows did not run to their end (an error) or at all (no In [N] where other
        cells have one): what they change, the notebook may not have."""
        ran = any(isinstance(c, int) for c in self.counts)
        return [i for i, (count, outputs) in enumerate(zip(self.counts, self.outputs))
                if ran and count is None or any(isinstance(o, dict) and o.get("output_type") == "error"
                                                for o in outputs or [])]

    def ran_late(self, cells) -> Optional[str]:
        """How one of ``cells`` ran after a cell below it (`class Rules` run again after `SCALE = 3.0` further
        down), else None."""
        from .source import names_of_cell

        seen = [(i, c) for i, c in enumerate(self.counts) if isinstance(c, int)]
        for above, first in seen:
            if above not in cells:
                continue
            bound, read = names_of_cell(self.cells[above])
            for below, second in seen:
                if below <= above or second > first:
                    continue
                # Only where the two disagree: the cell above read what the one below binds, both bind a name, or
                # the one below, which model.py holds too, read what the one above binds (the %%model cell run again
                # after %model_load below it, or a cell re-run above a plot of what it makes, is no such case).
                bound_below, read_below = names_of_cell(self.cells[below])
                if bound_below & read or bound & bound_below or below in cells and bound & read_below:
                    return (f"code cell {above + 1} ran as In [{first}], after code cell {below + 1} below it, which "
                            f"ran as In [{second}]")
        return None

    def maybe_ran_twice(self, cells: Mapping[int, Iterable[int]]) -> Optional[str]:
        """How one of ``cells`` (each with the cells that set what it changes) may have run more than once, else None:
        a number below its In [N] that no saved cell has, and that came after the In [M] of the cell that set what it
        changes (it ran as that number too, or a deleted cell did; a run of it before that cell set the value again
        changed an older one, which no one holds now)."""
        counts = {c for c in self.counts if isinstance(c, int)}
        for cell, set_in in sorted(cells.items()):
            count = self.counts[cell] if cell < len(self.counts) else None
            if not isinstance(count, int):
                continue
            setters = [(self.counts[s], s) for s in set_in
                       if s < len(self.counts) and isinstance(self.counts[s], int) and self.counts[s] <= count]
            since, setter = max(setters, default=(0, None))
            missing = [n for n in range(since + 1, count) if n not in counts]
            if missing:
                after = f", after code cell {setter + 1} set what it changes as In [{since}]" if setter is not None else ""
                return (f"code cell {cell + 1} ran as In [{count}], and no saved cell ran as In [{missing[-1]}]{after}: "
                        "it may have run twice")
        return None

    @property
    def out_of_order(self) -> Optional[str]:
        """How the saved execution counts show the cells ran in another order than the file lists them (a cell
        above run after one below: `SCALE = 5` run again after `SCALE = 2` further down), else None. The CLI reads
        the cells top to bottom."""
        seen: list[tuple[int, int]] = [(i, c) for i, c in enumerate(self.counts) if isinstance(c, int)]
        for (above, first), (below, second) in zip(seen, seen[1:]):
            if second < first:
                return (f"code cell {above + 1} ran as In [{first}], after code cell {below + 1} below it, which ran "
                        f"as In [{second}]")
        return None

    @property
    def note(self) -> Optional[str]:
        """Which %model_export the CLI follows, when the notebook has several (None with one or none)."""
        if len(self.exports) < 2:
            return None
        cells = ", ".join(str(n) for n in self.exports[:-1]) + f" and {self.exports[-1]}"
        return (f"{self.path.name} has {len(self.exports)} %model_export cells (code cells {cells}); this exports the "
                f"model as it is at the first one (cell {self.exports[0]}): the cells after it are not read.")

    def recorded_predictions(self) -> PredictionRecord:
        """The predictions after the last ``%%model`` cell whose input and saved answer read back: a
        ``%model_predict JSON`` line or a ``%%predict`` cell whose body is a literal, answered by its
        result (``Out[n]``) or, for a stream, by the text its view or its printed output saved."""
        record = PredictionRecord()
        start = (last_cell_of(self.cells, "model") or 0) + 1
        self.prediction_cells = {}
        for cell, (source, outputs) in enumerate(zip(self.cells[start:], self.outputs[start:]), start):
            if _predicts_again(source):
                self._read_again(record, outputs, cell)
                continue
            model_input = _literal_input(source)
            if model_input is None:
                continue
            result = _saved_result(outputs)
            printed = _saved_stream(outputs) if result is None else None
            if result is not None:
                kept = record.add(model_input[0], result[0])
            elif printed is not None:
                kept = record.add(model_input[0], printed, shown=PRINTED_STREAM)
            else:
                continue
            if kept >= 0:
                self.prediction_cells[id(list(record)[kept])] = cell
        return record

    def _read_again(self, record: PredictionRecord, outputs: list, cell: int) -> None:
        """What a saved `%model_predict --again` printed: each recorded input it answered differently, with the
        new answer (`  {input}: {old} then, {new} now`), replaces the recorded one. An answer it cut short (over
        120 characters) cannot be read back: every prediction recorded before it then leaves the record (the file
        no longer shows what the notebook answers; the CLI says so)."""
        printed = "".join("".join(o.get("text", "")) if isinstance(o.get("text"), list) else o.get("text", "")
                          for o in outputs or [] if isinstance(o, dict) and o.get("name") == "stdout")
        if any(isinstance(o, dict) and o.get("output_type") == "error" for o in outputs or []) or not printed:
            return
        items = {json.dumps(item.input, sort_keys=True): item for item in record}
        unread = False
        for line in printed.splitlines():
            if not line.startswith(AGAIN_INDENT):
                continue
            read = read_again_line(line)
            if read is None:
                unread = True  # (cut short: the new answer is not in the file)
                continue
            item = items.get(json.dumps(read[0], sort_keys=True))
            if item is not None:  # (else an input the file does not show, which the CLI does not replay)
                kept = record.add(item.input, read[1], request=item.request)
                if kept >= 0:
                    self.prediction_cells[id(list(record)[kept])] = cell
        if unread:
            self.unread_again = True
            record.drop_all()

    def prediction_cell(self, record: PredictionRecord, index: int) -> Optional[int]:
        """The cell (its index) whose saved output is recorded prediction ``index`` of
        :meth:`recorded_predictions`, or None."""
        items = list(record)
        return self.prediction_cells.get(id(items[index])) if index < len(items) else None


def _literal_input(source: str) -> Optional[tuple]:
    """``(input,)`` of a plain predict cell whose input is written out, else None (a variable, a
    request header or another method: the file alone does not tell what the kernel was given)."""
    magic, line, body = split_cell_magic(source)
    if magic == "predict":
        if strip_comment(line).strip() not in ("", "--no-widget"):
            return None
        try:
            return (ast.literal_eval(body.strip()),)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None
    if magic is not None:
        return None
    text = _last_line_magic(source)
    if text is None or not text.startswith("%model_predict "):
        return None
    text = strip_comment(text[len("%model_predict "):]).strip().removesuffix(";").strip()
    text = text.removeprefix("--no-widget").strip()
    if text.startswith("--"):
        return None  # flags (headers, a method): not a plain predict
    try:
        return (json.loads(text),)
    except ValueError:
        return None


def _predicts_again(source: str) -> bool:
    """A cell whose last line is `%model_predict --again` (with --no-widget, a comment or `;`)."""
    text = _last_line_magic(source)
    if text is None or not text.startswith("%model_predict "):
        return False
    words = strip_comment(text[len("%model_predict "):]).strip().removesuffix(";").split()
    return "--again" in words and set(words) <= {"--again", "--no-widget"}


def _last_line_magic(source: str) -> Optional[str]:
    """The cell's last line when it is a line magic of its own at the top level (the cell's result, ``Out[n]``,
    is then that magic's: ``%model_load`` and ``%model_predict {...}`` in one cell, as the README's quickstart
    has them), else None."""
    lines = source.rstrip().splitlines()
    if not lines or not lines[-1].startswith("%"):
        return None
    try:
        tree = ast.parse(python_of_cell(source) or "")
    except SyntaxError:
        return None
    last = tree.body[-1] if tree.body else None
    if not (isinstance(last, ast.Pass) and last.lineno == len(lines) and last.col_offset == 0):
        return None  # (inside a block, or a string that goes on over several lines)
    return lines[-1].strip()


# The line a finished stream ends with, in its view's saved output and in its printed text.
_STREAM_SUMMARY = re.compile(r"(?:^|(?<=\n))\[(?P<outcome>done|stopped|interrupted|error): \d+ chunks in [^\n]*\]\n?")
_WAITING = "Waiting for the background load to finish ...\n"


def _saved_stream(outputs: list) -> Optional[str]:
    """The text a stream that ran to its end left in the cell (its view's saved output, or the text it
    printed where there was no widget manager), up to its summary line; None for a stopped, failed or
    interrupted stream, or no stream."""
    for output in outputs or []:
        if isinstance(output, dict) and output.get("output_type") == "error":
            return None
    candidates = []
    for output in outputs or []:
        if isinstance(output, dict) and output.get("output_type") == "display_data":
            candidates.append(_text(output.get("data", {}).get("text/plain")))
    candidates.append("".join(_text(o.get("text")) for o in outputs or []
                              if isinstance(o, dict) and o.get("output_type") == "stream" and o.get("name") == "stdout"))
    for text in candidates:
        found = list(_STREAM_SUMMARY.finditer(text))
        if found:
            if found[-1]["outcome"] != "done":
                return None
            return text[:found[-1].start()].removeprefix(_WAITING)
    return None


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else value if isinstance(value, str) else ""


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
    counts: list[Optional[int]] = []
    exports: list[int] = []
    redefined: Optional[tuple[int, str]] = None  # after the first export: the first cell that defines the model anew
    number = 0
    for cell in cells:
        if not isinstance(cell, dict) or cell.get("cell_type") != "code":
            continue
        src = cell.get("source", "")
        src = "".join(src) if isinstance(src, list) else str(src)
        if not src.strip():
            continue  # Jupyter runs no empty cell (it gets no In [N]): not counted, so "cell N" stays In [N]
        number += 1
        if any(line.lstrip().startswith("%model_export") for line in src.splitlines()):
            exports.append(number)
            continue
        if exports:  # after the first export: read only to tell whether a later export is another model
            magic = split_cell_magic(src)[0]
            if redefined is None and magic in ("model", "model_config"):
                redefined = (number, magic)
            continue
        sources.append(src)
        outputs.append(cell.get("outputs") or [])
        counts.append(cell.get("execution_count"))
    if last_cell_of(sources, "model") is None:
        raise NotebookFileError(f"{path} has no `%%model` cell (before any %model_export), so there is no model to export.")
    if redefined is not None and redefined[0] < exports[-1]:
        raise NotebookFileError(
            f"{path} has {len(exports)} %model_export cells (code cells {', '.join(map(str, exports))}), and code cell "
            f"{redefined[0]} between them defines the model anew (%%{redefined[1]}), so they export different models "
            f"and the file does not say which one you mean. Delete the %model_export cells you do not mean (the CLI "
            f"exports the model as it is at the first one), then run this again.")
    return SavedNotebook(path, sources, outputs, exports, counts)


def config_from_cells(cells: Sequence[str], source: str = "notebook") -> ModelConfig:
    """The config the last ``%%model_config`` cell sets (defaults without one)."""
    index = last_cell_of(list(cells), "model_config")
    if index is None:
        return ModelConfig()
    _, _, body = split_cell_magic(cells[index])
    return parse_config(body, source=f"{source}, %%model_config cell {index + 1}", line_offset=1)


