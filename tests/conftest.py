import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from kernel_harness import Kernel  # noqa: E402


@pytest.fixture(scope="module")
def kernel():
    """One real IPython kernel per test module, with kernel_magics loaded."""
    k = Kernel()
    k.ok("%load_ext kernel_magics")
    yield k
    k.shutdown()


# ---------------------------------------------------------------- the real truss package

import os  # noqa: E402
import subprocess  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TRUSS_REFERENCE = REPO.parent / "shared" / "truss_reference"
TRUSS_VENV = Path(os.environ.get("TRUSS_REF_VENV", Path.home() / ".cache" / "truss-reference" / "venv"))


def _truss_python() -> Path:
    python = TRUSS_VENV / "bin" / "python"
    if not (python.exists() and TRUSS_REFERENCE.is_dir()):
        message = (f"the truss reference is not set up ({TRUSS_REFERENCE}/setup.sh creates {TRUSS_VENV}); "
                   "`make test` sets it up")
        if os.environ.get("KM_REQUIRE_TRUSS"):
            pytest.fail(message)
        pytest.skip(message)
    return python


@pytest.fixture(scope="session")
def truss_validate():
    """Validate a directory with the real truss 0.18.36 loader and config parser."""
    python = _truss_python()

    def validate(path: Path) -> str:
        done = subprocess.run([str(python), str(TRUSS_REFERENCE / "validate.py"), str(path)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"truss rejected {path}: {done.stdout}{done.stderr}"
        return done.stdout

    return validate


# ---------------------------------------------------------------- one Ray cluster for the tests that deploy on Ray

@pytest.fixture(scope="session")
def ray_cluster():
    """A head and two worker nodes on this machine (127.0.0.1) with Ray Serve running, started once:
    deploying on it takes seconds, where each `serve --engine ray` of its own starts a Ray and Serve."""
    pytest.importorskip("ray", reason="ray[serve] is not installed (pip install 'kernel-magics[ray]')")
    from ray_harness import LocalCluster
    from server_harness import free_port

    cluster = LocalCluster(workers=2, cpus=2, serve_port=free_port())
    yield cluster
    cluster.close()
