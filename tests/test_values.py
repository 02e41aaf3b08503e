"""The value path without a kernel: plan -> save -> import the generated model.py in a fresh Python.

Cells run here in one namespace whose ``__name__`` is ``__main__``, as a kernel runs them, so classes
and functions they define belong to ``__main__`` as in a notebook. ``build_model_source`` plans how
each name travels, every plan saves its file, and a subprocess imports model.py through ``TrussDir``
(as the servers do) and evaluates the same probes as the live namespace: the answers must be equal.
Each saved file is then checked for ``__main__``.
"""

import io
import stat
import json
import pickletools
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from kernel_magics.core import notebook_pickle
from kernel_magics.core.source import MaterializeError, build_model_source, python_of_cell
from kernel_magics.core.values import VALUES_DIR

_IMPORT = textwrap.dedent("""\
    import json, sys
    from kernel_magics.core.truss_dir import TrussDir
    root, probes = sys.argv[1], json.loads(sys.argv[2])
    module = sys.modules[TrussDir.open(root).import_model_class().__module__]
    print(json.dumps({name: eval(expr, vars(module)) for name, expr in probes.items()}))
""")


def run_cells(cells: list[str]) -> dict:
    """The cells' Python run in order in one namespace, as a kernel runs them (``__main__``)."""
    namespace = {"__name__": "__main__"}
    for i, cell in enumerate(cells):
        exec(compile(python_of_cell(cell), f"<cell {i + 1}>", "exec"), namespace)
    return namespace


def ship(root: Path, cells: list[str], probes: dict[str, str]):
    """Plan and save every value, then evaluate ``probes`` live and in a fresh Python that imports model.py.
    Returns (live answers, exported answers, the ModelSource)."""
    live = run_cells(cells)
    source = build_model_source(cells, "Model", "nb.ipynb", live=live)
    (root / "model").mkdir(parents=True)
    (root / "model" / "__init__.py").write_text("")
    (root / "model" / "model.py").write_text(source.text)
    (root / "config.yaml").write_text("model_name: values\n")
    folder = root / "data" / VALUES_DIR
    folder.mkdir(parents=True)
    for plan in source.values:
        if plan.save is not None:
            plan.save(folder)
    # Probed after saving, as the export saves first: a generator's draws continue from the saved state.
    expected = {name: eval(expr, live) for name, expr in probes.items()}
    done = subprocess.run([sys.executable, "-I", "-c", _IMPORT, str(root), json.dumps(probes)],
                          capture_output=True, text=True, cwd=root.parent, timeout=300)
    assert done.returncode == 0, f"{source.text}\n{done.stderr}"
    return json.loads(json.dumps(expected)), json.loads(done.stdout.strip().splitlines()[-1]), source


def saved_files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "data" / VALUES_DIR).iterdir())}


def pickle_streams(name: str, data: bytes) -> list[bytes]:
    """The pickle streams inside a saved file (a torch save is a zip holding one)."""
    if name.endswith(".pt"):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return [archive.read(n) for n in archive.namelist() if n.endswith(".pkl")]
    return [data] if name.endswith(".pkl") else []


def assert_no_main(root: Path) -> None:
    """No saved file (nor model.py) refers to __main__, whatever its format."""
    assert "__main__" not in (root / "model" / "model.py").read_text()
    for name, data in saved_files(root).items():
        assert b"__main__" not in data, name
        for stream in pickle_streams(name, data):
            ops = [(op.name, arg) for op, arg, _ in pickletools.genops(stream)]
            assert all("__main__" not in str(arg) for _, arg in ops), name


# ---------------------------------------------------------------------- every format, one export

FORMATS = [
    "import functools, dataclasses\nimport numpy as np\nimport torch\nfrom torch import nn\n"
    "from sklearn.datasets import load_iris\nfrom sklearn.linear_model import LogisticRegression\n"
    "from sklearn.pipeline import make_pipeline\nfrom sklearn.preprocessing import StandardScaler\n"
    "from sklearn.base import BaseEstimator, TransformerMixin\n"
    "from tokenizers import Tokenizer, models, pre_tokenizers, trainers",
    # literal, changed after its assignment; a literal too long for model.py
    "LABELS = ['setosa', 'versicolor']\nLABELS.append('virginica')\nWORDS = ['w%d' % i for i in range(500)]\n"
    "WORDS.append('last')",
    # .npy, a large one
    "big = np.arange(2 ** 22, dtype=np.float32)\nbig[7] = -1.0",
    # safetensors: a tensor and a state dict
    "torch.manual_seed(0)\nshift = torch.randn(4)\nshift.mul_(3)\n"
    "state = {'w': torch.randn(2, 4), 'b': torch.zeros(2)}\nstate['b'].add_(1)",
    # a torch module rebuilt from source, weights from safetensors
    "torch.manual_seed(1)\nlin = nn.Linear(4, 2)\nwith torch.no_grad():\n    lin.weight.mul_(2.0)\nlin.eval()",
    # a notebook nn.Module with a nested class, through torch's full save (its structure changed)
    "class Net(nn.Module):\n    class Scale(nn.Module):\n        def forward(self, x):\n            return x * 3\n"
    "    def __init__(self):\n        super().__init__()\n        self.body = nn.Linear(4, 3)\n"
    "        self.scale = Net.Scale()\n    def forward(self, x):\n        return self.scale(self.body(x))",
    "torch.manual_seed(2)\nnet = Net()\nnet.head = nn.Linear(3, 1)",
    # a tokenizer's own JSON
    "tok = Tokenizer(models.WordLevel(unk_token='[UNK]'))\ntok.pre_tokenizer = pre_tokenizers.Whitespace()\n"
    "tok.train_from_iterator(['hello world', 'hello there'], trainers.WordLevelTrainer(special_tokens=['[UNK]']))",
    # skops: a fitted pipeline of library classes only
    "X, y = load_iris(return_X_y=True)\npipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300))\n"
    "pipe.fit(X, y)",
    # joblib: a pipeline holding a notebook transformer
    "class Clip(BaseEstimator, TransformerMixin):\n    def fit(self, X, y=None):\n        self.top_ = X.max()\n"
    "        return self\n    def transform(self, X):\n        return np.minimum(X, self.top_ / 2)",
    "clipped = make_pipeline(Clip(), LogisticRegression(max_iter=300))\nclipped.fit(X, y)",
    # pickle: a dict of dataclass instances, a partial of a notebook function, a nested class instance
    "@dataclasses.dataclass\nclass Point:\n    x: float\n    y: float\n\n"
    "def scale(p, k=1.0):\n    return p.x * k + p.y\n\n"
    "class Outer:\n    class Inner:\n        def __init__(self, v):\n            self.v = v",
    "points = {'a': Point(1.0, 2.0)}\npoints['b'] = Point(3.0, 4.0)\nscaler = functools.partial(scale, k=3.0)\n"
    "scaler.keywords['k'] = 4.0\nnested = {'inner': Outer.Inner(7)}\nnested['more'] = Outer.Inner(8)",
    # random generators, consumed in the notebook: their state travels
    "rng = np.random.default_rng(0)\nrng.random(5)\ngen = torch.Generator()\ngen.manual_seed(5)\n"
    "torch.rand(3, generator=gen)",
    "%%model\nclass Model:\n    def predict(self, model_input):\n"
    "        return [LABELS, WORDS, big, shift, state, lin, net, tok, pipe, clipped, points, scaler, nested, rng, gen]",
]

ROWS = "[[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]"  # iris rows, for the classifiers
PROBES = {
    "literal": "LABELS",
    "literal file": "WORDS[-3:]",
    "npy": "[str(big.dtype), big.shape[0], float(big[7]), float(big.sum())]",
    "tensor": "shift.tolist()",
    "state dict": "{k: v.tolist() for k, v in state.items()}",
    "rebuilt module": "[lin(torch.ones(1, 4)).tolist(), lin.training]",
    "full module": "[net.head(net(torch.ones(1, 4))).tolist(), type(net.scale).__qualname__, type(net).__module__]",
    "tokenizer": "tok.encode('hello there world').ids",
    "skops": f"pipe.predict_proba({ROWS}).tolist()",
    "joblib": f"[clipped.predict_proba({ROWS}).tolist(), type(clipped.steps[0][1]).__module__]",
    "dataclasses": "{k: [p.x, p.y, type(p).__module__] for k, p in points.items()}",
    "partial": "[scaler(Point(1.0, 2.0)), scaler.func is scale]",
    "nested class": "[nested['inner'].v, nested['more'].v, type(nested['inner']) is Outer.Inner]",
    "numpy generator": "rng.random(3).tolist()",
    "torch generator": "torch.rand(3, generator=gen).tolist()",
}


def test_every_format_saves_and_loads_as_the_notebook_has_it(tmp_path):
    for module in ("torch", "sklearn", "skops", "tokenizers", "joblib", "safetensors"):
        pytest.importorskip(module)
    root = tmp_path / "out"
    expected, got, source = ship(root, FORMATS, PROBES)
    # Nothing refers to __main__ in the live namespace answers either: there the module is __main__.
    for key in ("full module", "joblib"):
        assert expected[key][-1] == "__main__" and got[key][-1] == "model.model"
        expected[key][-1] = got[key][-1]
    expected["dataclasses"] = {k: [x, y, "model.model"] for k, (x, y, _) in expected["dataclasses"].items()}
    assert got == expected
    formats = {p.name: p.format for p in source.values}
    assert formats == {
        "LABELS": "literal", "WORDS": "literal file", "big": "npy", "shift": "safetensors", "state": "safetensors",
        "lin": "safetensors weights; the module is rebuilt from its source", "net": "torch.save (pickle)",
        "tok": "tokenizers JSON", "pipe": "skops", "clipped": "joblib (pickle)", "points": "pickle",
        "scaler": "pickle", "nested": "pickle", "rng": "pickle", "gen": "pickle"}, formats
    files = saved_files(root)
    assert files["big.npy"][-4:] and len(files["big.npy"]) > 4 * 2 ** 22  # the large array, raw
    assert_no_main(root)
    for name in ("net.pt", "clipped.joblib", "points.pkl", "scaler.pkl", "nested.pkl"):
        assert b"model.model" in files[name], name  # notebook code is named where model.py defines it


# ---------------------------------------------------------------------- identity

def test_one_object_under_two_names_is_saved_once_and_loads_as_one_object(tmp_path):
    pytest.importorskip("numpy")
    cells = [
        "import numpy as np",
        "weights = np.linspace(0, 1, 5)\nalso = weights\nalso *= 2",
        "calls = []\ndef train():\n    calls.append(1)\n    return np.ones(3) * 4, 'v' + str(len(calls))",
        "w, tag = train()",
        "shared = [1, 2]\nother = shared\nother.append(3)",
        "%%model\nclass Model:\n    def predict(self, model_input):\n"
        "        return [weights, also, w, tag, shared, other]",
    ]
    probes = {"same array": "also is weights", "array": "also.tolist()", "w": "w.tolist()", "tag": "tag",
              "same list": "other is shared", "list": "other"}
    expected, got, source = ship(tmp_path / "out", cells, probes)
    assert got == expected and got["same array"] is True and got["same list"] is True
    assert sorted(saved_files(tmp_path / "out")) == ["w.npy", "weights.npy"]  # one file for weights/also
    text = source.text
    assert "also = weights" in text and "other = shared" in text
    # `w, tag = train()`: both travel as values, so the statement (and train) is not in model.py.
    assert "train" not in text and "calls" not in text
    why = source.why()
    assert "the same object as `weights`" in why and "the same object as `shared`" in why


def test_a_statement_is_kept_for_the_name_that_travels_as_source(tmp_path):
    pytest.importorskip("numpy")
    cells = ["import numpy as np", "arr, label = np.zeros(2), 'kept'\narr += 1",
             "%%model\nclass Model:\n    def predict(self, model_input):\n        return [arr, label]"]
    expected, got, source = ship(tmp_path / "out", cells, {"arr": "arr.tolist()", "label": "label"})
    assert got == expected == {"arr": [1.0, 1.0], "label": "kept"}
    assert "arr, label = np.zeros(2), 'kept'" in source.text  # label needs it; arr's loader follows it


# ---------------------------------------------------------------------- the pickler's rule

def test_notebook_code_is_named_in_model_model_without_touching_the_interpreter():
    """What another thread (a model served from the kernel) sees while a value is saved: nothing changed."""
    namespace = run_cells([
        "import functools, sys\nclass Outer:\n    class Inner:\n        pass\n"
        "def f(x):\n    return x\nseen = []\n"
        "class Spy:\n    def __reduce__(self):\n"
        "        seen.append((Outer.__module__, Outer.Inner.__module__, sys.modules.get('model.model'),"
        " sys.modules.get('model')))\n        return (list, ())",
        "value = [Outer.Inner(), functools.partial(f, 1), Outer, Spy()]"])
    before = ("__main__", "__main__", sys.modules.get("model.model"), sys.modules.get("model"))
    data = notebook_pickle.dumps(namespace["value"], namespace)
    assert namespace["seen"] == [before]
    assert b"__main__" not in data and b"model.model" in data and b"Inner" in data
    assert notebook_pickle.references(namespace["value"], namespace)[1] == {"Outer", "f"}  # Spy reduces to a list


def test_notebook_objects_inside_object_arrays_are_found():
    np = pytest.importorskip("numpy")
    namespace = run_cells(["class Point:\n    pass"])
    holder = {"numbers": np.zeros(3), "objects": np.array([namespace["Point"]()], dtype=object)}
    assert notebook_pickle.references(holder, namespace) == ({"numpy"}, {"Point"})


def test_what_a_notebook_function_made_and_cannot_be_saved_is_re_run_and_verified():
    """A closure a notebook function made cannot be saved; unchanged since it was made, model.py re-runs the call and
    the export's fresh process compares fingerprints: its code, what it closes over, its defaults and attributes.
    What it carries that cannot be compared whole (an object, here an instance of a class defined inside a
    function, whose class attributes a fingerprint cannot see) keeps it refused, as it was."""
    cells = ["CONFIG = {'k': 2}",
             "def make_rounder(n):\n    def rounder(x):\n        return round(x, n)\n    return rounder",
             "def make_scaler():\n    return lambda x, k=CONFIG['k']: x * k",
             "def make_holder():\n    class Local:\n        factor = CONFIG['k']\n    local = Local()\n"
             "    return lambda x: x * local.factor",
             "money = make_rounder(2)\nscale = make_scaler()",
             "%%model\nclass Model:\n    def predict(self, model_input):\n        return scale(money(model_input))"]
    live = run_cells(cells)
    source = build_model_source(cells, "Model", live=live)
    assert "money = make_rounder(2)" in source.text and "scale = make_scaler()" in source.text
    assert {"money", "scale"} <= set(source.verify) and source.values == []
    # A default the notebook's function made is counted: CONFIG changed since gives a fresh `scale` another one.
    from kernel_magics.core.fingerprint import fingerprint, same

    fresh = run_cells(cells[:1] + ["CONFIG['k'] = 5"] + cells[1:])
    assert not same(fingerprint(live["scale"]), fingerprint(fresh["scale"]))
    held = [*cells[:-2], "held = make_holder()",
            "%%model\nclass Model:\n    def predict(self, model_input):\n        return held(model_input)"]
    with pytest.raises(MaterializeError, match="defines inside `make_holder`"):
        build_model_source(held, "Model", live=run_cells(held))
    # functools.wraps gives a notebook closure a library's __module__: it is still the notebook's, and what it
    # closes over (a builtin, here) cannot be compared whole: refused, as before.
    wrapped = ["import functools, math", "def scaled(fn, s):\n    @functools.wraps(fn)\n    def w(x):\n"
               "        return fn(x) * s\n    return w", "f = scaled(math.sqrt, 3)",
               "%%model\nclass Model:\n    def predict(self, model_input):\n        return f(model_input)"]
    with pytest.raises(MaterializeError, match="`f`.*cannot be pickled"):
        build_model_source(wrapped, "Model", live=run_cells(wrapped))


@pytest.mark.parametrize("cells, name, fragments", [
    (["def make():\n    class Local:\n        pass\n    return Local()", "thing = make()"], "thing",
     ["the class `Local`, which the notebook defines inside `make`", "top level of a cell",
      "Move that definition to the top level"]),
    (["class Gone:\n    pass", "thing = [Gone()]\nthing.append(1)", "del Gone"], "thing",
     ["the class `Gone` from the notebook, which no longer has that name at the top level"]),
    (["import threading", "thing = [threading.Lock()]\nthing.append(1)"], "thing",
     ["cannot be pickled (TypeError: cannot pickle '_thread.lock' object)", "inside `load()`"]),
])
def test_an_unsaveable_value_names_the_real_cause(cells, name, fragments):
    cells = [*cells, f"%%model\nclass Model:\n    def predict(self, model_input):\n        return {name}"]
    with pytest.raises(MaterializeError) as caught:
        build_model_source(cells, "Model", live=run_cells(cells))
    message = str(caught.value)
    assert f"`{name}`" in message and "model.model" not in message
    for fragment in fragments:
        assert fragment in message, message
    if "Lock" not in cells[1]:
        assert "open files, connections and locks" not in message  # not the cause here


def test_a_class_redefined_after_its_instance_was_made_loads_after_its_definition(tmp_path):
    cells = ["class Box:\n    def __init__(self, v):\n        self.v = v\n    def get(self):\n        return self.v",
             "box = {'b': Box(4)}\nbox['c'] = Box(5)",
             "class Box:\n    def __init__(self, v):\n        self.v = v\n    def get(self):\n        return self.v",
             "%%model\nclass Model:\n    def predict(self, model_input):\n        return box['b'].get()"]
    expected, got, source = ship(tmp_path / "out", cells, {"v": "[box['b'].get(), box['c'].get()]"})
    assert got == expected == {"v": [4, 5]}
    assert source.text.index("class Box") < source.text.index("box = pickle.loads")


def test_a_value_holding_a_class_edited_since_is_refused_as_model_py_defines_only_the_latest(tmp_path):
    """The same `class Box` run again is the same code (above); an edited one is not: the notebook's `box` runs the
    old `get`, model.py's `Box` the new one, and the saved pickle named `Box` and answered otherwise, silently. So is a
    torch module rebuilt from its source (`net = Net()` trained, then `class Net` edited): refused, naming both."""
    box = "class Box:\n    def __init__(self, v):\n        self.v = v\n    def get(self):\n        return {}"
    model = "%%model\nclass Model:\n    def predict(self, model_input):\n        return box['b'].get()"
    cells = [box.format("self.v"), "box = {'b': Box(4)}\nbox['c'] = Box(5)", box.format("self.v + 1"), model]
    with pytest.raises(MaterializeError) as info:
        build_model_source(cells, "Model", live=run_cells(cells[:-1]))
    for fragment in ("`box` (a dict)", "it holds the class `Box` as a cell defined it before the notebook bound `Box` "
                     "again, to other code", "Run the cell that makes `box` again"):
        assert fragment in str(info.value), info.value
    # Under a decorator without functools.wraps, the edited method is what the wrapper closes over: other code too
    # (it compared by name, so the export answered 5 where the notebook answers 4). Run again unchanged, it is not.
    deco = "def logged(fn):\n    def inner(self, *a):\n        return fn(self, *a)\n    return inner"
    decorated = box.replace("    def get", "    @logged\n    def get")
    cells = [deco, decorated.format("self.v"), "box = {'b': Box(4)}\nbox['c'] = Box(5)", decorated.format("self.v + 1"),
             model]
    with pytest.raises(MaterializeError, match="holds the class `Box` as a cell defined it before"):
        build_model_source(cells, "Model", live=run_cells(cells[:-1]))
    cells[3] = decorated.format("self.v")  # run again unchanged: the same code
    assert "box = pickle.loads" in build_model_source(cells, "Model", live=run_cells(cells[:-1])).text
    # A name whose latest binding is no definition at all: `box`'s saved file names `sqrt`, which model.py binds to
    # math's (it answered [2.0, 2.0] where the notebook answers [-1, 2.0]).
    cells = ["def sqrt(x):\n    return -1", "box = {'f': sqrt}\nbox['g'] = 1", "from math import sqrt",
             "%%model\nclass Model:\n    def predict(self, model_input):\n        return [box['f'](4), sqrt(4)]"]
    with pytest.raises(MaterializeError, match="`box` \\(a dict\\) but it holds the function `sqrt` as a cell defined it"):
        build_model_source(cells, "Model", live=run_cells(cells[:-1]))
    # The same class run again holds what its body and defaults read when it ran: `box`'s `Box` has `fn=helper` as
    # the first `helper`, model.py's `Box` the latest (it answered 2 where the notebook answers 1, silently). A
    # docstring added is no other code; neither is a helper run again unchanged.
    holder = "class Box:\n    def get(self, fn=helper):\n        {}return fn()"
    helper = "def helper():\n    return {}"
    model = "%%model\nclass Model:\n    def predict(self, model_input):\n        return [box['b'].get(), Box().get()]"
    cells = [helper.format(1), holder.format(""), "box = {'b': Box()}\nbox['c'] = 0", helper.format(2),
             holder.format(""), model]
    with pytest.raises(MaterializeError, match="holds the class `Box` as a cell defined it before the same cell ran "
                                               "again and made `Box` hold other values"):
        build_model_source(cells, "Model", live=run_cells(cells[:-1]))
    for cells[3], cells[4] in ((helper.format(1), holder.format("")),
                               (helper.format(1), holder.format("'''doc'''\n        "))):
        assert "box = pickle.loads" in build_model_source(cells, "Model", live=run_cells(cells[:-1])).text
    cells = ["def sq(x):\n    return x * x", "box = {'f': sq}\nbox['c'] = 0",
             "def sq(x):\n    '''square'''\n    return x * x",
             "%%model\nclass Model:\n    def predict(self, model_input):\n        return box['f'](3)"]
    assert "box = pickle.loads" in build_model_source(cells, "Model", live=run_cells(cells[:-1])).text
    # What it read in a container or an object (`cfg = {'t': T}`, a default `[T]`, `S(T)`, with `__slots__` too), and
    # state its own code moved since (a singleton, a counter: the value reads the earlier class's, model.py's starts
    # afresh). A method's `super()` cell holds the class itself: compared once (it took minutes for 30 such methods).
    reads = "class S:\n    __slots__ = ('t',)\n    def __init__(self, t):\n        self.t = t\n\nclass K:\n" \
            "    cfg = {{'t': T}}\n    s = S(T)\n    def get(self, d=[T]):\n        return {}"
    for read in ("self.cfg['t']", "self.s.t", "d[0]"):
        cells = ["T = 1", reads.format(read), "box = {'k': K()}\nbox['c'] = 0", "T = 2", reads.format(read),
                 "%%model\nclass Model:\n    def predict(self, model_input):\n        return box['k'].get()"]
        with pytest.raises(MaterializeError, match="holds the class `K` as a cell defined it before the same cell"):
            build_model_source(cells, "Model", live=run_cells(cells[:-1]))
    single = ("class Base:\n    pass\n\nclass Ids(Base):\n    n = 0\n" + "".join(
        f"    def m{i}(self):\n        return super().__init__()\n" for i in range(30)) +
        "    def next(self):\n        type(self).n += 1\n        return type(self).n")
    cells = [single, "box = {'i': Ids()}\nbox['c'] = 0\nbox['i'].next()\nbox['i'].next()", single,
             "%%model\nclass Model:\n    def predict(self, model_input):\n        return box['i'].n"]
    with pytest.raises(MaterializeError, match="state its own code moved since: a counter, a cache"):
        build_model_source(cells, "Model", live=run_cells(cells[:-1]))
    # A pydantic field's default lives only in the class's fields (it compared as the same code: the export answered
    # 0.7 where the notebook's held class answers 0.5, silently); run again unchanged, it is the same.
    config = "from pydantic import BaseModel\nclass Cfg(BaseModel):\n    t: float = {}"
    cells = [config.format(0.5), "box = {'cls': Cfg}\nbox['c'] = 0", config.format(0.7),
             "%%model\nclass Model:\n    def predict(self, model_input):\n        return box['cls']().t"]
    with pytest.raises(MaterializeError, match="holds the class `Cfg` as a cell defined it before"):
        build_model_source(cells, "Model", live=run_cells(cells[:-1]))
    cells[2] = config.format(0.5)
    assert "box = pickle.loads" in build_model_source(cells, "Model", live=run_cells(cells[:-1])).text
    pytest.importorskip("torch")
    net = ("import torch\nfrom torch import nn\nclass Net(nn.Module):\n    def __init__(self):\n"
           "        super().__init__()\n        self.lin = nn.Linear(2, 1)\n    def forward(self, x):\n"
           "        return self.lin(x){}")
    cells = [net.format(""), "net = Net()\nwith torch.no_grad():\n    net.lin.weight.mul_(2.0)", net.format(" * 2"),
             "%%model\nclass Model:\n    def predict(self, model_input):\n        return net(torch.ones(1, 2)).item()"]
    with pytest.raises(MaterializeError, match=r"`net` \(a Net\).*it holds the class `Net` as a cell defined it"):
        build_model_source(cells, "Model", live=run_cells(cells[:-1]))
    cells[2] = net.format("")  # run again unchanged: rebuilt from its source, as before
    assert "safetensors.torch.load_model(net" in build_model_source(cells, "Model", live=run_cells(cells[:-1])).text
    # Run again unchanged, a class whose own state moved since (a cache it fills, a counter) is refused without a
    # recorded prediction: `tok` reads the earlier class's cache, model.py's starts empty (here the answers agree, which
    # only a replay can tell).
    tok = ["import itertools\nclass Tok:\n    seen = {}\n    ids = itertools.count()\n    def split(self, s):\n"
           "        self.seen[s] = next(self.ids)\n        return s.split()",
           "tok = Tok()\ntok.lower = True\ntok.split('A b')"]
    cells = [*tok, tok[0], "%%model\nclass Model:\n    def predict(self, model_input):\n        return tok.split('x')"]
    with pytest.raises(MaterializeError, match="state its own code moved since"):
        build_model_source(cells, "Model", live=run_cells(cells[:-1]))
    proven = build_model_source(cells, "Model", live=run_cells(cells[:-1]), replay_proves=True)
    assert "tok = pickle.loads" in proven.text


@pytest.mark.parametrize("cells", [
    ["def f():\n    return 1", "def g():\n    return 2", "if False:\n    f = g"],
    ["def loads(s):\n    return 1", "try:\n    from no_such_module_here import loads\nexcept ImportError:\n    pass"],
    ["def f():\n    return 1", "def g():\n    return 2", "if False:\n    f = g",
     "try:\n    from no_such_module_here import f\nexcept ImportError:\n    pass"],
], ids=["if False", "failed try-import", "one after the other"])
def test_an_if_or_try_that_may_leave_a_name_unbound_keeps_the_definition_before_it(tmp_path, cells):
    """model.py held only the `if` (or the `try`) as the name's latest binding, so the deployment had no `f` at all
    (a NameError in predict, after an export that said nothing with --no-replay). Now the def before it is kept, in
    the notebook's order: bound as in the notebook either way, in the kernel and in the CLI."""
    name = "f" if "def f" in cells[0] else "loads"
    cells = [*cells, "%%model\nclass Model:\n    def predict(self, model_input):\n" f"        return {name}('x'[:0])"
             if name == "loads" else "%%model\nclass Model:\n    def predict(self, model_input):\n        return f()"]
    expected, got, source = ship(tmp_path / "out", cells, {"v": "Model().predict(None)"})
    assert expected == got == {"v": 1}, source.text
    assert source.text.index(f"def {name}") < source.text.index("if False" if name == "f" else "try:")
    assert f"def {name}" in build_model_source(cells, "Model").text  # (the CLI's: no live values)


def test_a_name_bound_again_from_itself_keeps_its_def_before_it_unless_a_value_holds_the_bare_one(tmp_path):
    """`f = functools.lru_cache(f)`, `A = dataclasses.dataclass(A)`: the statement re-runs in model.py after the def
    or class it reads (it was refused: "computed from its old one"). A saved value holding the bare `f` is refused
    while the notebook's `f` is a wrapper of it (model.py's `f` is the wrapper: `double(f)` answers otherwise)."""
    cells = ["import dataclasses, functools\ndef f(x):\n    return x + 1\n\nclass A:\n    x: int = 1",
             "f = functools.lru_cache(f)\nA = dataclasses.dataclass(A)",
             "%%model\nclass Model:\n    def predict(self, model_input):\n        return [f(1), A(3).x, repr(A(2))]"]
    expected, got, source = ship(tmp_path / "out", cells, {"v": "Model().predict(None)"})
    assert expected == got == {"v": [2, 3, "A(x=2)"]}, source.text
    assert "f = functools.lru_cache(f)" in build_model_source(cells, "Model").text  # (the CLI's too)
    # A value holding a functools cache of a notebook function names it as model.py binds it (it was refused:
    # "not the same object as __main__.f").
    cells = ["import functools\ndef f(x):\n    return x + 1", "g = functools.lru_cache(f)",
             "box = {'g': g}\nbox['c'] = 0",
             "%%model\nclass Model:\n    def predict(self, model_input):\n        return [box['g'](1), g(2)]"]
    expected, got, source = ship(tmp_path / "cached", cells, {"v": "Model().predict(None)"})
    assert expected == got == {"v": [2, 3]} and "box = pickle.loads" in source.text, source.text
    double = "def double(fn):\n    @functools.wraps(fn)\n    def w(*a):\n        return 2 * fn(*a)\n    return w"
    cells = ["import functools\n" + double, "def f(x):\n    return x + 1", "box = {'f': f}\nbox['c'] = 0",
             "f = functools.lru_cache(double(f))",
             "%%model\nclass Model:\n    def predict(self, model_input):\n        return box['f'](1)"]
    with pytest.raises(MaterializeError, match="holds the function `f` as a cell defined it before the notebook bound"):
        build_model_source(cells, "Model", live=run_cells(cells[:-1]))


def test_a_function_read_when_a_class_ran_and_defined_again_after_keeps_both_defs_in_order(tmp_path):
    """`def get(self, fn=helper)` and `f = staticmethod(act)` read the first `helper` and `act`; a later cell defines
    them again. model.py held only the later defs, after the class: a NameError on import (G8, D1 of the review)."""
    cells = ["def helper():\n    return 1\n\ndef act(x):\n    return x + 1",
             "class Box:\n    f = staticmethod(act)\n    def get(self, fn=helper):\n        return fn()",
             "def helper():\n    return 2\n\ndef act(x):\n    return x + 2",
             "%%model\nclass Model:\n    def predict(self, model_input):\n"
             "        return [Box().get(), helper(), Box.f(1), act(1)]"]
    expected, got, source = ship(tmp_path / "out", cells, {"v": "Model().predict(None)"})
    assert expected == got == {"v": [1, 2, 2, 3]}, source.text


@pytest.mark.parametrize("cells", [
    ["def f():\n    return 1", "if True:\n    def f():\n        return 2"],
    ["def f():\n    return 'relu'", "if True:\n    def f():\n        return 'tanh'"],
    ["import numpy as np\ndef f():\n    return float(np.mean([1, 2, 10]))",
     "for _ in range(1):\n    def f():\n        return float(np.median([1, 2, 10]))"],
    ["def f():\n    return 1", "exec('def f():\\n    return 2')"],
    ["import functools\ndef f():\n    return 1", "def install():\n    global f\n    inner = f\n"
     "    @functools.wraps(inner)\n    def f():\n        return inner() * 10\n", "install()"],
], ids=["def inside if", "a string in an if", "a call in a for", "exec", "global, wrapped"])
def test_a_def_the_cells_do_not_show_as_the_notebooks_is_refused_not_exported_as_the_first(cells):
    """The live `f` has the name `f` but not the code of the top-level `def f` model.py would hold (it answered 1
    where the notebook answers 2 or 10, silently). Told by its instructions and what they name, as any compilation of
    the text gives them: an import in the same %%model cell or a magic inside the def is still the def."""
    cells = [*cells, "%%model\nclass Model:\n    def predict(self, model_input):\n        return f()"]
    with pytest.raises(MaterializeError, match="it is the function `f` itself, as no top-level def in the cells"):
        build_model_source(cells, "Model", live=run_cells(cells[:-1]))


def test_a_wrapper_is_saved_as_the_wrapper_and_compared_with_what_its_decorator_closes_over(tmp_path):
    """A functools.wraps wrapper (or an lru_cache) takes the name of what it wraps: saved under that name, the export's
    `box['g']` was model.py's bare `f` (it answered [1, 1] where the notebook answers [2, 1], silently). A decorator
    factory's argument (`@scale(2)` then `@scale(3)`) was unwrapped away: the export answered 3 where the notebook's
    value answers 2. An import and a def in the %%model cell compile otherwise than the def alone: still the def."""
    double = ("import functools\ndef double(fn):\n    @functools.wraps(fn)\n    def w(*a):\n        return 2 * fn(*a)\n"
              "    return w")
    cells = [double, "def f(x):\n    return x", "g = double(f)\nh = functools.lru_cache(f)",
             "box = {'g': g, 'h': h}\nbox['c'] = 0",
             "%%model\nimport math\ndef helper(x):\n    return math.sqrt(x)\n\nclass Model:\n"
             "    def predict(self, model_input):\n"
             "        return [box['g'](1), f(1), box['h'].cache_info().maxsize, helper(4)]"]
    expected, got, source = ship(tmp_path / "out", cells, {"v": "Model().predict(None)"})
    assert expected == got == {"v": [2, 1, 128, 2.0]}, source.text
    scale = ("import functools\ndef scale(k):\n    def deco(fn):\n        @functools.wraps(fn)\n        def w(x):\n"
             "            return k * fn(x)\n        return w\n    return deco")
    cells = [scale, "@scale(2)\ndef f(x):\n    return x", "box = {'f': f}\nbox['c'] = 0",
             "@scale(3)\ndef f(x):\n    return x",
             "%%model\nclass Model:\n    def predict(self, model_input):\n        return box['f'](1)"]
    with pytest.raises(MaterializeError, match="holds the function `f` as a cell defined it before"):
        build_model_source(cells, "Model", live=run_cells(cells[:-1]))
    cells[3] = cells[1]  # run again unchanged: the same
    assert "box = pickle.loads" in build_model_source(cells, "Model", live=run_cells(cells[:-1])).text
    # A wrapper no top-level name binds any more (`g` bound to another since): refused naming it as a wrapper.
    cells = [double, "def f(x):\n    return x", "g = double(f)", "box = {'g': g}\nbox['c'] = 0", "g = double(double(f))",
             "%%model\nclass Model:\n    def predict(self, model_input):\n        return box['g'](1)"]
    with pytest.raises(MaterializeError, match="it holds a wrapper of the notebook's function `f`"):
        build_model_source(cells, "Model", live=run_cells(cells[:-1]))


def test_what_a_class_run_again_read_is_compared_by_its_data_not_its_repr():
    """An array, or a fitted scaler, read when the class ran (`W = X.copy()`, `sc = StandardScaler().fit(X)`), then
    `X` changed and the class run again: their reprs are alike (an array's is summarized), so the value holding the
    earlier class exported answering with the later data ([1.0, 1.0] for [0.0, 1.0]). A lock and a logger, new at
    each run, are still the same."""
    pytest.importorskip("sklearn")
    reads = ("class K:\n    W = X.copy()\n    sc = StandardScaler().fit(X)\n    def get(self):\n"
             "        return float(self.W.sum())")
    cells = ["import numpy as np\nfrom sklearn.preprocessing import StandardScaler\nX = np.zeros((5000, 1))", reads,
             "box = {'k': K()}\nbox['c'] = 0", "X = np.zeros((5000, 1))\nX[2500] = 1", reads,
             "%%model\nclass Model:\n    def predict(self, model_input):\n        return box['k'].get()"]
    with pytest.raises(MaterializeError, match="holds the class `K` as a cell defined it before the same cell ran"):
        build_model_source(cells, "Model", live=run_cells(cells[:-1]))
    fresh = "import threading, logging\nclass K:\n    lock = threading.Lock()\n    log = logging.getLogger('x')"
    cells = [fresh, "box = {'k': K()}\nbox['c'] = 0", fresh,
             "%%model\nclass Model:\n    def predict(self, model_input):\n        return type(box['k']).__name__"]
    assert "box = pickle.loads" in build_model_source(cells, "Model", live=run_cells(cells[:-1])).text


def test_the_same_def_compiled_beside_an_import_is_the_same_code(tmp_path):
    """Python 3.11 compiles `re.sub` as a method call in a cell without `import re` and as an attribute in one with
    it: the same def run again in such a cell was "other code", and a value holding the first was refused. An edit
    still is refused."""
    def_f = "def f(x):\n    return re.sub('a', {!r}, x)"
    cells = ["import re", def_f.format("b"), "box = {'f': f}\nbox['c'] = 0", "import re\n" + def_f.format("b"),
             "%%model\nclass Model:\n    def predict(self, model_input):\n        return [box['f']('aa'), f('ca')]"]
    expected, got, _ = ship(tmp_path / "out", cells, {"v": "Model().predict(None)"})
    assert expected == got == {"v": ["bb", "cb"]}
    cells[3] = "import re\n" + def_f.format("c")
    with pytest.raises(MaterializeError, match="holds the function `f` as a cell defined it before the notebook bound"):
        build_model_source(cells, "Model", live=run_cells(cells[:-1]))
    # What the comparison still sees (a review found the first three compared equal, exported silently): where a
    # jump goes, what a `try` covers, `*a` against `**a`, positional-only parameters.
    edits = [("def f(a):\n    r = []\n    if a:\n        r.append(1)\n    r.append(2)\n    return r",
              "def f(a):\n    r = []\n    if a:\n        r.append(1)\n        r.append(2)\n    return r"),
             ("def f(a):\n    try:\n        a = int(a)\n    except ValueError:\n        a = 0\n    return a",
              "def f(a):\n    a = int(a)\n    try:\n        pass\n    except ValueError:\n        a = 0\n    return a"),
             ("def f(*a):\n    return a", "def f(**a):\n    return a"),
             ("def f():\n    return dict(a=1)", "def f():\n    return dict(b=1)"),  # (3.11's dis hides KW_NAMES)
             ("def f(a, /):\n    return a", "def f(a):\n    return a")]
    for first, edited in edits:
        cells = [first, "box = {'f': f}\nbox['c'] = 0", edited,
                 "%%model\nclass Model:\n    def predict(self, model_input):\n        return str(box['f'])"]
        with pytest.raises(MaterializeError, match="holds the function `f` as a cell defined it before the notebook"):
            build_model_source(cells, "Model", live=run_cells(cells[:-1]))


def test_a_long_def_compiled_beside_an_import_is_the_def_the_cell_shows(tmp_path):
    """The compiler's choice an import in the cell makes also moves a long jump's EXTENDED_ARG: a def of ten
    `re.sub` lines was "bound again out of sight of the cells" and refused. And a set test (`x in {'a', 'b'}`, a
    frozenset constant) compares the same under any hash seed."""
    body = "".join("        s = re.sub('a', 'b', s)\n" for _ in range(10))
    cells = ["import re\ndef f(xs):\n    for s in xs:\n" + body + "    return s",
             "%%model\nclass Model:\n    def predict(self, model_input):\n        return f(['aa'])"]
    expected, got, _ = ship(tmp_path / "out", cells, {"v": "Model().predict(None)"})
    assert expected == got == {"v": "bb"}
    shape = ("from kernel_magics.core.contract import code_shape\n"
             "def f(x):\n    return x in {'alpha', 'beta', 'gamma', 'delta'}\nprint(repr(code_shape(f.__code__)))")
    shapes = {subprocess.run([sys.executable, "-c", shape], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2", "3")}
    assert len(shapes) == 1, shapes
    # A nan's sign, which its repr hides, and an int too long for dis to show (it raised ValueError).
    from kernel_magics.core.contract import code_shape

    nans = run_cells(["def f():\n    return 1e999 - 1e999", "def g():\n    return -(1e999 - 1e999)"])
    assert code_shape(nans["f"].__code__) != code_shape(nans["g"].__code__)
    big = run_cells(["def f():\n    return 0x" + "f" * 4000, "def g():\n    return 0x" + "e" * 4000])
    assert code_shape(big["f"].__code__) != code_shape(big["g"].__code__)
    # A `from __future__` import binds no name the model uses, yet changes how the later cells compile: model.py
    # dropped it, and `f.__annotations__` held the class, not the string the notebook's holds.
    cells = ["from __future__ import annotations\ndef f(x: int):\n    return x",
             "%%model\nclass Model:\n    def predict(self, model_input):\n        return str(f.__annotations__)"]
    expected, got, _ = ship(tmp_path / "future", cells, {"v": "Model().predict(None)"})
    assert expected == got == {"v": "{'x': 'int'}"}
    # At model.py's top it would reach the defs before it too: not when one of those has annotations.
    cells.insert(0, "def g(x: int):\n    return x")
    cells[-1] = cells[-1].replace("str(f.__annotations__)", "[str(f.__annotations__), g(1)]")
    text = build_model_source(cells, "Model", live=run_cells(cells[:-1])).text
    assert "from __future__" not in text and "def g(x: int)" in text, text


def test_members_of_an_enum_run_again_are_refused_as_they_compare_by_identity(tmp_path):
    """`fav = Color.RED`, then the `Color` cell run again unchanged: in the notebook `fav == Color.RED` is False and a
    dict keyed by the old members misses, while model.py has one `Color` (it answered [True, 1] for [False, 0],
    silently). Refused naming the enum; made after the run again, the value is the latest's and exports."""
    enum_cell = "import enum\nclass Color(enum.Enum):\n    RED = 1\n    BLUE = 2"
    model = ("%%model\nclass Model:\n    def predict(self, model_input):\n"
             "        return [box['fav'] == Color.RED, box['table'].get(Color.RED, 0)]")
    cells = [enum_cell, "box = {'fav': Color.RED, 'table': {Color.RED: 1}}", enum_cell, model]
    # (Its statement, re-run by model.py above the only `class Color`, fails there: the kernel's check then saves it.)
    with pytest.raises(MaterializeError, match="it holds the enum `Color` \\(or members of it\\) as a cell defined "
                                               "it before that cell ran again; in the notebook its members are not"):
        build_model_source(cells, "Model", live=run_cells(cells[:-1]), as_values={"box": "its re-run failed"})
    cells = [enum_cell, enum_cell, "box = {'fav': Color.RED, 'table': {Color.RED: 1}}", model]
    expected, got, _ = ship(tmp_path / "out", cells, {"v": "Model().predict(None)"})
    assert expected == got == {"v": [True, 1]}
    # An IntEnum's members compare and hash as their values: the old ones are equal to the latest's, and export.
    int_enum = enum_cell.replace("enum.Enum", "enum.IntEnum")
    cells = [int_enum, "box = {'fav': Color.RED, 'table': {Color.RED: 1}}", int_enum, model]
    assert run_cells(cells)["Model"]().predict(None) == [True, 1]
    assert "box = pickle.loads" in build_model_source(cells, "Model", live=run_cells(cells[:-1]),
                                                      as_values={"box": "its re-run failed"}).text


def test_a_mutable_default_calls_filled_is_refused_unless_a_prediction_is_replayed():
    """`def f(x, seen=[])` appended to by calls: the notebook's `f(3)` answers 3, model.py's def starts `seen` empty
    and answered 1, silently. Refused naming the default; with recorded predictions the replay judges. An unfilled
    one (`memo={}`) is as the cell wrote it."""
    cells = ["def f(x, seen=[]):\n    seen.append(x)\n    return len(seen)", "f(1); f(2)",
             "%%model\nclass Model:\n    def predict(self, model_input):\n        return f(3)"]
    with pytest.raises(MaterializeError, match=r"whose default `seen` is \[1, 2\] in the notebook, not \[\]"):
        build_model_source(cells, "Model", live=run_cells(cells[:-1]))
    assert "def f(x, seen=[])" in build_model_source(cells, "Model", live=run_cells(cells[:-1]), replay_proves=True).text
    cells[1] = "f.__name__"
    assert "def f(x, seen=[])" in build_model_source(cells, "Model", live=run_cells(cells[:-1])).text
    # A method's (static ones too): refused by the fresh process's comparison, with every cause a class attribute
    # may differ by; now named at once.
    for method, call in (("    def f(self, x, seen=[]):", "H().f({})"), ("    @staticmethod\n    def f(x, seen=[]):", "H.f({})")):
        cells = [f"class H:\n{method}\n        seen.append(x)\n        return len(seen)", call.format(1),
                 "%%model\nclass Model:\n    def predict(self, model_input):\n        return " + call.format(3)]
        with pytest.raises(MaterializeError, match=r"`H` \(a class from cell 1\), whose method `f`'s default `seen` "
                                                   r"is \[1\] in the notebook, not \[\]: calls filled it"):
            build_model_source(cells, "Model", live=run_cells(cells[:-1]))


def test_a_registry_a_decorator_fills_is_filled_by_model_py_as_the_notebook_did(tmp_path):
    """`MODELS = []` and `@model class A` that appends to it: the list was saved and loaded after the classes that
    fill it (a NameError on import); now model.py holds the literal, the decorated classes (which the model does not
    name) and fills it. A cell that also changes it where the analysis sees keeps it a saved value."""
    cells = ["MODELS = []\ndef model(cls):\n    MODELS.append(cls)\n    return cls",
             "@model\nclass A:\n    def get(self):\n        return 1",
             "%%model\nclass Model:\n    def predict(self, model_input):\n        return [m().get() for m in MODELS]"]
    expected, got, source = ship(tmp_path / "out", cells, {"v": "Model().predict(None)"})
    assert expected == got == {"v": [1]} and "MODELS" in source.verify, source.text
    # A cell that also changes it where the analysis sees keeps it a saved value, loaded after the classes its file
    # names; their decorator still needs a list to fill when model.py defines them (it was a NameError on import,
    # with advice that did not apply): the literal stays in its place too, and the saved value replaces it.
    cells.insert(2, "MODELS.append(int)")
    expected, got, source = ship(tmp_path / "again", cells, {"v": "[m.__name__ for m in MODELS]"})
    assert expected == got == {"v": ["A", "int"]} and "MODELS = pickle.loads" in source.text, source.text
    assert source.text.index("MODELS = []") < source.text.index("class A") < source.text.index("MODELS = pickle")
    # A definition in between that takes the list itself would keep the literal (it answered ['A'] for ['A', 'int']).
    cells.insert(1, "def names(models=MODELS):\n    return [m.__name__ for m in models]")
    cells[-1] = "%%model\nclass Model:\n    def predict(self, model_input):\n        return names()"
    with pytest.raises(MaterializeError, match=r"cell 2's `def names\(models=MODELS\).*` takes `MODELS` itself when "
                                               "model.py runs it, before that value is loaded"):
        build_model_source(cells, "Model", live=run_cells(cells[:-1]))


def test_the_model_package_is_importable_as_in_truss(tmp_path):
    """A pickle naming `model.model` by an ordinary global (the way other tools write it) loads too: the
    Truss root is on the path, so `model` is the package beside model.py, as in Truss's image."""
    root = tmp_path / "out"
    (root / "model").mkdir(parents=True)
    (root / "model" / "__init__.py").write_text("")
    (root / "model" / "model.py").write_text("class Thing:\n    pass\n\nclass Model:\n    def predict(self, x):\n"
                                            "        return x\n")
    (root / "config.yaml").write_text("model_name: t\n")
    data = b"cmodel.model\nThing\n."  # GLOBAL "model.model Thing", as pickle writes a class of model.py
    script = ("import pickle, sys\nfrom kernel_magics.core.truss_dir import TrussDir\n"
              "TrussDir.open(sys.argv[1]).import_model_class()\n"
              f"print(pickle.loads({data!r}).__module__, sys.modules['model'].__path__[0])")
    done = subprocess.run([sys.executable, "-I", "-c", script, str(root)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["model.model", str(root / "model")]


def test_every_value_file_of_an_export_reads_as_its_other_files_do(tmp_path, monkeypatch):
    """safetensors writes its files 0600: a container that runs the model as another user than the one who built
    the image could not read the weights. The export gives every value file the mode its config.yaml has (the
    umask's), whatever wrote it."""
    import os

    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    from kernel_magics.core.config import ModelConfig
    from kernel_magics.core.export import export_model, materialize
    from kernel_magics.core.replay import PredictionRecord

    cells = ["import torch\nimport numpy as np", "shift = torch.arange(3.0)\nshift.mul_(2)\nbig = np.arange(5.0)\nbig *= 3",
             "%%model\nclass Model:\n    def predict(self, model_input):\n"
             "        return shift.tolist() + big.tolist()"]
    live = run_cells(cells)
    record = PredictionRecord()
    record.add({}, [0.0, 2.0, 4.0, 0.0, 3.0, 6.0, 9.0, 12.0])
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o022)
    try:
        materialized = materialize(cells, ModelConfig(), tmp_path, "nb.ipynb", live=live, record=record)
        export_model(tmp_path / "out", materialized, base_dir=tmp_path)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out" / "data" / VALUES_DIR).iterdir()}
    assert "shift.safetensors" in modes and set(modes.values()) == {0o644}, modes


def test_a_value_loader_reads_its_library_through_the_notebooks_alias(tmp_path):
    """`import numpy as np` in the notebook: the loader of an array says `np.load`, with no second
    `import numpy` beside it; a value named like the module keeps its file name."""
    pytest.importorskip("numpy")
    cells = ["import numpy as np", "MEAN = np.arange(3.0)\nMEAN *= 2\nnumpy = np.ones(2)\nnumpy *= 3",
             "%%model\nclass Model:\n    def predict(self, model_input):\n        return (np.asarray(MEAN) + numpy.sum()).tolist()"]
    expected, got, source = ship(tmp_path / "out", cells, {"mean": "MEAN.tolist()", "numpy": "numpy.tolist()"})
    assert got == expected
    imports = [line for line in source.text.splitlines() if line.startswith("import ")]
    assert imports == ["import numpy as np", "import pathlib"], source.text
    assert 'MEAN = np.load(_VALUES / "MEAN.npy"' in source.text and '"numpy.npy"' in source.text, source.text
    # The prelude's `pathlib.Path` keeps its own import when the notebook binds pathlib to another name.
    cells = ["import numpy as np\nimport pathlib as pl", "MEAN = np.arange(3.0)\nMEAN *= 2",
             "%%model\nclass Model:\n    def predict(self, model_input):\n        return [str(pl.Path('a')), *MEAN]"]
    expected, got, source = ship(tmp_path / "out2", cells, {"mean": "MEAN.tolist()"})
    assert got == expected and "import pathlib\n" in source.text and "import pathlib as pl" in source.text


def test_skops_is_imported_without_torch_and_leaves_nothing_blocked():
    """skops.io's import walks scikit-learn's packages, one of which imports torch: seconds and hundreds of MB for
    a scikit-learn model, in the kernel and the export's checker. kernel_magics imports it without that package,
    which stays importable afterwards."""
    pytest.importorskip("skops")
    pytest.importorskip("torch")
    code = ("import sys\nfrom kernel_magics.core.skops_import import import_skops_io\nio = import_skops_io()\n"
            "assert io.dump and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)\n"
            "import sklearn.externals.array_api_compat.torch\nassert 'torch' in sys.modules\nprint('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
