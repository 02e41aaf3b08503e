"""The command line, run as a real subprocess (export and validate are covered in test_export)."""

import subprocess
import sys

import pytest


def test_help_lists_commands_and_imports_nothing_heavy():
    out = subprocess.run([sys.executable, "-m", "kernel_magics.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "export" in out.stdout and "validate" in out.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from kernel_magics import cli; "
         "print(sorted(m for m in ('torch', 'fastapi', 'IPython', 'pydantic', 'yaml') if m in sys.modules))"],
        capture_output=True, text=True,
    )
    assert probe.stdout.strip() == "[]"


def test_unknown_command_is_a_usage_error():
    out = subprocess.run([sys.executable, "-m", "kernel_magics.cli", "deploy"], capture_output=True, text=True)
    assert out.returncode == 2 and "invalid choice: 'deploy'" in out.stderr


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_a_port_out_of_range_is_a_usage_error_not_a_traceback(tmp_path, port):
    out = subprocess.run([sys.executable, "-m", "kernel_magics.cli", "serve", str(tmp_path), "--port", port],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (f"kernel-magics serve: error: argument --port: {port!r} is not a port "
                                                   "number: give one from 0 to 65535 (0 lets the system pick a free one)")


def test_labextension_is_installed_prebuilt_and_enabled():
    from pathlib import Path

    jupyter = Path(sys.executable).parent / "jupyter"
    out = subprocess.run([str(jupyter), "labextension", "list"], capture_output=True, text=True)
    line = next((l for l in (out.stdout + out.stderr).splitlines() if "kernel-magics" in l), "")
    assert "enabled" in line and "OK" in line and "(python, kernel-magics)" in line, out.stdout + out.stderr


# ---------------------------------------------------------------- export reads what a stream saved

STREAMING_CELLS = [
    "%load_ext kernel_magics",
    "%%model\nclass Model:\n    def predict(self, model_input):\n        for word in model_input['text'].split():\n"
    "            yield {'word': word} if model_input.get('as_json') else word.upper() + ' '\n",
    "%model_load",
    '%model_predict {"text": "hello streaming world"}  # text chunks',
    '%%predict\n{"text": "json lines", "as_json": True}',
]


def run_notebook(path, cells, widgets: bool):
    """Execute ``cells`` headlessly (nbclient, as nbconvert does) and save them with their outputs."""
    import nbformat
    from nbclient import NotebookClient

    if widgets:  # the outputs JupyterLab saves: the stream view, replaced by its final state
        cells = [cells[0] + "\n%config ModelMagics.widgets = 'always'", *cells[1:]]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    nbformat.write(nb, path)
    return nb


def edit_saved_stream(path, change) -> None:
    """Change the text a %model_predict stream saved (the view's text/plain, or the printed stdout)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for output in nb.cells[3].outputs:
        if output.get("name") == "stdout":
            output["text"] = change(output["text"])
        elif "text/plain" in output.get("data", {}):
            output["data"]["text/plain"] = change(output["data"]["text/plain"])
    nbformat.write(nb, path)


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "kernel_magics.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


@pytest.mark.parametrize("widgets", [False, True], ids=["printed", "stream-view"])
def test_export_of_a_streaming_notebook_replays_its_saved_streams(tmp_path, widgets):
    import json

    path = tmp_path / "streams.ipynb"
    nb = run_notebook(path, STREAMING_CELLS, widgets)
    saved = json.dumps(nb.cells[3].outputs)
    assert "execute_result" not in saved and "HELLO STREAMING WORLD" in saved  # a stream leaves no Out[n]
    done = cli("export", path, tmp_path / "out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Replayed 2 recorded predictions" in done.stdout
    # The replay is real: a saved stream that the model does not give makes the export refuse.
    edit_saved_stream(path, lambda text: text.replace("HELLO STREAMING WORLD", "HELLO STREAMING WORLD!"))
    done = cli("export", path, tmp_path / "out2", cwd=tmp_path)
    assert done.returncode == 1 and "HELLO STREAMING WORLD!" in done.stderr, done.stdout + done.stderr
    assert not (tmp_path / "out2").exists()


def test_a_prediction_on_the_last_line_of_a_cell_is_replayed_as_the_kernel_replays_it(tmp_path):
    """`%model_load` and `%model_predict {...}` in one cell (the README's quickstart): the cell's Out[n] is the
    prediction's, and the CLI replays it and writes example_model_input, as %model_export of the same notebook
    does (the CLI said "No predictions recorded yet" and wrote other bytes)."""
    path = tmp_path / "same-cell.ipynb"
    run_notebook(path, [
        "%load_ext kernel_magics",
        "%%model\nclass Model:\n    def predict(self, model_input):\n        return {'y': model_input['x'] * 2}",
        '%model_load\n%model_predict {"x": 21}',
        'if True:\n    %model_predict {"x": 5}',  # inside a block: no Out[n], nothing to replay
        'x = 1\n%model_predict {"x": 2}  # a comment',
        "%model_export out-kernel",
    ], widgets=False)
    done = cli("export", path, tmp_path / "out-cli", cwd=tmp_path)
    assert done.returncode == 0 and "Replayed 2 recorded predictions" in done.stdout, done.stdout + done.stderr
    for name in ("config.yaml", "model/model.py"):  # (model.py's first line names the notebook: nbclient's
        # kernel is not told its notebook's name, as Jupyter's are)
        cli_text, kernel_text = ((tmp_path / out / name).read_text().split("\n", 1)[1] for out in ("out-cli", "out-kernel"))
        assert cli_text == kernel_text, name
    assert "example_model_input:\n    x: 21\n" in (tmp_path / "out-cli/config.yaml").read_text()


def test_a_stopped_or_failed_saved_stream_is_not_replayed(tmp_path):
    path = tmp_path / "stopped.ipynb"
    run_notebook(path, STREAMING_CELLS[:4], widgets=False)
    edit_saved_stream(path, lambda text: text.replace("[done:", "[stopped:"))
    done = cli("export", path, tmp_path / "out", cwd=tmp_path)
    assert done.returncode == 0 and "No predictions recorded yet" in done.stdout, done.stdout + done.stderr


# ---------------------------------------------------------------- predict, completion, help, exit codes

PREDICT_CELLS = [
    "%load_ext kernel_magics",
    "%%model\nimport pathlib\n\n\nclass Model:\n    def load(self):\n        print('loading weights')\n"
    "        self.scale = 2\n\n    def predict(self, model_input):\n        if 'gate' in model_input:\n"
    "            return self.wait_for(model_input['gate'])\n        if model_input.get('fail'):\n"
    "            raise ValueError('bad input')\n        print('predicting')\n"
    "        return {'y': model_input['x'] * self.scale}\n\n    def wait_for(self, gate):\n        yield 'first '\n"
    "        while not pathlib.Path(gate).exists():\n            pass\n        yield 'second'\n",
]


def test_an_export_of_cells_run_out_of_order_says_so_when_the_replay_differs(tmp_path):
    """`SCALE = 5` run again after `SCALE = 2` further down (the saved In [N] show it): the notebook answered 5, the
    CLI reads the cells top to bottom and answers 2. The refusal blamed files and randomness; it now names the two
    cells and says to run the notebook from the top, or --execute."""
    import nbformat

    cells = [("%load_ext kernel_magics", 1), ("SCALE = 5", 5),
             ("%%model\nclass Model:\n    def predict(self, model_input):\n        return {'y': model_input['x'] * SCALE}",
              2), ("%model_load", 3), ("SCALE = 2", 4), ('%model_predict {"x": 1}', 6)]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c, execution_count=n) for c, n in cells])
    nb.cells[-1].outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "{'y': 5}"}, execution_count=6)]
    nbformat.write(nb, tmp_path / "nb.ipynb")
    done = cli("export", tmp_path / "nb.ipynb", tmp_path / "out", cwd=tmp_path)
    assert done.returncode == 1 and not (tmp_path / "out").exists(), done.stdout + done.stderr
    assert ("the notebook's cells ran in another order than the file lists them (code cell 2 ran as In [5], after "
            "code cell 3 below it, which ran as In [2])") in done.stderr, done.stderr
    assert "Restart & Run All" in done.stderr and "--execute" in done.stderr


def test_a_literal_a_later_cell_changes_is_exported_with_the_change_and_replayed(tmp_path):
    """A new user's notebook: `CONFIG = {...}`, then `CONFIG['round'] = 2` and `LABELS.append(...)` in later cells.
    The CLI refused it, even with a saved prediction; model.py now runs the same statements after the assignments,
    and the saved prediction proves the append (a cell run twice would have appended twice)."""
    path = tmp_path / "config.ipynb"
    cells = [
        "%load_ext kernel_magics",
        "CONFIG = {'round': 1, 'scale': 10}\nLABELS = ['low']",
        "%%model\nclass Model:\n    def predict(self, model_input):\n"
        "        return {'y': model_input['x'] * CONFIG['scale'] + CONFIG['round'], 'labels': LABELS}",
        "CONFIG['round'] = 2\nLABELS.append('high')",
        '%model_load\n%model_predict {"x": 3}',
    ]
    run_notebook(path, cells, widgets=False)
    done = cli("export", path, tmp_path / "out", cwd=tmp_path)
    assert done.returncode == 0 and "Replayed 1 recorded prediction" in done.stdout, done.stdout + done.stderr
    text = (tmp_path / "out/model/model.py").read_text()
    assert text.index("CONFIG = {") < text.index("class Model") < text.index("CONFIG['round'] = 2")
    # A prediction saved before the change answered from the value before it: the refusal names the change.
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nb.cells[3], nb.cells[4] = nb.cells[4], nb.cells[3]
    nb.cells[3].execution_count, nb.cells[4].execution_count = 4, 5  # (as a Run All of that order numbers them)
    result = next(o for o in nb.cells[3].outputs if o["output_type"] == "execute_result")
    result["data"]["text/plain"] = "{'y': 31, 'labels': ['low']}"
    nbformat.write(nb, tmp_path / "before.ipynb")
    done = cli("export", tmp_path / "before.ipynb", tmp_path / "out1", cwd=tmp_path)
    assert done.returncode == 1 and not (tmp_path / "out1").exists(), done.stdout + done.stderr
    assert ("Most likely cause: `CONFIG` (`CONFIG['round'] = 2` in cell 5, line 1) and `LABELS` "
            "(`LABELS.append('high')` in cell 5, line 2) changed after this prediction was saved (cell 4)") in done.stderr
    # Without the saved prediction the append is not proven (the round alone would be):
    nb = nbformat.read(path, as_version=4)
    nb.cells[-1].outputs = []
    nbformat.write(nb, path)
    done = cli("export", path, tmp_path / "out2", cwd=tmp_path)
    assert done.returncode == 1 and not (tmp_path / "out2").exists(), done.stdout + done.stderr
    assert "`LABELS.append('high')` (line 2), which leaves another value each time it runs" in done.stderr


def test_the_cli_replays_the_answers_predict_again_saved(tmp_path):
    """After a retrain, `%model_predict --again` records the new answers; the CLI read only `%model_predict INPUT`
    cells and refused the file with the old answers (a new user)."""
    path = tmp_path / "again.ipynb"
    run_notebook(path, [
        "%load_ext kernel_magics",
        "W = {'w': 1}",
        "%%model\nclass Model:\n    def predict(self, model_input):\n        return {'y': model_input['x'] * W['w']}",
        '%model_load\n%model_predict {"x": 2}',
        "W['w'] = 5",
        "%model_predict --again",
    ], widgets=False)
    done = cli("export", path, tmp_path / "out", cwd=tmp_path)
    assert done.returncode == 0 and "Replayed 1 recorded prediction" in done.stdout, done.stdout + done.stderr
    assert "example_model_input:\n    x: 2\n" in (tmp_path / "out/config.yaml").read_text()


def saved_notebook(path, cells):
    """A notebook file as Jupyter saves it: each cell with its In [N] and, for a prediction, its Out [N]."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    for source, count, *result in cells:
        cell = nbformat.v4.new_code_cell(source, execution_count=count)
        if result and result[0] == "error":
            cell.outputs = [nbformat.v4.new_output("error", ename="KeyError", evalue="'x'", traceback=[])]
        elif result:
            cell.outputs = [nbformat.v4.new_output("execute_result", {"text/plain": result[0]}, execution_count=count)]
        nb.cells.append(cell)
    nbformat.write(nb, path)
    return path


RULES = "%%model\nclass Model:\n    def predict(self, model_input):\n        return {'cut': Rules.cutoff, 'n': len(NAMES)}"


@pytest.mark.parametrize("case", ["ran after a cell below it", "may have run twice",
                                  "may have run twice, the gap not just before it", "stopped at an error",
                                  "never ran", "the model cell run again after the load below it",
                                  "a cell run again above one that only reads it"])
def test_the_cli_refuses_a_cell_it_reads_otherwise_than_it_ran(tmp_path, case):
    """The CLI reads the cells top to bottom, each once. A new user's `class Rules: cutoff = SCALE * 2.0` run again
    after `SCALE = 3.0` below it exported the cutoff of the file's order, silently; an append run twice (its In [N]
    follows a number no saved cell has) was carried once. Refused now, saying why; what the saved numbers show does
    not matter to model.py (the %%model cell run again after %model_load) exports. A number missing anywhere between
    the cell that set the list and the append counts, not only the one just before the append: run as In [4], the
    append ran again as In [6] after a cell that only prints ran as In [5] (a review: that was exported)."""
    cells = {
        "ran after a cell below it": [("SCALE = 2.0\nNAMES = ['a']", 1), ("class Rules:\n    cutoff = SCALE * 2.0", 4),
                                      ("SCALE = 3.0", 3), (RULES, 5), ("%model_load", 6),
                                      ('%model_predict {"x": 1}', 7, "{'cut': 6.0, 'n': 1}")],
        "may have run twice": [("SCALE = 2.0\nNAMES = ['a']", 1), ("class Rules:\n    cutoff = SCALE * 2.0", 2),
                               (RULES, 3), ("NAMES.append('b')", 5), ("%model_load", 6),
                               ('%model_predict {"x": 1}', 7, "{'cut': 4.0, 'n': 3}")],
        "may have run twice, the gap not just before it": [
            ("SCALE = 2.0\nNAMES = ['a']", 1), ("class Rules:\n    cutoff = SCALE * 2.0", 2), (RULES, 3),
            ("NAMES.append('b')", 6), ("print('trained')", 5), ("%model_load", 7),
            ('%model_predict {"x": 1}', 8, "{'cut': 4.0, 'n': 3}")],
        "stopped at an error": [("SCALE = 2.0\nNAMES = ['a']", 1), ("class Rules:\n    cutoff = SCALE * 2.0", 2),
                                (RULES, 3), ("{}['x']\nNAMES.append('b')", 4, "error"), ("%model_load", 5),
                                ('%model_predict {"x": 1}', 6, "{'cut': 4.0, 'n': 1}")],
        "never ran": [("SCALE = 2.0\nNAMES = ['a']", 1), ("class Rules:\n    cutoff = SCALE * 2.0", 2),
                      ("NAMES = ['b']", None), (RULES, 3), ("%model_load", 4),
                      ('%model_predict {"x": 1}', 5, "{'cut': 4.0, 'n': 1}")],
        "a cell run again above one that only reads it": [
            ("import math\nSCALE = 2.0\nNAMES = ['a']", 6), ("print(len(NAMES), math.pi)", 2),
            ("class Rules:\n    cutoff = SCALE * 2.0", 7), (RULES, 8), ("%model_load", 9),
            ('%model_predict {"x": 1}', 10, "{'cut': 4.0, 'n': 1}")],
        "the model cell run again after the load below it": [
            ("SCALE = 2.0\nNAMES = ['a']", 1), ("class Rules:\n    cutoff = SCALE * 2.0", 2), (RULES, 5),
            ("%model_load", 4), ('%model_predict {"x": 1}', 6, "{'cut': 4.0, 'n': 1}")],
    }[case]
    path = saved_notebook(tmp_path / "nb.ipynb", [("%load_ext kernel_magics", None), *cells])
    done = cli("export", path, tmp_path / "out", cwd=tmp_path)
    if case.startswith(("the model cell", "a cell run again above")):
        assert done.returncode == 0, done.stdout + done.stderr
        return
    assert done.returncode == 1 and not (tmp_path / "out").exists(), done.stdout + done.stderr
    said = {"ran after a cell below it": "code cell 3 ran as In [4], after code cell 4 below it, which ran as In [3]",
            "may have run twice": "code cell 5 ran as In [5], and no saved cell ran as In [4], after code cell 2 set "
                                  "what it changes as In [1]: it may have run twice",
            "may have run twice, the gap not just before it": "code cell 5 ran as In [6], and no saved cell ran as "
                                                              "In [4], after code cell 2 set what it changes as In [1]",
            "stopped at an error": "cell 5 changes it after its assignment: `NAMES.append('b')` (line 2), which model.py "
                                   "cannot run after it (the notebook file shows cell 5 did not run, or stopped at an "
                                   "error)",
            "never ran": "Code cell 4 holds what model.py needs, but the saved notebook shows it did not run"}[case]
    assert said in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_the_cli_refuses_a_value_load_read_that_a_cell_changed_after_the_load(tmp_path):
    """A new user's notebook: load() copies CONFIG['threshold'], a cell after %model_load sets it to 2.5, and the
    saved predictions happen to answer the same at either threshold. %model_export refused it; the CLI exported a
    model that answered otherwise, saying it answered as the notebook did. Now it refuses too, naming the change."""
    model = ("%%model\nclass Model:\n    def load(self):\n        self.t = threshold_of(CONFIG)\n"
             "    def predict(self, model_input):\n        return model_input['x'] > self.t")
    cells = [("%load_ext kernel_magics", 1), ("CONFIG = {'threshold': 0.5}\ndef threshold_of(c):\n    return c['threshold']",
                                             2), (model, 3), ("%model_load", 4), ("CONFIG['threshold'] = 2.5", 5),
             ('%model_predict {"x": 3}', 6, "True")]
    done = cli("export", saved_notebook(tmp_path / "nb.ipynb", cells), tmp_path / "out", cwd=tmp_path)
    assert done.returncode == 1 and not (tmp_path / "out").exists(), done.stdout + done.stderr
    assert ("`CONFIG` (`CONFIG['threshold'] = 2.5` in cell 5, line 1) changed after %model_load ran (cell 4), and "
            "load() reads it") in done.stderr, done.stderr
    # The same change before the load is what the loaded model read: exported.
    cells[3], cells[4] = ("CONFIG['threshold'] = 2.5", 4), ("%model_load", 5)
    done = cli("export", saved_notebook(tmp_path / "nb2.ipynb", cells), tmp_path / "out2", cwd=tmp_path)
    assert done.returncode == 0 and "Replayed 1 recorded prediction" in done.stdout, done.stdout + done.stderr


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A real export (kernel-magics export of a notebook), made once for the predict tests."""
    import nbformat

    root = tmp_path_factory.mktemp("predict")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in PREDICT_CELLS])
    nbformat.write(nb, root / "model.ipynb")
    done = cli("export", root / "model.ipynb", root / "out", cwd=root)
    assert done.returncode == 0, done.stderr
    return root / "out"


def test_predict_prints_the_answer_and_sends_the_models_prints_to_stderr(exported):
    done = cli("predict", exported, "-d", '{"x": 21}', cwd=exported.parent)
    assert (done.returncode, done.stdout) == (0, '{"y": 42}\n'), done.stderr
    assert "loading weights" in done.stderr and "predicting" in done.stderr
    piped = subprocess.run([sys.executable, "-m", "kernel_magics", "predict", str(exported), "-f", "-"],
                           input='{"x": 1.5}', capture_output=True, text=True)
    assert (piped.returncode, piped.stdout) == (0, '{"y": 3.0}\n'), piped.stderr


def test_predict_streams_each_chunk_as_it_comes(exported, tmp_path):
    import json
    import os

    gate = tmp_path / "gate"
    proc = subprocess.Popen([sys.executable, "-m", "kernel_magics", "predict", str(exported), "-d",
                             json.dumps({"gate": str(gate)})], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = b""
        while not first.endswith(b"first "):  # the first chunk arrives while the generator waits for the gate
            piece = os.read(proc.stdout.fileno(), 64)
            assert piece, proc.stderr.read().decode()
            first += piece
        gate.write_text("go")
        rest = proc.stdout.read()
        assert proc.wait(60) == 0 and first + rest == b"first second"
    finally:
        proc.kill()
        proc.wait()


def test_predict_errors_and_their_exit_codes(exported, tmp_path):
    failed = cli("predict", exported, "-d", '{"fail": true}', cwd=tmp_path)
    assert failed.returncode == 1 and failed.stdout == ""
    assert "model.py" in failed.stderr and "raise ValueError('bad input')" in failed.stderr
    assert failed.stderr.rstrip().splitlines()[-1].startswith("error: predict failed: ValueError: bad input")
    assert "kernel_magics/" not in failed.stderr  # the model's frames only
    not_json = cli("predict", exported, "-d", "{x: 1}", cwd=tmp_path)
    assert not_json.returncode == 2 and not_json.stderr.count("\n") == 1 and "is not JSON" in not_json.stderr
    missing = cli("predict", tmp_path / "nowhere", "-d", "{}", cwd=tmp_path)
    assert missing.returncode == 1 and missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr
    broken = tmp_path / "broken"
    (broken / "model").mkdir(parents=True)
    (broken / "config.yaml").write_text("model_name: broken\n")
    (broken / "model" / "model.py").write_text("X = 1 / 0\n\nclass Model:\n    def predict(self, x):\n        return x\n")
    failed_import = cli("predict", broken, "-d", "{}", cwd=tmp_path)
    assert failed_import.returncode == 1 and "X = 1 / 0" in failed_import.stderr
    assert "kernel_magics/" not in failed_import.stderr and "<frozen" not in failed_import.stderr
    assert failed_import.stderr.rstrip().splitlines()[-1].startswith(
        "error: importing model/model.py raised ZeroDivisionError"), failed_import.stderr
    # A file the model reads that is not there (a data/ file deleted since the export): the file, not the code.
    (broken / "model" / "model.py").write_text(
        "import pathlib\n\nclass Model:\n    def load(self):\n"
        "        self.labels = (pathlib.Path(__file__).parents[1] / 'data' / 'labels.txt').read_text()\n\n"
        "    def predict(self, x):\n        return self.labels\n")
    missing_file = cli("predict", broken, "-d", "{}", cwd=tmp_path)
    last = missing_file.stderr.rstrip().splitlines()[-1]
    assert missing_file.returncode == 1 and last.startswith("error: load() failed: FileNotFoundError"), last
    assert f"A file that load() reads is missing: put {broken / 'data' / 'labels.txt'} back" in last, last
    # validate (which loads when the config has an example input) says the same.
    (broken / "config.yaml").write_text("model_name: broken\nmodel_metadata:\n  example_model_input: {}\n")
    validated = cli("validate", broken, cwd=tmp_path)
    assert validated.returncode == 1 and "load() failed in a fresh Python: FileNotFoundError" in validated.stderr
    assert "(model/model.py, line 5, in load)." in validated.stderr, validated.stderr
    assert validated.stderr.rstrip().endswith("A file that load() reads is missing: put it back where it is read, or "
                                              "fix the path in model/model.py."), validated.stderr


def test_help_shows_examples_and_exit_codes():
    out = cli("--help", cwd=".")
    assert "examples:\n  kernel-magics export" in out.stdout and "kernel-magics predict" in out.stdout
    assert "exit codes:" in out.stdout and "3    serve could not listen" in out.stdout
    for command in ("export", "serve", "validate", "predict"):
        assert "examples:\n  kernel-magics" in cli(command, "--help", cwd=".").stdout


def test_an_unknown_option_gets_its_commands_usage_and_the_near_miss():
    done = cli("serve", "somewhere", "--prot", "8080", cwd=".")
    assert done.returncode == 2 and done.stderr.startswith("usage: kernel-magics serve "), done.stderr
    assert done.stderr.rstrip().endswith("kernel-magics serve: error: unrecognized arguments: --prot 8080 (did you "
                                         "mean --port?)"), done.stderr
    done = cli("validate", "somewhere", "extra", cwd=".")
    assert done.returncode == 2 and done.stderr.rstrip().endswith("unrecognized arguments: extra"), done.stderr
    assert "did you mean" not in done.stderr and "Traceback" not in done.stderr
    done = cli("--no-import", "validate", "somewhere", cwd=".")  # a known option, before the command's name
    assert done.returncode == 2 and done.stderr.rstrip().endswith(
        "unrecognized arguments: --no-import (--no-import must come after `validate`, before any --)"), done.stderr


def test_a_port_in_use_is_exit_code_3(exported):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = cli("serve", exported, "--port", taken.getsockname()[1], cwd=exported.parent)
    assert done.returncode == 3, done.stderr


def test_bash_completion_completes_commands_options_and_choices():
    script = cli("completion", "bash", cwd=".").stdout

    def complete(*words: str) -> list[str]:
        line = " ".join(f"'{w}'" for w in words)
        probe = (f"{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _kernel_magics; "
                 "printf '%s\\n' \"${COMPREPLY[@]}\"")
        done = subprocess.run(["bash", "-c", probe], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert complete("kernel-magics", "pre") == ["predict"]
    assert complete("kernel-magics", "serve", "--log-f") == ["--log-format"]
    assert complete("kernel-magics", "serve", "--engine", "r") == ["ray"]
    assert complete("kernel-magics", "completion", "") == ["bash"]
    assert "--secrets-from-stdin" not in script  # hidden options stay hidden


def test_validate_loads_with_the_secrets_of_a_secrets_dir_as_serve_does(tmp_path):
    """validate loads the model to answer its example input: a secret comes from --secrets-dir (as Truss mounts
    /secrets) as it does for serve and predict; a --secrets-dir that is not a folder is a usage error."""
    import os

    from server_harness import write_truss

    d = write_truss(tmp_path / "m", "class Model:\n    def __init__(self, secrets):\n        self._secrets = secrets\n"
                    "    def load(self):\n        self.token = self._secrets['tok']\n"
                    "    def predict(self, model_input):\n        return len(self.token)\n",
                    'model_name: m\nsecrets: {tok: null}\nmodel_metadata: {example_model_input: {"x": 1}}\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRUSS_SECRET_")}

    def validate(*args):
        return subprocess.run([sys.executable, "-m", "kernel_magics", "validate", str(d), *args], capture_output=True,
                              text=True, env=env, timeout=120)

    done = validate()
    assert done.returncode == 1 and "Secret 'tok' has no value" in done.stderr, done.stderr
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "tok").write_text("abc")
    done = validate("--secrets-dir", str(tmp_path / "secrets"))
    assert done.returncode == 0 and "answered model_metadata.example_model_input" in done.stdout, done.stderr
    done = validate("--secrets-dir", str(tmp_path / "nowhere"))
    assert done.returncode == 2 and done.stderr.strip() == (
        f"error: --secrets-dir {tmp_path / 'nowhere'} is not a folder. Give the folder that holds one file per secret, "
        "named after it."), done.stderr
