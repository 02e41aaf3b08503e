"""Materialize and export: in a real kernel, from the CLI, checked by the real truss package."""

import json
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from kernel_harness import Kernel

REPO = Path(__file__).resolve().parents[1]
CANARY = "sk-CANARY-export-55e1"


def write_notebook(path: Path, cells: list) -> Path:
    """A notebook of these cells: a string is a code cell, anything else a cell as nbformat makes it."""
    nb = new_notebook(cells=[new_code_cell(c) if isinstance(c, str) else c for c in cells],
                      metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, path)
    return path


def run_notebook_cells(path: Path, env: dict = None, stop_on_error: bool = True) -> tuple[Kernel, list]:
    """Run a notebook's code cells in order in a real kernel started in its folder, as Jupyter would."""
    nb = nbformat.read(path, as_version=4)
    k = Kernel(env={"JPY_SESSION_NAME": str(path), **(env or {})}, cwd=str(path.parent))
    results = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            ex = k.execute(cell.source, timeout=300)
            results.append(ex)
            if stop_on_error:
                assert ex.status == "ok", f"{cell.source}\n{ex.error_text}{ex.stderr}"
    return k, results


def cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "kernel_magics.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def files_of(root: Path) -> dict[str, bytes]:
    """What an export ships (its marker file, unique to each export, aside)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts and p.name != ".kernel-magics-export"}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".building-" in p.name or ".old-" in p.name]


# ---------------------------------------------------------------- the quickstart: CLI == kernel, and truss accepts both

def test_kernel_export_is_byte_identical_to_cli_export_and_truss_accepts_both(tmp_path, truss_validate):
    nb = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
    nb.cells.append(new_code_cell("%model_export out-kernel"))
    path = tmp_path / "quickstart.ipynb"
    nbformat.write(nb, path)
    k, results = run_notebook_cells(path)
    k.shutdown()
    printed = results[-1].stdout
    assert "Exported `Model` as a Truss" in printed and "model.py  (" in printed and "KiB)" in printed

    done = cli("export", path, tmp_path / "out-cli")
    assert done.returncode == 0, done.stderr
    kernel_files, cli_files = files_of(tmp_path / "out-kernel"), files_of(tmp_path / "out-cli")
    assert set(kernel_files) == {"config.yaml", "model/__init__.py", "model/model.py"}
    assert kernel_files == cli_files
    config = kernel_files["config.yaml"].decode()
    assert "- torch==2.13.0\n" in config and "+cpu" not in config
    assert f"python_version: py{sys.version_info.major}{sys.version_info.minor}" in config
    header, body = kernel_files["model/model.py"].decode().split("\n\n", 1)
    assert "from quickstart.ipynb" in header
    assert "kernel_magics" not in body and "%" not in body  # no magics, no import of ours
    assert "steps=50" not in body and "def train_charnet" in body  # the try-out cell is left out, helpers kept
    for out in ("out-kernel", "out-cli"):
        truss_validate(tmp_path / out)


def test_show_magics(tmp_path, fresh_kernel):
    k = fresh_kernel(cwd=tmp_path)
    k.ok("%load_ext kernel_magics")
    k.ok("import math\nK = 2\ndef f(x):\n    return math.floor(x) * K")
    k.ok("%%model_config\nmodel_name: shown\nsecrets: {tok: null}\n")
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        return f(model_input)")
    shown = k.ok("%model_show")
    code = shown.outputs[0]["data"]
    assert "text/html" in code and "def f(x):" in code["text/plain"] and "import math" in code["text/plain"]
    config = k.ok("%model_show config.yaml").outputs[0]["data"]["text/plain"]
    assert "model_name: shown" in config and "tok: null" in config and "python_version: py3" in config
    why = k.ok("%model_show --why").stdout
    assert "the model class" in why and "used by Model" in why and "used by f" in why
    # The lab panel's commands run outside the history (no In[N]): they do not shift the numbers --why gives.
    k.ok("%model_load --no-widget", store_history=False)
    k.ok("K += 1")  # In[8]
    why = k.ok("%model_show --why").stdout
    assert "changed after its assignment, by `K += 1` in cell 8, line 1" in why, why
    # A data_dir that does not exist is said at once (a typo would show only as load()'s FileNotFoundError).
    noted = k.ok("%%model_config\ndata_dir: no_such_folder\n").stdout
    assert f"note: data_dir 'no_such_folder' does not exist ({tmp_path / 'no_such_folder'})" in noted, noted
    (tmp_path / "no_such_folder").mkdir()
    assert "note" not in k.ok("%%model_config\ndata_dir: no_such_folder\n").stdout


# ---------------------------------------------------------------- fidelity: the export answers as the notebook did

FIDELITY = {
    "sync, pydantic, pre/postprocess, data_dir, secrets": ([
        "import pydantic\nimport json\n\nclass Ask(pydantic.BaseModel):\n    text: str\n    times: int = 1\n\n"
        "class Reply(pydantic.BaseModel):\n    text: str\n    bonus: int\n    token_length: int",
        "%%model_config\nmodel_name: fid-a\ndata_dir: assets\nsecrets: {tok: null}\n",
        textwrap.dedent('''\
            %%model
            class Model:
                def __init__(self, data_dir, secrets):
                    self._data_dir, self._secrets = data_dir, secrets
                def load(self):
                    self.bonus = json.loads((self._data_dir / "bonus.json").read_text())["bonus"]
                    self.token_length = len(self._secrets["tok"])
                def preprocess(self, model_input: Ask) -> Ask:
                    return Ask(text=model_input.text.strip(), times=model_input.times)
                def predict(self, ask: Ask) -> Reply:
                    return Reply(text=ask.text * ask.times, bonus=self.bonus, token_length=self.token_length)
                def postprocess(self, reply):
                    return {"reply": reply, "shout": reply.text.upper()}
            '''),
    ], [{"text": " hi ", "times": 2}, {"text": "x"}]),
    "async predict and async generator": ([
        "import asyncio\nSTEPS = 3",
        textwrap.dedent('''\
            %%model
            class Model:
                async def preprocess(self, model_input):
                    await asyncio.sleep(0)
                    return model_input
                async def predict(self, model_input):
                    for i in range(STEPS):
                        await asyncio.sleep(0)
                        yield {"i": i, "n": model_input["n"]}
            '''),
    ], [{"n": 1}, {"n": 7}]),
    "sync generator of text with helpers": ([
        "WORDS = ['alpha', 'beta', 'gamma']\n\ndef words(n):\n    for w in WORDS[:n]:\n        yield w + ' '",
        "%%model\nclass Model:\n    def predict(self, model_input):\n        yield from words(model_input['n'])\n",
    ], [{"n": 2}, {"n": 3}]),
}

RUN_EXPORT = r'''
import asyncio, json, sys
from kernel_magics.core.truss_dir import TrussDir
host = TrussDir.open(sys.argv[1]).host()
host.load()
async def main():
    return [await host.collect(i) for i in json.loads(sys.argv[2])]
print(json.dumps(asyncio.run(main())))
'''


@pytest.mark.parametrize("case", list(FIDELITY))
def test_exported_model_gives_the_notebooks_answers(tmp_path, case, truss_validate):
    cells, inputs = FIDELITY[case]
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "bonus.json").write_text('{"bonus": 42}')
    predict_cells = [f"import json as _j\nprint(_j.dumps(get_ipython().run_line_magic('model_predict', {json.dumps(i)!r})))"
                     for i in inputs]
    path = write_notebook(tmp_path / "fid.ipynb", ["%load_ext kernel_magics", *cells, "%model_load",
                                                   *predict_cells, "%model_export out"])
    k, results = run_notebook_cells(path, env={"TRUSS_SECRET_tok": CANARY})
    k.shutdown()
    notebook_answers = [json.loads(r.stdout.strip().splitlines()[-1]) for r in results[-1 - len(inputs):-1]]
    out = tmp_path / "out"
    truss_validate(out)
    # A fresh interpreter, started elsewhere, with only the export: no notebook state at all.
    done = subprocess.run([sys.executable, "-I", "-c", RUN_EXPORT, str(out), json.dumps(inputs)],
                          capture_output=True, text=True, cwd="/", timeout=120,
                          env={"TRUSS_SECRET_tok": CANARY, "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == notebook_answers
    for name, data in files_of(out).items():
        assert CANARY.encode() not in data, name


# ---------------------------------------------------------------- data and local packages

def test_data_and_local_packages_are_copied(tmp_path, truss_validate):
    (tmp_path / "mytools.py").write_text("def double(x):\n    return 2 * x\n")
    (tmp_path / "extra.txt").write_text("7")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "base.txt").write_text("5")
    path = write_notebook(tmp_path / "pk.ipynb", [
        "%load_ext kernel_magics",
        "import mytools",
        "%%model\nclass Model:\n    def __init__(self, data_dir):\n        self.d = data_dir\n"
        "    def predict(self, x):\n        return mytools.double(int((self.d / 'base.txt').read_text()))",
        "%model_load",
        "%model_export out --data extra.txt",
    ])
    k, results = run_notebook_cells(path)
    k.shutdown()
    files = files_of(tmp_path / "out")
    assert {"packages/mytools.py", "data/base.txt", "data/extra.txt"} <= set(files)
    assert b"mytools" not in files["config.yaml"]  # a local module is packaged, not a requirement
    truss_validate(tmp_path / "out")
    done = subprocess.run([sys.executable, "-I", "-c", RUN_EXPORT, str(tmp_path / "out"), "[{}]"],
                          capture_output=True, text=True, cwd="/", timeout=120)
    assert done.returncode == 0 and json.loads(done.stdout) == [10], done.stderr


# ---------------------------------------------------------------- bad input: clear messages, nothing half-written

def usage_error(ex) -> str:
    assert ex.status == "error" and ex.reply["ename"] == "UsageError", ex.all_text
    return ex.reply["evalue"]


def test_kernel_export_errors_leave_nothing_behind(tmp_path, fresh_kernel):
    (tmp_path / "libdir").mkdir()
    (tmp_path / "libdir" / "hidden_mod.py").write_text("VALUE = 1\n")
    k = fresh_kernel(cwd=tmp_path)
    k.ok("%load_ext kernel_magics")
    assert "No `%%model` cell" in usage_error(k.execute("%model_export out"))
    k.ok("exec('made_by_exec = 3')")
    k.ok("%%model\nclass Model:\n    def predict(self, x):\n        return made_by_exec")
    msg = usage_error(k.execute("%model_export out"))
    assert "`made_by_exec`" in msg and "exec, %run" in msg
    # An import that only works through the kernel's sys.path: the fresh-process check catches it.
    k.ok("import sys\nsys.path.insert(0, 'libdir')\nimport hidden_mod")
    k.ok("%%model\nclass Model:\n    def predict(self, x):\n        return hidden_mod.VALUE")
    msg = usage_error(k.execute("%model_export out"))
    assert "does not work on its own" in msg and "No module named 'hidden_mod'" in msg
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    (tmp_path / "afile").write_text("x")
    assert "is a file" in usage_error(k.execute("%model_export afile"))
    k.ok("%%model\nclass Model:\n    def predict(self, x):\n        return 1")
    k.ok("%model_export out")
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    assert "changed since the earlier export (mine.txt)" in usage_error(k.execute("%model_export out"))
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep me"
    # A failing export with --force keeps the previous export whole.
    k.ok("%%model\nclass Model:\n    def predict(self, x):\n        return hidden_mod.VALUE")
    usage_error(k.execute("%model_export out --force"))
    assert (tmp_path / "out" / "mine.txt").exists() and leftovers(tmp_path) == []
    k.ok("%%model\nclass Model:\n    def predict(self, x):\n        return 2")
    assert "mine.txt" in usage_error(k.execute('%model_export "out" --force'))  # a file it did not write
    k.ok('%model_export "out" --force --force')  # quotes, as a path with spaces needs, are not part of the name
    assert not (tmp_path / "out" / "mine.txt").exists() and "return 2" in (tmp_path / "out/model/model.py").read_text()
    assert "does not exist" in usage_error(k.execute("%model_export out2 --data nowhere.bin"))
    assert not (tmp_path / "out2").exists() and leftovers(tmp_path) == []


def test_cli_bad_notebooks(tmp_path):
    bad = tmp_path / "bad.ipynb"
    bad.write_text("{not json")
    done = cli("export", bad, tmp_path / "o")
    assert done.returncode == 1 and "not a notebook: invalid JSON at line 1" in done.stderr
    assert "Traceback" not in done.stderr
    empty = write_notebook(tmp_path / "nomodel.ipynb", ["x = 1"])
    done = cli("export", empty, tmp_path / "o")
    assert done.returncode == 1 and "has no `%%model` cell" in done.stderr
    done = cli("export", tmp_path / "missing.ipynb", tmp_path / "o")
    assert done.returncode == 1 and "Cannot read notebook" in done.stderr
    badcfg = write_notebook(tmp_path / "cfg.ipynb", ["%%model_config\nmodel_nam: x\n",
                                                     "%%model\nclass Model:\n    def predict(self, x):\n        return 1"])
    done = cli("export", badcfg, tmp_path / "o")
    assert done.returncode == 1 and "Did you mean `model_name`?" in done.stderr
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []


def test_cli_validate(tmp_path):
    path = write_notebook(tmp_path / "v.ipynb", ["%%model\nclass Model:\n    def predict(self, x):\n        return 1"])
    assert cli("export", path, tmp_path / "good").returncode == 0
    done = cli("validate", tmp_path / "good")
    assert done.returncode == 0 and done.stdout.startswith("OK")
    (tmp_path / "typo").mkdir()
    (tmp_path / "typo" / "config.yml").write_text("model_name: x\n")
    done = cli("validate", tmp_path / "typo")
    assert done.returncode == 1 and "rename it to config.yaml" in done.stderr
    (tmp_path / "good" / "config.yaml").write_text("requirements: ['torch=>1']\n")
    done = cli("validate", tmp_path / "good")
    assert done.returncode == 1 and "line 1: `requirements[0]`: 'torch=>1' is not a valid pip requirement" in done.stderr
    (tmp_path / "good" / "config.yaml").write_text("model_class_name: Missing\n")
    done = cli("validate", tmp_path / "good")
    assert done.returncode == 1 and "defines no class `Missing`" in done.stderr


def test_requirements_pinning_rules():
    from kernel_magics.core.export import pin_requirements
    from kernel_magics.core.source import MaterializeError

    import types

    # A module a library made as it ran (Cython's `_cython_3_1_2`, which a pickled DataFrame's types name): nothing
    # to install, and no warning (the user was told to add it to the requirements).
    made = types.ModuleType("_made_at_run_time_by_a_library")
    made.__spec__ = None
    sys.modules[made.__name__] = made
    try:
        pinned, warnings = pin_requirements(["torch", "pyyaml>=5", "ipython ; python_version > '3'"],
                                            ["torch", "json", "yaml", "pydantic", "mylocal", "notinstalled_xyz",
                                             made.__name__], {"mylocal"})
    finally:
        del sys.modules[made.__name__]
    assert pinned[0] == "torch==2.13.0"           # a bare name is pinned, local tag +cpu dropped
    assert pinned[1] == "pyyaml>=5"               # a written specifier wins
    assert pinned[2].startswith("ipython==") and pinned[2].endswith('; python_version > "3"')
    assert any(p.startswith("pydantic==") for p in pinned)
    assert not any(p.startswith(("json", "mylocal", "PyYAML")) for p in pinned)  # stdlib, local, duplicate
    import yaml

    assert warnings == [
        f"requirement `pyyaml>=5` is a range: the export was checked with pyyaml {yaml.__version__}, and a deployment "
        f"may install another version. Write `pyyaml=={yaml.__version__}` in %%model_config to serve what the notebook "
        "ran.",
        "could not tell which distribution provides module `notinstalled_xyz`; add it to requirements yourself."]
    # A written pin that excludes what the check ran with says so; one that matches it (its local tag too), or a
    # marker that does not apply here, says nothing; a wildcard pin is a range.
    import importlib.metadata

    full = importlib.metadata.version("torch")  # 2.13.0+cpu
    torch = full.split("+")[0]
    assert pin_requirements(["torch==2.0.0", "numpy==1.0 ; python_version < '3'", f"torch=={full}", "torch<99",
                             "pyyaml==6.*"], [])[1] == [
        f"requirement `torch==2.0.0` excludes torch {torch}, which the export was checked with: a deployment installs "
        f"another version. Write `torch=={torch}` in %%model_config, or install a version it allows here.",
        f"requirement `torch<99` is a range: the export was checked with torch {torch}, and a deployment may install "
        f"another version. Write `torch=={torch}` in %%model_config to serve what the notebook ran.",
        f"requirement `pyyaml==6.*` is a range: the export was checked with pyyaml {yaml.__version__}, and a deployment "
        f"may install another version. Write `pyyaml=={yaml.__version__}` in %%model_config to serve what the notebook "
        "ran."]
    with pytest.raises(MaterializeError, match="imports kernel_magics"):
        pin_requirements([], ["kernel_magics"])


# ---------------------------------------------------------------- --force: only what the export wrote, in one step

SIMPLE = "%%model\nclass Model:\n    def predict(self, model_input):\n        return 1"


def test_run_all_again_replaces_the_notebooks_own_export_and_nothing_else(tmp_path, fresh_kernel):
    """Run All twice works: `%model_export DIR` replaces the export the same notebook made there, unchanged since,
    without --force; another notebook's or another kernel's export, or a file changed by hand, is not replaced."""
    nb = write_notebook(tmp_path / "nb.ipynb", [SIMPLE])
    # As Jupyter Server starts a notebook's kernel: JPY_SESSION_NAME is the notebook's path.
    lab = fresh_kernel(cwd=tmp_path, env={"JPY_SESSION_NAME": str(nb)}, load_ext=True)
    lab.ok(SIMPLE)
    assert "replacing" not in lab.ok("%model_export out").stdout
    assert "Exported `Model` as a Truss (replacing the earlier export there):" in lab.ok("%model_export out").stdout
    done = cli("export", nb, tmp_path / "out")  # the CLI's export of the same file is the same notebook's
    assert done.returncode == 0 and "replaced the earlier one" in done.stderr, done.stderr
    # A kernel that no server named (nbclient, a console) replaces its own exports only.
    plain = fresh_kernel(cwd=tmp_path, load_ext=True)
    plain.ok(SIMPLE)
    assert "holds an earlier export of nb.ipynb (this kernel cannot tell whether it runs nb.ipynb" in usage_error(
        plain.execute("%model_export out"))
    plain.ok("%model_export own")
    assert "(replacing the earlier export there)" in plain.ok("%model_export own").stdout
    assert "holds an earlier export made by another kernel" in usage_error(lab.execute("%model_export own"))
    # A file of the export changed by hand since: kept, and named.
    config = tmp_path / "out" / "config.yaml"
    config.write_text(config.read_text() + "# tuned by hand\n")
    assert "changed since the earlier export (config.yaml (changed))" in usage_error(lab.execute("%model_export out"))
    assert "# tuned by hand" in config.read_text() and leftovers(tmp_path) == []
    # What a listing of files alone misses: a link to a folder, and a folder added empty.
    lab.ok("%model_export own --force")
    (tmp_path / "keep").mkdir()
    (tmp_path / "own" / "linked").symlink_to(tmp_path / "keep")
    (tmp_path / "own" / "notes").mkdir()
    assert "changed since the earlier export (linked, notes/)" in usage_error(lab.execute("%model_export own"))
    assert (tmp_path / "own" / "linked").is_symlink() and (tmp_path / "own" / "notes").is_dir()


def test_a_file_added_to_the_earlier_export_while_the_export_runs_is_not_replaced(tmp_path, fresh_kernel):
    """The earlier export is checked again just before the swap: what a user put there meanwhile (the check may
    take minutes) stays, and the export says so."""
    import threading

    k = fresh_kernel(cwd=tmp_path, load_ext=True)
    go, waiting = tmp_path / "go", tmp_path / "waiting"
    go.touch()
    k.ok("%%model\nimport pathlib, time\nclass Model:\n    def load(self):\n"
         f"        pathlib.Path({str(waiting)!r}).touch()\n"
         f"        while not pathlib.Path({str(go)!r}).exists():\n            time.sleep(0.05)\n"
         "    def predict(self, x):\n        return x")
    k.ok("%model_load")
    k.ok("%model_predict 1")
    k.ok("%model_export out")
    go.unlink()
    waiting.unlink()
    done = []
    exporting = threading.Thread(target=lambda: done.append(k.execute("%model_export out")))
    exporting.start()
    deadline = time.monotonic() + 60
    while not waiting.exists() and time.monotonic() < deadline:  # the check's fresh process is in load()
        time.sleep(0.05)
    (tmp_path / "out" / "late.txt").write_text("mine")
    go.touch()
    exporting.join(timeout=120)
    assert "changed while this export ran (late.txt)" in usage_error(done[0])
    assert (tmp_path / "out" / "late.txt").read_text() == "mine" and leftovers(tmp_path) == []


def test_force_refuses_files_the_export_did_not_write_unless_given_twice_and_never_deletes_a_git(tmp_path):
    import shutil

    nb = write_notebook(tmp_path / "nb.ipynb", [SIMPLE])
    out = tmp_path / "out"
    # Under the usual umask, an export's folder reads as any new folder does, not as mkdtemp's 0700 build folder.
    made = subprocess.run(["sh", "-c", 'umask 022 && exec "$0" -m kernel_magics export "$1" "$2"', sys.executable,
                           str(nb), str(out)], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0 and stat.S_IMODE(out.stat().st_mode) == 0o755, made.stderr
    out.chmod(0o700)  # made private by its user: the next export keeps that
    again = cli("export", nb, out)  # exporting the same notebook again, as users do: its own export is replaced
    assert again.returncode == 0 and f"replaced the earlier one in {out}" in again.stderr, again.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    other = write_notebook(tmp_path / "other.ipynb", [SIMPLE])
    refused = cli("export", other, out)  # another notebook's export: said as such, and --force named
    assert refused.returncode == 1 and f"{out} holds an earlier export of nb.ipynb. Pass --force" in refused.stderr
    assert cli("export", other, out, "--force").returncode == 0  # only an export's own files there: replaced
    (out / "notes.md").write_text("mine")
    again = cli("export", other, out)  # not only the export's files now, so not without --force twice
    assert again.returncode == 1 and "changed since the earlier export (notes.md), so an export will not" in again.stderr, again.stderr
    (out / "config.yaml").write_text((out / "config.yaml").read_text() + "# tuned by hand\n")
    done = cli("export", nb, out, "--force")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "config.yaml (changed), notes.md" in done.stderr and "--force twice" in done.stderr
    assert (out / "notes.md").read_text() == "mine" and "# tuned by hand" in (out / "config.yaml").read_text()
    (out / ".git").mkdir()
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    done = cli("export", nb, out, "--force", "--force")
    assert done.returncode == 1 and "holds a .git folder" in done.stderr
    assert (out / ".git" / "HEAD").exists() and (out / "notes.md").exists()
    shutil.rmtree(out / ".git")
    done = cli("export", nb, out, "--force", "--force")
    assert done.returncode == 0, done.stderr
    assert not (out / "notes.md").exists() and "# tuned by hand" not in (out / "config.yaml").read_text()
    assert leftovers(tmp_path) == []


def test_force_swaps_the_folders_in_one_step(tmp_path, monkeypatch):
    from kernel_magics.core import export, scratch

    target = tmp_path / "t"
    target.mkdir()
    (target / export.MARKER).write_text(json.dumps({"id": "earlier"}))
    (target / "old.txt").write_text("old")
    build = scratch.ScratchDir(tmp_path, ".t.building-")
    (build.path / "new.txt").write_text("new")

    def no_rename(*args):  # two renames would leave a moment with no target
        raise AssertionError(f"rename {args}: the swap was not one atomic exchange")

    monkeypatch.setattr(export.os, "rename", no_rename)
    try:
        assert export._swap_into_place(build.path, target, "earlier", build, force=2) == []
    finally:
        build.release()
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"] and leftovers(tmp_path) == []


# ---------------------------------------------------------------- the check's side effects, float tolerance, memory

def test_replay_tolerance_refuses_a_later_timestamp_and_accepts_rounding_noise():
    import struct

    from kernel_magics.core.replay import compare

    now = 1_764_500_000.123456
    assert compare({"t": now}, {"t": now + 1.0}) is not None  # a timestamp a second later is another answer
    assert compare(now, now + 0.5) is not None
    assert compare(0.5, 0.6) is not None
    assert compare(0.1 + 0.2, 0.3) is None  # float64 rounding
    assert compare(1e-17, -2e-17) is None  # noise around zero
    f32 = [struct.unpack("f", struct.pack("f", x))[0] for x in (0.1234567, 0.12345675)]  # float32 outputs
    assert f32[0] != f32[1] and compare(f32[0], f32[1]) is None
    assert compare([1, 2.0], [1, 2]) is None
    np = pytest.importorskip("numpy")
    assert compare({"label": np.str_("setosa")}, {"label": "setosa"}) is None  # iris.target_names[i]: one JSON string
    assert compare(np.str_("setosa"), "versicolor") is not None and compare("1", 1) is not None


SIDE_EFFECT = '''%%model
class Model:
    def load(self):
        import pathlib
        pathlib.Path("written_by_load.txt").write_text("x")  # relative: lands in the working directory
    def predict(self, model_input):
        return 1
'''


def test_what_the_check_writes_in_its_working_directory_stays_out_of_the_export(tmp_path, request):
    k = Kernel(cwd=str(tmp_path))
    request.addfinalizer(k.shutdown)
    k.ok("%load_ext kernel_magics")
    k.ok(SIDE_EFFECT)
    k.ok("%model_load --no-widget")
    k.ok("%model_predict {}")
    assert "Replayed 1 recorded prediction" in k.ok("%model_export out").stdout
    assert not (tmp_path / "out" / "written_by_load.txt").exists()
    assert sorted(files_of(tmp_path / "out")) == ["config.yaml", "model/__init__.py", "model/model.py"]


def test_exporting_a_large_value_adds_only_a_small_buffer_to_the_kernel(tmp_path, request):
    k = Kernel(cwd=str(tmp_path), env={"TRUSS_SECRET_tok": CANARY})  # a secret: every saved byte is scanned
    request.addfinalizer(k.shutdown)
    k.ok("%load_ext kernel_magics\nimport numpy as np, resource\nBIG = np.ones(300 * 2**20 // 8)")  # 300 MiB
    k.ok("%%model_config\nsecrets: {tok: null}\n")
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        return float(BIG[0])")
    peak = "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)"  # KiB -> MiB, the highest so far
    before = int(k.ok(peak).stdout)
    assert "BIG.npy  (300.0 MiB)" in k.ok("%model_export out").stdout
    assert int(k.ok(peak).stdout) - before < 64  # reading the file back whole for the scan added 300


REQUEST_TAKING = '''%%model
import fastapi


class Model:
    def predict(self, model_input, request: fastapi.Request):
        return {"user": request.headers.get("x-user"), "path": request.url.path, "method": request.method,
                "signed": request.headers.get("authorization", "").startswith("Bearer ")}
'''


def test_a_prediction_made_with_headers_is_replayed_with_the_same_request(tmp_path, request):
    k = Kernel(cwd=str(tmp_path), env={"TRUSS_SECRET_tok": CANARY})
    request.addfinalizer(k.shutdown)
    k.ok("%load_ext kernel_magics")
    k.ok("%%model_config\nsecrets: {tok: null}\n")
    k.ok(REQUEST_TAKING)
    k.ok("%model_load --no-widget")
    ex = k.ok(f'%model_predict --header x-user:alice --header "authorization:Bearer {CANARY}" {{"q": 1}}')
    assert "'user': 'alice'" in ex.result and "'signed': True" in ex.result
    kept = k.ok("import json\nprint(json.dumps([r.request for r in "
                "get_ipython().magics_manager.registry['ModelMagics'].record]))").stdout
    assert CANARY not in kept and '["x-user", "alice"]' in kept and "/v1/models/model:predict" in kept
    ex = k.ok("%model_export out")
    assert "Replayed 1 recorded prediction" in ex.stdout, ex.stdout
    assert all(CANARY.encode() not in data for data in files_of(tmp_path / "out").values())


def test_the_cli_replays_a_request_taking_predict_saved_in_the_notebook_with_a_servers_request(tmp_path):
    from nbformat.v4 import new_output

    nb = new_notebook(cells=[new_code_cell(REQUEST_TAKING), new_code_cell('%model_predict {"q": 1}')],
                      metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    answer = {"user": None, "path": "/v1/models/model:predict", "method": "POST", "signed": False}
    nb.cells[1].outputs = [new_output("execute_result", data={"text/plain": repr(answer)}, execution_count=2)]
    nbformat.write(nb, tmp_path / "nb.ipynb")
    done = cli("export", tmp_path / "nb.ipynb", tmp_path / "out")
    assert done.returncode == 0 and "Replayed 1 recorded prediction" in done.stdout, done.stderr


def test_the_export_says_how_many_predictions_it_did_not_keep(tmp_path, fresh_kernel):
    """The kernel keeps the last 20 predictions of a definition: a user who made 23 must not read the replay's
    "20" as all of them."""
    k = fresh_kernel(cwd=tmp_path, load_ext=True)
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        return model_input['i'] * 2")
    k.ok("%model_load --no-widget")
    k.ok("for i in range(23):\n    get_ipython().run_line_magic('model_predict', '{\"i\": %d}' % i)")
    out = k.ok("%model_export out").stdout
    assert ("Replayed 20 recorded predictions in a fresh Python (3 earlier ones were not kept: the kernel keeps "
            "the last 20): the export answers as the notebook did.") in out, out


def test_an_export_whose_check_never_loaded_a_model_that_failed_to_load_says_so(tmp_path, fresh_kernel):
    """The check loads the model only to replay predictions: with none (or --no-replay), a load that failed in the
    kernel was never tried on the export, and the export says what the kernel knows."""
    k = fresh_kernel(cwd=tmp_path, load_ext=True)
    k.ok("%%model\nclass Model:\n    def load(self):\n        open('weights-that-are-not-there.bin')\n"
         "    def predict(self, model_input):\n        return 1")
    assert k.execute("%model_load --no-widget").status == "error"
    out = k.ok("%model_export out").stdout
    assert "No predictions recorded yet" in out, out
    assert ("warning: the model's last %model_load failed (FileNotFoundError: ") in out, out
    assert ("with no prediction to replay, the export's check did not load it: served, this directory will likely "
            "fail to load too. Fix load(), run %model_load and a %model_predict, then export again.") in out, out
    out = k.ok("%model_export out2 --no-replay").stdout
    assert "--no-replay skipped them" in out, out
    # A secret the kernel has no value for: a deployment provides it, so the advice is to give the kernel one.
    k.ok("%%model_config\nmodel_name: s\nsecrets: {tok: null}")
    k.ok("%%model\nclass Model:\n    def __init__(self, **kwargs):\n        self._secrets = kwargs['secrets']\n"
         "    def load(self):\n        self.tok = self._secrets['tok']\n"
         "    def predict(self, model_input):\n        return 1")
    assert k.execute("%model_load --no-widget").status == "error"
    out = k.ok("%model_export out3").stdout
    assert "failed for a secret the kernel has no value for" in out and "%model_secret NAME" in out, out
    # A model loaded since: no warning.
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        return 1")
    k.ok("%model_load --no-widget")
    assert "warning" not in k.ok("%model_export out4").stdout
