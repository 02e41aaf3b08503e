"""The notebook's own predictions, kept to prove that an export answers as the notebook did.

The kernel records the last successful predictions of the current model
definition (:class:`PredictionRecord`); the export's fresh-process check
replays them against the exported directory and :func:`compare` decides
whether each answer is the same: JSON-equal, floats close (:func:`floats_match`),
a stream compared joined (which is how both sides hold it). A stream read back
from a saved notebook is only known as the text it printed, so its replayed
answer is compared printed the same way (:func:`as_printed`).
"""

from __future__ import annotations

import json
import math
import struct
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["PredictionRecord", "Recorded", "compare", "as_printed", "PRINTED_STREAM", "MAX_RECORDED",
           "MAX_RECORD_BYTES", "RELATIVE_TOLERANCE", "floats_match", "computed_in_float32"]

MAX_RECORDED = 20
MAX_RECORD_BYTES = 1_000_000
# Floats match to 1e-10 relative with an absolute floor of 1e-12: float64 rounding noise passes, and so
# does noise around zero, but a timestamp taken a fraction of a second later does not (1.7e9 s x 1e-10 =
# 0.17 s). Where both values are float32 numbers (a float32 model's output), to 1e-5 relative with a floor
# of 1e-6: float32 keeps about 7 digits, and thread-count or kernel choices change the last ones. An answer that
# holds a float32 number (more than 9 digits, exactly a float32) is a float32 model's: all its floats are compared
# so, a score scaled or summed in Python included, whose noise is float32's though it is no float32 number itself;
# but not a number beyond 2**24, which float32 cannot even count to one by one (a timestamp in the same answer).
RELATIVE_TOLERANCE = 1e-10
ABSOLUTE_FLOOR = 1e-12
FLOAT32_RELATIVE_TOLERANCE = 1e-5
FLOAT32_ABSOLUTE_FLOOR = 1e-6
_FLOAT32_EXACT = 2.0 ** 24
# A recorded output that is a stream's text as the notebook printed it (see as_printed).
PRINTED_STREAM = "printed-stream"


@dataclass(frozen=True)
class Recorded:
    input: Any
    output: Any
    shown: Optional[str] = None  # PRINTED_STREAM: `output` is the text a stream printed, not its value
    request: Optional[dict] = None  # the request it was made with (model_request.describe_request), if any

    def as_dict(self) -> dict:
        return {"input": self.input, "output": self.output, **({"shown": self.shown} if self.shown else {}),
                **({"request": self.request} if self.request else {})}


class PredictionRecord:
    """The last :data:`MAX_RECORDED` (input, result) pairs of one model definition, JSON only."""

    def __init__(self) -> None:
        self._items: deque[Recorded] = deque(maxlen=MAX_RECORDED)
        self.skipped = 0  # predictions too large or not JSON, left out
        self.dropped = 0  # earlier predictions pushed out by later ones (the record keeps the last MAX_RECORDED)

    def clear(self) -> None:
        """A new definition (or a hot reload) starts a new record."""
        self._items.clear()
        self.skipped = self.dropped = 0

    def add(self, model_input: Any, output: Any, shown: Optional[str] = None, request: Optional[dict] = None) -> int:
        """Keep a prediction if input and result are JSON of at most 1 MB each. The latest answer to
        an input replaces an earlier one (the notebook may have changed since). Returns the position
        it was kept at, or -1."""
        plain_input = _plain(model_input)
        if plain_input is None or _plain(output) is None:
            self.skipped += 1
            return -1
        for i, item in enumerate(self._items):
            if item.input == plain_input[0]:
                del self._items[i]
                break
        else:
            self.dropped += len(self._items) == MAX_RECORDED
        self._items.append(Recorded(plain_input[0], output, shown, request))
        return len(self._items) - 1

    def drop_all(self) -> None:
        """Nothing recorded can be trusted any more (the CLI: answers it could not read back)."""
        self.dropped += len(self._items)
        self._items.clear()

    def __iter__(self):
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    @property
    def first_input(self) -> Any:
        return self._items[0].input if self._items else None


def _plain(value: Any) -> Optional[tuple]:
    """``(value as JSON data,)`` when it is JSON (Pydantic inputs dumped) and small enough, else None."""
    from .serialization import to_jsonable

    try:
        data = to_jsonable(value, what="the input")
        size = len(json.dumps(data))
    except Exception:
        return None
    return (data,) if size <= MAX_RECORD_BYTES else None


def compare(expected: Any, got: Any, path: str = "", float32: Optional[bool] = None) -> Optional[str]:
    """None when ``got`` answers as ``expected`` did, else where and how they differ. ``float32``: the answer
    comes from float32 numbers (None: judged from the notebook's answer, see :func:`computed_in_float32`; never
    from the export's, which would loosen the check for an export that lost precision the notebook had)."""
    if float32 is None:
        float32 = computed_in_float32(expected)
    if isinstance(expected, bool) or isinstance(got, bool):
        return None if expected is got else _differ(path, expected, got)
    if isinstance(expected, (int, float)) and isinstance(got, (int, float)):
        if isinstance(expected, float) and isinstance(got, float) and math.isnan(expected) and math.isnan(got):
            return None
        if floats_match(expected, got, float32=float32):
            return None
        return _differ(path, expected, got)
    if isinstance(expected, dict) and isinstance(got, dict):
        if set(expected) != set(got):
            missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
            parts = ([f"missing keys {missing}"] if missing else []) + ([f"extra keys {extra}"] if extra else [])
            return f"at the result{path}: {', '.join(parts)}"
        for key in expected:
            why = compare(expected[key], got[key], f"{path}[{key!r}]", float32)
            if why:
                return why
        return None
    if isinstance(expected, list) and isinstance(got, list):
        if len(expected) != len(got):
            return f"at the result{path}: {len(expected)} items in the notebook, {len(got)} in the export"
        for i, (a, b) in enumerate(zip(expected, got)):
            why = compare(a, b, f"{path}[{i}]", float32)
            if why:
                return why
        return None
    if isinstance(expected, str) and isinstance(got, str):  # numpy's str_ is a str, and the same JSON string
        return None if str(expected) == str(got) else _differ(path, expected, got)
    return None if type(expected) is type(got) and expected == got else _differ(path, expected, got)


def as_printed(answer: Any) -> str:
    """A streamed answer as the notebook shows it (its view's text, or what it printed), up to the
    summary line: text chunks as text, other chunks one JSON line each, then a newline if none ends it."""
    if isinstance(answer, str):
        text = answer
    elif isinstance(answer, list):
        text = "".join(c if isinstance(c, str) else json.dumps(c) + "\n" for c in answer)
    else:
        text = json.dumps(answer) + "\n"
    return text if not text or text.endswith("\n") else text + "\n"


def floats_match(expected: float, got: float, *, float32: bool = False) -> bool:
    """Whether two numbers are the same answer up to floating-point noise (see RELATIVE_TOLERANCE);
    ``float32``: the answer they are part of was computed in float32."""
    if expected == got:
        return True
    if (float32 and max(abs(expected), abs(got)) < _FLOAT32_EXACT) or (_is_float32(expected) and _is_float32(got)):
        return math.isclose(expected, got, rel_tol=FLOAT32_RELATIVE_TOLERANCE, abs_tol=FLOAT32_ABSOLUTE_FLOOR)
    return math.isclose(expected, got, rel_tol=RELATIVE_TOLERANCE, abs_tol=ABSOLUTE_FLOOR)


def computed_in_float32(answer: Any, _budget: Optional[list] = None) -> bool:
    """Whether an answer holds a float32 number turned into a Python float (0.30000001192092896): a float32
    model's answer, whose other numbers (a score scaled, a sum) carry float32's noise too. A short decimal
    (0.5, 0.25) is a float32 number as well, but says nothing: it needs more than 9 significant digits."""
    budget = _budget if _budget is not None else [10_000]
    budget[0] -= 1
    if budget[0] < 0:
        return False
    if isinstance(answer, float):
        digits = repr(answer).lstrip("-").split("e")[0].replace(".", "").strip("0")
        return len(digits) > 9 and _is_float32(answer)
    if isinstance(answer, dict):
        return any(computed_in_float32(v, budget) for v in answer.values())
    if isinstance(answer, list):
        return any(computed_in_float32(v, budget) for v in answer)
    return False


def _is_float32(value: Any) -> bool:
    if not isinstance(value, float) or not math.isfinite(value):
        return False
    try:
        return struct.unpack("f", struct.pack("f", value))[0] == value
    except OverflowError:
        return False


def _differ(path: str, expected: Any, got: Any) -> str:
    return f"at the result{path or ''}: the notebook had {short(expected)}, the export gives {short(got)}"


# How `%model_predict --again` shows an answer that changed, one per line, which `kernel-magics export` reads back
# from the saved notebook (each part JSON; a part over 120 characters is cut and cannot be read back).
AGAIN_INDENT = "  "


def again_line(model_input: Any, then: Any, now: Any) -> str:
    return f"{AGAIN_INDENT}{short(model_input)}: {short(then)} then, {short(now)} now"


def read_again_line(line: str) -> Optional[tuple[Any, Any]]:
    """``(input, new answer)`` of an :func:`again_line`, or None when it cannot be read back."""
    decoder = json.JSONDecoder()
    try:
        model_input, at = decoder.raw_decode(line, len(AGAIN_INDENT))
        if not line.startswith(": ", at):
            return None
        _, at = decoder.raw_decode(line, at + 2)
        if not line.startswith(" then, ", at):
            return None
        now, at = decoder.raw_decode(line, at + len(" then, "))
    except ValueError:
        return None
    return (model_input, now) if line[at:] == " now" else None


def short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"
