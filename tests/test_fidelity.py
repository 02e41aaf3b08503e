"""State fidelity: what the notebook computed reaches the deployment, and every export proves it.

Each case trains or changes something in a real kernel, records predictions, exports with
%model_export, then serves the export with `kernel-magics serve` and with Truss 0.18.36's own server
(with the model's libraries installed, as a deployment has them): both must answer as the notebook
did. The same notebook exported by the CLI (no live values) must be refused, saying where and why.
"""

import json
import textwrap

import httpx
import pytest

from server_harness import serve_ours, serve_truss, truss_venv_with_models
from test_export import cli, files_of, leftovers, run_notebook_cells, usage_error, write_notebook


CASES = {
    "fitted pipeline": ([
        "from sklearn.datasets import load_wine\nfrom sklearn.linear_model import LogisticRegression\n"
        "from sklearn.pipeline import make_pipeline\nfrom sklearn.preprocessing import StandardScaler",
        "X, y = load_wine(return_X_y=True)\npipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))",
        "pipe.fit(X, y)",
        textwrap.dedent("""\
            %%model
            class Model:
                def load(self):
                    self.pipe = pipe
                def predict(self, model_input):
                    rows = model_input["rows"]
                    return {"labels": [int(v) for v in self.pipe.predict(rows)],
                            "proba": self.pipe.predict_proba(rows).tolist()}
            """),
    ], [{"rows": [[13.2, 1.78, 2.14, 11.2, 100, 2.65, 2.76, 0.26, 1.28, 4.38, 1.05, 3.4, 1050]]},
        {"rows": [[12.37, 0.94, 1.36, 10.6, 88, 1.98, 0.57, 0.28, 0.42, 1.95, 1.05, 1.82, 520],
                  [12.86, 1.35, 2.32, 18.0, 122, 1.51, 1.25, 0.21, 0.94, 4.1, 0.76, 1.29, 630]]}],
        "`pipe.fit(X, y)` (line 1)", ["scikit-learn==", "skops=="], "skops"),
    "weights changed in place": ([
        "import torch\nfrom transformers import GPT2Config, GPT2LMHeadModel",
        "cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)",
        "torch.manual_seed(0); lm = GPT2LMHeadModel(cfg)\nwith torch.no_grad():\n"
        "    lm.transformer.wte.weight.mul_(3.0)\nlm.eval()",
        textwrap.dedent("""\
            %%model
            class Model:
                def load(self):
                    self.lm = lm
                def predict(self, model_input):
                    ids = torch.tensor([model_input["ids"]])
                    with torch.no_grad():
                        logits = self.lm(ids).logits[0, -1]
                    return {"next": int(logits.argmax()), "score": float(logits.max())}
            """),
    ], [{"ids": [1, 2, 3]}, {"ids": [5, 9, 40, 2]}],
        "`lm.transformer.wte.weight.mul_(3.0)` (line 3)", ["torch==", "transformers==", "safetensors=="],
        "safetensors weights; the module is rebuilt from its source"),
    "dict and data frame changed": ([
        "import pandas as pd",
        "LABELS = {0: 'nebbiolo', 1: 'grignolino', 2: 'dolcetto'}\n"
        "df = pd.DataFrame({'a': [1.0, 2.0, 3.0], 'b': [2.0, 4.0, 8.0]})",
        "df['ratio'] = df.a / df.b\nLABELS[2] = 'barbera'",
        textwrap.dedent("""\
            %%model
            class Model:
                def predict(self, model_input):
                    i = model_input["i"]
                    return {"label": LABELS[i], "ratio": float(df["ratio"][i])}
            """),
    ], [{"i": 2}, {"i": 0}],
        # (the dict item alone the CLI carries now, as a statement after the literal: the data frame it cannot)
        "`df['ratio'] = df.a / df.b` (line 1)", ["pandas=="], "pickle"),
}


def predict_cells(inputs):
    return [f"import json as _j\nprint(_j.dumps(get_ipython().run_line_magic('model_predict', {json.dumps(i)!r})))"
            for i in inputs]


@pytest.mark.parametrize("case", list(CASES))
def test_the_export_answers_as_the_notebook_did_on_both_servers(tmp_path, case, truss_validate):
    cells, inputs, change, pins, fmt = CASES[case]
    path = write_notebook(tmp_path / "nb.ipynb", ["%load_ext kernel_magics", *cells, "%model_load",
                                                   *predict_cells(inputs), "%model_export out", "%model_show --why"])
    k, results = run_notebook_cells(path)
    k.shutdown()
    answers = [json.loads(r.stdout.strip().splitlines()[-1]) for r in results[-2 - len(inputs):-2]]
    exported, why = results[-2].stdout, results[-1].stdout
    assert f"Replayed {len(inputs)} recorded predictions in a fresh Python" in exported
    assert fmt in why  # %model_show --why says how the value travels, and why
    config = (tmp_path / "out" / "config.yaml").read_text()
    for pin in pins:
        assert pin in config, config
    assert "example_model_input" in config and "__main__" not in (tmp_path / "out/model/model.py").read_text()
    truss_validate(tmp_path / "out")
    with serve_ours(tmp_path / "out") as ours:
        assert [httpx.post(ours.predict_url(), json=i).json() for i in inputs] == answers
    venv = truss_venv_with_models()
    if venv is not None:
        with serve_truss(tmp_path / "out", venv=venv) as theirs:
            assert [httpx.post(theirs.predict_url(), json=i).json() for i in inputs] == answers
    # Without the kernel's values, the file alone cannot give these answers: the CLI refuses, saying why.
    done = cli("export", path, tmp_path / "from-cli")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert change in done.stderr and "%model_export" in done.stderr
    assert not (tmp_path / "from-cli").exists() and leftovers(tmp_path) == []


def test_every_value_changed_after_the_recorded_prediction_is_named(tmp_path, fresh_kernel):
    """Four values changed after the prediction: the refusal names all four, not the first it finds (the user
    would fix one and meet the next refusal), each with its change: one changed in place, one defined again, one
    changed through the object it was handed to (a ChainMap writes into its first map, as an optimizer's step
    writes into the parameters it was given), one through an alias. Not named: a cell re-run unchanged, a literal
    defined again to the same value, and a
    module the model imports (`collections.OrderedDict()` changes nothing the export carries)."""
    k = fresh_kernel(cwd=tmp_path, load_ext=True)
    k.ok("import collections\nOFFSET = {'bias': 0}\nSCALE = 2\nEXTRA = {}\nview = collections.ChainMap(EXTRA)\n"
         "NAMES = []\nBASE = 0")
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n"
         "        return model_input['x'] * SCALE + OFFSET['bias'] + len(collections.Counter(EXTRA)) + len(NAMES) + BASE")
    k.ok("%model_load")
    assert k.ok('%model_predict {"x": 1}').result == "2"
    k.ok("SCALE = 2\nBASE = 0 * 1")  # defined again, with the same source or to the same value: no cause
    usage_error(k.execute("%%model_config\nmodel_nam: typo"))  # a failed cell magic still counts as In[7]
    k.ok("SCALE = 3\nOFFSET['bias'] = 1\nview.update(a=1)\ncollections.OrderedDict()")
    k.ok("more = NAMES\nmore.append('x')")
    message = usage_error(k.execute("%model_export out"))
    assert "`OFFSET` (`OFFSET['bias'] = 1` in cell 8, line 2)" in message, message
    assert "`SCALE` (cell 8 defines it again: `SCALE = 3`)" in message, message
    assert ("`EXTRA` (`view.update(a=1)` in cell 8, line 3, through `view`, which holds `EXTRA` (cell 2, line 5))"
            in message), message
    assert ("`NAMES` (`more.append('x')` in cell 9, line 2, through `more`, which holds `NAMES` (cell 9, line 1))"
            in message), message
    assert "`collections`" not in message and "`BASE`" not in message, message
    assert "for the current values, then export again; --no-replay skips" in message, message
    assert "Fix that" not in message, message  # the remedy is said once
    assert "changed after this prediction was recorded; the export carries their values now" in message, message
    assert not (tmp_path / "out").exists()


def test_a_prediction_recorded_before_the_model_was_loaded_again_is_named_as_the_cause(tmp_path, fresh_kernel):
    """A hot swap that changes load() keeps what the old load() made (and says so): a prediction made then, and
    %model_load run after it, answers otherwise than the export's fresh load(). The refusal says that, and to
    predict again; predicting it again after the load lets the export go ahead."""
    load = "%%model\nclass Model:\n    def load(self):\n        self.tag = '{}'\n    def predict(self, x):\n" \
           "        return {{'tag': self.tag}}"
    k = fresh_kernel(cwd=tmp_path, load_ext=True)
    k.ok(load.format("v1"))
    k.ok("%model_load")
    assert "`load` changed" in k.ok(load.format("v2")).stdout
    k.ok('%model_predict {"x": 1}')  # cell 5: answered from the old load()
    k.ok("%model_load")  # cell 6
    message = usage_error(k.execute("%model_export out"))
    assert ("Most likely cause: %model_load ran again in cell 6, after this prediction was recorded: the notebook "
            "answered from what an earlier load() made, the export from a fresh load(). Predict that input again "
            "(%model_predict with the same input: its latest answer replaces the one recorded; `%model_predict "
            "--again` predicts every recorded input again; running the %%model cell again clears the record) to "
            "record answers of the model as it is loaded now") in message, message
    assert not (tmp_path / "out").exists()
    k.ok('%model_predict {"x": 1}')
    # The same input predicted again replaces the earlier answer in the record: the export goes ahead.
    assert "Replayed 1 recorded prediction in a fresh Python" in k.ok("%model_export out").stdout


def test_a_call_a_value_load_read_was_passed_to_after_the_load_is_no_change(tmp_path, fresh_kernel):
    """Saving the config with json.dump after %model_load changes nothing load() read: the export goes ahead (the
    refusal of a value load() read and a cell changed since counts only a binding or a change in sight)."""
    k = fresh_kernel(cwd=tmp_path, load_ext=True)
    k.ok("import json, os\nCONFIG = {'t': 0.5}")
    k.ok("%%model\nclass Model:\n    def load(self):\n        self.t = CONFIG['t']\n"
         "    def predict(self, model_input):\n        return model_input['p'] >= self.t")
    k.ok("%model_load")
    k.ok("with open(os.devnull, 'w') as f:\n    json.dump(CONFIG, f)")
    k.ok('%model_predict {"p": 0.7}')
    assert "Replayed 1 recorded prediction" in k.ok("%model_export out").stdout


def test_predict_again_records_every_input_anew_after_a_retrain(tmp_path, fresh_kernel):
    """A new user retrained and met the replay's refusal for each old answer in turn, predicting each input again
    by hand. `%model_predict --again` predicts every recorded input again, says which answers changed, and the
    export then replays the new ones."""
    k = fresh_kernel(cwd=tmp_path, load_ext=True)
    k.ok("W = {'w': 1}")
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        return {'y': model_input['x'] * W['w']}")
    k.ok("%model_load")
    for x in (1, 0, 2):
        k.ok(f'%model_predict {{"x": {x}}}')
    k.ok("W['w'] = 5")  # the retrain
    message = usage_error(k.execute("%model_export out"))
    assert "`%model_predict --again` predicts every recorded input again" in message, message
    again = k.ok("%model_predict --again")
    assert again.result is None and again.stdout == (
        'Predicted the 3 recorded inputs again; 2 answer differently now, and the record keeps the new answers (the '
        'export replays them):\n  {"x": 1}: {"y": 1} then, {"y": 5} now\n  {"x": 2}: {"y": 2} then, {"y": 10} now\n'
    ), again.stdout
    assert "Replayed 3 recorded predictions in a fresh Python" in k.ok("%model_export out").stdout
    assert k.ok("%model_predict --again").stdout == "Predicted the 3 recorded inputs again: each answers as recorded.\n"
    assert "takes no input" in usage_error(k.execute('%model_predict --again {"x": 1}'))


@pytest.mark.parametrize("recorded", [0.4, 0.1], ids=["the replay differs", "the replay passes by chance"])
def test_a_value_load_read_and_a_cell_changed_after_the_load_is_named_as_the_cause(tmp_path, fresh_kernel, recorded):
    """load() copies THRESH; a later cell sets THRESH again, then a prediction answers from the copy. The export's
    load() reads the new value: refused (rightly), and the cause named is that change, not a guess at randomness
    or files; the remedy given (load again, predict again) lets the export go ahead. A global that only predict
    reads, changed at the same place, is not named (the prediction read it as the export does). Refused too when no
    recorded answer shows it (a new user's replay passed by chance, and the deployment answered otherwise)."""
    k = fresh_kernel(cwd=tmp_path, load_ext=True)
    k.ok("THRESH = 0.5\nSCALE = 1")
    k.ok("%%model\nclass Model:\n    def load(self):\n        self.th = THRESH\n"
         "    def predict(self, model_input):\n        return {'positive': model_input['p'] * SCALE >= self.th}")
    k.ok("%model_load")  # cell 4
    k.ok("THRESH = 0.9\nSCALE = 2")  # cell 5
    k.ok(f'%model_predict {{"p": {recorded}}}')
    message = usage_error(k.execute("%model_export out"))
    assert ("`THRESH` (cell 5 defines it again: `THRESH = 0.9`) changed after %model_load ran (cell 4), and load() "
            "reads it: the notebook's loaded model still holds what its load() read then") in message, message
    assert "`SCALE`" not in message and "randomness" not in message, message
    assert "Run %model_load again (then `%model_predict --again`" in message, message
    assert not (tmp_path / "out").exists()
    k.ok("%model_load")
    k.ok("%model_predict --again")
    assert "Replayed 1 recorded prediction" in k.ok("%model_export out").stdout


def test_a_value_changed_after_the_recorded_predictions_fails_the_replay(tmp_path, fresh_kernel):
    k = fresh_kernel(cwd=tmp_path)
    k.ok("%load_ext kernel_magics")
    k.ok("WORDS = ['red', 'green', 'blue']")
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        return WORDS[model_input['i']]")
    k.ok("%model_load")
    assert k.ok('%model_predict {"i": 1}').result == "'green'"
    k.ok("%model_export out")
    before = files_of(tmp_path / "out")
    k.ok("WORDS[1] = 'teal'")  # after the prediction was recorded
    message = usage_error(k.execute("%model_export out --force"))
    assert "does not answer as the notebook did, so nothing was exported" in message
    assert "The notebook answered \"green\"; the export answers \"teal\"" in message
    assert "`WORDS` (`WORDS[1] = 'teal'` in cell 7, line 1) changed after this prediction was recorded" in message, message
    assert files_of(tmp_path / "out") == before and leftovers(tmp_path) == []  # the previous export stays
    skipped = k.ok("%model_export out --force --no-replay").stdout
    assert "Replay skipped (--no-replay)" in skipped and "WORDS = ['red', 'teal', 'blue']" in (
        tmp_path / "out/model/model.py").read_text()
    k.ok('%model_predict {"i": 1}')  # a fresh record for the current values
    assert "Replayed 1 recorded prediction" in k.ok("%model_export out --force").stdout


def test_a_name_a_later_star_import_binds_again_travels_as_the_notebook_has_it(tmp_path, fresh_kernel):
    """`def log` then `from math import *`: the notebook's `log` is math's. The export used to keep the def, and
    answered "LOG: 100" where the notebook answered 4.605 (silently, with no prediction recorded yet)."""
    k = fresh_kernel(cwd=tmp_path, load_ext=True)
    k.ok("def log(msg):\n    return f'LOG: {msg}'")
    k.ok("from math import *")
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        return {'y': log(model_input['x'])}")
    k.ok("%model_load")
    assert k.ok('%model_predict {"x": 100}').result == "{'y': 4.605170185988092}"
    assert "Replayed 1 recorded prediction" in k.ok("%model_export out").stdout
    text = (tmp_path / "out/model/model.py").read_text()
    assert "from math import *" in text and "LOG:" not in text, text


def test_a_value_that_cannot_be_saved_refuses_the_export_naming_it(tmp_path, fresh_kernel):
    k = fresh_kernel(cwd=tmp_path)
    k.ok("%load_ext kernel_magics\nimport threading")
    k.ok("guard = threading.Lock()\nguard.acquire()")
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        return guard.locked()")
    message = usage_error(k.execute("%model_export out"))
    assert "`guard` (a _thread.lock)" in message and "`guard.acquire()` in cell" in message
    assert "cannot be pickled" in message and "inside `load()`" in message
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_truss_compatibility_warnings_in_the_notebook(tmp_path, fresh_kernel):
    k = fresh_kernel(cwd=tmp_path)
    k.ok("%load_ext kernel_magics\nimport numpy as np")
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        return {'ok': np.bool_(True)}")
    k.ok("%model_load")
    warned = k.ok("%model_predict {}").stdout
    assert "Truss's own server could not send this result: a numpy.bool at the result['ok']" in warned
    assert "warning" not in k.ok("%model_predict {}").stdout  # once per definition
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        yield {'token': 1}")
    assert "Truss's own server streams only str or bytes" in k.ok("%model_predict {}").stdout
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        return float('nan')")
    assert k.ok("%model_predict {}").result == "nan"  # NaN passes, as Truss's server sends it


def test_load_runs_in_a_worker_thread_as_on_the_servers(kernel):
    kernel.ok("import asyncio, threading\nasync def fetch():\n    await asyncio.sleep(0)\n    return 'fetched'")
    kernel.ok("%%model\nclass Model:\n    def load(self):\n        self.v = asyncio.run(fetch())\n"
              "        self.thread = threading.current_thread().name\n"
              "    def predict(self, model_input):\n        return [self.v, self.thread]")
    kernel.ok("%model_load")
    assert kernel.ok("%model_predict {}").result == "['fetched', 'model-load']"
    ex = kernel.execute("%%model\nclass Model:\n    async def load(self):\n        pass\n"
                        "    def predict(self, model_input):\n        return 1")
    assert ex.reply["ename"] == "UsageError" and "Truss 0.18 never awaits load()" in ex.reply["evalue"]


def test_the_cli_says_which_of_several_exports_it_follows_and_refuses_when_they_differ(tmp_path):
    """A notebook with two %model_export cells: the CLI exports the model as it is at the first and says so; when
    a %%model cell between them defines the model anew, the file does not say which one is meant: it refuses."""
    model = "%%model\nclass Model:\n    def predict(self, model_input):\n        return {'v': VERSION}"
    path = write_notebook(tmp_path / "nb.ipynb", ["%load_ext kernel_magics\nVERSION = 1", model, "%model_export a",
                                                  "print('plot')", "%model_export b"])
    done = cli("export", path, tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert ("note: nb.ipynb has 2 %model_export cells (code cells 3 and 5); this exports the model as it is at the "
            "first one (cell 3): the cells after it are not read.") in done.stderr
    path = write_notebook(tmp_path / "nb2.ipynb", ["%load_ext kernel_magics\nVERSION = 1", model, "%model_export a",
                                                   model.replace("VERSION", "VERSION + 1"), "%model_export b"])
    done = cli("export", path, tmp_path / "out2")
    assert done.returncode == 1 and not (tmp_path / "out2").exists(), done.stderr
    assert ("has 2 %model_export cells (code cells 3, 5), and code cell 4 between them defines the model anew "
            "(%%model)") in done.stderr, done.stderr


def test_the_replay_compares_floats_with_a_tolerance_fitting_the_answer():
    """A float32 model's answer (it holds a float32 number) is compared at float32's noise, a score it scaled in
    Python included, with an absolute tolerance near zero; a float64 answer, or a timestamp beside float32 numbers,
    still differs a second later."""
    np = pytest.importorskip("numpy")
    from kernel_magics.core.replay import compare

    prob, noisy = float(np.float32(0.3)), float(np.float32(0.3) + np.float32(1e-7))  # the last digits of float32
    assert compare({"p": prob, "pct": prob * 100, "zero": 0.0}, {"p": noisy, "pct": noisy * 100, "zero": 4e-7}) is None
    assert "['pct']" in compare({"p": prob, "pct": prob * 100}, {"p": prob, "pct": prob * 101})  # a real difference
    assert "['t']" in compare({"p": prob, "t": 1.7e9}, {"p": prob, "t": 1.7e9 + 1})  # a timestamp a second later
    assert "['x']" in compare({"x": 0.1, "y": 0.5}, {"x": 0.1 + 1e-9, "y": 0.5})  # float64 (0.5 says nothing)
    assert compare({"x": 0.1}, {"x": 0.1 + 1e-12}) is None and compare([0.0], [1e-13]) is None  # float64 noise
    # The tolerance follows the notebook's answer: an export that answers in float32 where the notebook answered in
    # float64 (a value saved at lower precision) is another answer.
    exact = [0.123456789012345, 0.987654321098765]
    assert compare(exact, [float(np.float32(x)) for x in exact]) is not None
