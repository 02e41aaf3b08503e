"""The modules an export's pickled values import when model.py loads them, in the order it loads them.

A value saved with ``torch.save`` or ``pickle`` names the classes it is made of by module; unpickling
imports those modules (pickle's ``find_class``). For a sentence-transformers encoder that is
transformers' BERT code and more: seconds, and most of a warm export's check once torch itself is
imported. The spare checker (spare_check.py) imports these modules in advance too, within what the
export's proof allows a spare to hold (issue 23: a spare "imports the libraries the model's
requirements name" before model.py runs):

- only modules of the libraries config.yaml's requirements name (never the standard library, never a
  module of the export itself: model.model, packages/);
- only the modules the pickles name, which the check would import anyway, by name, while model.py
  unpickles the value: a forgotten ``import`` in model.py binds no name either way, and still fails;
- only from the value loads that directly follow model.py's ``_VALUES = ...`` line, and only up to the
  first statement that is not one of the loads written by core/values.py (any other statement could
  change what an import does).

What it cannot rule out, as no spare that imports a library ahead can: a pickle's own reconstructor
code that relies on a later import not having happened yet, or that changes what a later import does
(an environment variable set while unpickling, read by a library at import).

Reading a pickle's module names needs no unpickling: :func:`pickle_modules` walks its opcodes.
"""

from __future__ import annotations

import _compat_pickle
import ast
import os
import pickletools
import zipfile
from pathlib import Path
from typing import Optional

__all__ = ["pickle_modules", "value_imports"]

PLAIN_PICKLE_LIMIT = 64 * 2**20  # bytes: a larger plain pickle is not scanned (its modules import on load)
_STRINGS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING",
                      "STRING"})
_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})
# torch.load renames these before importing (torch.serialization's load_module_mapping).
_TORCH_RENAMED = {"torch.tensor": "torch._tensor"}
# Loads core/values.py writes that run no code able to change an import (a pickle's own code aside).
_PURE_LOADS = frozenset({"numpy.load", "ast.literal_eval", "safetensors.torch.load_file", "safetensors.torch.load_model",
                         "tokenizers.Tokenizer.from_file"})


def pickle_modules(data: bytes) -> list[str]:
    """The modules a pickle's GLOBAL and STACK_GLOBAL opcodes name, first use first, as the unpickler
    imports them (Python 2 names mapped as pickle maps them below protocol 3). What the opcodes push is
    followed only as far as STACK_GLOBAL needs: the last two strings, fetched from the memo when memoized.
    A module this walk misses is imported by the unpickler when its turn comes, as in a cold check."""
    found: list[str] = []
    memo: dict = {}
    recent: list = [None, None]  # the last two things pushed (a string, or None for anything else)
    protocol = 0
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name == "PROTO":
                protocol = arg
                continue
            if name == "FRAME":  # framing pushes nothing
                continue
            if name in _STRINGS:
                recent.append(arg if isinstance(arg, str) else None)
            elif name in _GETS:
                recent.append(memo.get(arg))
            elif name in _PUTS:
                memo[arg] = recent[-1]
                continue
            elif name == "MEMOIZE":
                memo[len(memo)] = recent[-1]
                continue
            elif name == "GLOBAL":
                found.append(_as_unpickled(*arg.split(" ", 1), protocol))
                recent.append(None)
            elif name == "STACK_GLOBAL":
                if isinstance(recent[-2], str) and isinstance(recent[-1], str):
                    found.append(_as_unpickled(recent[-2], recent[-1], protocol))
                recent.append(None)
            else:
                recent.append(None)
            del recent[:-2]
    except Exception:  # a format this walk does not know: what was found so far still holds
        pass
    return list(dict.fromkeys(found))


_seen: dict = {}  # (path, size, mtime) -> modules: the export's check and the next spare read the same file


def _file_modules(path: Path, read) -> Optional[list[str]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _seen:
        data = read(path)
        if len(_seen) > 64:
            _seen.clear()
        _seen[key] = None if data is None else pickle_modules(data)
    return _seen[key]


def _as_unpickled(module: str, name: str, protocol: int) -> str:
    """The module pickle's find_class imports for ``module``/``name`` (fix_imports, its default)."""
    if protocol < 3:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            return _compat_pickle.NAME_MAPPING[(module, name)][0]
        return _compat_pickle.IMPORT_MAPPING.get(module, module)
    return module


def _torch_pickle(path: Path) -> Optional[bytes]:
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            return archive.read(names[0]) if len(names) == 1 else None
    except Exception:  # (a damaged or unusual archive: torch.load says what is wrong, in the check)
        return None


def _plain_pickle(path: Path) -> Optional[bytes]:
    try:
        return path.read_bytes() if path.stat().st_size <= PLAIN_PICKLE_LIMIT else None
    except OSError:
        return None


def _call_name(node: ast.AST) -> str:
    return ast.unparse(node.func) if isinstance(node, ast.Call) else ""


def _value_file(call: ast.AST) -> Optional[str]:
    """``"f"`` in ``_VALUES / "f"`` anywhere in ``call``'s arguments."""
    for node in ast.walk(call):
        if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.left, ast.Name)
                and node.left.id == "_VALUES" and isinstance(node.right, ast.Constant)
                and isinstance(node.right.value, str)):
            return node.right.value
    return None


def value_imports(body: list, start: int, values: Path, local: set[str], allowed: set[str]) -> list[str]:
    """Import statements for the modules the value loads in ``body[start:]`` unpickle (model.py's
    statements after its leading imports; ``values``: the export's data/notebook_values; ``local``: the
    top-level names of the export's own modules; ``allowed``: the top-level names of the libraries the
    requirements name, the only ones imported in advance)."""
    statements: list[str] = []
    for i, node in enumerate(body[start:]):
        if i == 0:
            if not (isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "_VALUES"):
                return []
            continue
        call = node.value if isinstance(node, (ast.Assign, ast.Expr)) else None
        name = _call_name(call) if call is not None else ""
        if name in _PURE_LOADS:
            continue
        modules = None
        filename = _value_file(call) if call is not None else None
        if name == "torch.load" and filename:
            found = _file_modules(values / filename, _torch_pickle)
            modules = None if found is None else [_TORCH_RENAMED.get(m, m) for m in found]
        elif name == "pickle.loads" and filename:
            modules = _file_modules(values / filename, _plain_pickle)
        if modules is None:
            break  # any other statement, or a value not read: nothing after it is imported in advance
        for module in modules:
            top = module.split(".")[0]
            if top in allowed and top not in local and all(part.isidentifier() for part in module.split(".")):
                statements.append(f"import {module}")
    return list(dict.fromkeys(statements))
