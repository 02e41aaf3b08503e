"""Export time (issue 5): in-kernel `%model_export` vs `kernel-magics export`, side by side.

Two notebooks: the quickstart (torch) and a generated 200-cell notebook (plain Python; the
model uses 60 helpers spread over it, the rest is noise the closure must skip). For each:
materialize only (analysis, in the kernel), in-kernel export, and CLI export (a new process).
Exports include the fresh-process import check, which dominates for torch models.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_notebook

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from kernel_harness import Kernel  # noqa: E402


def generated_notebook(path: Path, cells: int = 200) -> Path:
    sources = ["%load_ext kernel_magics", "import math\nimport json\nimport statistics"]
    helpers = 0
    while len(sources) < cells - 1:
        i = len(sources)
        if i % 3 == 0 and helpers < 60:
            prev = f"h{helpers - 1}(x) + " if helpers else ""
            sources.append(f"C{helpers} = {i}\n\ndef h{helpers}(x):\n    return {prev}math.sqrt(x + C{helpers})")
            helpers += 1
        elif i % 3 == 1:
            sources.append(f"results_{i} = []\nfor step in range(3):\n    results_{i}.append(step * {i})\nprint(len(results_{i}))")
        else:
            sources.append(f"def unused_{i}(y):\n    return json.dumps(y)\n\nTABLE_{i} = {{'k': {i}}}")
    sources.append(f"%%model\nclass Model:\n    def predict(self, model_input):\n        return h{helpers - 1}(model_input['x'])")
    nb = new_notebook(cells=[new_code_cell(s) for s in sources],
                      metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, path)
    return path


def best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


MEASURE = '''
import contextlib, io, json, time
m = get_ipython().magics_manager.registry["ModelMagics"]
def best(fn, repeat):
    out = []
    for _ in range(repeat):
        t = time.perf_counter(); fn(); out.append(time.perf_counter() - t)
    return min(out)
with contextlib.redirect_stdout(io.StringIO()):
    r = {"materialize_s": best(m._materialize, 10),
         "kernel_export_s": best(lambda: get_ipython().run_line_magic("model_export", "bench-out --force"), 3)}
print(json.dumps(r))
'''


def measure(notebook: Path) -> dict:
    nb = nbformat.read(notebook, as_version=4)
    k = Kernel(cwd=str(notebook.parent), env={"JPY_SESSION_NAME": str(notebook)})
    try:
        for cell in nb.cells:
            if cell.cell_type == "code":
                k.ok(cell.source, timeout=300)
        r = json.loads(k.ok(MEASURE, timeout=600).stdout.strip().splitlines()[-1])
    finally:
        k.shutdown()
    out = notebook.parent / "bench-cli"
    cmd = [sys.executable, "-m", "kernel_magics.cli", "export", str(notebook), str(out), "--force"]
    r["cli_export_s"] = best(lambda: subprocess.run(cmd, check=True, capture_output=True))
    r["cells"] = sum(c.cell_type == "code" for c in nb.cells)
    return r


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "q").mkdir()
        (tmp / "g").mkdir()
        quick = tmp / "q" / "quickstart.ipynb"
        quick.write_bytes((ROOT / "notebooks" / "quickstart.ipynb").read_bytes())
        rows = {"quickstart (torch)": measure(quick),
                "generated, 200 cells": measure(generated_notebook(tmp / "g" / "generated.ipynb"))}
    print("| notebook | code cells | materialize (analysis) | `%model_export` | `kernel-magics export` | CLI / kernel |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['cells']} | {r['materialize_s'] * 1e3:.1f} ms | {r['kernel_export_s'] * 1e3:.0f} ms "
              f"| {r['cli_export_s'] * 1e3:.0f} ms | {r['cli_export_s'] / r['kernel_export_s']:.2f} |")


if __name__ == "__main__":
    main()
