"""One owner of a Truss directory: paths, layout keys, packages, secret defaults, value rules.

Every command runs as a real subprocess from different working directories; served directories
answer over real HTTP.
"""

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from server_harness import serve_ours, write_truss

ECHO = "class Model:\n    def predict(self, model_input):\n        return model_input\n"


def cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "kernel_magics", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=300)


def pycaches(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("__pycache__")]


def test_validate_takes_any_path_from_any_working_directory(tmp_path):
    project = tmp_path / "project"
    (project / "sub").mkdir(parents=True)
    write_truss(project / "x", ECHO)
    for cwd, arg in [(project, "x"), (project, "./x"), (project / "sub", "../x"), ("/", project / "x"),
                     (project / "x", ".")]:
        done = cli("validate", arg, cwd=cwd)
        assert done.returncode == 0, (cwd, arg, done.stderr)
        assert done.stdout.startswith(f"OK {project / 'x'}: ") and "imported and instantiated in a fresh Python" in done.stdout
        assert "exported" not in done.stdout + done.stderr
    assert pycaches(project) == []  # validate writes nothing into the user's folder


LAYOUT = '''
from helper_pkg import greet
from shared_tools import shout


class Predictor:
    def __init__(self, config):
        self._name = config["model_name"]

    def predict(self, model_input):
        return {"greeting": shout(greet(model_input["who"])), "name": self._name}
'''


def layout_dir(tmp_path: Path) -> Path:
    """model_module_dir, model_class_filename, model_class_name, bundled packages, an external package dir."""
    root = tmp_path / "custom"
    (root / "src").mkdir(parents=True)
    (root / "src" / "predictor.py").write_text(LAYOUT)
    (root / "libs" / "helper_pkg").mkdir(parents=True)
    (root / "libs" / "helper_pkg" / "__init__.py").write_text("def greet(who):\n    return f'hello {who}'\n")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "shared_tools.py").write_text("def shout(text):\n    return text.upper()\n")
    (root / "config.yaml").write_text(
        "model_name: custom-layout\nmodel_module_dir: src\nmodel_class_filename: predictor.py\n"
        "model_class_name: Predictor\nbundled_packages_dir: libs\nexternal_package_dirs: [../shared]\n"
        "some_future_key: 1\n")
    return root


def test_layout_keys_and_package_dirs_through_validate_and_serve(tmp_path):
    root = layout_dir(tmp_path)
    done = cli("validate", "custom", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "src/predictor.py defines `Predictor` with predict" in done.stdout
    # warned, not refused, as Truss's parser allows it; its push would refuse it (validate_forbid_extra)
    assert ("unknown key `some_future_key` is ignored here and by Truss's server, but `truss push` refuses it"
            in done.stderr), done.stderr
    # Served as users serve it, with Python writing .pyc files (this machine and CI turn that off):
    # none lands in the user's directory, nor in its package dirs.
    with serve_ours(root, env={"PYTHONDONTWRITEBYTECODE": ""}) as served:  # (empty: writing on)
        answer = httpx.post(served.predict_url(), json={"who": "ada"}).json()
    assert answer == {"greeting": "HELLO ADA", "name": "custom-layout"}
    assert pycaches(root) == [] and pycaches(tmp_path / "shared") == []


def test_the_directory_imports_as_python_imports_it_less_the_pycache(tmp_path):
    """The hook that keeps __pycache__ out of the directory changes nothing else: a .zip on the path under it
    imports (zipimport's hook still gets it), and an extension module wins over a .py of the same name."""
    import _statistics  # (a compiled module nothing here imports first)
    import shutil
    import zipfile

    root = tmp_path / "d"
    root.mkdir()
    (root / "plain_mod.py").write_text("X = 2\n")
    with zipfile.ZipFile(root / "lib.zip", "w") as z:
        z.writestr("zipped_mod.py", "X = 1\n")
    shutil.copy(_statistics.__file__, root)  # the compiled module, and a .py of its name beside it that must lose
    (root / "_statistics.py").write_text("X = 3\n")
    code = (f"import sys\nsys.path[:0] = [{str(root / 'lib.zip')!r}, {str(root)!r}]\n"
            "from pathlib import Path\nfrom kernel_magics.core.truss_dir import _no_bytecode_under\n"
            f"_no_bytecode_under([Path({str(root)!r})])\n"
            "import zipped_mod, plain_mod, _statistics\n"
            "print(zipped_mod.X, plain_mod.X, hasattr(_statistics, '_normal_dist_inv_cdf'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": ""})  # (empty: writing on)
    assert done.stdout.split() == ["1", "2", "True"], done.stderr
    assert pycaches(root) == []


def test_the_import_check_names_a_missing_package_and_the_flag_that_skips_it(tmp_path):
    write_truss(tmp_path / "gpu", "import not_installed_here_xyz\n" + ECHO, "requirements: [not-installed-here-xyz==1.0]\n")
    done = cli("validate", "gpu", cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "needs `not_installed_here_xyz`, which is not installed in this Python" in done.stderr
    assert "--no-import" in done.stderr
    done = cli("validate", "gpu", "--no-import", cwd=tmp_path)
    assert done.returncode == 0 and "import check skipped (--no-import)" in done.stdout


def test_a_streaming_predict_with_postprocess_is_refused_before_it_is_served(tmp_path):
    """Truss's server loads such a class and answers every request 412: validate and serve say so at once."""
    write_truss(tmp_path / "pp", "class Model:\n    def predict(self, model_input):\n        yield 'a'\n\n"
                "    def postprocess(self, result):\n        return result\n")
    for command in (["validate", "pp"], ["serve", "pp", "--port", "0"]):
        done = cli(*command, cwd=tmp_path)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert "`Model.predict` in" in done.stderr and "streams (it yields) and the class has postprocess" in done.stderr
    # A generator defined inside predict is no stream of its own.
    write_truss(tmp_path / "ok", "class Model:\n    def predict(self, model_input):\n"
                "        def parts():\n            yield 'a'\n        return ''.join(parts())\n\n"
                "    def postprocess(self, result):\n        return result\n")
    assert cli("validate", "ok", "--no-import", cwd=tmp_path).returncode == 0


def test_validate_replays_the_example_input(tmp_path):
    write_truss(tmp_path / "ex", "class Model:\n    def predict(self, model_input):\n        return 1 / model_input['d']\n",
                "model_metadata: {example_model_input: {d: 0}}\n")
    done = cli("validate", "ex", cwd=tmp_path)
    assert done.returncode == 1 and "predict failed on model_metadata.example_model_input: ZeroDivisionError" in done.stderr
    assert "division by zero (model/model.py, line 3, in predict)." in done.stderr, done.stderr  # where to look
    (tmp_path / "ex" / "config.yaml").write_text("model_metadata: {example_model_input: {d: 4}}\n")
    done = cli("validate", "ex", cwd=tmp_path)
    assert done.returncode == 0 and "answered model_metadata.example_model_input" in done.stdout


def test_validate_warns_of_requirements_this_python_does_not_meet_as_serve_does(tmp_path):
    """validate runs the model with what is installed here: a requirement that is not met is said, as serve says it,
    and the check still runs (the deployment installs its requirements)."""
    write_truss(tmp_path / "req", ECHO, "requirements: [pyyaml==0.0.1, no-such-dist-km==1.0, 'pyyaml; python_version < \"3\"']\n")
    done = cli("validate", "req", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("OK "), done.stdout + done.stderr
    lines = done.stderr.splitlines()
    assert [line.split(" but ")[0] for line in lines] == [
        "warning: config.yaml requires pyyaml==0.0.1", "warning: config.yaml requires no-such-dist-km==1.0"], lines
    assert lines[1].endswith("but no-such-dist-km is not installed"), lines


@pytest.mark.parametrize("memory, expected", [
    ("1Pi", 2**50), ("512Mi", 512 * 2**20), ("2Gi", 2 * 2**30), ("1.5Gi", int(1.5 * 2**30)), ("1G", 10**9),
    ("128974848", 128974848), ("129e6", 129 * 10**6), ("123Mi", 123 * 2**20), ("1Ei", 2**60), ("4k", 4000),
    ("2Ti", 2 * 2**40), ("3T", 3 * 10**12), ("1P", 10**15), ("1E", 10**18), ("8Ki", 8192),
])
def test_memory_in_every_unit_reaches_the_ray_replica(memory, expected):
    from kernel_magics.core.config import parse_config
    from kernel_magics.serving.ray_engine import replica_options

    options = replica_options(parse_config(f"resources: {{memory: '{memory}', cpu: '2'}}\n"))
    assert options["ray_actor_options"]["memory"] == expected
    assert options["ray_actor_options"]["num_cpus"] == 2.0


def test_quantities_truss_refuses_are_refused_with_the_reason():
    from kernel_magics.core.config import parse_config
    from kernel_magics.core.errors import ConfigError

    for text, fragment in [("resources: {memory: 1000m}", "does not accept the unit 'm' for memory"),
                           ("resources: {memory: lots}", "memory must be a size like"),
                           ("resources: {cpu: '0'}", "cpu must be more than zero"),
                           ("resources: {accelerator: 'H100:0'}", "must be a positive integer")]:
        with pytest.raises(ConfigError, match=fragment):
            parse_config(text)
    config = parse_config("resources: {accelerator: {accelerator: H100, count: 2}}")
    assert str(config.resources.gpu) == "H100:2" and config.resources.gpu_count == 2


def test_a_syntax_error_in_model_py_names_its_line_and_shows_it(tmp_path):
    from kernel_magics.core.truss_dir import TrussDir, TrussDirError

    root = write_truss(tmp_path / "broken", "class Model:\n    def predict(self model_input):\n        return 1\n")
    with pytest.raises(TrussDirError) as caught:
        TrussDir.open(root).check_static()
    message = str(caught.value)  # (Python's own wording of the error varies between versions)
    assert ", line 2: syntax error: " in message and message.endswith(": `def predict(self model_input):`. Fix model.py.")
    long_line = "x = (" + " + ".join(["1"] * 80) + " +)\n"
    (root / "model" / "model.py").write_text("class Model:\n    def predict(self, model_input):\n        return 1\n" + long_line)
    with pytest.raises(TrussDirError) as caught:
        TrussDir.open(root).check_static()
    assert "line 4: syntax error: " in str(caught.value) and "...`. Fix model.py." in str(caught.value), str(caught.value)
