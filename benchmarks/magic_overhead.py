"""Magic overhead, side by side in one real kernel (issue 3).

(a) `%model_predict` on a trivial model vs calling the instance's predict directly.
(b) hot reload (re-running `%%model`) vs `%model_load` on a model whose load takes ~1 s.
Prints a table and the ratios; numbers go in benchmarks/README.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from kernel_harness import Kernel  # noqa: E402

MODEL = '''class Model:
    def load(self):
        time.sleep(1.0)  # stands in for reading weights
        self.scale = 2
    def predict(self, model_input):
        return {"y": model_input["x"] * self.scale}
'''

MEASURE = '''
import contextlib, io, json, time
ip = get_ipython()
host = ip.magics_manager.registry["ModelMagics"].host

def best(fn, repeat, n):
    """Best mean time per call over `repeat` runs of `n` calls (least disturbed by the noisy machine)."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t) / n)
    return min(times)

x = {"x": 3}
with contextlib.redirect_stdout(io.StringIO()):  # the magics' own messages are not measured output
    r = {
        "direct_s": best(lambda: host.instance.predict(x), 5, 2000),
        "magic_s": best(lambda: ip.run_line_magic("model_predict", '{"x": 3}'), 5, 2000),
        "hot_reload_s": best(lambda: ip.run_cell_magic("model", "", MODEL_SRC), 5, 20),
        "load_s": best(lambda: ip.run_line_magic("model_load", ""), 3, 1),
    }
print(json.dumps(r))
'''


def main() -> None:
    k = Kernel()
    try:
        k.ok("%load_ext kernel_magics\nimport time")
        k.ok(f"MODEL_SRC = {MODEL!r}")
        k.ok("%%model\n" + MODEL)
        k.ok("%model_load")
        ex = k.ok(MEASURE, timeout=600)
        r = json.loads(ex.stdout.strip().splitlines()[-1])
    finally:
        k.shutdown()
    print("| measurement | time | ratio |")
    print("|---|---|---|")
    print(f"| predict called directly | {r['direct_s'] * 1e6:.2f} µs | 1 |")
    print(f"| `%model_predict` (JSON parse, loop hop, worker thread, serialization check) "
          f"| {r['magic_s'] * 1e6:.1f} µs | {r['magic_s'] / r['direct_s']:.0f}x |")
    print(f"| `%model_load` (load sleeps 1 s) | {r['load_s'] * 1e3:.0f} ms | 1 |")
    print(f"| hot reload (re-run `%%model`) | {r['hot_reload_s'] * 1e3:.2f} ms | "
          f"{r['hot_reload_s'] / r['load_s']:.4f} ({r['load_s'] / r['hot_reload_s']:.0f}x faster) |")


if __name__ == "__main__":
    main()
