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
