"""``uv pip install`` for the tests that make venvs of their own (the package tests, JupyterLab 4.0), from the
package sources pip is configured with: the set-up's own reading of pip's configuration (.ci/uv_pip.py, imported
from its file). uv runs from the test venv; its cache is the caller's (never the home directory)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("uv_pip", Path(__file__).resolve().parents[1] / ".ci" / "uv_pip.py")
_uv_pip = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_uv_pip)
pip_settings_for_uv = _uv_pip.pip_settings_for_uv


def uv_install(python: Path, env: dict, cache: Path, *requirements, timeout: float = 900) -> subprocess.CompletedProcess:
    """Install ``requirements`` into the venv of ``python`` with ``env`` (the PATH the venv's own); the completed
    process, whose return code the caller checks."""
    options, settings = pip_settings_for_uv()
    env = {**env, **settings, "UV_CACHE_DIR": str(cache), "UV_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, "-m", "uv", "pip", "install", "-q", "--python", str(python), *options,
                           *[str(r) for r in requirements]], capture_output=True, text=True, env=env, timeout=timeout)
