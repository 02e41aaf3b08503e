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


def test_a_stopped_or_failed_saved_stream_is_not_replayed(tmp_path):
    path = tmp_path / "stopped.ipynb"
    run_notebook(path, STREAMING_CELLS[:4], widgets=False)
    edit_saved_stream(path, lambda text: text.replace("[done:", "[stopped:"))
    done = cli("export", path, tmp_path / "out", cwd=tmp_path)
    assert done.returncode == 0 and "No predictions recorded yet" in done.stdout, done.stdout + done.stderr
