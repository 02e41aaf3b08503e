"""Turn a prediction into JSON-ready data, the way a Truss server would.

:func:`to_jsonable` is what our runtime sends. :func:`truss_would_refuse` tells
where Truss 0.18's own server (``json.dumps`` with its ``DeepNumpyEncoder``)
would fail on a result ours can send, so the notebook can warn before a deploy.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from .errors import NotSerializableError

__all__ = ["to_jsonable", "to_json_body", "JSONBody", "is_pydantic_model", "is_pydantic_class", "is_response",
           "truss_would_refuse", "truss_refuses_chunk"]


def is_pydantic_class(obj: Any) -> bool:
    """True for a Pydantic model class (without importing pydantic when unused)."""
    return isinstance(obj, type) and hasattr(obj, "model_validate") and hasattr(obj, "model_fields")


def is_pydantic_model(obj: Any) -> bool:
    return is_pydantic_class(type(obj)) and hasattr(obj, "model_dump")


def is_response(obj: Any) -> bool:
    """A Starlette/FastAPI Response object (which a model may return and a server sends as it is)."""
    return any(c.__name__ == "Response" and c.__module__.startswith("starlette.") for c in type(obj).__mro__)


def to_jsonable(value: Any, *, what: str = "the prediction", wire: bool = False) -> Any:
    """Return ``value`` as JSON data, or raise naming the offending type and where it sits.

    Pydantic models become the data of their own JSON (as sent); tuples become lists and
    numpy scalars and arrays plain numbers and lists (as Truss's encoder does).
    NaN and infinities pass, as Truss's server sends them (``NaN``, ``Infinity``).
    Anything else that is not JSON is an error, because no server could send it.

    Dictionary keys that are numbers, booleans or None become the strings a reader of the JSON
    finds (``{nan: 1}``: ``{"NaN": 1}``; of two keys that write alike, ``1`` and ``"1"``, the last,
    as ``json.loads`` keeps it). ``wire``: they stay, for ``json.dumps`` to write as Truss's server
    does, both of two alike included.
    """
    try:
        return _convert(value, wire)
    except _Unsendable as bad:
        _fail(bad.value, what, "".join(reversed(bad.path)), bad.why)
    except RecursionError:
        if _contains_itself(value):
            raise NotSerializableError(
                f"{what.capitalize()} contains itself (a list or dict inside itself), so a Truss server could not "
                "send it. Build a new list or dict of the parts you mean (copy.deepcopy keeps the loop).",
                # What Truss's own server answers: json.dumps's ValueError, in its "Unhandled exception" body.
                truss_message="Circular reference detected", truss_type="ValueError") from None
        raise NotSerializableError(
            f"{what.capitalize()} is nested deeper than Python's recursion limit, so a Truss server could not send "
            "it. Flatten it (fewer levels of lists and dicts inside each other).",
            truss_message="maximum recursion depth exceeded while encoding a JSON object",
            truss_type="RecursionError") from None


def _contains_itself(value: Any) -> bool:
    """Whether a list, tuple or dict holds itself somewhere inside (a loop), walked without recursion: the
    RecursionError that led here may come from a loop or from nesting that is only deep."""
    stack = [(value, frozenset())]
    while stack:
        item, above = stack.pop()
        if isinstance(item, (list, tuple, dict)):
            if id(item) in above:
                return True
            inside = above | {id(item)}
            stack.extend((child, inside) for child in (item.values() if isinstance(item, dict) else item))
    return False


def to_json_body(value: Any, *, what: str = "the prediction") -> "JSONBody":
    """The JSON a Truss server sends for a result: a Pydantic model as its own JSON (Truss
    sends ``.json()``), anything else as :func:`to_jsonable` then ``json.dumps``."""
    if is_pydantic_model(value):
        return JSONBody(value.model_dump_json().encode())
    return JSONBody(dumps(to_jsonable(value, what=what, wire=True)).encode())


# ---------------------------------------------------------------------- json.dumps, faster for lists of floats

# A list of floats at least this long is written by orjson: below it, the split and join cost more than they save.
_FLOAT_RUN = 16
_orjson: Any = None


def dumps(value: Any) -> str:
    """``json.dumps(value)`` of JSON data, character for character (Truss's server sends exactly that), faster
    where results are long lists of floats: embeddings, logits, scores.

    Why: ``json.dumps`` writes a float with ``float.__repr__``, about 0.6 us each (an embedding of 384 floats:
    about 220 us, a fifth of a served request's CPU here). orjson writes the same shortest round-trip digits in a
    twentieth of that; it differs from ``repr`` only in layout (no space after a comma, ``0.00001`` and ``1.5e-7``
    where ``repr`` writes ``1e-05`` and ``1.5e-07``, ``null`` for NaN and infinities), so those few numbers are
    written by ``repr`` again and the separators are json's. Everything else is ``json.dumps`` itself.
    tests/test_serialization.py compares the two on half a million floats of every magnitude."""
    global _orjson
    if _orjson is None:
        try:
            import orjson as _orjson
        except ImportError:  # (orjson comes with the serve extra; the base install writes as json does)
            _orjson = False
    return _encode(value) if _orjson else json.dumps(value)


# How deep a result is searched for lists of floats: an embedding sits at most a few levels down
# ({"data": [{"embedding": [...]}]}); below this json.dumps writes the rest (and no recursion limit is near).
_DEPTH = 6


def _encode(value: Any, depth: int = 0) -> str:
    """json.dumps's text, with each long list of floats written by orjson and only the containers on the way to
    one joined here: whatever holds none goes to json.dumps whole (a Python join of many small containers, such
    as detection boxes, would cost several times json.dumps's own)."""
    if not _holds_floats(value, depth):
        return json.dumps(value)
    if type(value) is list:
        if type(value[0]) is float:
            return _float_list(value) if all(type(item) is float for item in value) else json.dumps(value)
        return "[" + ", ".join([_encode(item, depth + 1) for item in value]) + "]"
    return "{" + ", ".join([f"{json.dumps(key)}: {_encode(item, depth + 1)}" for key, item in value.items()]) + "}"


def _holds_floats(value: Any, depth: int) -> bool:
    """Whether ``value`` leads to a long list of floats, judged by the first item of each list on the way (a
    list's items share a shape: a batch of embeddings, rows of a matrix), so the look costs a few steps."""
    if depth >= _DEPTH:
        return False
    kind = type(value)
    if kind is list:
        if not value:
            return False
        first = type(value[0])
        if first is float:
            return len(value) >= _FLOAT_RUN
        return (first is list or first is dict) and _holds_floats(value[0], depth + 1)
    if kind is dict:
        # (keys that are not strings, which to_jsonable leaves on the wire, are json.dumps's to write)
        return (any((type(item) is list or type(item) is dict) and _holds_floats(item, depth + 1)
                    for item in value.values()) and all(type(key) is str for key in value))
    return False


def _float_list(values: list) -> str:
    text = _orjson.dumps(values).decode("ascii")
    if "n" in text:  # null: NaN or an infinity, which json.dumps writes by name
        return json.dumps(values)
    if "e" in text or "0.0000" in text:
        text = _as_repr_writes(text)
    return text.replace(",", ", ")  # (no other comma in a list of numbers)


def _as_repr_writes(text: str) -> str:
    """orjson's list of floats with the numbers it lays out otherwise than repr written by repr: an exponent (1.5e-7,
    1e16), a small number written out (0.00001). A token parses back to the very float it came from (orjson writes
    round-trip digits). Only those tokens are visited (found with str.find): an embedding has a few among hundreds,
    and a Python step per token cost as much as the rest of the answer's encoding (91 against 42 us for 384)."""
    spans = set()
    for needle in ("e", "0.0000"):
        at = text.find(needle)
        while at != -1:
            start = text.rfind(",", 0, at) + 1 or 1  # (1: the first token, after "[")
            end = text.find(",", at)
            if end == -1:
                end = len(text) - 1  # (the last token, before "]")
            if needle == "e" or text.startswith(("0.0000", "-0.0000"), start, end):
                spans.add((start, end))
            at = text.find(needle, end)
    pieces, last = [], 0
    for start, end in sorted(spans):
        pieces += [text[last:start], float.__repr__(float(text[start:end]))]
        last = end
    pieces.append(text[last:])
    return "".join(pieces)


class JSONBody(bytes):
    """A result already encoded as the JSON body a server sends."""


_SCALARS = (str, int, float, bool, type(None))
_PLAIN = frozenset(_SCALARS)  # exact types: one set lookup per item on the common path


class _Unsendable(Exception):
    """Raised deep in a result; each level on the way up adds where (paths are built only on failure)."""

    def __init__(self, value: Any, why: Any = None) -> None:
        self.value, self.why, self.path = value, why, []


def _convert(value: Any, wire: bool = False) -> Any:
    if type(value) in _PLAIN:
        return value
    if isinstance(value, _SCALARS):
        # A number of a subclass (numpy.float64, an IntEnum) as the plain number json.dumps writes for it, so the
        # notebook shows 0.5 where it showed np.float64(0.5); the wire's bytes are the same.
        if isinstance(value, float):
            return float.__float__(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return int.__int__(value)
        if isinstance(value, str):
            return str.__str__(value)  # numpy.str_ (a label looked up in an array of names) as the str it sends
        return value
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if type(key) is not str and not isinstance(key, str):
                if not isinstance(key, (int, float)) and key is not None:  # (bool is an int)
                    raise _Unsendable(key, "dictionary keys must be strings")
                if not wire:
                    key = json.dumps(key)  # the key's text on the wire (NaN and the infinities by name)
            elif type(key) is not str:
                key = str.__str__(key)  # numpy.str_ (`dict(zip(target_names, probs))`) as the str it sends
            try:
                out[key] = item if type(item) in _PLAIN else _convert(item, wire)
            except _Unsendable as bad:
                bad.path.append(f"[{key!r}]")
                raise
        return out
    if isinstance(value, (list, tuple)):
        out_list: list = []
        append = out_list.append
        try:
            for item in value:
                append(item if type(item) in _PLAIN else _convert(item, wire))
        except _Unsendable as bad:
            bad.path.append(f"[{len(out_list)}]")
            raise
        return out_list
    if is_pydantic_model(value):
        # Exactly what goes on the wire (Truss sends a Pydantic result as its own JSON, where NaN and
        # infinities become null), so the notebook shows what the deployment answers.
        return json.loads(value.model_dump_json())
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return _convert(value.tolist(), wire)
    raise _Unsendable(value)


def _fail(value: Any, what: str, path: str, why: Any) -> None:
    kind = type(value)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    where = f"at {what}{path}" if path else f"as {what}"
    reason = why or "it is not JSON-serializable"
    hint = ""
    if name.startswith("torch."):
        hint = " Convert it first, for example with .tolist() or .item()."
    raise NotSerializableError(
        f"{what.capitalize()} contains a {name} {where}: {reason}, so a Truss server could not send it. "
        f"Return dicts, lists, strings, numbers, booleans, None or a Pydantic model.{hint}",
        # What Truss's own server answers: json.dumps's TypeError, in its "Unhandled exception" body.
        truss_message=f"Object of type {kind.__name__} is not JSON serializable",
    )


# ---------------------------------------------------------------------- what Truss's server refuses

def truss_would_refuse(value: Any) -> Optional[str]:
    """Where Truss 0.18's server could not encode a result our server sends, as ``['key'][0]``
    ("" for the result itself), with the type; None when Truss would send it too."""
    if is_pydantic_model(value) or is_response(value):
        return None  # Truss sends a top-level Pydantic model with .json()
    try:
        return _truss_walk(value, "")
    except RecursionError:
        return ("a list or dict inside itself in the result" if _contains_itself(value)
                else "nesting deeper than Python's recursion limit in the result")


def _truss_walk(value: Any, path: str) -> Optional[str]:
    if isinstance(value, _SCALARS):
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _truss_walk(item, f"{path}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _truss_walk(item, f"{path}[{i}]")
            if found:
                return found
        return None
    kind = type(value)
    if kind.__module__ == "numpy":
        import numpy as np

        # Truss's DeepNumpyEncoder knows np.integer, np.floating and np.ndarray; not np.bool_.
        if isinstance(value, (np.integer, np.floating, np.ndarray)):
            return None
    label = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return f"a {label} at the result{path}"


def truss_refuses_chunk(chunk: Any) -> bool:
    """Truss's server streams only str and bytes chunks; anything else cuts its response off."""
    return not isinstance(chunk, (str, bytes, bytearray, memoryview))
