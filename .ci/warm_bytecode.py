"""Write the .pyc files of the modules the demo and the tests import, and only those.

Why: every process the tests start (kernels, servers, checkers, Ray's) imports torch, transformers, FastAPI or
Ray; without .pyc files each compiles them again (4.1 s of CPU for what takes 2.6 s with them). Writing all of them
at install time (`uv pip install --compile-bytecode`, as pip does) compiles the 23,000 modules of the venv, most of
which nothing imports: about 45 s of the set-up on this 2-core machine. Importing what a run imports writes about
4,800 of them in 17 s (beside the project's build: .ci/install_venv.py); `make` lets Python write the few others as
they are first imported (the Makefile unexports PYTHONDONTWRITEBYTECODE, which this machine and CI set).

    python .ci/warm_bytecode.py VENV_PYTHON

Two processes, one per core, each importing its share; a module that is not installed is skipped (the set-up's
extras decide what is there), and nothing here can fail the set-up.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

# Split so that the two halves take about as long: torch with what imports it (sentence-transformers alone is
# 13 s of the first) against the rest, whose scikit-learn and pandas come first so that they are written by the
# time sentence-transformers imports them (17 and 16 s on a fresh clone, against 24 and 13 s with them in the first).
SHARES = (
    ("torch", "transformers", "sentence_transformers"),
    ("numpy", "pandas", "sklearn", "ray", "ray.serve", "ray.dashboard", "fastapi", "uvicorn", "starlette",
     "pydantic", "httpx", "prometheus_client", "ipykernel.kernelapp", "ipywidgets", "jupyter_client", "nbclient",
     "nbformat", "jupyter_server.serverapp", "jupyterlab", "notebook", "playwright.sync_api", "pytest", "xdist",
     "yaml", "kernel_magics.serving.server", "kernel_magics.notebook"),
)

_IMPORT_EACH = """
import importlib, sys
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception:  # not installed here, or fails outside a real run: its .pyc comes when it is first imported
        pass
"""


def main(argv: list[str]) -> int:
    python = argv[0] if argv else sys.executable
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    # A temp dir of its own, removed afterwards: importing torch's compiler leaves torchinductor_<user> in the
    # system's, and `make test` leaves nothing there.
    with tempfile.TemporaryDirectory(prefix="km-warm-") as scratch:
        env["TMPDIR"] = scratch
        procs = [subprocess.Popen([python, "-c", _IMPORT_EACH, *share], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for share in SHARES]
        for proc in procs:
            try:
                proc.wait(timeout=600)
            except subprocess.TimeoutExpired:  # an import that hangs: its .pyc files come later, the set-up goes on
                proc.kill()
                proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
