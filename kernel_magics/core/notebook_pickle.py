"""Pickles that name the notebook's own classes and functions as members of ``model.model``.

A value saved from the kernel may hold an instance of a class defined in the notebook
(a wrapper around a fitted vectorizer, a notebook ``nn.Module``, a dataclass), or a
notebook function (a ``functools.partial``, a callback). In the kernel they live in
``__main__``; in the deployment model.py defines them, imported by Truss as
``model.model``. The pickles written here refer to them there, so nothing saved names
``__main__``.

The rule lives in the pickler, as cloudpickle keeps its rules (``reducer_override``):
a notebook class or function is written as ``getattr(<model.model>, "Outer")`` (then
``getattr(..., "Inner")`` for a nested class), with ``<model.model>`` written as
``importlib.import_module("model.model")``. Nothing outside the pickler changes while it
runs: no ``__module__`` is rewritten, ``sys.modules`` is untouched, so a model served from
the kernel meanwhile sees the interpreter as it was. Loading needs only the standard
library and the module model.py itself (Truss registers it in ``sys.modules`` before
running it, and ``model`` is a package beside it).

The same rule serves every library serializer: :func:`dump` and :func:`dumps` (pickle), :func:`joblib_dump`
(joblib's own pickler subclass) and :func:`torch_save` (``torch.save``'s ``pickle_module``).
:func:`references` runs it without writing anything, to learn which notebook names and
which installed modules a value needs before it is saved.
"""

from __future__ import annotations

import enum
import importlib
import pickle
import sys
import types
from pathlib import Path
from typing import Any, Collection, Mapping, Optional

from .contract import definition_code, functools_wrapped

__all__ = ["MODEL_MODULE", "CannotPickle", "NotebookReferenceError", "dump", "dumps", "joblib_dump", "torch_save",
           "references", "refer_to"]

MODEL_MODULE = "model.model"  # what model.py is imported as, by Truss and by us
PROTOCOL = pickle.HIGHEST_PROTOCOL


class NotebookReferenceError(pickle.PicklingError):
    """A notebook class or function inside the value has no name model.py can define."""

    advice = ""  # what to do instead, when not the usual (move the definition to the top level of a cell)
    superseded = False  # a definition replaced since: the whole reason (not why the value had to be saved)


class _ModelModule:
    """Stands for ``model.model`` inside a pickle (written as ``importlib.import_module("model.model")``)."""


class _Rule:
    """How notebook classes and functions are written; shared by every pickler of one save."""

    def __init__(self, namespace: Mapping[str, Any], saving: str = "", replaced: Collection[str] = ()) -> None:
        self.namespace = namespace
        # The notebook's names that cells defined more than once: a value holding an earlier definition that differs
        # from the latest is refused (planning, unless the replay will prove the value; saving follows what the plan
        # decided). A mapping says which were defined with other source (True) and which only ran again (False).
        self.replaced = replaced
        self.notebook = namespace.get("__name__", "__main__")
        self.saving = saving  # the name whose value is being saved: it cannot refer to itself
        self.module = _ModelModule()
        self.used: set[str] = set()  # top-level notebook names the pickle refers to

    def reduce(self, obj: Any) -> Any:
        if obj is self.module:
            return importlib.import_module, (MODEL_MODULE,)
        # (functools.lru_cache(f) pickles as a name, as a function does: the notebook's, not `__main__`'s)
        named = isinstance(obj, (type, types.FunctionType)) or functools_wrapped(obj) is not None
        if not named or getattr(obj, "__module__", None) != self.notebook:
            return NotImplemented
        parent, attr = self._where(obj)
        return getattr, (parent, attr)

    def _where(self, obj: Any) -> tuple[Any, str]:
        """(the object that holds ``obj`` in model.py, its attribute name)."""
        qualname = getattr(obj, "__qualname__", obj.__name__)
        parts = qualname.split(".")
        kind = "class" if isinstance(obj, type) else "function"
        wrapper = False
        if "<locals>" not in parts and "<lambda>" not in parts:
            found, holder = self.namespace.get(parts[0], _MISSING), self.module
            for part in parts[1:]:
                holder, found = found, getattr(found, part, _MISSING)
            # A class defined again since the value was made resolves to the definition model.py holds (the
            # notebook's latest): with the same code (its cell run again) that is the same behaviour; with other
            # code the deployment would run other methods than the notebook's value does, so it is refused, unless
            # recorded predictions will be replayed to prove the answers the same (a docstring edited).
            if found is not _MISSING and found is not obj and _wraps(obj, found):
                # A wrapper that took the name of what it wraps (functools.wraps: `g = double(f)`; a cache of it under
                # another name, `g = lru_cache(f)`), which the name does not bind: a name bound to the object itself
                # is written instead (model.py's `f` would be the bare function), else it is refused.
                found, wrapper = _MISSING, True
            if found is not _MISSING and isinstance(found, type) == isinstance(obj, type) and parts[0] != self.saving:
                edited = self.replaced.get(parts[0], True) if isinstance(self.replaced, Mapping) else True
                # (A wrapper of the very function, `f = functools.wraps`-style `double(f)`, compares equal by its
                # code but answers otherwise: the value holds the bare `f`, model.py's `f` is the wrapper.)
                # (A plain enum's members compare by identity: in the notebook those of a run before are not equal
                # to the latest's, `table[Color.RED]` misses, while model.py has one `Color`, whatever the code. An
                # IntEnum's or StrEnum's compare as their values.)
                members = isinstance(obj, type) and issubclass(obj, enum.Enum) and getattr(
                    obj, "_member_type_", object) is object
                replaced = parts[0] in self.replaced and found is not obj
                other_code = replaced and (_wraps(found, obj) or definition_code(found) != definition_code(obj))
                if replaced and (members or other_code):
                    again = (f"the notebook bound `{parts[0]}` again, to other code" if edited else
                             f"the same cell ran again and made `{parts[0]}` hold other values (a default, a class "
                             "attribute or a function it read, changed in between, or state its own code moved "
                             "since: a counter, a cache)")
                    error = NotebookReferenceError(
                        f"it holds the {kind} `{qualname}` as a cell defined it before {again}; model.py defines "
                        f"only the latest `{parts[0]}`, so the deployment would run other code than the notebook's "
                        "value does" if other_code else
                        f"it holds the enum `{qualname}` (or members of it) as a cell defined it before that cell "
                        f"ran again; in the notebook its members are not equal to the latest `{parts[0]}`'s (an enum "
                        f"compares by identity: `{parts[0]}.X == old_x` is False, a dict keyed by them misses), "
                        f"while model.py defines one `{parts[0]}`, so the deployment would answer otherwise")
                    error.advice = (f"Run the cell that makes `{self.saving or 'the value'}` again, so that it holds "
                                    f"the latest `{qualname}` (or give the new definition another name); with "
                                    "recorded predictions (%model_predict) the export's replay judges instead.")
                    error.superseded = True
                    raise error
                self.used.add(parts[0])
                return holder, parts[-1]
        # A function or class made inside a function (or a lambda) can still be reached through a
        # top-level name bound to it.
        bound = sorted(n for n, v in self.namespace.items() if v is obj and not n.startswith("_"))
        bound = [n for n in bound if n != self.saving]
        if bound:
            self.used.add(bound[0])
            return self.module, bound[0]
        if "<locals>" in parts:
            where = ".".join(parts[:parts.index("<locals>")])
            raise NotebookReferenceError(
                f"it holds the {kind} `{parts[-1]}`, which the notebook defines inside `{where}`, and a saved "
                "file can only refer to classes and functions defined at the top level of a cell")
        if "<lambda>" in parts:
            raise NotebookReferenceError(
                "it holds a lambda from the notebook that no top-level name is bound to, and a saved file can only "
                "refer to functions defined at the top level of a cell")
        if wrapper:
            error = NotebookReferenceError(
                f"it holds a wrapper of the notebook's {kind} `{qualname}` (made by a decorator with functools.wraps, "
                "or a functools cache), which no top-level name binds any more, so model.py cannot make it")
            error.advice = ("Bind the wrapper to a top-level name of its own (`g = double(f)`) and run the cells that "
                            "use it again, or build it inside `load()`.")
            raise error
        if parts[0] == self.saving and self.namespace.get(parts[0]) is obj:
            error = NotebookReferenceError(
                f"it is the {kind} `{qualname}` itself, as no top-level def in the cells makes it (a cell that wraps "
                "it ran more than once, a def inside an `if` or a loop, exec, or a function that rebinds it with "
                "`global`), so model.py cannot define it as the notebook has it")
            error.advice = (f"Define `{qualname}` as the model should use it at the top level of a cell and run each "
                            "cell from there once (Restart and Run All), then export again.")
            raise error
        if self.namespace.get(parts[0], _MISSING) is not _MISSING and parts[0] != self.saving:
            now = self.namespace[parts[0]]
            error = NotebookReferenceError(
                f"it holds the {kind} `{qualname}` from the notebook, whose name a later cell bound to "
                f"{_described(now)}; model.py can bind `{parts[0]}` to only one of them")
            error.advice = (f"Give the notebook's {kind} or the later binding another name, then run the cells that "
                            "use it again.")
            raise error
        raise NotebookReferenceError(
            f"it holds the {kind} `{qualname}` from the notebook, which no longer has that name at the top level "
            "(deleted or renamed since the value was made), so model.py cannot define it")


_MISSING = object()


def _wraps(wrapper: Any, obj: Any) -> bool:
    """Whether ``wrapper`` wraps ``obj`` (functools.wraps, lru_cache), at any depth."""
    inner, seen = wrapper, 0
    try:
        while getattr(inner, "__wrapped__", None) is not None and seen < 100:
            inner, seen = inner.__wrapped__, seen + 1
            if inner is obj:
                return True
    except Exception:  # (a class whose __getattr__ fails otherwise)
        return False
    return False


def _described(value: Any) -> str:
    if isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType)):
        kind = "the class" if isinstance(value, type) else "the function"
        return f"{kind} {getattr(value, '__module__', None) or '?'}.{getattr(value, '__qualname__', '?')}"
    return f"a {type(value).__name__}"


def _pickler_class(base: type, rule: _Rule) -> type:
    """``base`` with the notebook rule as its ``reducer_override`` (a class per save, nothing global)."""
    return type(f"Notebook{base.__name__.lstrip('_')}", (base,),
                {"reducer_override": lambda self, obj: rule.reduce(obj)})


class CannotPickle(Exception):
    """Saving failed; ``reason`` completes "the value cannot be saved because ...", ``notebook_code`` tells
    whether the cause is a notebook definition (else the object itself: a lock, an open file ...)."""

    def __init__(self, reason: str, notebook_code: bool, advice: str = "", superseded: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.notebook_code = notebook_code
        self.advice = advice
        self.superseded = superseded


def _guarded(action: Any) -> Any:
    try:
        return action()
    except RecursionError:
        raise CannotPickle("it nests too deeply to be saved", False) from None
    except NotebookReferenceError as exc:
        raise CannotPickle(str(exc), True, exc.advice, exc.superseded) from None
    except Exception as exc:  # pickle raises TypeError, AttributeError, PicklingError ...
        raise CannotPickle(f"it cannot be pickled ({type(exc).__name__}: {exc})", False) from None


# ---------------------------------------------------------------------- the serializers

def dumps(value: Any, namespace: Mapping[str, Any], *, saving: str = "") -> bytes:
    """``pickle.dumps(value)``, with notebook classes and functions named in ``model.model``."""
    import io

    buffer = io.BytesIO()
    _guarded(lambda: _pickler_class(pickle.Pickler, _Rule(namespace, saving))(buffer, PROTOCOL).dump(value))
    return buffer.getvalue()


def dump(value: Any, path: Path, namespace: Mapping[str, Any], *, saving: str = "") -> None:
    """``pickle.dump(value)`` into ``path``, written as it goes (a large value is never held twice)."""

    def write() -> None:
        with open(path, "wb") as file:
            _pickler_class(pickle.Pickler, _Rule(namespace, saving))(file, PROTOCOL).dump(value)

    _guarded(write)


def joblib_dump(value: Any, path: Path, namespace: Mapping[str, Any], *, saving: str = "") -> None:
    """What ``joblib.dump(value, path)`` writes (arrays stored raw, uncompressed), through the same rule."""
    from joblib.numpy_pickle import NumpyPickler

    pickler = _pickler_class(NumpyPickler, _Rule(namespace, saving))

    def dump() -> None:
        with open(path, "wb") as file:
            pickler(file).dump(value)

    _guarded(dump)


def torch_save(value: Any, path: Path, namespace: Mapping[str, Any], *, saving: str = "") -> None:
    """``torch.save(value, path)`` with a pickle module whose Pickler follows the same rule
    (torch subclasses it for its tensor storages)."""
    import torch

    module = types.ModuleType("kernel_magics_pickle")
    module.Pickler = _pickler_class(pickle.Pickler, _Rule(namespace, saving))
    module.Unpickler, module.load, module.loads = pickle.Unpickler, pickle.load, pickle.loads
    module.dump = lambda obj, file, protocol=None: module.Pickler(file, protocol).dump(obj)
    _guarded(lambda: torch.save(value, path, pickle_module=module))


# ---------------------------------------------------------------------- what a value needs

class _Discard:
    def write(self, data: bytes) -> int:
        return len(data)


def _heavy_types() -> tuple:
    out: list[type] = []
    np = sys.modules.get("numpy")
    if np is not None:
        out.append(np.ndarray)
    torch = sys.modules.get("torch")
    if torch is not None:
        out += [torch.Tensor, torch.UntypedStorage, torch.TypedStorage]
    return tuple(out)


def refer_to(definitions: Any, namespace: Mapping[str, Any], *, saving: str = "",
             replaced: Collection[str] = ()) -> None:
    """Check that model.py can define these notebook classes or functions as the value has them (what a pickle of it
    would check, for a value saved otherwise: a torch module rebuilt from its source gets only its weights from the
    file). Raises CannotPickle."""
    rule = _Rule(namespace, saving, replaced)
    _guarded(lambda: [rule.reduce(d) for d in definitions])


def references(value: Any, namespace: Mapping[str, Any], *, saving: str = "",
               replaced: Collection[str] = ()) -> tuple[set[str], set[str]]:
    """``(modules, notebook names)``: the top-level installed modules loading a pickle of ``value`` imports,
    and the notebook's top-level names it refers to (model.py must define them before loading it).

    Nothing is written: array and tensor data is skipped. Raises CannotPickle saying why the value
    cannot be saved (also when it holds an earlier definition of a name in ``replaced``, with other code).
    """
    rule = _Rule(namespace, saving, replaced)
    modules: set[str] = set()
    heavy = _heavy_types()

    def reduce(self: Any, obj: Any) -> Any:
        found = rule.reduce(obj)
        if found is not NotImplemented or obj is rule.module:
            return found
        module: Optional[str] = (getattr(obj, "__module__", None)
                                 if isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType))
                                 else type(obj).__module__)
        if module:
            modules.add(module.split(".")[0])
        if isinstance(obj, heavy) and not getattr(getattr(obj, "dtype", None), "hasobject", False):
            return tuple, ()  # its data (numbers, not objects) is not needed to find what it refers to
        return NotImplemented

    scanner = type("NotebookScanner", (pickle.Pickler,), {"reducer_override": reduce})
    _guarded(lambda: scanner(_Discard(), PROTOCOL).dump(value))
    modules -= {"builtins", rule.notebook, MODEL_MODULE.split(".")[0]}
    return {m for m in modules if m not in sys.stdlib_module_names}, rule.used
