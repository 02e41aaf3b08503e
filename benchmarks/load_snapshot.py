"""What %model_load's snapshot costs (core/load_snapshot.py): the globals the model uses are fingerprinted (and
copied up to 64 MB) when load starts, and fingerprinted again when it ends, so an export can save what load()
changed as it was before the load.

For a few typical globals, side by side in one run: the snapshot's seconds (before + after the load) and, as the
yardstick, `pickle.dumps` of the same value (about what an export's capture of it costs anyway). Best of 3.
Run: `.venv/bin/python benchmarks/load_snapshot.py` (about 30 s).
"""

from __future__ import annotations

import pickle
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernel_magics.core import load_snapshot  # noqa: E402


def best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    import numpy as np

    values = {
        "list of 100k floats": [float(i) for i in range(100_000)],
        "dict of 10k str -> list": {f"k{i}": [i, i + 1] for i in range(10_000)},
        "16 MB float32 array": np.ones(4_000_000, dtype=np.float32),
        "60 MB float32 array (copied)": np.ones(15_000_000, dtype=np.float32),
        "200 MB float32 array (fingerprint only)": np.ones(50_000_000, dtype=np.float32),
    }
    try:
        import torch

        torch.manual_seed(0)
        values["torch Linear 2048x2048 (16 MB)"] = torch.nn.Linear(2048, 2048)
    except ImportError:
        pass
    print(f"{'global the model uses':<42} {'snapshot s':>10} {'pickle s':>9} {'ratio':>6}")
    for label, value in values.items():
        live = {"VALUE": value}

        def snapshot() -> None:
            load_snapshot.before_load(live, ["VALUE"])
            load_snapshot.after_load(live)

        seconds = best(snapshot)
        pickled = best(lambda: pickle.dumps(value, protocol=5))
        print(f"{label:<42} {seconds:>10.3f} {pickled:>9.3f} {seconds / pickled:>6.1f}")


if __name__ == "__main__":
    main()
