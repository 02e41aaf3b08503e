"""Turn a prediction into JSON-ready data, the way a Truss server would."""

from __future__ import annotations

import math
from typing import Any

from .errors import NotSerializableError

__all__ = ["to_jsonable", "is_pydantic_model", "is_pydantic_class"]


def is_pydantic_class(obj: Any) -> bool:
    """True for a Pydantic model class (without importing pydantic when unused)."""
    return isinstance(obj, type) and hasattr(obj, "model_validate") and hasattr(obj, "model_fields")


def is_pydantic_model(obj: Any) -> bool:
    return is_pydantic_class(type(obj)) and hasattr(obj, "model_dump")


def to_jsonable(value: Any, *, what: str = "the prediction") -> Any:
    """Return ``value`` as JSON data, or raise naming the offending type and where it sits.

    Pydantic models become ``model_dump(mode="json")``; tuples become lists (as
    ``json.dumps`` would send them). Anything else that is not JSON is an error,
    because the server could not send it.
    """
    return _convert(value, what, "")


_SCALARS = (str, int, bool, type(None))


def _convert(value: Any, what: str, path: str) -> Any:
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _fail(value, what, path, "NaN and infinity are not valid JSON")
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                if isinstance(key, (int, float, bool)) or key is None:
                    key = str(key).lower() if isinstance(key, bool) else "null" if key is None else str(key)
                else:
                    _fail(key, what, path, "dictionary keys must be strings")
            out[key] = _convert(item, what, f"{path}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_convert(item, what, f"{path}[{i}]") for i, item in enumerate(value)]
    if is_pydantic_model(value):
        return value.model_dump(mode="json")
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        # Truss's server encodes numpy scalars and arrays (DeepNumpyEncoder); so do we.
        return _convert(value.tolist(), what, path)
    _fail(value, what, path, None)


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
        f"Return dicts, lists, strings, numbers, booleans, None or a Pydantic model.{hint}"
    )
