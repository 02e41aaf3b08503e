"""``pip install`` done by uv, from the package sources pip is configured with.

Why: the set-up's install (torch, JupyterLab, Ray, the extension's build) took pip about 4 minutes of the 9 that
`make test` may take on a fresh clone; uv resolves and installs the same requirements in parallel, through the same
PEP 517 backend for the editable project. uv reads no pip.conf nor PIP_* variable, and a machine may rely on them
(private indexes, wheel folders, a constraints file, certificates), so they are read from `pip config list` and
handed over as uv's options. Where uv cannot be had, pip does the install as before.

    python .ci/uv_pip.py VENV_PYTHON [pip install arguments...]

The tests that make venvs of their own install the same way (tests/uv_install.py, ``pip_settings_for_uv``).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from typing import Optional, Sequence


def pip_settings(python: str = sys.executable) -> dict[str, str]:
    """The settings `pip install` runs with: `pip config list` (pip.conf files and PIP_* variables), a PIP_*
    variable over an [install] section over [global], as pip reads them; other sections are other commands'."""
    listed = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True)
    sections: dict[str, dict] = {":env:": {}, "install": {}, "global": {}}
    for line in listed.stdout.splitlines() if listed.returncode == 0 else ():
        key, _, value = line.partition("=")
        section, _, name = key.rpartition(".")
        try:
            value = ast.literal_eval(value)  # pip prints each value as a Python literal (a multi-line value's \n)
        except (ValueError, SyntaxError):
            value = value.strip("'\"")
        if section in sections:
            sections[section][name.replace("_", "-")] = str(value)
    settings = {}
    for section in ("global", "install", ":env:"):
        settings.update(sections[section])
    if "default-timeout" in settings:  # (PIP_DEFAULT_TIMEOUT is the variable for `timeout`)
        settings["timeout"] = settings.pop("default-timeout")
    return settings


def pip_settings_for_uv(python: str = sys.executable) -> tuple[list, dict]:
    """pip's configuration as uv's options and variables: its indexes and wheel folders, its constraints, its
    certificates, its trusted hosts, its proxy and its timeout."""
    settings = pip_settings(python)
    options = []
    for option, key in (("--index-url", "index-url"), ("--extra-index-url", "extra-index-url"),
                        ("--find-links", "find-links"), ("--constraint", "constraint"),
                        ("--allow-insecure-host", "trusted-host")):
        for value in settings.get(key, "").split():
            options += [option, value]
    if settings.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        options.append("--no-index")
    if "extra-index-url" in settings or "find-links" in settings:
        options += ["--index-strategy", "unsafe-best-match"]  # as pip: the best version from any source
    variables = {"SSL_CERT_FILE": settings["cert"]} if "cert" in settings else {}
    if "proxy" in settings:
        variables["HTTPS_PROXY"] = variables["HTTP_PROXY"] = settings["proxy"]
    if "timeout" in settings:
        variables["UV_HTTP_TIMEOUT"] = settings["timeout"]
    return options, variables


def uv_for(python: str) -> Optional[tuple[list, dict]]:
    """uv installed into the venv of ``python``: the command that installs with it (pip's settings as its options)
    and its environment; None where uv cannot be had (pip installs instead)."""
    if subprocess.run([python, "-m", "pip", "install", "-q", "uv>=0.5"]).returncode != 0:
        print("note: uv could not be installed; pip installs instead (slower)", file=sys.stderr)
        return None
    options, variables = pip_settings_for_uv(python)
    # No --compile-bytecode (pip's way: every module of the venv, about 45 s here): the Makefile writes the .pyc
    # files of what a run imports (.ci/warm_bytecode.py) and lets Python write the rest as they are first imported.
    return ([python, "-m", "uv", "pip", "install", "-q", "--python", python, *options],
            {**os.environ, **variables, "UV_NO_PROGRESS": "1"})


def pip_install(python: str, requirements: Sequence[str]) -> int:
    """pip's own install (where uv cannot be had or failed); its exit code."""
    return subprocess.run([python, "-m", "pip", "install", "-q", *requirements]).returncode


def main(argv: list[str]) -> int:
    python, requirements = argv[0], argv[1:]
    uv = uv_for(python)
    if uv is None:
        return pip_install(python, requirements)
    command, env = uv
    if subprocess.run([*command, *requirements], env=env).returncode == 0:
        return 0
    # What uv could not do (a setting of pip's it does not take, a source it reads otherwise), pip may.
    print("note: uv could not install the requirements (above); pip tries (slower)", file=sys.stderr)
    return pip_install(python, requirements)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
