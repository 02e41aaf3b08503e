"""The set-up's install of the project into its venv, in the order that keeps both cores of this machine busy.

Installing the editable project at once (``uv pip install -e ".[extras]"``) builds it before anything else: the
JupyterLab extension's jlpm install and webpack build, about 30 s mostly on one core, with the dependencies
installed in a few seconds after it and the .pyc warm-up (.ci/warm_bytecode.py, two processes, about 17 s) after
that. Here uv installs the dependencies first (read from pyproject.toml, no build needed: about 6 s), with what the
build itself needs (its build-system requirements and ``editables``); then the project's build runs in that venv
(``--no-build-isolation``) while the warm-up imports the dependencies beside it. The project's own modules are
imported from the working tree meanwhile, as the editable install will map them. Where uv cannot be had, pip
installs everything in one step, as before, and the warm-up follows.

    python .ci/install_venv.py VENV_PYTHON EXTRAS [REQUIREMENT OR PIP OPTION...]

e.g. ``python .ci/install_venv.py .venv/bin/python test,serve -c constraints.txt torch==2.13.0``.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import uv_pip  # noqa: E402
import warm_bytecode  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    python, extras, pinned = argv[0], [e for e in argv[1].split(",") if e], argv[2:]
    editable = ["-e", f".[{','.join(extras)}]" if extras else "."]
    uv = uv_pip.uv_for(python)
    if uv is None:
        done = uv_pip.pip_install(python, [*pinned, *editable])
        return done or warm_bytecode.main([python])
    command, env = uv
    build_needs = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    needs = ["-r", "pyproject.toml", *(f"--extra={extra}" for extra in extras), *build_needs, "editables", *pinned]
    if subprocess.run([*command, *needs], env=env, cwd=ROOT).returncode != 0:
        # What uv could not do (a setting of pip's it does not take, a source it reads otherwise), pip may.
        print("note: uv could not install the requirements (above); pip tries (slower)", file=sys.stderr)
        done = uv_pip.pip_install(python, [*pinned, *editable])
        return done or warm_bytecode.main([python])
    build = subprocess.Popen([*command, "--no-deps", "--no-build-isolation", "-e", "."], env=env, cwd=ROOT)
    try:
        warm_bytecode.main([python])
    finally:
        built = build.wait()
    if built != 0:
        print("error: the project's build failed (above)", file=sys.stderr)
    return built


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
