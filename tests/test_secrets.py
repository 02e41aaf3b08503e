"""No secret on disk or in a saved notebook (issue 22, items 1 to 4).

A canary secret sits in the kernel's environment (``TRUSS_SECRET_tok``); each test checks that it
reaches no exported byte, no %model_show output, no recorded input, no error the kernel sends (what
Jupyter saves: ename, evalue, traceback) and no log line, and that a notebook run with nbclient and
saved holds it nowhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook

from kernel_harness import Kernel
from test_export import cli
from kernel_magics.core.secrets import ENCODINGS, SecretScanner, SecretStore

CANARY = "sk-CANARY-secrets-4b7e21"
# Every escaping changes it (quotes, a backslash, a non-ASCII letter), and it ends with the newline a
# secret read from a file keeps.
ODD = "sk-O\"DD\\can'ary-\u00e9-91c0\n"


def sent(ex) -> str:
    """Every message the frontend got for a cell (outputs, errors, the reply), as JSON text."""
    return json.dumps([m["content"] for m in ex.messages]) + json.dumps(ex.reply)


def assert_no_secret(text: str, *secrets: str) -> None:
    for secret in secrets or (CANARY,):
        for form in {secret, secret.strip(), json.dumps(secret)[1:-1], json.dumps(secret.strip())[1:-1],
                     repr(secret)[1:-1], repr(secret.strip())[1:-1]}:
            assert form not in text, f"secret form {form!r} leaked"


@pytest.fixture(scope="module")
def k(tmp_path_factory):
    folder = tmp_path_factory.mktemp("secrets")
    kernel = Kernel(cwd=str(folder), env={"TRUSS_SECRET_tok": CANARY})
    kernel.folder = folder
    kernel.ok("%load_ext kernel_magics\n%config ModelMagics.widgets = 'never'\nimport os, types\nimport numpy as np")
    kernel.ok("%%model_config\nmodel_name: secret-test\nsecrets: {tok: null}\n")
    yield kernel
    kernel.shutdown()


def exported_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


# ---------------------------------------------------------------- 1. no secret in an export or %model_show

HOLDERS = {
    "HEADERS": ("HEADERS = {}\nHEADERS['Authorization'] = 'Bearer ' + os.environ['TRUSS_SECRET_tok']",
                "model/model.py"),
    "TOKEN": ("def get_token():\n    return os.environ['TRUSS_SECRET_tok']\nTOKEN = get_token()", "model/model.py"),
    "WORDS": ("WORDS = np.array(['hello', os.environ['TRUSS_SECRET_tok']])", "data/notebook_values/WORDS"),
    "CLIENT": ("CLIENT = types.SimpleNamespace(retries=3)\nCLIENT.token = os.environ['TRUSS_SECRET_tok']",
               "data/notebook_values/CLIENT"),
}


@pytest.mark.parametrize("name", list(HOLDERS))
def test_an_export_holding_a_secret_is_refused_naming_the_value_and_keeps_the_previous_one(k, name):
    cell, where = HOLDERS[name]
    target = k.folder / f"out-{name.lower()}"
    k.ok(f"{name} = 'harmless'")
    k.ok(f"%%model\nclass Model:\n    def predict(self, x):\n        return str(type({name}))\n")
    k.ok(f"%model_export {target}")  # a good export first: the refused one must leave it as it is
    before = exported_bytes(target)
    k.ok(cell)
    shown = k.execute("%model_show")
    why = k.execute("%model_show --why")
    config = k.execute("%model_show config.yaml")
    refused = k.execute(f"%model_export {target} --force")
    for ex in (shown, why, config, refused):
        assert_no_secret(sent(ex))
    assert "UsageError" in refused.stderr, refused.all_text
    message = " ".join(refused.stderr.split())
    assert f"{where}" in message and f"secret `tok`" in message and f"`{name}`" in message, message
    assert "load()" in message and 'kwargs["secrets"]' in message
    assert exported_bytes(target) == before
    assert not [p for p in k.folder.iterdir() if ".building-" in p.name]
    if where == "model/model.py":  # what the export would write, shown with the secret replaced
        assert "warning:" in shown.stdout and f"`{name}`" in shown.stdout and "***" in shown.displayed


def test_the_scan_finds_every_encoding_across_chunk_boundaries(tmp_path):
    scanner = SecretScanner({ODD: "tok"})
    for encoding in ENCODINGS[2:] + ("utf-8",):
        for at in (0, 5, 1000 - 3):  # 1000: the chunk size below, so some hits straddle two chunks
            path = tmp_path / f"{encoding}-{at}"
            path.write_bytes(b"!" * at + ODD.strip().encode(encoding) + b"?" * 3000)
            assert scanner.find_in_file(path, chunk_size=1000) == ("tok", at), (encoding, at)
    (tmp_path / "clean").write_bytes(b"sk-O\"DD" * 1000)
    assert scanner.find_in_file(tmp_path / "clean", chunk_size=1000) is None


def test_the_cli_export_refuses_a_secret_from_its_environment(tmp_path):
    """`kernel-magics export` has no live values: what it writes is checked against TRUSS_SECRET_<name>."""
    nb = new_notebook(cells=[new_code_cell(c) for c in (
        "%load_ext kernel_magics",
        "%%model_config\nmodel_name: cli\nsecrets: {tok: null}\n",
        "%%model\nclass Model:\n    def predict(self, x):\n        return len(x['q'])\n",
        '%model_predict {"q": "' + CANARY + '"}',  # typed into the notebook: it becomes the example input
    )], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nb.cells[-1].outputs = [nbformat.v4.new_output("execute_result", {"text/plain": str(len(CANARY))},
                                                   execution_count=4)]
    nbformat.write(nb, tmp_path / "typed.ipynb")
    done = cli("export", tmp_path / "typed.ipynb", tmp_path / "out", cwd=tmp_path,
               env={**os.environ, "TRUSS_SECRET_tok": CANARY})
    assert done.returncode != 0 and not (tmp_path / "out").exists()
    message = " ".join(done.stderr.split())
    assert "config.yaml would hold the value of secret `tok` through its `model_metadata` entry" in message, message
    assert_no_secret(done.stdout + done.stderr)


# ---------------------------------------------------------------- 2. no secret recorded

def test_a_prediction_holding_a_secret_is_not_recorded_nor_written(k):
    target = k.folder / "out-recorded"
    k.ok("%%model\nclass Model:\n    def predict(self, x):\n        return {'len': len(x['q'])}\n")
    k.ok("%model_load")
    skipped = k.ok("%model_predict {'q': os.environ['TRUSS_SECRET_tok']}")
    k.ok('%model_predict {"q": "plain"}')
    exported = k.ok(f"%model_export {target}")
    assert_no_secret(sent(skipped) + sent(exported))
    assert "Not recorded for the export" in skipped.stdout and "secret `tok`" in skipped.stdout
    assert "Replayed 1 recorded prediction" in exported.stdout
    assert "example_model_input:\n    q: plain" in (target / "config.yaml").read_text()
    assert CANARY.encode() not in exported_bytes(target)



def test_a_request_header_holding_a_secret_is_recorded_by_name_and_replayed_with_it(fresh_kernel, tmp_path):
    """The recorded request keeps a reference to the secret, not its value; the replay resolves it from
    its own secrets, so a model that checks the token gets the same request (replayed with `***` it
    answered otherwise and the export was refused). (A kernel of its own: the canary is typed into a
    cell here, which the shared kernel's saved history must never hold.)"""
    k = fresh_kernel(cwd=tmp_path, env={"TRUSS_SECRET_tok": CANARY}, load_ext=True)
    k.ok("%config ModelMagics.widgets = 'never'\nimport fastapi")
    k.ok("%%model_config\nmodel_name: header-test\nsecrets: {tok: null}\n")
    k.ok("%%model\nclass Model:\n    def __init__(self, secrets):\n        self._s = secrets\n"
         "    def predict(self, x, request: fastapi.Request):\n"
         "        return {'authorized': request.headers.get('x-token') == 'Bearer ' + self._s['tok']}\n")
    k.ok("%model_load")
    yes = k.ok(f'%model_predict --header "x-token:Bearer {CANARY}" {{"q": 1}}')
    assert "True" in yes.result
    k.ok('%model_predict --header x-token:other {"q": 2}')
    kept = k.ok("import json\nprint(json.dumps([r.request for r in "
                "get_ipython().magics_manager.registry['ModelMagics'].record]))").stdout
    assert CANARY not in kept and "Bearer {{secret:tok}}" in kept, kept
    exported = k.ok(f"%model_export {tmp_path / 'out'}")
    assert "Replayed 2 recorded predictions" in exported.stdout, exported.stdout
    assert CANARY.encode() not in exported_bytes(tmp_path / "out")


def test_a_model_that_reads_a_secret_from_the_environment_is_refused(k):
    """Truss mounts secrets as files and passes them as `secrets`: os.environ["TRUSS_SECRET_tok"] in
    model.py works in the notebook and in the check (the kernel has the variable) but not when deployed."""
    target = k.folder / "out-env-read"
    k.ok("ENV_TOKEN = os.environ['TRUSS_SECRET_tok']\nAUTH = 'Bearer ' + ENV_TOKEN")
    k.ok("%%model\nclass Model:\n    def predict(self, x):\n        return {'auth': len(AUTH)}\n")
    refused = k.execute(f"%model_export {target}")
    assert_no_secret(sent(refused))
    message = " ".join(refused.stderr.split())
    assert "UsageError" in refused.stderr and "reads secret `tok` from the environment" in message, refused.all_text
    assert "load()" in message and not target.exists()


# ---------------------------------------------------------------- 3. no secret in a saved error

FAILING = '''%%model
class Failure(Exception):
    def __init__(self, token):
        self.token = token
    def __str__(self):
        return f"denied for {self.token}"

class Model:
    def __init__(self, secrets):
        self._s = secrets
    def load(self):
        if LOAD_FAILS:
            open(os.path.join("/no/such/folder", self._s["tok"]))
    def predict(self, kind):
        tok = self._s["tok"]
        if kind == "dict":
            raise ValueError({"Authorization": "Bearer " + tok})
        if kind == "tuple":
            raise RuntimeError("denied", (401, tok))
        if kind == "bytes":
            raise ValueError(tok.encode())
        if kind == "custom":
            raise Failure(tok)
        if kind == "stream":
            return self.stream(tok)
        if kind == "echo":
            return {"token": tok}
        return "ok"
    def stream(self, tok):
        yield "a"
        raise ConnectionError({"header": tok})
'''


def test_errors_the_kernel_sends_are_redacted_whatever_holds_the_secret(k):
    k.ok("LOAD_FAILS = True")
    k.ok(FAILING)
    failed_load = k.execute("%model_load")
    k.ok("LOAD_FAILS = False")
    k.ok("%model_load")
    cells = {"load (OSError filename)": failed_load}
    for kind in ("dict", "tuple", "bytes", "custom", "stream"):
        cells[kind] = k.execute(f'%model_predict "{kind}"')
    k.ok("%config ModelMagics.widgets = 'always'")
    cells["stream in the live view"] = k.execute('%model_predict "stream"')
    k.ok("%config ModelMagics.widgets = 'never'")
    cells["a magic's usage error"] = k.execute("%model_predict {'a': 1}[os.environ['TRUSS_SECRET_tok']]")
    cells["the user's own cell"] = k.execute("raise KeyError((os.environ['TRUSS_SECRET_tok'], b'x'))")
    for what, ex in cells.items():
        assert ex.error is not None or "UsageError" in ex.stderr, what
        assert_no_secret(sent(ex))
        assert "***" in sent(ex), what
    assert cells["dict"].error["evalue"] == "{'Authorization': 'Bearer ***'}"
    assert cells["custom"].error["ename"] == "Failure" and cells["custom"].error["evalue"] == "denied for ***"
    assert cells["dict"].reply["evalue"] == "{'Authorization': 'Bearer ***'}"
    # IPython 9 keeps every error for %notebook, which writes them into an .ipynb.
    saved = k.execute("%notebook saved-by-ipython.ipynb")
    assert_no_secret((k.folder / "saved-by-ipython.ipynb").read_text() + sent(saved))


# ---------------------------------------------------------------- 4. logs and transformed forms

LOGGING = '''%%model
import logging

log = logging.getLogger("my_model")

class Model:
    def __init__(self, secrets):
        self._s = secrets
    def load(self):
        log.info("loading with token %s", self._s["tok"])
        print("stripped:", self._s["tok"].strip(), "repr:", repr(self._s["tok"]))
    def predict(self, x):
        log.warning("predict with %r", self._s["tok"])
        print("predict sees", self._s["tok"])
        try:
            raise ValueError(self._s["tok"].strip())
        except ValueError:
            log.exception("failed")
        return "ok"
'''


def test_the_models_log_lines_and_transformed_forms_are_redacted_in_the_cell_output(tmp_path):
    kernel = Kernel(cwd=str(tmp_path), env={"TRUSS_SECRET_tok": ODD})
    try:
        kernel.ok("%load_ext kernel_magics\n%config ModelMagics.widgets = 'never'\nimport logging\n"
                  "logging.basicConfig(level=logging.INFO, force=True)")  # the notebook configured logging
        kernel.ok("%%model_config\nmodel_name: logs\nsecrets: {tok: null}\n")
        kernel.ok(LOGGING)
        loaded = kernel.ok("%model_load")
        predicted = kernel.ok("%model_predict 1")
        for ex in (loaded, predicted):
            assert_no_secret(sent(ex), ODD)
        assert "loading with token ***" in loaded.stderr and "stripped: *** repr: '***'" in loaded.stdout
        assert "predict with '***'" in predicted.stderr and "ValueError: ***" in predicted.stderr
        assert "predict sees ***" in predicted.stdout
    finally:
        kernel.shutdown()


def test_the_store_redacts_a_file_secret_with_and_without_its_newline_and_its_repr(tmp_path):
    (tmp_path / "tok").write_text(ODD)
    store = SecretStore(["tok"], secrets_dir=tmp_path)
    text = f"{ODD} {ODD.strip()} {ODD!r} {ODD.strip()!r} {json.dumps(ODD)} {ODD.strip().encode()!r}"
    assert_no_secret(store.redact(text), ODD)
    assert store.held_in({"q": ODD.strip()}) == "tok" and store.held_in({"q": "plain"}) is None


# ---------------------------------------------------------------- a notebook run and saved

def test_a_notebook_run_with_nbclient_and_saved_holds_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("TRUSS_SECRET_tok", CANARY)
    cells = [
        "%load_ext kernel_magics\nimport os, logging\nlogging.basicConfig(level=logging.INFO, force=True)",
        "%%model_config\nmodel_name: saved\nsecrets: {tok: null}\n",
        "HEADERS = {}\nHEADERS['Authorization'] = 'Bearer ' + os.environ['TRUSS_SECRET_tok']",
        FAILING.replace("        return \"ok\"", "        return len(HEADERS)"),
        "LOAD_FAILS = False",
        "%model_load",
        "%model_predict {'q': os.environ['TRUSS_SECRET_tok']}",
        '%model_predict "dict"',
        '%model_predict "stream"',
        '%model_predict "echo"',
        "os.environ['TRUSS_SECRET_tok']",
        "print(os.environ['TRUSS_SECRET_tok'])",
        "%model_show",
        "%model_export out",
    ]
    nb = new_notebook(cells=[new_code_cell(c) for c in cells],
                      metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    path = tmp_path / "run.ipynb"
    nbformat.write(nb, path)
    saved = path.read_text()
    assert_no_secret(saved)
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    assert any(o.get("output_type") == "error" and "***" in o.get("evalue", "") for o in outputs)
    assert "would hold the value of secret `tok` through the notebook value `HEADERS`" in " ".join(saved.split())
    assert not (tmp_path / "out").exists()
