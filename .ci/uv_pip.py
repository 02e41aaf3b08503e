"""``pip install`` done by uv, from the package sources pip is configured with.

Why: the set-up's install (torch, JupyterLab, Ray, the extension's build) took pip about 4 minutes of the 9 that
`make test` may take on a fresh clone; uv resolves and installs the same requirements in parallel, through the same
PEP 517 backend for the editable project. uv reads no pip.conf nor PIP_* variable, and a machine may rely on them
(private indexes, wheel folders, a constraints file, certificates), so they are read from `pip config list` and
handed over as uv's options. Where uv cannot be had, pip does the install as before.

    python .ci/uv_pip.py VENV_PYTHON [pip install arguments...]

tests/test_package.py installs the sdist the same way (``pip_settings_for_uv``).
"""

from __future__ import annotations

import os
import subprocess
import sys


def pip_settings_for_uv(python: str = sys.executable) -> tuple[list, dict]:
    """pip's configuration (pip.conf files, then PIP_* variables, as `pip config list` shows them) as uv's options
    and variables: its indexes and wheel folders, its constraints, its certificates and its timeout."""
    listed = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True)
    settings = {}
    for line in listed.stdout.splitlines():
        key, _, value = line.partition("=")
        settings[key.split(".", 1)[-1]] = value.strip().strip("'\"")  # a PIP_* variable (listed last) wins
    options = []
    for option, key in (("--index-url", "index-url"), ("--extra-index-url", "extra-index-url"),
                        ("--find-links", "find-links"), ("--constraint", "constraint")):
        for value in settings.get(key, "").split():
            options += [option, value]
    if "extra-index-url" in settings or "find-links" in settings:
        options += ["--index-strategy", "unsafe-best-match"]  # as pip: the best version from any source
    variables = {"SSL_CERT_FILE": settings["cert"]} if "cert" in settings else {}
    if "default-timeout" in settings or "timeout" in settings:
        variables["UV_HTTP_TIMEOUT"] = settings.get("default-timeout") or settings["timeout"]
    return options, variables


def main(argv: list[str]) -> int:
    python, requirements = argv[0], argv[1:]
    has_uv = subprocess.run([python, "-m", "pip", "install", "-q", "uv>=0.5"]).returncode == 0
    if not has_uv:
        print("note: uv could not be installed; pip installs instead (slower)", file=sys.stderr)
        return subprocess.run([python, "-m", "pip", "install", "-q", *requirements]).returncode
    options, variables = pip_settings_for_uv(python)
    env = {**os.environ, **variables, "UV_NO_PROGRESS": "1"}
    return subprocess.run([python, "-m", "uv", "pip", "install", "-q", "--python", python, *options, *requirements],
                          env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
