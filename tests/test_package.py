"""The package as a user gets it: wheel and sdist built, installed into fresh venvs with no Node.js on the PATH.

Both go in with uv, from the package sources pip is configured with. What is tested is the package (its
metadata, its data files, the sdist's PEP 517 build), not the installer: uv reads the same metadata and builds
the sdist through the same backend and build requirements, in an isolated environment, as pip does. It does so
in a fraction of pip's time and CPU: the sdist in 4 s against pip's 72 (pip fetches and installs JupyterLab, a
build requirement, one file at a time); the wheel with its base dependencies in 3 s against 16 s, and the venvs
need no pip of their own (`venv --without-pip`: no ensurepip, 4 s each). uv also installs the JupyterLab that the
wheel's extension must show up in: set-up, not what is tested. Slow (fresh venvs, installs from the package
index or the caches); `make test` runs it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from uv_install import uv_install as uv_pip_install

REPO = Path(__file__).resolve().parents[1]
HEAVY = {"jupyterlab", "nbval", "fastapi", "uvicorn", "ray", "torch", "pytest"}


def run(*cmd, env=None, cwd=None, timeout=600):
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def uv_cache(tmp_path_factory):
    """uv's cache for this module's installs: in pytest's temp dir, never the home directory."""
    return tmp_path_factory.mktemp("uv-cache")


def uv_install(python: Path, env: dict, cache: Path, *requirements) -> None:
    done = uv_pip_install(python, env, cache, *requirements)
    assert done.returncode == 0, f"uv pip install {requirements}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def fresh_venv(path: Path) -> tuple[Path, dict]:
    """A venv whose PATH holds only its own bin: no node, npm or jlpm anywhere (and no pip: uv installs)."""
    run(sys.executable, "-m", "venv", "--without-pip", path)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = str(path / "bin")
    return path / "bin" / "python", env


def distributions(python: Path, env: dict, cache: Path) -> dict[str, str]:
    listed = run(sys.executable, "-m", "uv", "pip", "list", "--format", "json", "--python", python,
                 env={**env, "UV_CACHE_DIR": str(cache)}).stdout
    return {d["name"].lower(): d["version"] for d in json.loads(listed)}


@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_installs_without_node_and_the_base_install_is_lean(tmp_path, dist, uv_cache, kind):
    python, env = fresh_venv(tmp_path / "venv")
    uv_install(python, env, uv_cache, dist[0] if kind == "wheel" else dist[1])
    installed = distributions(python, env, uv_cache)
    assert "kernel-magics" in installed
    assert not HEAVY & set(installed), HEAVY & set(installed)
    # The magics work in a real kernel of this venv.
    probe = ("from jupyter_client.manager import start_new_kernel\n"
             "km, kc = start_new_kernel(kernel_name='python3')\n"
             "reply = kc.execute_interactive('%load_ext kernel_magics\\n%model_status', timeout=60)\n"
             "print(reply['content']['status'])\nkc.stop_channels(); km.shutdown_kernel(now=True)")
    out = run(python, "-c", probe, env=env, timeout=300).stdout
    assert "state: not defined" in out and out.strip().endswith("ok"), out
    # A command that needs an extra says which one, in one line.
    serve = subprocess.run([str(python), "-m", "kernel_magics", "serve", str(tmp_path)], capture_output=True,
                           text=True, env=env, timeout=120)
    assert serve.returncode == 1 and serve.stderr.strip().count("\n") == 0
    assert "pip install 'kernel-magics[serve]'" in serve.stderr
    # The prebuilt extension is there as data files, and an existing JupyterLab lists it enabled.
    share = tmp_path / "venv" / "share" / "jupyter" / "labextensions" / "kernel-magics"
    assert (share / "package.json").is_file() and (share / "install.json").is_file()
    if kind == "wheel":
        uv_install(python, env, uv_cache, "jupyterlab>=4,<5")
        listed = run(tmp_path / "venv" / "bin" / "jupyter", "labextension", "list", env=env)
        line = next(l for l in (listed.stdout + listed.stderr).splitlines() if "kernel-magics" in l)
        assert "enabled" in line and "OK" in line and "(python, kernel-magics)" in line, line


def test_the_sdist_carries_the_prebuilt_extension_and_no_build_leftovers(dist):
    import tarfile

    with tarfile.open(dist[1]) as tar:
        names = tar.getnames()
    assert any(n.endswith("kernel_magics/labextension/package.json") for n in names)
    assert not any("/node_modules/" in n or "/.venv/" in n or "/notebooks/exports/" in n for n in names)
