"""Live values that travel with an export: what the notebook computed, saved in its library's own format.

:func:`plan` decides, for one live value that cannot be rebuilt by re-running its
source, how it travels: as a Python literal written into model.py when it is
one, else as a file under ``data/notebook_values/`` in the format its library
is made for, preferring formats that run no code when loaded:

========================  =====================================================
value                     format
========================  =====================================================
str, numbers, lists ...   a literal in model.py (or a ``.literal`` file)
numpy array               ``.npy`` without pickles
torch tensor, state dict  safetensors
torch module              its constructor re-run from source + safetensors
                          weights, when its structure did not change after it
                          was built; else torch's full save (pickle)
tokenizers.Tokenizer      its own JSON
scikit-learn estimator    skops (joblib when skops is missing or the pipeline
                          holds classes defined in the notebook)
anything else picklable   pickle
========================  =====================================================

Classes and functions defined in the notebook are saved as members of
``model.model`` (Truss's name for model.py), which defines them, so nothing
in ``data/`` refers to ``__main__``: every pickle-based format goes through
:mod:`kernel_magics.core.notebook_pickle`, the one place that rule lives.
"""

from __future__ import annotations

import importlib.util
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Optional

from . import notebook_pickle
from .notebook_pickle import MODEL_MODULE

__all__ = ["ValuePlan", "plan", "literal_source", "is_literal", "is_immutable", "stateful_kind", "VALUES_DIR",
           "MODEL_MODULE", "CannotSave", "alias", "scan"]

VALUES_DIR = "notebook_values"  # under data/, which Truss copies into the image
_INLINE_LITERAL = 2000  # characters; longer literals go to a file
_PRELUDE = f'_VALUES = pathlib.Path(__file__).resolve().parent.parent / "data" / "{VALUES_DIR}"'

# The format of a torch module that travels as its weights and is rebuilt from its source (source.py tells it by this).
MODULE_WEIGHTS = "safetensors weights; the module is rebuilt from its source"


_OUTSIDE = ("Create it inside `load()` instead (open files, connections and locks there), and keep only plain "
            "data at the top level of the notebook.")


class CannotSave(Exception):
    """The value cannot be saved: the message says why (the caller names the value and the cell), ``advice``
    what to do about it."""

    def __init__(self, reason: str, advice: str = _OUTSIDE, whole: bool = False) -> None:
        super().__init__(reason)
        self.advice = advice
        self.whole = whole  # the reason is the whole story (not why the value had to be saved: that follows from it)


def _cannot(exc: notebook_pickle.CannotPickle) -> CannotSave:
    if exc.notebook_code:
        return CannotSave(exc.reason, exc.advice or "Move that definition to the top level of a cell (model.py defines "
                                                    "what the notebook defines there), or build the value inside "
                                                    "`load()`.", whole=exc.superseded)
    return CannotSave(exc.reason)


@dataclass
class ValuePlan:
    """How one name travels as a value, and the code model.py needs to get it back."""

    name: str
    format: str
    filename: Optional[str]  # under data/notebook_values/, None for an inline literal
    lines: list[str]  # model.py lines that (re)create the name
    imports: list[str] = field(default_factory=list)
    modules: set[str] = field(default_factory=set)  # top-level modules the file needs when loaded
    notebook_refs: set[str] = field(default_factory=set)  # notebook classes/functions the file refers to
    keeps_source: bool = False  # the definition stays in model.py; these lines follow it
    runs_code_on_load: bool = False
    save: Optional[Callable[[Path], None]] = None  # writes the file into the values folder
    alias_of: Optional[str] = None  # the same live object as this other name: bound to it, not saved again

    @property
    def prelude(self) -> list[str]:
        """Lines model.py needs once, before any loader."""
        return [_PRELUDE] if self.filename else []

    @property
    def prelude_imports(self) -> list[str]:
        return ["import pathlib"] if self.filename else []


def alias(name: str, primary: str) -> ValuePlan:
    """``name`` is bound to the very object saved as ``primary`` (one file, one object after loading)."""
    return ValuePlan(name, f"the same object as `{primary}`", None, [f"{name} = {primary}"], alias_of=primary)


# ---------------------------------------------------------------------- what a value is

def is_literal(value: Any, _budget: Optional[list] = None) -> bool:
    """A Python literal whose ``repr`` reads back equal, with the same types (no NaN, no subclasses)."""
    budget = _budget if _budget is not None else [200_000]
    budget[0] -= 1
    if budget[0] < 0:
        return False
    kind = type(value)
    if kind in (str, bytes, bool, type(None), int):
        return True
    if kind is float:
        return value == value and value not in (float("inf"), float("-inf"))
    if kind is complex:
        return is_literal(value.real, budget) and is_literal(value.imag, budget)
    if kind in (list, tuple, set, frozenset):
        if kind is frozenset:
            return False  # no literal syntax
        return all(is_literal(v, budget) for v in value)
    if kind is dict:
        return all(is_literal(k, budget) and is_literal(v, budget) for k, v in value.items())
    return False


def is_immutable(value: Any) -> bool:
    """Nothing can change it in place (so only rebinding its name can change what the model sees)."""
    if isinstance(value, (str, bytes, int, float, complex, bool, type(None), frozenset, range)):
        return True
    if type(value) is tuple:
        return all(is_immutable(v) for v in value)
    return False


def literal_source(value: Any) -> str:
    return repr(value)


def stateful_kind(value: Any) -> Optional[str]:
    """What trained or random state a value holds ("a torch module" ...), or None.

    Checked by type without importing anything: a library that is not imported
    cannot have made the value.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        if isinstance(value, torch.nn.Module):
            return "a torch module"
        if isinstance(value, torch.Tensor):
            return "a torch tensor"
        if isinstance(value, torch.Generator):
            return "a torch random generator"
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(value, (np.ndarray, np.generic)):
            return "a numpy array"
        if isinstance(value, (np.random.Generator, np.random.RandomState)):
            return "a numpy random generator"
    pandas = sys.modules.get("pandas")
    if pandas is not None and isinstance(value, (pandas.DataFrame, pandas.Series, pandas.Index)):
        return f"a pandas {type(value).__name__}"
    sklearn_base = sys.modules.get("sklearn.base")
    if sklearn_base is not None and isinstance(value, sklearn_base.BaseEstimator):
        return "a scikit-learn estimator"
    tokenizers = sys.modules.get("tokenizers")
    if tokenizers is not None and isinstance(value, tokenizers.Tokenizer):
        return "a trained tokenizer"
    import random

    if isinstance(value, random.Random):
        return "a random generator"
    if not isinstance(value, type) and callable(getattr(value, "fit", None)) and (
            callable(getattr(value, "predict", None)) or callable(getattr(value, "transform", None))):
        return "a fitted estimator"
    if isinstance(value, dict) and value and torch is not None and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()):
        return "a dict of torch tensors"
    return None


# ---------------------------------------------------------------------- planning

def plan(name: str, value: Any, *, namespace: Mapping[str, Any], rebuild_module: bool = False,
         replaced: Collection[str] = ()) -> ValuePlan:
    """How ``value`` (bound to ``name`` in the notebook) travels. Raises CannotSave.

    ``rebuild_module``: for a torch module, its definition can be re-run from source
    and only its weights (and train/eval flags) need to travel. ``replaced``: the notebook's names that a cell
    defined again with other source; a value holding an earlier one of them, with other code, is refused (model.py
    defines only the latest).
    """
    if is_literal(value):
        text = literal_source(value)
        if len(text) <= _INLINE_LITERAL:
            return ValuePlan(name, "literal", None, [f"{name} = {text}"])
        filename = f"{name}.literal"
        return ValuePlan(name, "literal file", filename,
                         [f'{name} = ast.literal_eval((_VALUES / "{filename}").read_text(encoding="utf-8"))'],
                         imports=["import ast"], save=lambda d: (d / filename).write_text(text, encoding="utf-8"))
    torch = sys.modules.get("torch")
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, (np.ndarray, np.generic)) and np.asarray(value).dtype != object:
        return _npy(name, value, np)
    if torch is not None:
        if isinstance(value, torch.nn.Module):
            if rebuild_module:
                # Re-run from its source, it is built by the classes model.py defines: the notebook's own (`class
                # Net` edited and run again after `net = Net()` was trained) would build another forward there.
                classes = {type(m) for m in value.modules() if "<locals>" not in type(m).__qualname__}
                _saving(lambda: notebook_pickle.refer_to(classes, namespace, saving=name, replaced=replaced))
                return _module_weights(name, value)
            return _torch_full(name, value, namespace, replaced)
        if isinstance(value, torch.Tensor) and value.layout == torch.strided and not value.is_meta:
            return _tensor(name, value, torch)
        if isinstance(value, dict) and value and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                     for k, v in value.items()):
            return _tensor_dict(name, value)
    tokenizers = sys.modules.get("tokenizers")
    if tokenizers is not None and isinstance(value, tokenizers.Tokenizer):
        filename = f"{name}.tokenizer.json"
        return ValuePlan(name, "tokenizers JSON", filename,
                         [f'{name} = tokenizers.Tokenizer.from_file(str(_VALUES / "{filename}"))'],
                         imports=["import tokenizers"], modules={"tokenizers"},
                         save=lambda d: value.save(str(d / filename)))
    sklearn_base = sys.modules.get("sklearn.base")
    if sklearn_base is not None and isinstance(value, sklearn_base.BaseEstimator):
        return _sklearn(name, value, namespace, replaced)
    return _pickle(name, value, namespace, scanned=scan(value, namespace, name, replaced))


def _npy(name: str, value: Any, np: Any) -> ValuePlan:
    filename = f"{name}.npy"
    scalar = isinstance(value, np.generic)
    line = f'{name} = numpy.load(_VALUES / "{filename}", allow_pickle=False)' + ("[()]" if scalar else "")
    return ValuePlan(name, "npy", filename, [line], imports=["import numpy"], modules={"numpy"},
                     save=lambda d: np.save(d / filename, np.asarray(value), allow_pickle=False))


def _tensor(name: str, value: Any, torch: Any) -> ValuePlan:
    filename = f"{name}.safetensors"
    load = f'safetensors.torch.load_file(_VALUES / "{filename}")["value"]'
    if isinstance(value, torch.nn.Parameter):
        load = f"torch.nn.Parameter({load}, requires_grad={value.requires_grad})"

    def save(folder: Path) -> None:
        import safetensors.torch

        safetensors.torch.save_file({"value": value.detach().contiguous()}, str(folder / filename))

    return ValuePlan(name, "safetensors", filename, [f"{name} = {load}"],
                     imports=["import safetensors.torch", "import torch"], modules={"safetensors", "torch"}, save=save)


def _tensor_dict(name: str, value: dict) -> ValuePlan:
    filename = f"{name}.safetensors"

    def save(folder: Path) -> None:
        import safetensors.torch

        safetensors.torch.save_file({k: v.detach().contiguous() for k, v in value.items()}, str(folder / filename))

    return ValuePlan(name, "safetensors", filename, [f'{name} = safetensors.torch.load_file(_VALUES / "{filename}")'],
                     imports=["import safetensors.torch"], modules={"safetensors", "torch"}, save=save)


def _module_weights(name: str, module: Any) -> ValuePlan:
    """The module's definition re-runs (it builds the structure); its weights and modes come from the file."""
    filename = f"{name}.safetensors"
    modes = {sub: m.training for sub, m in module.named_modules()}
    lines = [f'safetensors.torch.load_model({name}, _VALUES / "{filename}")']
    if len(set(modes.values())) == 1:
        lines.append(f"{name}.train({next(iter(modes.values()))})")
    else:
        training = sorted(sub for sub, flag in modes.items() if flag)
        lines.append(f"for _name, _module in {name}.named_modules():")
        lines.append(f"    _module.training = _name in {training!r}")

    def save(folder: Path) -> None:
        import safetensors.torch

        safetensors.torch.save_model(module, str(folder / filename))

    return ValuePlan(name, MODULE_WEIGHTS, filename, lines,
                     imports=["import safetensors.torch"], modules={"safetensors", "torch"}, keeps_source=True,
                     save=save)


def _torch_full(name: str, module: Any, namespace: Mapping[str, Any], replaced: Collection[str]) -> ValuePlan:
    filename = f"{name}.pt"
    modules, refs = scan(module, namespace, name, replaced)

    def save(folder: Path) -> None:
        _saving(lambda: notebook_pickle.torch_save(module, folder / filename, namespace, saving=name))

    return ValuePlan(name, "torch.save (pickle)", filename,
                     [f'{name} = torch.load(_VALUES / "{filename}", weights_only=False)'],
                     imports=["import torch"], modules=modules | {"torch"}, notebook_refs=refs,
                     runs_code_on_load=True, save=save)


def _sklearn(name: str, value: Any, namespace: Mapping[str, Any], replaced: Collection[str]) -> ValuePlan:
    modules, refs = scan(value, namespace, name, replaced)
    # skops resolves classes by import path, so notebook classes go through (job)lib pickles instead.
    if refs or importlib.util.find_spec("skops") is None:
        return _pickle(name, value, namespace, library="joblib", scanned=(modules, refs))
    filename = f"{name}.skops"
    plan_ = ValuePlan(name, "skops", filename, [], imports=["import skops.io"], modules=modules | {"skops"})

    from .skops_import import import_skops_io

    skops_io = import_skops_io()

    def save(folder: Path) -> None:
        skops_io.dump(value, folder / filename)

    # The types it may create are fixed when the export is planned, and written into model.py.
    buffer = io.BytesIO()
    skops_io.dump(value, buffer)
    trusted = sorted(skops_io.get_untrusted_types(data=buffer.getvalue()))
    plan_.lines = [f'{name} = skops.io.load(_VALUES / "{filename}", trusted={trusted!r})']
    plan_.save = save
    return plan_


def _pickle(name: str, value: Any, namespace: Mapping[str, Any], library: str = "pickle",
            scanned: Optional[tuple] = None) -> ValuePlan:
    modules, refs = scanned or scan(value, namespace, name)
    if library == "joblib" and importlib.util.find_spec("joblib") is None:
        library = "pickle"
    if library == "joblib":
        filename = f"{name}.joblib"
        line = f'{name} = joblib.load(_VALUES / "{filename}")'

        def save(folder: Path) -> None:
            _saving(lambda: notebook_pickle.joblib_dump(value, folder / filename, namespace, saving=name))

        return ValuePlan(name, "joblib (pickle)", filename, [line], imports=["import joblib"],
                         modules=modules | {"joblib"}, notebook_refs=refs, runs_code_on_load=True, save=save)
    filename = f"{name}.pkl"

    def save_pickle(folder: Path) -> None:
        _saving(lambda: notebook_pickle.dump(value, folder / filename, namespace, saving=name))

    return ValuePlan(name, "pickle", filename, [f'{name} = pickle.loads((_VALUES / "{filename}").read_bytes())'],
                     imports=["import pickle"], modules=modules, notebook_refs=refs, runs_code_on_load=True,
                     save=save_pickle)


# ---------------------------------------------------------------------- scanning and notebook classes

def scan(value: Any, namespace: Mapping[str, Any], name: str = "",
         replaced: Collection[str] = ()) -> tuple[set[str], set[str]]:
    """The top-level modules a pickle of ``value`` would import, and the notebook classes/functions it
    names. Raises CannotSave naming what cannot be pickled (an open file, a lock, a class defined inside
    a function ...)."""
    try:
        return notebook_pickle.references(value, namespace, saving=name, replaced=replaced)
    except notebook_pickle.CannotPickle as exc:
        raise _cannot(exc) from None


def _saving(action: Callable[[], Any]) -> Any:
    try:
        return action()
    except notebook_pickle.CannotPickle as exc:
        raise _cannot(exc) from None
