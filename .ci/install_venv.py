"""The set-up's install of the project into its venv, in the order that keeps both cores of this machine busy.

Installing the editable project at once (``uv pip install -e ".[extras]"``) builds it before anything else: the
JupyterLab extension's jlpm install and webpack build, about 30 s mostly on one core, with the dependencies
installed in a few seconds after it and the .pyc warm-up (.ci/warm_bytecode.py, two processes, about 17 s) after
that. Here uv installs the dependencies first (read from pyproject.toml, no build needed: about 6 s), with what the
build itself needs (its build-system requirements and ``editables``); then the project's build runs in that venv
(``--no-build-isolation``) while the warm-up imports the dependencies beside it. The project's own modules are
imported from the working tree meanwhile, as the editable install will map them. Where uv cannot be had (or this
Python has no tomllib, 3.10), pip installs everything in one step, as before, and the warm-up follows. A build
that fails is reported once the warm-up ends, not tried again: it would fail the same way.

    python .ci/install_venv.py VENV_PYTHON EXTRAS [REQUIREMENT OR PIP OPTION...]

e.g. ``python .ci/install_venv.py .venv/bin/python test,serve -c constraints.txt torch==2.13.0``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.dont_write_bytecode = True  # no .ci/__pycache__ for the two modules below
sys.path.insert(0, str(Path(__file__).resolve().parent))
import uv_pip  # noqa: E402
import warm_bytecode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def build_needs() -> list[str]:
    """What the project's build imports: its build-system requirements and its build hooks' dependencies, and
    ``editables`` (hatchling's editable wheel)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    hooks = project.get("tool", {}).get("hatch", {}).get("build", {}).get("hooks", {}).values()
    return [*project["build-system"]["requires"], *(d for hook in hooks for d in hook.get("dependencies", [])),
            "editables"]


def main(argv: list[str]) -> int:
    python, extras, pinned = argv[0], [e for e in argv[1].split(",") if e], argv[2:]
    # The paths below (constraints.txt, ".") are the repository's, and the warm-up imports the project's own
    # modules from its working tree (`python -c` puts the working directory first on sys.path).
    os.chdir(ROOT)
    editable = ["-e", f".[{','.join(extras)}]" if extras else "."]

    def with_pip() -> int:  # one step, then the warm-up, as before
        return uv_pip.pip_install(python, [*pinned, *editable]) or warm_bytecode.main([python])

    try:
        needs = build_needs()
    except ModuleNotFoundError:  # no tomllib (Python 3.10)
        return with_pip()
    uv = uv_pip.uv_for(python)
    if uv is None:
        return with_pip()
    command, env = uv
    requirements = ["-r", "pyproject.toml", *(f"--extra={extra}" for extra in extras), *needs, *pinned]
    if subprocess.run([*command, *requirements], env=env).returncode != 0:
        # What uv could not do (a setting of pip's it does not take, a source it reads otherwise), pip may.
        print("note: uv could not install the requirements (above); pip tries (slower)", file=sys.stderr)
        return with_pip()
    build = subprocess.Popen([*command, "--no-deps", "--no-build-isolation", "-e", "."], env=env)
    try:
        warm_bytecode.main([python])
    finally:
        built = build.wait()
    if built != 0:
        print("error: the project's build failed (above)", file=sys.stderr)
    return built


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
