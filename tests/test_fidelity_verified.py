"""Issue 21: values changed where the code does not show it, verified against the live values.

Each case is a notebook of its own, run in a real kernel: it records predictions and exports with
%model_export, and the fresh-process verification moves what re-running its source would get wrong
to the values (``%model_show --why`` says how it measured that). The export then answers as the
notebook did from `kernel-magics serve` and from Truss 0.18.36's own server. The CLI, which has no
live values, refuses the same notebook naming the value, the cell and the line, and with --execute
runs it headlessly and exports the kernel's directory byte for byte (its export marker aside).
"""

import json
import re

import httpx
import pytest

from server_harness import serve_ours, serve_truss, truss_reference_python
from test_export import cli, files_of, leftovers, run_notebook_cells, usage_error, write_notebook

CASES = {
    # name: (files beside the notebook, cells before %%model, the model's predict body, inputs,
    #        what %model_show --why says (patterns), what the CLI's refusal says)
    "a list extended through a second name": (
        {}, ["import os\nMODE = os.environ.get('KM_TEST_MODE', 'plain')  # the environment: stays source",
             "FEATURES = sorted({'b', 'a'})", "cols = FEATURES\ncols.append('c')"],
        "return {'features': FEATURES, 'mode': MODE, 'i': model_input['i']}", [{"i": 1}],
        [r"FEATURES +variable +cell 3 +used by Model; value \(literal\): re-running its source gives a different "
         r"value: 2 items, the notebook has 3 items", r"MODE +variable +cell 2 +used by Model; source"],
        "`FEATURES` (in Model), but cell 4 binds another name to it"),
    "a dict filled inside a function": (
        {}, ["LABELS = dict()", "def fill():\n    LABELS.update({'0': 'red', '1': 'green'})", "fill()"],
        "return LABELS[str(model_input['i'])]", [{"i": 1}, {"i": 0}],
        [r"LABELS +variable +cell 2 +used by Model; value \(literal\): re-running its source gives a different value: "
         r"0 items, the notebook has 2 items"],
        "`LABELS` (in Model), but cell 4 calls `fill`, which uses it and may change it: `fill()` (line 1)"),
    "a dict filled by an awaited coroutine": (
        {}, ["import asyncio\nLABELS = dict()",
             "async def load_labels():\n    await asyncio.sleep(0)\n    LABELS.update({'0': 'red', '1': 'green'})",
             "await load_labels()"],
        "return LABELS[str(model_input['i'])]", [{"i": 1}],
        [r"LABELS +variable +cell 2 +used by Model; value \(literal\): re-running its source gives a different value: "
         r"0 items, the notebook has 2 items"],
        "cell 4 calls `load_labels`, which uses it and may change it: `load_labels()` (line 1)"),
    "a list read from a file deleted afterwards": (
        {"labels.txt": "red green blue\n"},
        ["LABELS = open('labels.txt').read().split()", "import os\nos.remove('labels.txt')"],
        "return LABELS[model_input['i']]", [{"i": 2}],
        [r"LABELS +variable +cell 2 +used by Model; value \(literal\): re-running its source fails in a fresh "
         r"Python \(FileNotFoundError"],
        "re-running `open('labels.txt').read().split()` (cell 2, line 1) may not give the value the notebook had"),
    "an attribute of a local module changed in a cell": (
        {"helper.py": "SCALE = 2\n\n\ndef scale(x):\n    return x * SCALE\n"},
        ["import helper", "setattr(helper, 'SCALE', 3)"],
        "return helper.scale(model_input['x'])", [{"x": 5}],
        [r"helper.SCALE +attribute +cell 2 +used by the module helper; value \(literal\): the notebook changed it, "
         r"and importing helper afresh gives a different value: 2, the notebook has 3"],
        "`helper` is a module beside the notebook, and cell 3 changes it: `setattr(helper, 'SCALE', 3)` (line 1)"),
    "a random generator that predict consumes": (
        {}, ["import random\nrng = random.Random(7)"],
        "return {'i': model_input['i'], 'draw': rng.random()}", [{"i": 1}, {"i": 2}],
        [r"rng +variable +cell 2 +used by Model; source"],  # its seed state is where the predictions began
        "re-running `random.Random(7)` (cell 2, line 2) may not give the value the notebook had"),
}


# The cases whose export --execute also makes, compared byte for byte: one of each way a value travels (a literal, a
# module beside the notebook with its changed attribute, a generator left as its source). The other cases' values
# travel as the first one's does; each --execute is a headless kernel and an export of its own (seconds of CPU).
EXECUTED = ("a list extended through a second name", "an attribute of a local module changed in a cell",
            "a random generator that predict consumes")
assert set(EXECUTED) <= set(CASES)


def predict_cells(inputs):
    return [f"import json as _j\nprint(_j.dumps(get_ipython().run_line_magic('model_predict', {json.dumps(i)!r})))"
            for i in inputs]


def model_cell(body: str) -> str:
    return f"%%model\nclass Model:\n    def predict(self, model_input):\n        {body}"


def answers_of(served, inputs) -> list:
    return [httpx.post(served.predict_url(), json=i, timeout=30).json() for i in inputs]


@pytest.mark.parametrize("case", list(CASES))
def test_a_value_changed_where_the_code_does_not_show_it_is_verified_and_travels(tmp_path, case, truss_validate):
    files, cells, body, inputs, why_lines, refusal = CASES[case]
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    path = write_notebook(tmp_path / "nb.ipynb", ["%load_ext kernel_magics", *cells, model_cell(body), "%model_load",
                                                   *predict_cells(inputs), "%model_export out", "%model_show --why"])
    k, results = run_notebook_cells(path)
    k.shutdown()
    answers = [json.loads(r.stdout.strip().splitlines()[-1]) for r in results[-2 - len(inputs):-2]]
    exported, why = results[-2].stdout, results[-1].stdout
    assert f"Replayed {len(inputs)} recorded prediction" in exported, exported
    for line in why_lines:
        assert re.search(line, why), why
    truss_validate(tmp_path / "out")
    with serve_ours(tmp_path / "out") as ours:
        assert answers_of(ours, inputs) == answers
    if truss_reference_python() is not None:
        with serve_truss(tmp_path / "out") as theirs:
            assert answers_of(theirs, inputs) == answers
    # The file alone cannot prove these values: the CLI refuses, naming the value, the cell and the line ...
    for name, text in files.items():
        (tmp_path / name).write_text(text)  # as the notebook found it
    done = cli("export", path, tmp_path / "from-cli")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert refusal in done.stderr and "--execute" in done.stderr, done.stderr
    assert not (tmp_path / "from-cli").exists() and leftovers(tmp_path) == []
    if case not in EXECUTED:
        return
    # ... and with --execute runs the notebook in a fresh kernel and exports what the kernel exported, byte for
    # byte (the values that travel included): what answered as the notebook did above.
    before = path.read_bytes()
    done = cli("export", path, tmp_path / "executed", "--execute")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[1/" in done.stdout and f"Replayed {len(inputs)} recorded prediction" in done.stdout
    assert f"Exported `Model` from {path.name} as a Truss" in done.stdout, done.stdout  # (as without --execute)
    assert f"\n{tmp_path / 'executed'}/\n" in done.stdout, done.stdout  # as seen from here, not the notebook's folder
    assert path.read_bytes() == before  # the notebook file is untouched
    executed, exported = files_of(tmp_path / "executed"), files_of(tmp_path / "out")
    assert executed == exported, sorted(n for n in {*executed, *exported} if executed.get(n) != exported.get(n))


def test_the_local_module_travels_in_packages_and_its_change_after_the_import(tmp_path, fresh_kernel):
    (tmp_path / "helper.py").write_text("SCALE = 2\n\n\ndef scale(x):\n    return x * SCALE\n")
    k = fresh_kernel(cwd=tmp_path)
    k.ok("%load_ext kernel_magics\nimport helper")
    k.ok("helper.SCALE = 3")
    k.ok(model_cell("return helper.scale(model_input['x'])"))
    k.ok("%model_export out")
    assert (tmp_path / "out/packages/helper.py").read_text() == (tmp_path / "helper.py").read_text()
    text = (tmp_path / "out/model/model.py").read_text()
    assert text.index("import helper") < text.index("helper.SCALE = 3") < text.index("class Model")


def test_an_unseeded_generator_that_predict_consumes_is_named_in_the_refusal(tmp_path, fresh_kernel):
    k = fresh_kernel(cwd=tmp_path)
    k.ok("%load_ext kernel_magics\nimport random\nrng = random.Random()")
    k.ok(model_cell("return rng.random()"))
    k.ok("%model_load")
    k.ok('%model_predict {"i": 1}')
    message = usage_error(k.execute("%model_export out"))
    assert "does not answer as the notebook did, so nothing was exported" in message
    assert "Most likely cause: `rng` (a random.Random) changes each time predict runs" in message
    assert ("Create (and seed) it inside load(), then export again; --no-replay skips" in message
            and "Fix that" not in message), message  # one remedy, said once
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_execute_stops_at_a_failing_cell_naming_it_and_exports_nothing(tmp_path):
    path = write_notebook(tmp_path / "nb.ipynb", [
        "%load_ext kernel_magics", "WORDS = ['a']", "raise ValueError('the data moved.')",
        model_cell("return WORDS")])
    before = path.read_bytes()
    done = cli("export", path, tmp_path / "out", "--execute")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "[3/4] cell 3: raise ValueError('the data moved.')" in done.stdout
    assert ("Running nb.ipynb headlessly failed in cell 3 (`raise ValueError('the data moved.')`): ValueError: the data "
            "moved. Nothing was exported, and the notebook file is unchanged") in done.stderr  # one full stop
    assert "Parent appears to have exited" not in done.stderr  # the kernel was shut down, not left to notice
    assert not (tmp_path / "out").exists() and path.read_bytes() == before and leftovers(tmp_path) == []


def test_execute_refuses_a_target_it_could_not_replace_before_the_notebook_runs(tmp_path):
    """The target is checked before the notebook runs (a training notebook may run for minutes), with the message
    the export itself would give."""
    path = write_notebook(tmp_path / "nb.ipynb", [
        "%load_ext kernel_magics", "open('ran.txt', 'w').close()", model_cell("return 1")])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    done = cli("export", path, tmp_path / "out", "--execute")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "exists and is not empty, and no export made it" in done.stderr, done.stderr
    assert "[1/" not in done.stdout and not (tmp_path / "ran.txt").exists()  # no cell ran
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_execute_accepts_what_the_export_accepts_a_link_to_an_empty_folder_and_its_own_export(tmp_path):
    """What the export accepts, the check before the notebook runs accepts: a link to an empty folder (the kernel
    exports into the folder it points to), from a working directory the target holds (the kernel's is the
    notebook's folder), and then the notebook's own export there, replaced."""
    path = write_notebook(tmp_path / "nb.ipynb", [
        "%load_ext kernel_magics", "open('ran.txt', 'w').close()", model_cell("return 1")])
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    done = cli("export", path, tmp_path / "link", "--execute", cwd=tmp_path / "real")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "over TCP" not in done.stderr  # the headless kernel runs over Unix sockets (no port to lose to a race)
    assert (tmp_path / "real" / "model" / "model.py").is_file() and (tmp_path / "ran.txt").exists()
    again = cli("export", path, tmp_path / "link", "--execute", cwd=tmp_path / "real")  # its own export: replaced
    assert again.returncode == 0 and "(replacing the earlier export there)" in again.stdout, again.stdout + again.stderr


def test_cells_are_counted_as_jupyter_numbers_them_code_cells_only(tmp_path):
    """"cell N" is the Nth code cell, In [N] after a clean Run All (markdown cells have no number): in the plain
    export's refusal, in --execute's progress and in what its kernel says, alike."""
    from nbformat.v4 import new_markdown_cell

    path = write_notebook(tmp_path / "nb.ipynb", [
        new_markdown_cell("# Counting"), "import threading\nL = threading.Lock()", new_markdown_cell("Take it:"),
        "L.acquire()", model_cell("return L.locked()")])
    done = cli("export", path, tmp_path / "out")
    assert done.returncode == 1 and "cell 2 changes it after its assignment: `L.acquire()`" in done.stderr, done.stderr
    done = cli("export", path, tmp_path / "out", "--execute")  # (no %load_ext cell: the kernel loads it itself)
    assert done.returncode == 1 and "[2/3] cell 2: L.acquire()" in done.stdout, done.stdout + done.stderr
    assert "changed by `L.acquire()` in cell 2" in done.stderr, done.stderr


def test_cells_run_before_load_ext_count_in_the_kernel_and_in_execute(tmp_path, fresh_kernel):
    """A notebook that trains first and loads the extension later: what its cells defined before `%load_ext` is
    exported (from the kernel's input history), and "cell N" is still In[N]. A cell that failed and a %%model
    cell that ran before the extension existed (its magic not found) change neither. --execute of the notebook
    (without those two: it stops at a failing cell), which loads the extension at that cell too, exports the same
    model.py."""
    cells = ["import math", "def double(v):\n    return v * 2", "K = 3", "K = K +",
             model_cell("return 'not this one'"),
             "%load_ext kernel_magics", model_cell("return double(K) + math.floor(model_input['x'])"), "%model_load",
             '%model_predict {"x": 1.5}', "%model_export out"]
    k = fresh_kernel(cwd=tmp_path)
    for cell in cells:
        k.execute(cell)
    text = (tmp_path / "out/model/model.py").read_text()
    assert "def double(v):" in text and "K = 3" in text and "import math" in text and "not this one" not in text
    k.ok("K = 4")  # In[11]
    message = usage_error(k.execute("%model_export out"))
    assert "`K` (cell 11 defines it again: `K = 4`) changed after this prediction was recorded" in message, message
    k.shutdown()
    path = write_notebook(tmp_path / "nb.ipynb", [c for c in cells if c != "K = K +" and "not this one" not in c])
    done = cli("export", path, tmp_path / "executed", "--execute")  # (it stops at a failing cell)
    assert done.returncode == 0 and "Replayed 1 recorded prediction" in done.stdout, done.stdout + done.stderr
    assert (tmp_path / "executed/model/model.py").read_text().splitlines()[1:] == text.splitlines()[1:]


def test_a_name_imported_from_a_changed_local_module_travels_as_its_live_value(tmp_path, monkeypatch):
    from kernel_magics.core.config import ModelConfig
    from kernel_magics.core.export import export_model, materialize
    from kernel_magics.core.replay import PredictionRecord

    (tmp_path / "helper.py").write_text("SCALE = 2\n")
    cells = ["import helper", "helper.SCALE = 3", "from helper import SCALE",
             model_cell("return SCALE")]
    live = {"helper": type(json)("helper"), "SCALE": 3}  # the kernel's values: the module as the notebook changed it
    live["helper"].SCALE = 3
    record = PredictionRecord()
    record.add({}, 3)
    monkeypatch.chdir(tmp_path)
    materialized = materialize(cells, ModelConfig(), tmp_path, "nb.ipynb", live=live, record=record)
    result = export_model(tmp_path / "out", materialized, base_dir=tmp_path)
    assert result.replayed == 1 and result.timings["verify rounds"] == 2
    why = result.source.why()
    assert re.search(r"SCALE +import +cell 3 .*value \(literal\): re-running its source gives a different value: 2, "
                     r"the notebook has 3", why), why


LOAD_CHANGES = {
    # how LABELS is made, and whether the notebook recorded a prediction after %model_load
    "a literal": ("LABELS = ['a', 'b']", False),
    "a computed list, verified": ("LABELS = list('ab')", False),
    "a computed list, replayed": ("LABELS = list('ab')", True),
}


@pytest.mark.parametrize("loaded", [True, False], ids=["loaded", "not loaded"])
@pytest.mark.parametrize("case", list(LOAD_CHANGES))
def test_a_global_that_load_changes_is_compared_as_both_loads_left_it(tmp_path, fresh_kernel, loaded, case):
    """load() appends to a notebook global: the deployment's load must start from the value the notebook's
    load started from, so the export answers as the notebook (3 labels), with or without %model_load. (Saved
    as the kernel's load left it, the deployment's load appended again: 4 labels.)"""
    made, predicted = LOAD_CHANGES[case]
    k = fresh_kernel(cwd=tmp_path)
    k.ok(f"%load_ext kernel_magics\n{made}")
    k.ok("%%model\nclass Model:\n    def load(self):\n        LABELS.append('extra')\n"
         "    def predict(self, model_input):\n        return {'labels': len(LABELS)}\n")
    if loaded:
        k.ok("%model_load")
        if predicted:
            assert "'labels': 3" in k.ok("%model_predict {}").result
    exported = k.ok("%model_export out").stdout
    assert ("replayed 1" in exported.lower()) == (loaded and predicted), exported
    done = cli("predict", tmp_path / "out", "-d", "{}", cwd=tmp_path)
    assert (done.returncode, done.stdout) == (0, '{"labels": 3}\n'), done.stderr


def test_a_global_that_load_changes_and_a_cell_changes_after_the_load_is_refused_until_loaded_again(
        tmp_path, fresh_kernel):
    """load() fills THRESHOLDS (setdefault) and a cell after %model_load changes it: no deployment, which runs
    load() alone from the value before the notebook's load, can have that change. The export refuses naming both
    and the remedy; after %model_load runs again the value travels as the notebook has it. A cache that load()
    clears and predict fills changes after the load too, in no cell: exported, not refused."""
    k = fresh_kernel(cwd=tmp_path, load_ext=True)
    k.ok("THRESHOLDS = {}\nCACHE = {}\nNAMES = []")
    k.ok("%%model\nclass Model:\n    def load(self):\n        THRESHOLDS.setdefault('min_score', 0.5)\n"
         "        CACHE.clear()\n        NAMES.append('n')\n    def predict(self, model_input):\n"
         "        CACHE[model_input['x']] = THRESHOLDS['min_score']\n"
         "        return {'t': CACHE[model_input['x']], 'names': sorted(NAMES)}")
    k.ok("%model_load")  # cell 4
    # cell 5: NAMES is handed to a function and called a method on, neither of which changes it (measured)
    k.ok("THRESHOLDS['min_score'] = 0.7\nimport collections\ncounts = collections.Counter(NAMES)\nNAMES.extend([])")
    k.ok('%model_predict {"x": 1}')
    message = usage_error(k.execute("%model_export out"))
    assert message.startswith("`THRESHOLDS` is changed by load() (`THRESHOLDS.setdefault('min_score', 0.5)` in load(), "
                              "cell 3, line 4) and again after %model_load ran (cell 4): "
                              "`THRESHOLDS['min_score'] = 0.7` in cell 5, line 1."), message
    assert "Run %model_load again after that cell" in message and "CACHE" not in message, message
    assert "NAMES" not in message, message
    assert not (tmp_path / "out").exists()
    k.ok("%model_load")
    k.ok('%model_predict {"x": 1}')
    k.ok('%model_predict {"x": 2}')
    assert "Replayed 2 recorded predictions" in k.ok("%model_export out").stdout
    with serve_ours(tmp_path / "out") as ours:
        assert answers_of(ours, [{"x": 1}]) == [{"t": 0.7, "names": ["n", "n"]}]
    # A change the code shows only as handing the value to a notebook function, measured: refused too.
    k.ok("def tweak(names):\n    names.append('x')")
    k.ok("tweak(NAMES)")  # cell 13
    message = usage_error(k.execute("%model_export out"))
    assert message.startswith("`NAMES` is changed by load() (`NAMES.append('n')` in load(), cell 3, line 6) and again "
                              "after %model_load ran (cell 8): `tweak(NAMES)` in cell 13, line 1."), message
    # A load run outside the history (the lab panel's command) comes before the next cell, which it names.
    k.ok("%model_load --no-widget", store_history=False)
    k.ok("NAMES.append('y')")  # cell 15 (the refused export was cell 14)
    message = usage_error(k.execute("%model_export out"))
    assert "again after %model_load ran (outside the notebook's cells, before cell 15): `NAMES.append('y')` in cell " \
           "15, line 1." in message, message


def test_a_global_that_load_changes_and_is_too_large_to_copy_is_refused_naming_the_line(tmp_path, fresh_kernel):
    """A global load() changes that %model_load did not copy (over 64 MB) cannot be saved as it was before the
    load: the export refuses, naming it and the statement in load() that changes it."""
    k = fresh_kernel(cwd=tmp_path)
    k.ok("%load_ext kernel_magics\nimport numpy as np\nBIG = np.zeros(17_000_000, dtype=np.float32)")
    k.ok("%%model\nclass Model:\n    def load(self):\n        BIG[0] += 1\n"
         "    def predict(self, model_input):\n        return {'first': float(BIG[0])}\n")
    k.ok("%model_load")
    why = usage_error(k.execute("%model_export out"))
    assert "`BIG`" in why and "(`BIG[0] += 1` in load(), cell 2, line 4)" in why, why
    assert "export before %model_load" in why, why
    assert not (tmp_path / "out").exists()


def test_a_module_attribute_changed_out_of_sight_travels_with_the_whole_module(tmp_path, fresh_kernel):
    """A notebook nn.Module whose float attribute a function changed (invisible to the code's reading, which
    sends a module changed only by calls as its weights): the weights-only module is verified, its fingerprint
    counts plain attributes, so it travels whole and the export answers as the notebook, without a replay."""
    k = fresh_kernel(cwd=tmp_path)
    k.ok("%load_ext kernel_magics\nimport torch\n"
         "class Scaled(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
         "        self.lin = torch.nn.Linear(2, 1)\n        self.temperature = 1.0\n"
         "    def forward(self, x):\n        return self.lin(x) / self.temperature")
    k.ok("torch.manual_seed(0)\nnet = Scaled()")
    k.ok("def calibrate(m):\n    m.temperature = 4.0\ncalibrate(net)")
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n"
         "        with torch.no_grad():\n            return {'y': round(net(torch.ones(1, 2)).item(), 6)}\n")
    expected = k.ok("print(round(net(torch.ones(1, 2)).item(), 6))").stdout.strip()
    k.ok("%model_export out --no-replay")
    why = k.ok("%model_show --why").stdout
    assert re.search(r"net +variable +cell 2 .*value \(torch.save \(pickle\), runs code when loaded\): re-running its "
                     r"source gives a different value: its attribute `temperature` is 1.0, the notebook has 4.0", why), why
    done = cli("predict", tmp_path / "out", "-d", "{}", cwd=tmp_path)
    assert (done.returncode, json.loads(done.stdout or "null")) == (0, {"y": float(expected)}), done.stderr


def test_a_class_attribute_a_function_changed_is_refused_not_exported_as_the_class_body_has_it(tmp_path, fresh_kernel):
    """`def tune(t): Config.threshold = t` after the recorded prediction: re-running the class gives 0.5, the
    notebook answers with 0.9, and the replay (made before the change) agreed with the stale export. The class's
    plain attributes are verified in the fresh process; a changed class cannot travel, so the export refuses."""
    k = fresh_kernel(cwd=tmp_path)
    k.ok("%load_ext kernel_magics\nclass Config:\n    threshold = 0.5\n\ndef tune(t):\n    Config.threshold = t")
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n"
         "        return {'positive': model_input['v'] > Config.threshold}\n")
    k.ok("%model_load\n%model_predict {\"v\": 0.7}")
    k.ok("tune(0.9)")
    why = usage_error(k.execute("%model_export out"))
    assert "`Config` (a class from cell 1)" in why and "its attribute `threshold` is 0.5, the notebook has 0.9" in why, why
    assert "put the value in the class body" in why, why
    assert not (tmp_path / "out").exists()
    k.ok("tune(0.5)")  # back as its source has it: exports
    assert "Replayed 1 recorded prediction" in k.ok("%model_export out").stdout


def test_a_name_bound_again_out_of_sight_of_its_def_travels_as_the_notebook_has_it(tmp_path, fresh_kernel):
    """Two bindings the cells do not show: `def swap(): global f; f = g`, then `swap()`, and a class body that took a
    function (`f = staticmethod(sqrt)`) before `from math import sqrt`. model.py's `def f` is not the notebook's `f`,
    and its `from math import sqrt` goes above the class: both exported silently and answered otherwise (1 for 2;
    2.0 for -1), with no prediction recorded to replay. Now `f` travels as a value (a pickle naming `g`), and the
    class's held function is verified in the fresh process, so the export refuses, naming the attribute."""
    k = fresh_kernel(cwd=tmp_path)
    k.ok("%load_ext kernel_magics\ndef f():\n    return 1")
    k.ok("def g():\n    return 2\n\ndef swap():\n    global f\n    f = g")
    k.ok("swap()")
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        return f()")
    assert "`f` (pickle" in k.ok("%model_export out --no-replay").stdout
    done = cli("predict", tmp_path / "out", "-d", "{}", cwd=tmp_path)
    assert (done.returncode, done.stdout.strip()) == (0, "2"), done.stderr
    k.ok("def sqrt(x):\n    return -1\n\nclass K:\n    f = staticmethod(sqrt)")
    k.ok("from math import sqrt")
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        return [K.f(4), sqrt(4)]")
    why = usage_error(k.execute("%model_export out --force --no-replay"))
    for fragment in ("`K` (a class from cell 6)", "its attribute `f` is math.sqrt, the notebook has <notebook>.sqrt",
                     "a name its body read was bound again by a later cell"):
        assert fragment in why, why


def test_a_value_holding_a_class_edited_and_run_again_since_is_refused_until_it_is_made_again(tmp_path, fresh_kernel):
    """`s = Scaler(2)` and `HELD = [Scaler(3)]`, then the `Scaler` cell edited and run again: the notebook's values
    still run the old method (6 for 3), but model.py defined only the latest `Scaler` (7), and the export answered 7
    with nothing said. `s`, re-run from source, now gets the earlier `Scaler`, which model.py holds before it, as the
    notebook's did; `HELD`, saved as a value (its `append` is not re-run), would load with the latest: with no
    recorded prediction the export refuses naming it and the class; with one, the replay differs and names it as
    the cause. Run again unchanged, a class is the same code: a value made before exports as before."""
    scaler = "class Scaler:\n    def __init__(self, k):\n        self.k = k\n    def apply(self, x):\n        return {}"
    k = fresh_kernel(cwd=tmp_path)
    k.ok("%load_ext kernel_magics\n" + scaler.format("x * self.k"))
    k.ok("s = Scaler(2)\nHELD = [Scaler(3)]\nHELD.append(Scaler(4))")
    k.ok(scaler.format("x * self.k"))  # run again, unchanged
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n"
         "        return [s.apply(model_input['x']), HELD[1].apply(1)]\n")
    assert "Replayed" not in k.ok("%model_export out").stdout  # (no prediction recorded: nothing else proves it)
    k.ok(scaler.format("x * self.k + 1") + "\n%model_load")  # edited
    why = usage_error(k.execute("%model_export out --force"))  # (a value from the start: planned first)
    for fragment in ("`HELD` (a list) but it holds the class `Scaler` as a cell defined it before the notebook "
                     "bound `Scaler` again, to other code", "Run the cell that makes `HELD` again"):
        assert fragment in why, why
    assert k.ok(predict_cells([{"x": 3}])[0]).stdout.strip() == "[6, 4]"
    why = usage_error(k.execute("%model_export out --force"))  # (the replay judges, and differs)
    assert "The notebook answered [6, 4]; the export answers [6, 5]" in why, why
    assert "Most likely cause: `HELD` holds the class `Scaler` as a cell defined it before" in why, why
    assert "Run the cell that makes `HELD` again" in why, why
    k.ok("s = Scaler(2)\nHELD = [Scaler(3), Scaler(4)]")
    assert k.ok(predict_cells([{"x": 3}])[0]).stdout.strip() == "[7, 5]"
    assert "Replayed 1 recorded prediction" in k.ok("%model_export out --force").stdout


def test_a_value_made_before_its_class_was_edited_is_exported_with_the_class_it_was_made_with(tmp_path, fresh_kernel):
    """A new user's: `s = S()`, `class S` edited, load() keeping `s`, a prediction recorded. model.py re-ran
    `s = S()` after the latest `S` only (an instance without attributes compares the same in the fresh process):
    the export answered 2 where the notebook answered 1, and was refused. model.py now holds the earlier `S` before
    `s = S()` and the edited one after it, in the notebook's order, and the export answers 1, as the notebook."""
    k = fresh_kernel(cwd=tmp_path, load_ext=True)
    k.ok("class S:\n    def f(self):\n        return 1")
    k.ok("s = S()")
    k.ok("%%model\nclass Model:\n    def load(self):\n        self.s = s\n    def predict(self, model_input):\n"
         "        return self.s.f()")
    k.ok("class S:\n    def f(self):\n        return 2\n%model_load")
    assert k.ok("%model_predict {}").result == "1"
    assert "Replayed 1 recorded prediction" in k.ok("%model_export out").stdout
    text = (tmp_path / "out" / "model" / "model.py").read_text()
    assert text.index("return 1") < text.index("s = S()") < text.index("return 2"), text


def test_values_computed_from_a_name_bound_again_later_export_from_the_kernel_as_the_notebook_has_them(
        tmp_path, fresh_kernel):
    """model.py now holds the earlier binding an assignment read (the CLI's NameError, test_source's
    READ_THEN_BOUND_AGAIN); in the kernel the fresh process compares what the assignment makes, so a value whose
    earlier binding model.py cannot carry travels as its value instead of being refused (a new user's: `m` and `m2`
    from a DataFrame changed and bound again were refused, "give the later `df` another name"), and a chain of ints
    is no alias (`N2 = N * 2`, refused as one)."""
    k = fresh_kernel(cwd=tmp_path, load_ext=True)
    model = "%%model\nclass Model:\n    def predict(self, model_input):\n        return {}"
    for cells, expression, answer in [
        (["import pandas as pd\ndf = pd.DataFrame({'a': [1.0, 2.0]})\nm = float(df.a.mean())\ndf['a'] = df['a'] * 10\n"
          "m2 = int(df.a.sum())\ndf = pd.DataFrame({'a': [0]})"], "(m, m2, len(df))", "[1.5, 30, 1]"),
        (["N = 1\nN2 = N * 2\nLIM = N2 + 1\nN = 5"], "LIM + N", "8"),
        (["N = 0\nN2 = N + 100", "N = 1", "class C:\n    def __init__(self):\n        self.v = N", "c = C()", "N = 5"],
         "(c.v, N, N2)", "[1, 5, 100]")]:
        for cell in cells:
            k.ok(cell)
        k.ok(model.format(expression))
        assert k.ok("%model_load\n%model_predict {}").result == answer
        assert "Replayed 1 recorded prediction" in k.ok("%model_export out --force").stdout


def test_an_earlier_value_only_its_source_can_carry_is_proven_by_the_replay_or_refused(tmp_path, fresh_kernel):
    """`SCALE = random.random()`, `def f(x, s=SCALE)`, then `SCALE = 2`: model.py re-runs `random.random()` for f's
    default, which no live value can be compared with. Refused without a recorded prediction and with `--no-replay`
    (which replays none); with one, the replay differs, and the refusal names `SCALE`."""
    k = fresh_kernel(cwd=tmp_path)
    k.ok("%load_ext kernel_magics\nimport random\nSCALE = random.random()")
    k.ok("def f(x, s=SCALE):\n    return x * s")
    k.ok("SCALE = 2")
    k.ok(model_cell("return [f(model_input['x']), SCALE]"))
    why = usage_error(k.execute("%model_export out"))
    assert "`SCALE` as cell 1 set it (`SCALE = random.random()`) is read when cell 2 runs" in why, why
    k.ok("%model_load")
    k.ok(predict_cells([{"x": 3}])[0])
    assert "no recorded prediction proves it" in usage_error(k.execute("%model_export out --no-replay"))
    why = usage_error(k.execute("%model_export out"))
    assert "model.py re-runs the statement that set `SCALE`" in why and "another name" in why, why
    assert not (tmp_path / "out").exists()


def test_a_load_changed_by_a_hot_swap_after_the_load_is_named_when_the_replay_differs(tmp_path, fresh_kernel):
    """The %%model cell edited (`self.scale = 10.0` in load()) and run again after %model_load: the live model keeps
    what the old load made (2.0 for 2), the export loads afresh (20.0). The refusal blamed files and randomness; it now
    names the swap and says to run %model_load again, after which the export answers as the notebook does."""
    model = "%%model\nclass Model:\n    def load(self):\n        self.scale = {}\n" \
            "    def predict(self, model_input):\n        return {{'y': model_input['x'] * self.scale}}\n"
    k = fresh_kernel(cwd=tmp_path)
    k.ok("%load_ext kernel_magics")
    k.ok(model.format("1.0"))
    k.ok("%model_load")
    k.ok(model.format("10.0"))
    assert k.ok(predict_cells([{"x": 2}])[0]).stdout.strip() == '{"y": 2.0}'
    why = usage_error(k.execute("%model_export out"))
    assert "the %%model cell ran again with another `load` after %model_load" in why, why
    assert "Run %model_load again" in why and "files" not in why, why
    k.ok("%model_load")
    assert k.ok(predict_cells([{"x": 2}])[0]).stdout.strip() == '{"y": 20.0}'
    assert "Replayed 1 recorded prediction" in k.ok("%model_export out").stdout


def test_a_name_the_model_reads_that_the_notebook_deleted_is_exported_with_a_warning(tmp_path, fresh_kernel):
    """`del NAMES` after the recorded prediction: the notebook's model now fails with a NameError, model.py sets
    `NAMES` as its cell did. The export still answers the recorded prediction as the notebook did then, and says so;
    a name only a statement read (`del raw`) is no warning."""
    k = fresh_kernel(cwd=tmp_path)
    k.ok("%load_ext kernel_magics\nNAMES = {'a': 'alpha'}\nraw = [('b', 2)]\nLOOKUP = dict(raw)")
    k.ok(model_cell("return [NAMES[model_input['k']], LOOKUP['b']]"))
    k.ok("%model_load")
    assert k.ok(predict_cells([{"k": "a"}])[0]).stdout.strip() == '["alpha", 2]'
    k.ok("del NAMES, raw")
    exported = k.ok("%model_export out").stdout
    assert ("warning: the model uses `NAMES`, which the notebook no longer has (deleted since cell 1 set it)"
            in exported and "Replayed 1 recorded prediction" in exported), exported
    assert "`raw`" not in exported, exported


def test_a_name_that_cannot_be_fingerprinted_is_named_as_not_verified(tmp_path, fresh_kernel):
    """A lock re-run from source has no fingerprint (it cannot be pickled): it stays source (it could not be saved
    either), and %model_show --why and the export's output say it was not verified and what proves it."""
    k = fresh_kernel(cwd=tmp_path)
    k.ok("%load_ext kernel_magics\nimport threading\nLOCK = threading.Lock()\nNAMES = ['a']")
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        with LOCK:\n"
         "            return {'names': NAMES}\n")
    why = k.ok("%model_show --why").stdout
    assert re.search(r"LOCK +variable +cell 1 +used by Model; source \(not verified: its value cannot be "
                     r"fingerprinted \(it cannot be pickled\), so only the replay", why), why
    assert re.search(r"NAMES +variable .*; source\n", why), why
    exported = k.ok("%model_export out").stdout
    assert ("warning: `LOCK` (a _thread.lock) travels as source without being verified against the notebook (a value "
            "that cannot be pickled has no fingerprint to compare); no recorded prediction proves it") in exported, exported
    k.ok("%model_load\n%model_predict {}")
    exported = k.ok("%model_export out --force").stdout
    assert "; the replay of 1 recorded prediction is its only proof." in exported, exported


def test_a_closure_a_notebook_function_made_is_re_run_and_verified_and_one_whose_state_changed_is_refused(
        tmp_path, fresh_kernel):
    """`money = make_rounder(2)` cannot be saved (it holds a function defined inside another) but re-running it in
    model.py gives the same function over the same `ndigits`: it travels as source, verified (it was refused,
    though the notebook ran fine). A closure whose state a cell changed since (`acc(1)` appended to what it closes
    over) is not what re-running gives: refused, naming it, as before."""
    k = fresh_kernel(cwd=tmp_path, load_ext=True)
    k.ok("def make_rounder(ndigits):\n    def rounder(x):\n        return round(x, ndigits)\n    return rounder\n\n"
         "money = make_rounder(2)")
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        return money(model_input['x'])")
    k.ok("%model_load")
    assert k.ok('%model_predict {"x": 3.14159}').result == "3.14"
    assert "Replayed 1 recorded prediction" in k.ok("%model_export out").stdout
    assert "money = make_rounder(2)" in (tmp_path / "out/model/model.py").read_text()
    assert re.search(r"money +variable +cell 2 +used by Model; source\n", k.ok("%model_show --why").stdout)
    k.ok("def make_acc():\n    seen = []\n    def acc(x):\n        seen.append(x)\n        return len(seen)\n"
         "    return acc\n\nacc = make_acc()")
    k.ok("acc(1)")
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        return money(model_input['x']) + acc(0)")
    message = usage_error(k.execute("%model_export out2"))
    assert "`acc`" in message and "defines inside `make_acc`" in message, message
    assert not (tmp_path / "out2").exists()


def test_a_load_that_opens_a_relative_data_path_is_checked_where_truss_runs_it(tmp_path, fresh_kernel):
    """Truss runs the model in the directory's root (/app: model/, data/, config.yaml), so `open('data/labels.txt')`
    in load() works deployed; the fresh-process check runs where those paths resolve the same (it refused, from an
    empty folder), and what load() writes there stays out of the export."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "labels.txt").write_text("red green\n")
    k = fresh_kernel(cwd=tmp_path)
    k.ok("%load_ext kernel_magics")
    k.ok("%%model\nclass Model:\n    def load(self):\n        with open('data/labels.txt') as f:\n"
         "            self.labels = f.read().split()\n        with open('written_by_load.txt', 'w') as f:\n"
         "            f.write('scratch')\n"
         "    def predict(self, model_input):\n        return {'labels': self.labels}\n")
    k.ok("%model_load\n%model_predict {}")
    exported = k.ok("%model_export out").stdout  # (the notebook's data/ folder is the export's data/)
    assert "Replayed 1 recorded prediction" in exported, exported
    assert sorted(p.name for p in (tmp_path / "out" / "data").iterdir()) == ["labels.txt"]
    assert not list((tmp_path / "out").rglob("written_by_load.txt"))


def test_a_load_that_opens_a_file_beside_the_notebook_is_told_how_to_ship_it(tmp_path, fresh_kernel):
    """load() opens `labels.txt` beside the notebook, which a deployment (run in the exported directory) lacks:
    the refusal says to move it into data/ and read it from there, as the notebook can too (also where --data
    copied it, which the notebook's load() does not read); a file missing from data/ is named by the export's path,
    not the hidden build folder's."""
    (tmp_path / "labels.txt").write_text("red green\n")
    k = fresh_kernel(cwd=tmp_path, load_ext=True)
    k.ok("%%model\nclass Model:\n    def load(self):\n        self.labels = open('labels.txt').read().split()\n"
         "    def predict(self, model_input):\n        return self.labels")
    k.ok("%model_load\n%model_predict {}")
    message = usage_error(k.execute("%model_export out"))
    advice = ("load() reads `labels.txt` from the working directory: it is beside the notebook, but a deployment runs in "
              "the exported directory, where only data/ goes with the model{}. Move it into a data/ folder beside the "
              "notebook and read it in load() as `data/labels.txt`: the notebook and the deployment both find it there")
    assert advice.format("") in message, message
    message = usage_error(k.execute("%model_export out --data labels.txt"))
    assert advice.format(" (--data copied it there, as data/labels.txt)") in message, message
    k.ok("%%model\nclass Model:\n    def load(self):\n        self.labels = open('data/labels.txt').read().split()\n"
         "    def predict(self, model_input):\n        return self.labels")
    (tmp_path / "data").mkdir()
    (tmp_path / "labels.txt").rename(tmp_path / "data" / "labels.txt")
    k.ok("%model_load\n%model_predict {}")
    (tmp_path / "data" / "labels.txt").rename(tmp_path / "data" / "moved.txt")
    message = usage_error(k.execute("%model_export out"))
    assert "`data/labels.txt` is not in the export" in message and ".building-" not in message, message
    k.ok("%%model\nclass Model:\n    def __init__(self, data_dir):\n        self.data = data_dir\n"
         "    def load(self):\n        self.labels = (self.data / 'labels.txt').read_text().split()\n"
         "    def predict(self, model_input):\n        return self.labels")
    (tmp_path / "data" / "moved.txt").rename(tmp_path / "data" / "labels.txt")
    k.ok("%model_load\n%model_predict {}")
    (tmp_path / "data" / "labels.txt").rename(tmp_path / "data" / "moved.txt")
    message = usage_error(k.execute("%model_export out"))  # (data_dir: an absolute path, in the build folder)
    assert f"No such file or directory: '{tmp_path / 'out' / 'data' / 'labels.txt'}'" in message, message
    assert "`data/labels.txt` is not in the export" in message and ".building-" not in message, message
    (tmp_path / "data" / "moved.txt").rename(tmp_path / "data" / "labels.txt")
    assert "Replayed 1 recorded prediction" in k.ok("%model_export out").stdout


def test_why_lists_what_a_cell_sets_on_a_module_beside_the_notebook_before_any_export(tmp_path, fresh_kernel):
    """%model_show --why names the attributes a cell visibly sets on a local module (they travel as values set
    after the import) and says how the module itself travels, without waiting for an export to measure them."""
    (tmp_path / "helper.py").write_text("SCALE = 2\n\n\ndef scale(x):\n    return x * SCALE\n")
    k = fresh_kernel(cwd=tmp_path)
    k.ok("%load_ext kernel_magics\nimport helper")
    k.ok("helper.SCALE = 3")
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        return helper.scale(model_input['x'])\n")
    why = k.ok("%model_show --why").stdout
    assert re.search(r"helper +import +cell 1 +used by Model; source \(a module beside the notebook: it travels in "
                     r"packages/", why), why
    assert re.search(r"helper.SCALE +attribute +cell 1 +used by the module helper; value \(literal\): changed by "
                     r"`helper.SCALE = 3` in cell 2, line 1", why), why
    k.ok("%model_export out")
    done = cli("predict", tmp_path / "out", "-d", '{"x": 5}', cwd=tmp_path)
    assert (done.returncode, done.stdout) == (0, "15\n"), done.stderr


def test_a_registry_a_class_the_model_does_not_use_filled_or_an_array_drawn_by_a_class_body_is_refused(tmp_path,
                                                                                                      fresh_kernel):
    """`__init_subclass__` fills `Base.registry` with `A` and `B`; the model uses `A` and the registry, so model.py
    defines `Base` and `A` only, and its registry lacks `B` (it answered ['A'] where the notebook answers ['A', 'B'],
    silently: a class attribute holding classes was not compared). Refused naming the attribute; with `B` named in
    the model, it exports."""
    k = fresh_kernel(cwd=tmp_path)
    k.ok("%load_ext kernel_magics\nclass Base:\n    registry = {}\n    def __init_subclass__(cls, **kw):\n"
         "        super().__init_subclass__(**kw)\n        Base.registry[cls.__name__] = cls")
    k.ok("class A(Base):\n    pass\n\nclass B(Base):\n    pass")
    model = "%%model\nclass Model:\n    def predict(self, model_input):\n        return {}"
    k.ok(model.format("[A.__name__, sorted(Base.registry)]"))
    why = usage_error(k.execute("%model_export out --no-replay"))
    assert "its attribute `registry` is {'A': <class 'model.model.A'>}, the notebook has" in why, why
    assert "registered itself there (`__init_subclass__`)" in why, why
    k.ok(model.format("[A.__name__, B.__name__, sorted(Base.registry)]"))
    assert "Exported `Model`" in k.ok("%model_export out --no-replay").stdout
    # A registry a decorator fills (`REGISTRY = {}`, `@register('a') def fa`): saved, it loaded after the defs that
    # fill it (a NameError, refused with advice that did not apply); now model.py fills it as the notebook did, with
    # the decorated defs the model does not name, and the fresh process compares it.
    k.ok("REGISTRY = {}\ndef register(name):\n    def deco(fn):\n        REGISTRY[name] = fn\n        return fn\n"
         "    return deco")
    k.ok("@register('a')\ndef fa(x):\n    return x + 1")
    k.ok(model.format("REGISTRY['a'](1)"))
    assert "Exported `Model`" in k.ok("%model_export out --force --no-replay").stdout
    done = cli("predict", tmp_path / "out", "-d", "{}", cwd=tmp_path)
    assert (done.returncode, done.stdout.strip()) == (0, "2"), done.stderr
    # An array its body draws (`W = np.random.rand(3)`): model.py draws another; it was not compared (only literal
    # class attributes were), and the export answered with other weights, silently.
    k.ok("import numpy as np\nclass K:\n    W = np.random.rand(3)")
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        return float(K.W.sum())")
    why = usage_error(k.execute("%model_export out --force --no-replay"))
    assert re.search(r"its attribute `W` is an array of shape \(3,\) \(float64\) \(checksum \w+\), the notebook has",
                     why), why
    assert "computes something else at every run (random numbers" in why, why
    # A default its def draws: function and method defaults were not compared either.
    k.ok("import random\ndef f(s=random.random(), w=np.ones(2)):\n    return s\n\n"
         "class R:\n    def get(self, s=random.random()):\n        return s")
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        return f()")
    why = usage_error(k.execute("%model_export out --force --no-replay"))
    assert "`f` (a function from cell" in why and "its def run again in model.py gives other defaults" in why, why
    assert re.search(r"its attribute `defaults` is \([0-9.]+, array\(\[1\., 1\.\]\)\), the notebook has", why), why
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        return R().get()")
    why = usage_error(k.execute("%model_export out --force --no-replay"))
    assert re.search(r"its attribute `get` is a method with the defaults \([0-9.]+,\), the notebook has", why), why
