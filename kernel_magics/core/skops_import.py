"""skops.io, imported without importing torch.

skops.io lists scikit-learn's estimators when it is imported (``all_estimators()``), and that walk imports every
package of scikit-learn, ``sklearn.externals.array_api_compat.torch`` among them, which imports torch where it is
installed: seconds of CPU and hundreds of MB for a scikit-learn model, in the kernel (planning its values) and in the
export's spare checker (importing model.py's libraries in advance). That package holds no estimator: while skops.io
is imported it is marked as not importable, which the walk skips.
"""

from __future__ import annotations

import sys
from typing import Any

_WALKED = "sklearn.externals.array_api_compat.torch"


def import_skops_io() -> Any:
    if "skops.io" not in sys.modules and "torch" not in sys.modules and _WALKED not in sys.modules:
        sys.modules[_WALKED] = None  # (an ImportError for the walk, which goes on)
        try:
            import skops.io  # noqa: F401
        finally:
            if sys.modules.get(_WALKED, False) is None:
                del sys.modules[_WALKED]
    import skops.io

    return skops.io
