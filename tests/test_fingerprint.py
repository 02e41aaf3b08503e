"""Fingerprints of live values (core/fingerprint.py): equal values agree in any process, different ones
say how they differ. No kernel."""

import json
import os
import subprocess
import sys
import types

import pytest

from kernel_magics.core.fingerprint import changed_attributes, difference, fingerprint, same


def fresh_process_fingerprint(expression: str, seed: str) -> dict:
    code = f"import json, numpy\nfrom kernel_magics.core.fingerprint import fingerprint\nprint(json.dumps(fingerprint({expression})))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONHASHSEED": seed})
    return json.loads(done.stdout)


def test_equal_values_agree_across_processes_whatever_the_hash_seed():
    expression = "[{'b', 'a', 'c'}, {'k': (1, 2.5, None)}, numpy.arange(6, dtype='float32').reshape(2, 3)]"
    one, two = fresh_process_fingerprint(expression, "1"), fresh_process_fingerprint(expression, "2")
    assert same(one, two)  # sets are fingerprinted sorted: the set order that PYTHONHASHSEED changes does not count


def test_a_difference_is_said_in_words_a_user_can_check():
    assert difference(fingerprint(["a", "b", "c"]), fingerprint(["a", "b"])) == (
        "re-running its source gives a different value: 2 items, the notebook has 3 items")
    assert difference(fingerprint(3), fingerprint(2)) == "re-running its source gives a different value: 2, the notebook has 3"
    assert difference(fingerprint(True), fingerprint(1)) is not None  # types count: 1 is not True
    assert difference(fingerprint({"a": 1, "b": 2}), fingerprint({"b": 2, "a": 1})) is not None  # order a model may use
    np = pytest.importorskip("numpy")
    a = np.zeros((2, 2))
    b = a.copy()
    b[1, 1] = 1e-9
    assert "an array of shape (2, 2) (float64) in both, with other contents" in difference(fingerprint(a), fingerprint(b))
    assert difference(fingerprint(a), fingerprint(a.copy())) is None


def test_tensors_and_modules_compare_by_value_not_by_device_or_identity():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    twin = torch.nn.Linear(3, 2)
    twin.load_state_dict(net.state_dict())
    assert same(fingerprint(net), fingerprint(twin))
    twin.eval()  # the train/eval mode is part of what the model does
    assert not same(fingerprint(net), fingerprint(twin))
    t = torch.arange(4, dtype=torch.bfloat16)
    assert same(fingerprint(t), fingerprint(t.clone())) and not same(fingerprint(t), fingerprint(t + 1))
    generator = torch.Generator().manual_seed(1)
    before = fingerprint(generator)
    torch.rand(1, generator=generator)
    assert not same(before, fingerprint(generator))  # a consumed generator is in another state
    assert same(fingerprint(torch.device("cpu")), fingerprint(torch.device("cpu")))


def test_a_module_fingerprint_counts_plain_attributes_and_non_persistent_buffers_of_every_submodule():
    """A module that travels as its weights loses what is not in its state dict: a `temperature` changed in a
    cell, a non-persistent buffer. The fingerprint must see them, so the verification sends such a module whole."""
    torch = pytest.importorskip("torch")

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(2, 2)
            self.temperature = 1.0
            self.register_buffer("scale", torch.ones(2), persistent=False)

    torch.manual_seed(0)
    net = torch.nn.Sequential(Head())
    twin = torch.nn.Sequential(Head())
    twin.load_state_dict(net.state_dict())
    assert same(fingerprint(net), fingerprint(twin))
    twin[0].temperature = 0.5  # a float attribute of a submodule
    assert difference(fingerprint(twin), fingerprint(net)) == (
        "re-running its source gives a different value: its attribute `0.temperature` is 1.0, the notebook has 0.5")
    twin[0].temperature = 1.0
    twin[0].scale.mul_(3)  # a buffer the state dict leaves out
    assert "scale" not in twin.state_dict() and not same(fingerprint(net), fingerprint(twin))
    twin[0].scale.div_(3)
    twin[0]._cache = object()  # private bookkeeping (and anything not a plain value) does not count
    twin[0].name_or_path, net[0].name_or_path = "/tmp/a/model", "/tmp/b/model"  # nor where it was loaded from
    assert same(fingerprint(net), fingerprint(twin))


def test_a_local_module_is_fingerprinted_by_its_public_attributes():
    module = types.ModuleType("helper")
    exec("SCALE = 2\ndef scale(x):\n    return x * SCALE", module.__dict__)
    before = fingerprint(module)
    module.SCALE = 3
    after = fingerprint(module)
    assert changed_attributes(after, before) == ["SCALE"]
    assert difference(after, before) == "the notebook changed its attribute `SCALE`: 2, the notebook has 3"


def test_notebook_classes_are_named_by_qualname_so_kernel_and_export_agree():
    def make(module_name):
        namespace = {"__name__": module_name}
        exec("class Point:\n    def __init__(self, x):\n        self.x = x", namespace)
        namespace["Point"].__module__ = module_name
        return namespace["Point"](3)

    assert same(fingerprint(make("__main__")), fingerprint(make("model.model")))
    import threading

    assert fingerprint(threading.Lock()) is None  # what cannot be pickled is not judged (the AST rules decide)


def test_a_closure_is_its_code_and_what_it_closes_over():
    """A notebook's `make_rounder(2)` and `make_rounder(2)` agree, `make_rounder(3)` differs; a closure over something
    with no fingerprint (a lock) has none; one that calls itself has one. A closure of a library (a decorator's
    wrapper: its cache filled in the kernel, empty in a fresh process) is compared by its code only."""
    notebook = {"__name__": "__main__"}  # (what the kernel's cells define: __module__ is __main__)
    exec("import threading\n"
         "def make_rounder(ndigits):\n    def rounder(x):\n        return round(x, ndigits)\n    return rounder\n"
         "def over_a_lock():\n    lock = threading.Lock()\n    def f():\n        return lock\n    return f\n"
         "def recursive():\n    def g(n):\n        return g(n - 1) if n else 0\n    return g\n", notebook)
    make_rounder = notebook["make_rounder"]
    assert same(fingerprint(make_rounder(2)), fingerprint(make_rounder(2)))
    assert not same(fingerprint(make_rounder(2)), fingerprint(make_rounder(3)))
    assert fingerprint(notebook["over_a_lock"]()) is None and fingerprint(notebook["recursive"]()) is not None

    def memoized(function):  # (this test module's: a library's, to the fingerprint)
        cache = {}

        def wrapper(x):
            if x not in cache:
                cache[x] = function(x)
            return cache[x]
        return wrapper

    used, fresh = memoized(abs), memoized(abs)
    used(-1)
    assert same(fingerprint(used), fingerprint(fresh))


def test_a_functools_cache_of_a_notebook_function_is_its_definition_not_its_pickled_name():
    """`f = functools.lru_cache(f)` pickles as the name `__main__.f` in the kernel and `model.model.f` in the fresh
    process: compared as pickled bytes it always differed, so the export saved it instead and then failed to import
    ("Can't get attribute 'f'"). Now it is the wrapper's kind and the function's definition."""
    import functools

    def cached(module: str, body: str):
        namespace = {"__name__": module}
        exec(f"def f(x):\n    return {body}", namespace)
        return functools.lru_cache(namespace["f"])

    kernel, fresh = fingerprint(cached("__main__", "x + 1")), fingerprint(cached("model.model", "x + 1"))
    assert same(kernel, fresh), (kernel, fresh)
    assert not same(kernel, fingerprint(cached("model.model", "x + 2")))


def test_a_function_compiled_with_or_without_the_import_it_uses_beside_it_is_the_same():
    """Python 3.11 loads `re.sub` as an attribute when `import re` is in the same module and as a method when not:
    the kernel's cell and model.py compile the same def otherwise, and a registry of such functions read as changed
    (the export then failed with a NameError). Other code still differs."""
    def made(source: str, module: str):
        namespace = {"__name__": module}
        exec(source, namespace)
        return namespace["strip"]

    body = "def strip(text):\n    if text:\n        return re.sub('[^a-z]+', ' ', text)\n    return text\n"
    other = made(body.replace("re.sub", "__import__('re').sub"), "__main__")
    kernel = made(body, "__main__")  # (`re` imported in another cell)
    fresh = made("import re\n" + body, "model.model")
    assert same(fingerprint(kernel), fingerprint(fresh))
    assert not same(fingerprint(kernel), fingerprint(other))
    assert not same(fingerprint(kernel), fingerprint(made(body.replace("' '", "'_'"), "model.model")))
