"""The spare checker (core/spare_check.py): the export's fresh Python, started ahead with the model's
libraries imported, proves exactly what a cold one proves, holds nothing of the kernel, and goes away
with %model_unload and with its kernel."""

import json
import os
import time
from pathlib import Path

import pytest

from server_harness import process_gone, write_truss

from kernel_magics.core import spare_check
from kernel_magics.core.truss_dir import TrussDir


def _ready(spare, timeout: float = 120) -> None:
    """Wait for the spare's marker file (its imports are done)."""
    deadline = time.monotonic() + timeout
    while not spare.ready:
        assert spare.alive() or not spare.started.is_set(), (spare.path / "output.txt").read_text()
        assert time.monotonic() < deadline, "the spare checker did not get ready"
        time.sleep(0.02)


def _check(root: Path, spare: bool):
    return TrussDir.open(root).check_in_fresh_process(load=True, replay=[{"input": {}}], spare=spare)


@pytest.fixture
def spare_slot():
    """This process keeps a spare for the test, and none afterwards."""
    yield spare_check
    spare_check.discard(disable=True)


# model.py, what the spare imported ahead, and whether that spare may check it (else the check is cold)
FORGOTTEN = {
    # model.py imports numpy but uses the alias it never bound: the spare had numpy imported
    "alias never bound": ("import numpy\n", "np.zeros(1)", ["import numpy"], True),
    # the spare had numpy imported; model.py never imports it
    "module never imported": ("import json\n", "numpy.zeros(1)", ["import numpy"], False),
    # a submodule the spare imported, that model.py does not: `import xml` alone has no xml.dom
    "submodule never imported": ("import xml\n", "xml.dom.minidom.parseString('<a/>')", ["import xml.dom.minidom"],
                                 False),
}


@pytest.mark.parametrize("case", list(FORGOTTEN))
def test_a_model_py_that_forgot_an_import_fails_in_the_spare_exactly_as_cold(tmp_path, spare_slot, case):
    imports, use, ahead, usable = FORGOTTEN[case]
    root = write_truss(tmp_path / "t", f"""{imports}
class Model:
    def load(self):
        self.x = {use}
    def predict(self, model_input):
        return 1
""")
    cold = _check(root, spare=False)
    assert cold.error and cold.stage == "load" and cold.spare is None
    spare = spare_slot.prepare(ahead)
    _ready(spare)
    assert spare.imported() == ahead  # the module is loaded in the spare: its name is not in model.py's globals
    warm = _check(root, spare=True)
    assert (warm.ok, warm.stage, warm.error) == (False, cold.stage, cold.error)
    assert warm.error.startswith("NameError" if case != "submodule never imported" else "AttributeError")
    assert warm.spare == (ahead if usable else None)  # used only when model.py imports all it imported
    if not usable:
        assert spare_check._state.last_miss == f"model.py does not start with `{ahead[0]}`"
    assert not spare.path.exists()  # used or refused, it is gone; a fresh one replaced it
    assert spare_check.current() is not None and spare_check.current() is not spare


@pytest.mark.slow  # 4 to 7 s each on this machine under load: a kernel, or three fresh Pythons
def test_a_spare_is_not_used_when_the_environment_or_the_config_environment_changed(tmp_path, spare_slot, monkeypatch):
    root = write_truss(tmp_path / "t", """import os
class Model:
    def predict(self, model_input):
        return os.environ.get("KM_SPARE_PROBE")
""")
    _ready(spare_slot.prepare(["import os"]))
    monkeypatch.setenv("KM_SPARE_PROBE", "changed after the spare started")
    report = _check(root, spare=True)
    assert report.spare is None and spare_check._state.last_miss == "the kernel's environment changed"
    assert report.replayed[0]["got"] == "changed after the spare started"  # as a cold check sees it
    _ready(spare_check.current())  # the replacement, started with the environment of now
    write_truss(root, (root / "model" / "model.py").read_text(), "model_name: t\nenvironment_variables: {A: '1'}\n")
    assert _check(root, spare=True).spare is None
    assert spare_check._state.last_miss == "the config's environment_variables changed"


def test_a_spare_is_not_used_once_a_source_it_imported_from_outside_site_packages_changed(tmp_path, spare_slot):
    """An editable install (this project's own, in a developer's venv) lives outside site-packages, whose
    stamp would not see the edit: the spare names the file and the check starts cold."""
    import kernel_magics.core.runtime as runtime

    source = Path(runtime.__file__)
    if "site-packages" in source.parts:
        pytest.skip("kernel_magics is not an editable install here")
    root = write_truss(tmp_path / "t", "import json\nclass Model:\n    def predict(self, model_input):\n        return 1\n")
    _ready(spare_slot.prepare(["import json"]))
    assert _check(root, spare=True).spare == ["import json"]  # unchanged: the spare is used
    spare = spare_slot.current()
    _ready(spare)
    before = source.stat()
    try:
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))  # as an editor's save
        report = _check(root, spare=True)
    finally:
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert report.ok and report.spare is None
    assert spare_check._state.last_miss == f"{source} changed since the spare imported it"


NOTEBOOK_MODEL = '''%%model
import json, os, sys

SEEN = {seen!r}

class Model:
    def load(self):
        main = sys.modules["__main__"]
        with open(SEEN, "w") as f:
            json.dump({{"path": sys.path, "main": sorted(vars(main)), "cwd": os.getcwd(),
                       "modules": sorted(sys.modules), "pythonpath": os.environ.get("PYTHONPATH")}}, f)
    def predict(self, model_input):
        return {{"ok": True}}
'''


@pytest.mark.slow  # 4 to 7 s each on this machine under load: a kernel, or three fresh Pythons
def test_nothing_of_the_kernel_reaches_the_spare_and_the_export_says_where_the_time_went(tmp_path, fresh_kernel):
    extra = tmp_path / "kernel-only"
    extra.mkdir()
    (extra / "kernel_only_module.py").write_text("VALUE = 1\n")
    notebook_dir = tmp_path / "nb"
    notebook_dir.mkdir()
    seen = tmp_path / "seen.json"
    k = fresh_kernel(cwd=notebook_dir, env={"PYTHONPATH": str(extra)}, load_ext=True, spare_checker=True)
    k.ok(f"import sys\nsys.path.insert(0, {str(extra)!r})\nimport kernel_only_module\nKERNEL_ONLY_GLOBAL = 42")
    k.ok(NOTEBOOK_MODEL.format(seen=str(seen)))
    k.ok("%model_load --no-widget")
    k.ok("%model_predict {}")
    # The spare started after the load; wait for its marker (its imports are done), as a user's next export would find it.
    k.ok("from kernel_magics.core import spare_check as _sc\nimport time as _t\n_sc.settled(60)\n_s = _sc.current()\n"
         "while not _s.ready:\n    _t.sleep(0.02)")
    out = k.ok("%model_export out").stdout
    timings = json.loads(k.ok("import json as _j\nprint(_j.dumps(get_ipython().magics_manager.registry"
                              "['ModelMagics'].last_export_timings))").stdout)
    # Checked by the spare, which ran model.py's imports (else: why the export did not take it).
    assert timings["spare"] == ["import json, os, sys"], k.ok("print(_sc._state.last_miss)").stdout
    assert "Checked in " in out and ": import " in out and ", load " in out and ", replay " in out
    assert "(1 prediction); its libraries were imported in advance (json, os, sys)." in out
    got = json.loads(seen.read_text())
    assert str(extra) not in got["path"] and got["pythonpath"] is None
    assert "kernel_only_module" not in got["modules"] and "KERNEL_ONLY_GLOBAL" not in got["main"]
    assert not any(p == str(notebook_dir) or p == "" for p in got["path"])
    assert Path(got["cwd"]).name.startswith("km-check-") and not Path(got["cwd"]).exists()


@pytest.mark.slow  # 4 to 7 s each on this machine under load: a kernel, or three fresh Pythons
def test_the_first_export_after_model_load_finds_what_the_values_unpickle_imported(tmp_path, fresh_kernel):
    """%model_load's spare imports model.py's leading imports, then (once the values were saved aside and their
    pickles read) the modules they unpickle: exactly what the export's own check_imports says, so it is used."""
    k = fresh_kernel(cwd=tmp_path, load_ext=True, spare_checker=True)
    k.ok("%%model_config\nrequirements: [numpy]")
    k.ok("import fractions\nimport numpy\nTABLE = []")
    k.ok("TABLE += [numpy.random.default_rng().random(3), fractions.Fraction(1, 3)]")  # (so it travels as a value)
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        return float(TABLE[0].sum() + TABLE[1])")
    k.ok("%model_load --no-widget")
    k.ok("%model_predict {}")
    # As a user's next export would find it: its imports done, the values' ones too (bounded, not timed).
    k.ok("from kernel_magics.core import spare_check as _sc\nimport time as _t\n_sc.settled(60)\n_s = _sc.current()\n"
         "_end = _t.monotonic() + 60\n"
         "while not (_s.ready and _s.imported() == _s.modules and any('numpy' in m for m in _s.modules)) "
         "and _t.monotonic() < _end:\n    _t.sleep(0.02)")
    k.ok("%model_export out")
    timings = json.loads(k.ok("import json as _j\nprint(_j.dumps(get_ipython().magics_manager.registry"
                              "['ModelMagics'].last_export_timings))").stdout)
    exported = TrussDir.open(tmp_path / "out")
    needed = spare_check.check_imports(exported)
    leading = spare_check.top_level_imports(exported.model_file.read_text())
    assert len(needed) > len(leading) and any("numpy" in m for m in needed[len(leading):]), needed
    assert timings["spare"] == needed


# A notebook value whose pickling by the export's planning (through notebook_pickle; the load's snapshot pickles
# otherwise) waits until the file {gate} exists: the test decides when planning goes on.
GATED_VALUE = """\
import pathlib, sys, time
GATE = pathlib.Path({gate!r})

class Slow:
    x = 0

    def __reduce__(self):
        frame = sys._getframe(1)
        while frame is not None and not frame.f_code.co_filename.endswith('notebook_pickle.py'):
            frame = frame.f_back
        while frame is not None and not GATE.exists():
            time.sleep(0.02)
        return (Slow, ())


THING = Slow()"""


@pytest.mark.slow  # 4 to 7 s each on this machine under load: a kernel, or three fresh Pythons
def test_model_load_ends_with_the_load_while_the_next_export_is_planned_in_the_background(tmp_path, fresh_kernel):
    """Planning the export's values (imports their libraries; skops walks scikit-learn: seconds) happens after the
    cell: here planning waits for a file the test writes only once %model_load has returned."""
    gate = tmp_path / "gate"
    k = fresh_kernel(cwd=tmp_path, load_ext=True, spare_checker=True)
    k.ok(GATED_VALUE.format(gate=str(gate)))
    k.ok("THING.x = 1")  # (changed by a later cell: it travels as a value)
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        return THING.x")
    k.ok("%model_load --no-widget", timeout=60)
    gate.touch()
    out = k.ok("from kernel_magics.core import spare_check as _sc\nprint(_sc.settled(60), _sc.current() is not None)")
    assert out.stdout.split() == ["True", "True"], out.stdout


@pytest.mark.slow  # 4 to 7 s each on this machine under load: a kernel, or three fresh Pythons
def test_the_spare_goes_with_model_unload_and_with_its_kernel(tmp_path, fresh_kernel):
    k = fresh_kernel(cwd=tmp_path, load_ext=True, spare_checker=True)
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        return 1")
    probe = ("from kernel_magics.core import spare_check as _sc\n_sc.settled(60)\n_s = _sc.current()\n_s.started.wait(30)\n"
             "print(_s.proc.pid, _s.path)")

    def spare() -> tuple[int, Path]:
        pid, path = k.ok(probe).stdout.split()
        return int(pid), Path(path)

    k.ok("%model_load --no-widget")
    pid, path = spare()
    k.ok("%model_unload")
    assert process_gone(pid) and not path.exists()
    assert "None" in k.ok("print(_sc.current())").stdout
    k.ok("%model_load --no-widget")
    pid, path = spare()
    assert os.path.isdir(path)
    k.shutdown()
    assert process_gone(pid)
    deadline = time.monotonic() + 30
    while path.exists() and time.monotonic() < deadline:  # its own last act: removing its folder
        time.sleep(0.02)
    assert not path.exists()


@pytest.mark.slow  # two kernels
def test_spare_checker_off_stops_the_spare_and_starts_none_and_exports_check_cold(tmp_path, fresh_kernel):
    k = fresh_kernel(cwd=tmp_path, load_ext=True, spare_checker=True)
    k.ok("%%model\nimport json\n\nclass Model:\n    def predict(self, model_input):\n        return json.dumps(1)")
    probe = "from kernel_magics.core import spare_check as _sc\n_sc.settled(60)\nprint(_sc.current() is not None)"
    k.ok("%model_load --no-widget")
    k.ok("%model_predict {}")
    spare = k.ok(probe + "\n_s = _sc.current()\n_s.started.wait(30)\nprint(_s.proc.pid, _s.path)").stdout.split()
    assert spare[0] == "True"
    k.ok("%config ModelMagics.spare_checker = False")
    assert process_gone(int(spare[1])) and not Path(spare[2]).exists()
    k.ok("%model_load --no-widget")
    assert k.ok(probe).stdout.split() == ["False"]
    out = k.ok("%model_export out").stdout
    assert "Replayed 1 recorded prediction" in out and "in advance" not in out, out
    assert k.ok(probe).stdout.split() == ["False"]  # and none after the export either
    k.ok("%config ModelMagics.spare_checker = True")
    k.ok("%model_load --no-widget")
    assert k.ok(probe).stdout.split() == ["True"]  # on again: from the next %model_load
    # Turned off while the load's planning thread runs (held at a gate: planning pickles THING): the spare that
    # thread then asks for does not start.
    gate = tmp_path / "gate"
    k.ok(GATED_VALUE.format(gate=str(gate)))
    k.ok("THING.x = 1")  # (changed by a later cell: it travels as a value)
    k.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        return THING.x")
    k.ok("%model_unload")  # (its spare goes: the load below starts from none)
    k.ok("get_ipython().run_line_magic('model_load', '--no-widget')\n"
         "get_ipython().run_line_magic('config', 'ModelMagics.spare_checker = False')\nGATE.touch()")
    assert k.ok(probe).stdout.split() == ["False"]
    # Set when the kernel starts, as the tests' kernels have it (an IPython config file would do the same):
    off = fresh_kernel(cwd=tmp_path, load_ext=True, spare_checker=False)
    off.ok("%%model\nclass Model:\n    def predict(self, model_input):\n        return 1")
    off.ok("%model_load --no-widget")
    assert off.ok(probe).stdout.split() == ["False"]


def test_only_the_imports_model_py_starts_with_are_imported_in_advance():
    # A statement before an import (an environment variable a library reads when imported) ends what a spare
    # may import ahead: the cold check runs it first.
    text = '"""doc"""\nimport os\nfrom a.b import c\nimport x as y, z\nos.environ["HF_HUB_OFFLINE"] = "1"\nimport numpy\n'
    assert spare_check.top_level_imports(text) == ["import os", "from a.b import c", "import x as y, z"]


def test_the_modules_a_pickle_imports_are_read_from_its_opcodes_without_unpickling():
    import collections
    import decimal
    import fractions
    import pickle

    from kernel_magics.core.value_imports import pickle_modules

    value = [collections.OrderedDict(a=1), fractions.Fraction(1, 3), decimal.Decimal("1.5"), collections.OrderedDict()]
    for protocol in (2, 4, 5):  # GLOBAL (2); STACK_GLOBAL with memoized strings, the class met twice (4, 5)
        found = pickle_modules(pickle.dumps(value, protocol=protocol))
        assert [m for m in found if m in ("collections", "fractions", "decimal")] == ["collections", "fractions",
                                                                                      "decimal"], (protocol, found)
    # A frame boundary between the two strings STACK_GLOBAL takes (protocol 4 frames every 64 KiB).
    import datetime

    assert "datetime" in pickle_modules(pickle.dumps([b"x" * 65516, datetime.time(1, 2)], protocol=4))
    # Python 2 names are imported as pickle maps them below protocol 3 (and only there).
    assert pickle_modules(b"\x80\x02c__builtin__\nset\nq\x00.") == ["builtins"]
    assert pickle_modules(b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x0b__builtin__\x8c\x03set\x93.") == ["__builtin__"]


VALUE_MODEL = '''import pathlib
import pickle

_VALUES = pathlib.Path(__file__).resolve().parent.parent / "data" / "notebook_values"
{between}v = pickle.loads((_VALUES / "v.pkl").read_bytes())


class Model:
    def load(self):
        self.x = numpy.zeros(1)  # `import numpy` forgotten: only the pickle imports numpy

    def predict(self, model_input):
        return 1
'''


def _truss_with_a_pickled_value(root: Path, between: str = "", value=None) -> Path:
    import fractions
    import pickle

    import numpy

    root = write_truss(root, VALUE_MODEL.format(between=between), "requirements: [numpy]\n")
    (root / "data" / "notebook_values").mkdir(parents=True)
    value = [numpy.arange(3), fractions.Fraction(1, 3)] if value is None else value
    (root / "data" / "notebook_values" / "v.pkl").write_bytes(pickle.dumps(value))
    return root


def test_a_spare_imports_what_the_values_unpickle_and_a_forgotten_import_still_fails(tmp_path, spare_slot):
    root = _truss_with_a_pickled_value(tmp_path / "t")
    ahead = spare_check.check_imports(TrussDir.open(root))
    # numpy's modules (a requirement), not fractions (the standard library: never imported ahead)
    assert ahead[:2] == ["import pathlib", "import pickle"] and len(ahead) > 2
    assert all(s.startswith("import numpy") for s in ahead[2:]), ahead
    cold = _check(root, spare=False)
    assert cold.error and cold.error.startswith("NameError") and cold.stage == "load"
    spare = spare_check.prepare(ahead)
    _ready(spare)
    assert spare.imported() == ahead
    warm = _check(root, spare=True)
    assert warm.spare == ahead  # used: numpy was imported ahead, and model.py still does not see the name
    assert (warm.ok, warm.stage, warm.error) == (False, cold.stage, cold.error)


def test_nothing_is_imported_ahead_for_values_loaded_after_another_statement(tmp_path):
    # A statement between the values' folder and the load may change what an import does: it runs first, cold.
    root = _truss_with_a_pickled_value(tmp_path / "t", between='import os\nos.environ["X"] = "1"\n')
    assert spare_check.check_imports(TrussDir.open(root)) == ["import pathlib", "import pickle"]
    root = _truss_with_a_pickled_value(tmp_path / "u", between='print("hi")\n')
    assert spare_check.check_imports(TrussDir.open(root)) == ["import pathlib", "import pickle"]


def test_only_modules_of_the_requirements_are_imported_ahead_and_a_damaged_value_means_a_cold_check(tmp_path):
    import xml.dom.minidom

    # The standard library is not a requirement: a pickle naming xml.dom.minidom does not import it ahead
    # (a reconstructor earlier in the pickle might rely on it not being imported yet).
    root = _truss_with_a_pickled_value(tmp_path / "t", value=[xml.dom.minidom.Document])
    assert spare_check.check_imports(TrussDir.open(root)) == ["import pathlib", "import pickle"]
    # A value file that cannot be read ahead: the spare is not used, the export's check goes on cold.
    (root / "data" / "notebook_values" / "v.pkl").write_bytes(b"not a pickle at all")
    assert spare_check.check_imports(TrussDir.open(root)) == ["import pathlib", "import pickle"]


def test_an_extended_spare_imports_the_values_modules_and_a_forgotten_import_still_fails(tmp_path, spare_slot):
    """The {"more": ...} line %model_load's spare gets once the values' modules are known: imported before the
    job, and the proof is the cold one's."""
    root = _truss_with_a_pickled_value(tmp_path / "t")
    ahead = spare_check.check_imports(TrussDir.open(root))
    spare = spare_check.prepare(ahead[:2])  # model.py's leading imports, as %model_load starts it
    assert spare.started.wait(30)
    with spare_check._state.lock:
        assert spare.extend(ahead[2:])
    deadline = time.monotonic() + 120
    while spare.imported() != ahead:
        assert spare.alive() and time.monotonic() < deadline, (spare.path / "output.txt").read_text()
        time.sleep(0.02)
    cold = _check(root, spare=False)
    warm = _check(root, spare=True)
    assert warm.spare == ahead and cold.error.startswith("NameError")
    assert (warm.ok, warm.stage, warm.error) == (False, cold.stage, cold.error)


def _table_export(tmp_path, table):
    import fractions

    import numpy

    from kernel_magics.core.config import ModelConfig
    from kernel_magics.core.export import materialize

    cells = ["import fractions\nimport numpy\nTABLE = []", "TABLE += [numpy.arange(3), fractions.Fraction(1, 3)]",
             "%%model\nclass Model:\n    def predict(self, model_input):\n        return float(TABLE[1])"]
    live = {"fractions": fractions, "numpy": numpy, "TABLE": table}
    return materialize(cells, ModelConfig(requirements=["numpy"]), tmp_path, "nb.ipynb", live=live)


def test_the_values_modules_are_known_before_the_export_exactly_as_the_export_will_read_them(tmp_path, monkeypatch):
    import fractions

    import numpy

    from kernel_magics.core.export import export_model

    monkeypatch.chdir(tmp_path)
    materialized = _table_export(tmp_path, [numpy.arange(3), fractions.Fraction(1, 3)])
    before = spare_check.imports_before_export(materialized)
    export_model(tmp_path / "out", materialized, base_dir=tmp_path)
    needed = spare_check.check_imports(TrussDir.open(tmp_path / "out"))
    assert before == needed and any("numpy" in s for s in needed), (before, needed)
    # Nothing when cancelled, or when the value is too large to be read ahead at export either.
    assert spare_check.imports_before_export(materialized, cancelled=lambda: True) is None
    big = _table_export(tmp_path, [numpy.zeros(65 * 2**20, dtype=numpy.uint8), fractions.Fraction(1, 3)])
    assert spare_check.imports_before_export(big) is None


def test_an_export_that_waits_for_its_spares_imports_says_so(tmp_path, spare_slot):
    """Exported right after %model_load (or the export before), the spare is still importing: the check's own stages
    do not show that wait, so the export's note does."""
    from kernel_magics.core.export import _check_note

    root = write_truss(tmp_path / "t", "import torch\nclass Model:\n    def predict(self, model_input):\n        return 1\n")
    spare_slot.prepare(["import torch"])  # importing torch takes over a second; the check is sent at once
    report = _check(root, spare=True)
    assert report.ok and report.spare == ["import torch"], report
    assert report.stages["waiting"] > 0.3, report.stages
    note = _check_note({**report.stages, "spare": report.spare, "check": report.seconds}, 1)
    assert note.startswith(f"Checked in {report.seconds:.1f} s: waiting for the libraries being imported in advance "
                           f"{report.stages['waiting']:.1f} s, import "), note
