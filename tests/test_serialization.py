"""The JSON a result is sent as: ``dumps`` writes what ``json.dumps`` writes (Truss's server sends exactly that),
character for character, also where it takes orjson's faster path for long lists of floats."""

import json
import math
import random
import struct

import pytest

from kernel_magics.core import serialization
from kernel_magics.core.errors import NotSerializableError
from kernel_magics.core.serialization import dumps, to_json_body, to_jsonable, truss_would_refuse


def floats_of_every_kind(n: int, seed: int) -> list:
    """Random bit patterns (every magnitude, subnormals), float32 values widened as torch's tolist() gives them,
    decimal-looking values from 1e-9 to 1e21, and the numbers repr and orjson lay out differently."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.3:
            value = struct.unpack("d", struct.pack("Q", rng.getrandbits(64)))[0]
        elif kind < 0.6:
            value = struct.unpack("f", struct.pack("f", rng.gauss(0, 0.1) * 10 ** rng.randint(-6, 18)))[0]
        else:
            value = rng.uniform(-1, 1) * 10 ** rng.randint(-9, 21)
        out.append(value)
    return out


EDGES = [1e-05, -1e-05, 1.5e-07, 2.5e-05, 0.0001, 0.00012, 9.999e-05, 1e16, -1e16, 9999999999999998.0, 1e15,
         1.2345678901234568e+17, 1e22, 5e-324, 1.7976931348623157e308, 0.0, -0.0, 1.0, 10.00001, 100.0, 0.1]


def test_half_a_million_floats_are_written_as_json_dumps_writes_them():
    values = [v for v in floats_of_every_kind(500_000, seed=7) if math.isfinite(v)] + EDGES
    assert dumps(values) == json.dumps(values)
    assert serialization._orjson, "orjson is installed with the serve extra: the fast path must be what is tested"
    for start in range(0, 4000, 40):  # short runs, each with its own mix of exponents and small numbers
        chunk = values[start:start + 40]
        assert dumps(chunk) == json.dumps(chunk)


@pytest.mark.parametrize("value", [
    [math.nan] + [0.5] * 20,
    [0.5] * 20 + [math.inf, -math.inf],
    [0.25] * 15,  # below the fast path's length
    [1.5] * 16,
    [1.0] * 20 + [1],  # an int among them
    [True] + [1.0] * 20,
    [],
    {},
    {"embedding": [0.1] * 384, "model": "minilm", "usage": {"tokens": 3}},
    {"a, b": [[1e-05] * 20, [2.0] * 20], "quote \" and , comma": {"é": [0.5] * 17}, "": []},
    [[0.1] * 20, "x, y", {"k": [3e-07] * 30}, None, [[], [{}]]],
    {"1": 1, "2": [1, 2, 3], "3": "text: with, separators"},
    {1: [1.0] * 16, None: [0.5] * 16},  # keys to_jsonable would have made strings: json.dumps's own way
    [{"label": "cat", "score": 0.9, "box": [1.0, 2.0, 3.0, 4.0]}] * 50,  # many small containers, no long float list
    {"data": [{"embedding": [0.25] * 384, "index": i} for i in range(4)] + [{"index": 9}], "model": "minilm"},
    [[0.5] * 20, [1, 2.0] + [0.5] * 20, [[0.5] * 20, 3]],  # rows unlike the first
])
def test_results_of_every_shape_are_written_as_json_dumps_writes_them(value):
    assert dumps(value) == json.dumps(value)
    assert to_json_body(value) == json.dumps(value).encode()


class Three(int):
    def __str__(self) -> str:
        return "three"


def test_keys_that_are_not_strings_are_written_as_json_dumps_writes_them_and_shown_as_a_reader_sees_them():
    """On the wire, json.dumps's own keys (as Truss's server sends them, two that write alike included); in the
    notebook, the data a reader of that JSON gets (the last of two alike, as json.loads keeps it)."""
    value = {math.nan: 1, math.inf: 2, -math.inf: 3, 1: "int", "1": "str", None: "n", 1.5: "f", Three(3): "sub",
             2.0: [0.5] * 20, "nested": {False: 0, "false": 1}}
    assert to_json_body(value) == json.dumps(value).encode()
    assert to_json_body(value).count(b'"1": ') == 2
    assert to_jsonable(value) == json.loads(json.dumps(value))
    assert list(to_jsonable(value))[:3] == ["NaN", "Infinity", "-Infinity"] and to_jsonable(value)["1"] == "str"


def test_numbers_and_strings_of_subclasses_are_shown_as_the_plain_values_the_wire_carries():
    import enum

    import numpy as np

    class Level(enum.IntEnum):
        HIGH = 3

    value = {"f": np.float64(0.5), "i": Level.HIGH, "row": [np.float64(0.25)] * 20, "s": "text", "b": True,
             "label": np.array(["setosa"])[0], "probs": dict(zip(np.array(["setosa"]), [0.9]))}
    shown = to_jsonable(value)
    assert shown == {"f": 0.5, "i": 3, "row": [0.25] * 20, "s": "text", "b": True, "label": "setosa",
                     "probs": {"setosa": 0.9}}
    assert type(next(iter(shown["probs"]))) is str
    assert type(shown["f"]) is float and type(shown["i"]) is int and type(shown["row"][0]) is float
    assert type(shown["label"]) is str  # (the notebook showed np.str_('setosa'))
    assert to_json_body(value) == json.dumps(value).encode()


def test_a_deeply_nested_result_is_written_as_json_dumps_writes_it():
    """As deep as json.dumps itself goes (the search for float lists stops a few levels down)."""
    deep = inner = {"floats": [0.5] * 20}
    for _ in range(900):
        inner = [inner]
    assert dumps(inner) == json.dumps(inner)
    for _ in range(5):
        deep = {"level": [deep]}
    assert dumps(deep) == json.dumps(deep)


def test_a_result_inside_itself_is_refused_in_one_paragraph_as_truss_refuses_it():
    """A list inside itself: a one-paragraph error that says what to change (not a RecursionError), and the
    ValueError Truss's server answers with (tests/test_truss_conformance.py compares the served answer)."""
    loop: list = []
    loop.append(loop)
    with pytest.raises(NotSerializableError) as caught:
        to_jsonable({"c": loop})
    assert "contains itself" in str(caught.value) and "\n" not in str(caught.value)
    assert (caught.value.truss_type, caught.value.truss_message) == ("ValueError", "Circular reference detected")
    assert truss_would_refuse({"c": loop}) == "a list or dict inside itself in the result"
    # Nesting that is only deep (no loop) says so, with the RecursionError json.dumps raises there.
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(NotSerializableError) as caught:
        to_jsonable(deep)
    assert "nested deeper" in str(caught.value) and caught.value.truss_type == "RecursionError"
