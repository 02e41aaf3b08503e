"""Fingerprints of live values: does re-running a name's source give the value the notebook has?

The export's fresh process fingerprints every name model.py rebuilds from source; the
kernel fingerprints its live value; :func:`difference` compares the two and says, in
words a user can check, how they differ ("4 items, the notebook has 5"). A fingerprint
is a small JSON-able dict, so it crosses the process boundary in the check's report:

- literals (numbers, strings, lists, dicts ... of literals): their canonical text (sets sorted);
- numpy arrays and torch tensors: dtype, shape and a checksum of the bytes (the device is left
  out: a tensor the deployment moves to its GPU holds the same value);
- torch modules: a checksum over the state dict, the train/eval flags, the plain attributes (numbers,
  strings, tuples) and the non-persistent buffers of every submodule;
- random generators: their state; tokenizers: their JSON;
- a module imported from the notebook's folder: one fingerprint per public attribute;
- anything else: a checksum of its pickled bytes, with classes and functions defined in the
  notebook named by their qualified name only (``__main__`` in the kernel, ``model.model`` in
  the export).

``None`` means the value cannot be fingerprinted (it cannot be pickled): it is not verified.
Nothing is imported here that the value's own library has not already imported.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import reprlib
import sys
import types
from typing import Any, Optional

__all__ = ["fingerprint", "fingerprint_names", "difference", "same", "changed_attributes", "made_by_notebook_code",
           "type_name", "cell_is_filled", "BESIDES_WEIGHTS"]

# Modules whose classes and functions are the notebook's own (the kernel's __main__, model.py in the export).
NOTEBOOK_MODULES = frozenset({"__main__", "model.model", "model"})
_LITERAL_BUDGET = 100_000  # nodes; a bigger literal is checksummed through pickle instead
_CONTAINER_ITEMS = 10_000  # a list or dict of more non-literals is checksummed through pickle


def fingerprint(value: Any, *, weights: bool = True) -> Optional[dict]:
    """A JSON-able fingerprint of ``value`` (kind, digest, summary), or None when it has none. ``weights=False``:
    for a torch module, everything but its state dict (see BESIDES_WEIGHTS)."""
    try:
        if not weights:
            torch = sys.modules.get("torch")
            if torch is not None and isinstance(value, torch.nn.Module):
                return _torch(value, weights=False)
        return _fingerprint(value, depth=0)
    except Exception:  # a value that cannot be read safely is simply not verified
        return None


# Appended to a name: fingerprint only what a torch module holds besides its weights (its modes, plain attributes
# and non-persistent buffers). A module sent as its weights gets them from the saved file, equal by construction:
# hashing them again in both processes cost a quarter of a warm export of the gallery's embeddings.
BESIDES_WEIGHTS = "#besides-weights"


def fingerprint_names(namespace: dict, names: list[str]) -> dict[str, Optional[dict]]:
    """Fingerprints of ``names`` in a module namespace; a missing name has the fingerprint None."""
    found = {}
    for name in names:
        base, besides = name.removesuffix(BESIDES_WEIGHTS), name.endswith(BESIDES_WEIGHTS)
        if base not in namespace:
            found[name] = None
        else:
            found[name] = fingerprint(namespace[base], weights=not besides)
    return found


def same(a: Optional[dict], b: Optional[dict]) -> bool:
    return a is not None and b is not None and a.get("digest") == b.get("digest")


def difference(live: Optional[dict], fresh: Optional[dict]) -> Optional[str]:
    """None when both fingerprints agree (or one is unknown), else how the fresh value differs, e.g.
    "re-running its source gives a different value: 4 items, the notebook has 5"."""
    if live is None or fresh is None or same(live, fresh):
        return None
    head = "re-running its source gives a different value"
    if live.get("kind") == "module" and fresh.get("kind") == "module":
        mine, theirs = live.get("items", {}), fresh.get("items", {})
        for attr in sorted(set(mine) | set(theirs)):
            if attr not in theirs:
                return f"{head}: attribute `{attr}` is missing when the module is imported afresh"
            if attr not in mine:
                continue  # the notebook deleted it: the model cannot be using it
            why = difference(mine[attr], theirs[attr])
            if why:
                return f"the notebook changed its attribute `{attr}`: " + why.replace(f"{head}: ", "", 1)
        return head
    mine, theirs = live.get("attributes") or {}, fresh.get("attributes") or {}
    for attr in sorted(set(mine) & set(theirs)):  # a torch module's plain attributes
        if mine[attr] != theirs[attr]:
            return f"{head}: its attribute `{attr}` is {theirs[attr]}, the notebook has {mine[attr]}"
    if live.get("summary") != fresh.get("summary"):
        return f"{head}: {fresh.get('summary')}, the notebook has {live.get('summary')}"
    return f"{head}: {fresh.get('summary')} in both, with other contents"


def changed_attributes(live: Optional[dict], fresh: Optional[dict]) -> list[str]:
    """For two module fingerprints: the public attributes whose values differ."""
    if not live or not fresh or live.get("kind") != "module" or fresh.get("kind") != "module":
        return []
    mine, theirs = live.get("items", {}), fresh.get("items", {})
    return [a for a in sorted(mine) if a in theirs and not same(mine[a], theirs[a])]


# ---------------------------------------------------------------------- by type

def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, (bytes, bytearray, memoryview)) else str(part).encode())
        h.update(b"\x00")
    return h.hexdigest()[:32]


def _fp(kind: str, digest: str, summary: str, **extra: Any) -> dict:
    return {"kind": kind, "digest": digest, "summary": summary, **extra}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _fingerprint(value: Any, depth: int) -> Optional[dict]:
    if isinstance(value, types.ModuleType):
        if depth:
            return _fp("module", _digest("module", value.__name__), f"module {value.__name__}")
        return _module(value)
    if isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType)):
        return _definition(value, depth, closure=True)
    from .contract import functools_wrapped

    wrapped = functools_wrapped(value)
    if wrapped is not None:
        # functools.lru_cache(f), cache(f): the wrapper's kind and the function's definition (pickled, it is only a
        # name, which differs between the kernel's `__main__` and model.py)
        inner = _definition(wrapped, depth, closure=True)
        kind = type(value).__qualname__
        return _fp("definition", _digest("wrapper", kind, inner["digest"]), f"a functools.{kind} of {inner['summary']}")
    text = _canonical(value, [_LITERAL_BUDGET])
    if text is not None:
        return _fp("literal", _digest("literal", text), _literal_summary(value))
    logging = sys.modules.get("logging")
    if logging is not None and isinstance(value, logging.Logger):  # by name: as logging.getLogger gives it anywhere
        name = "<notebook>" if value.name in NOTEBOOK_MODULES else value.name
        return _fp("literal", _digest("logger", name), f"the logger {name}")
    for check in (_numpy, _torch, _randoms, _tokenizer):
        found = check(value)
        if found is not None:
            return found
    if type(value) in (list, tuple, set, frozenset, dict) and len(value) <= _CONTAINER_ITEMS and depth < 20:
        return _container(value, depth)
    return _pickled(value)


def _container(value: Any, depth: int) -> Optional[dict]:
    """A container of non-literals, fingerprint by fingerprint (a set's members sorted: its order is the hash
    seed's, not the notebook's)."""
    parts = []
    items = value.items() if isinstance(value, dict) else ((None, v) for v in value)
    for key, item in items:
        found = _fingerprint(item, depth + 1)
        key_text = _canonical(key, [_LITERAL_BUDGET]) if isinstance(value, dict) else ""
        if found is None or key_text is None:
            return None
        parts.append(f"{key_text}={found['digest']}")
    if isinstance(value, (set, frozenset)):
        parts.sort()
    return _fp("container", _digest(type(value).__name__, *parts), _plural(len(value), "item"))


def _literal_summary(value: Any) -> str:
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        return f"{_plural(len(value), 'item')}"
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else f"a string of {_plural(len(value), 'character')}"
    if isinstance(value, bytes):
        return f"{_plural(len(value), 'byte')}"
    return repr(value)


_PRIMITIVES = frozenset({str, bytes, bool, int, float, complex, type(None)})


def _canonical(value: Any, budget: list) -> Optional[str]:
    """A text that is equal for equal literals in any process (sets sorted), with types kept."""
    budget[0] -= 1
    if budget[0] < 0:
        return None
    kind = type(value)
    if kind in _PRIMITIVES:
        return f"{kind.__name__}:{value!r}"
    if kind in (list, tuple):
        if all(type(v) in _PRIMITIVES for v in value):  # the common flat list: the same text, without a call each
            budget[0] -= len(value)
            if budget[0] < 0:
                return None
            return f"{kind.__name__}[{','.join([f'{type(v).__name__}:{v!r}' for v in value])}]"
        parts = [_canonical(v, budget) for v in value]
        return None if None in parts else f"{kind.__name__}[{','.join(parts)}]"
    if kind in (set, frozenset):
        parts = [_canonical(v, budget) for v in value]
        return None if None in parts else f"{kind.__name__}{{{','.join(sorted(parts))}}}"
    if kind is dict:
        parts = []
        for k, v in value.items():  # in order: a model may iterate over it
            ck, cv = _canonical(k, budget), _canonical(v, budget)
            if ck is None or cv is None:
                return None
            parts.append(f"{ck}:{cv}")
        return "dict{" + ",".join(parts) + "}"
    return None


def _module(module: types.ModuleType) -> dict:
    items = {}
    for attr, value in sorted(vars(module).items()):
        if attr.startswith("_") or isinstance(value, types.ModuleType):
            continue
        if isinstance(value, (type, types.FunctionType)) and getattr(value, "__module__", None) == module.__name__:
            items[attr] = _definition(value)  # defined in the module's file: a replaced one still shows
            continue
        found = fingerprint(value)
        if found is not None:
            items[attr] = found
    return _fp("module", _digest("module", *(f"{k}={v['digest']}" for k, v in items.items())),
               f"module {module.__name__}", items=items)


def made_by_notebook_code(value: Any) -> bool:
    """Whether a function was made by notebook code (a class: defined there), by the module its globals are
    (functools.wraps copies a library's __module__ onto a notebook's wrapper, not its globals)."""
    return getattr(value, "__globals__", {}).get("__name__", getattr(value, "__module__", None)) in NOTEBOOK_MODULES


def _whole(value: Any) -> str:
    """The digest of something a notebook function carries, when it can be compared whole; else no fingerprint."""
    if isinstance(value, types.FunctionType) and not (value.__closure__ or value.__defaults__ or value.__kwdefaults__
                                                      or getattr(value, "__dict__", None)):
        return _definition(value)["digest"]  # (a plain function: its code, and its globals are model.py's own)
    if type(value) is tuple:  # (defaults: each one whole)
        return _digest("tuple", *(_whole(v) for v in value))
    if type(value) is dict and all(type(k) is str for k in value):  # (keyword defaults, a function's attributes)
        return _digest("dict", *(f"{k}={_whole(v)}" for k, v in value.items()))
    found = _fingerprint(value, 1)
    if found is None or found["kind"] not in ("literal", "array", "tensor"):
        raise _NoFingerprint()  # (an object pickled: a class defined inside a function shows by its name only)
    return found["digest"]


class _NoFingerprint(Exception):
    """Part of the value has no fingerprint, so the whole has none (fingerprint() answers None)."""


def cell_is_filled(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # (a cell not bound yet)
        return False
    return True


def _definition(value: Any, depth: int = 0, *, closure: bool = False) -> dict:
    module = getattr(value, "__module__", None)
    notebook = made_by_notebook_code(value)
    module = "<notebook>" if module in NOTEBOOK_MODULES else module
    name = f"{module}.{getattr(value, '__qualname__', getattr(value, '__name__', '?'))}"
    code = getattr(value, "__code__", None)
    # (by its instructions as any compilation gives them: the kernel compiled `re.sub` in a cell without `import re`
    # otherwise than model.py does, and a registry of such functions read as changed)
    from .contract import code_shape

    body = _digest(repr(code_shape(code))) if code is not None else ""
    if not isinstance(value, type):
        # A function the notebook made (`money = make_rounder(2)`, the value of a name itself: depth 0) is its code
        # and all it carries: the values it closes over (`ndigits` 2 or 3 are other functions), its defaults and
        # its attributes. Only what can be compared whole counts (literals, arrays, functions with nothing of their
        # own): a closure over an object, or over another closure, has no fingerprint. (A library's decorated
        # functions, a module's beside the notebook and functions inside a container are compared by their code
        # only, as before: a memoizing decorator's cache, filled in the kernel, is no change of theirs.)
        parts = []
        if closure and notebook and depth == 0:
            for cell in getattr(value, "__closure__", None) or ():
                # (not bound yet; a function that calls itself)
                if not cell_is_filled(cell) or cell.cell_contents is value:
                    parts.append("")
                    continue
                parts.append(_whole(cell.cell_contents))
            parts += [_whole(getattr(value, "__defaults__", None)), _whole(getattr(value, "__kwdefaults__", None)),
                      _whole(dict(getattr(value, "__dict__", None) or {}))]
            shown = getattr(value, "__defaults__", None) or getattr(value, "__kwdefaults__", None)
            if shown:  # (what a difference message names: `s=random.random()` drew another)
                return _fp("definition", _digest("definition", name, body, *parts), name,
                           attributes={"defaults": reprlib.repr(shown)})
        return _fp("definition", _digest("definition", name, body, *parts), name)
    # A class's own plain attributes (`threshold = 0.5` in its body): a function that sets `Config.threshold`
    # changes what re-running the class gives, as a cell would, but out of sight of the source.
    attributes, parts = {}, []
    for attr, item in sorted(vars(value).items()):
        if attr.startswith("__"):
            continue
        held = item.__func__ if isinstance(item, (staticmethod, classmethod)) else item
        try:
            own = getattr(held, "__qualname__", "")
        except Exception:  # (an object whose __getattr__ fails otherwise)
            continue
        own = own if isinstance(own, str) else ""
        if isinstance(held, types.FunctionType) and own.startswith(value.__qualname__ + "."):
            # A method: the class's code, and its defaults, which its def computes when the class runs
            # (`s=random.random()`: model.py draws another)
            if held.__defaults__ or held.__kwdefaults__:
                try:
                    found = _digest("defaults", _whole(held.__defaults__), _whole(held.__kwdefaults__))
                except _NoFingerprint:
                    continue
                parts.append(f"{attr}()={found}")
                if len(attributes) < 200:
                    shown = f"a method with the defaults {reprlib.repr(held.__defaults__ or held.__kwdefaults__)}"
                    attributes[attr] = shown
            continue
        if callable(held) and not isinstance(held, type) and own and not own.startswith(value.__qualname__ + "."):
            # A function the body took from elsewhere (`f = staticmethod(sqrt)`): the one it held then, which a
            # later `from math import sqrt` does not change in the notebook but would in model.py.
            found = _definition(held)
            parts.append(f"{attr}->{found['digest']}")
            if len(attributes) < 200:
                attributes[attr] = found["summary"]
            continue
        text = _canonical(item, [_LITERAL_BUDGET])
        if text is None and type(item) in (list, tuple, dict) and len(item) <= _CONTAINER_ITEMS:
            # A registry of classes or functions (`__init_subclass__` filling `Base.registry`): by their names, as a
            # subclass model.py does not define is missing from it there
            text = _names(item)
        if text is None:
            # An array or tensor its body made (`W = np.random.rand(3)`: model.py draws another), by its data
            found = _numpy(item) or (_torch(item) if not isinstance(item, type) else None)
            if found is not None and found["kind"] in ("array", "tensor"):
                parts.append(f"{attr}#{found['digest']}")
                if len(attributes) < 200:
                    attributes[attr] = f"{found['summary']} (checksum {found['digest'][:8]})"
            continue  # methods, descriptors, nested classes, objects: the class's code, or not a plain value
        parts.append(f"{attr}={text}")
        if len(attributes) < 200:
            shown = repr(item)
            attributes[attr] = shown if len(shown) <= 60 else shown[:57] + "..."
    return _fp("definition", _digest("definition", name, body, *parts), name, attributes=attributes)


def _names(item: Any) -> Optional[str]:
    """A flat list, tuple or dict of classes and functions (and plain keys), by their qualified names."""
    def name(v: Any) -> Optional[str]:
        if isinstance(v, (type, types.FunctionType)):
            module = getattr(v, "__module__", None)
            return f"{'<notebook>' if module in NOTEBOOK_MODULES else module}.{v.__qualname__}"
        return _canonical(v, [_LITERAL_BUDGET]) if type(v) in _PRIMITIVES else None

    pairs = list(item.items()) if isinstance(item, dict) else [(None, v) for v in item]
    texts = [(name(k) if k is not None else "", name(v)) for k, v in pairs]
    if any(v is None or k is None for k, v in texts) or not any(
            isinstance(v, (type, types.FunctionType)) for _, v in pairs):
        return None
    return f"{type(item).__name__}[{','.join(f'{k}:{v}' for k, v in texts)}]"


def _array_bytes_digest(dtype: str, shape: tuple, data: bytes) -> str:
    return _digest("array", dtype, shape, data)


def _numpy(value: Any) -> Optional[dict]:
    np = sys.modules.get("numpy")
    if np is None or not isinstance(value, (np.ndarray, np.generic)):
        return None
    array = np.asarray(value)
    if array.dtype == object:
        return None  # pickled instead
    shape = tuple(array.shape)
    return _fp("array", _array_bytes_digest(str(array.dtype), shape, np.ascontiguousarray(array).tobytes()),
               f"an array of shape {shape} ({array.dtype})")


def _tensor_bytes(torch: Any, tensor: Any) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy().tobytes()


def _torch(value: Any, weights: bool = True) -> Optional[dict]:
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.is_meta:
            return None
        shape = tuple(value.shape)
        return _fp("tensor", _array_bytes_digest(str(value.dtype), shape, _tensor_bytes(torch, value)),
                   f"a tensor of shape {shape} ({str(value.dtype).replace('torch.', '')})")
    if isinstance(value, torch.nn.Module):
        h = hashlib.sha256(f"{type(value).__qualname__}".encode())
        count = 0
        for key, tensor in value.state_dict().items():
            h.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            if weights:
                h.update(_tensor_bytes(torch, tensor))
            count += tensor.numel()
        h.update(repr([m.training for m in value.modules()]).encode())
        attributes = {}
        for key, part, shown in _module_extras(torch, value):
            h.update(key.encode())
            h.update(part)
            if shown is not None and len(attributes) < 200:
                attributes[key.lstrip(".")] = shown
        return _fp("torch module", h.hexdigest()[:32], f"a {type(value).__name__} with {count:,} weights",
                   attributes=attributes)
    if isinstance(value, (torch.device, torch.dtype)):
        return _fp("literal", _digest("torch", str(value)), str(value))
    if isinstance(value, torch.Generator):
        return _fp("random", _digest("torch generator", _tensor_bytes(torch, value.get_state())),
                   "a torch.Generator in another state")
    return None


def _module_extras(torch: Any, module: Any) -> list[tuple[str, bytes, Optional[str]]]:
    """What a module holds besides its state dict, submodules included: plain attributes (numbers, strings,
    tuples: a `temperature` changed in a cell; an absolute path aside) and non-persistent buffers. A module that travels as its
    weights only loses both, so they must count in whether re-running its source gives the notebook's value."""
    parts = []
    for prefix, sub in module.named_modules():
        for attr, value in sorted(vars(sub).items()):
            if attr.startswith("_") or attr == "training":
                continue
            if isinstance(value, str) and os.path.isabs(value):
                continue  # where it was loaded from (`name_or_path`): another folder in every process, same weights
            text = _canonical(value, [_LITERAL_BUDGET])
            if text is not None:
                shown = repr(value)
                parts.append((f"{prefix}.{attr}", text.encode(), shown if len(shown) <= 60 else shown[:59] + "…"))
        for name in sorted(getattr(sub, "_non_persistent_buffers_set", ())):
            buffer = sub._buffers.get(name)
            if isinstance(buffer, torch.Tensor):
                parts.append((f"{prefix}.{name}:{buffer.dtype}:{tuple(buffer.shape)}", _tensor_bytes(torch, buffer),
                              None))
    return parts


def _randoms(value: Any) -> Optional[dict]:
    import random

    if isinstance(value, random.Random):
        return _fp("random", _digest("random", repr(value.getstate())), f"a {type(value).__name__} in another state")
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(value, np.random.Generator):
            return _fp("random", _digest("numpy", repr(value.bit_generator.state)),
                       "a numpy.random.Generator in another state")
        if isinstance(value, np.random.RandomState):
            state = value.get_state()
            return _fp("random", _digest("numpy rs", state[0], np.asarray(state[1]).tobytes(), state[2:]),
                       "a numpy.random.RandomState in another state")
    return None


def _tokenizer(value: Any) -> Optional[dict]:
    tokenizers = sys.modules.get("tokenizers")
    if tokenizers is None or not isinstance(value, tokenizers.Tokenizer):
        return None
    return _fp("tokenizer", _digest("tokenizer", value.to_str()),
               f"a tokenizer with {value.get_vocab_size():,} tokens")


class _Pickler(pickle.Pickler):
    """Pickles with the notebook's classes and functions named by qualified name only, so the kernel's
    ``__main__.Foo`` and the export's ``model.model.Foo`` give the same bytes."""

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, (type, types.FunctionType)) and getattr(obj, "__module__", None) in NOTEBOOK_MODULES:
            return ("notebook", obj.__qualname__)
        return None


def _pickled(value: Any) -> Optional[dict]:
    buffer = io.BytesIO()
    try:
        _Pickler(buffer, protocol=4).dump(value)
    except Exception:
        return None
    data = buffer.getvalue()
    size = f"{len(value)} items" if isinstance(value, (list, tuple, dict, set)) else f"{_plural(len(data), 'pickled byte')}"
    return _fp("pickle", _digest("pickle", data), f"a {type_name(value)} of {size}")


def type_name(value: Any) -> str:
    """A value's type as a user reads it: `list`, `Scaler` (the notebook's own), `sklearn.pipeline.Pipeline`."""
    kind = type(value)
    own = kind.__module__ in ("builtins", *NOTEBOOK_MODULES)
    return kind.__qualname__ if own else f"{kind.__module__}.{kind.__qualname__}"
