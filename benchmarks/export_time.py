"""Export time: in-kernel `%model_export`, split into its stages, and `kernel-magics export`, side by side.

Notebooks: the quickstart (torch), a generated 200-cell notebook (plain Python; the model uses 60
helpers spread over it, the rest is noise the closure must skip), and the gallery (a fitted
scikit-learn pipeline, all-MiniLM-L6-v2 embeddings, a tiny GPT-2 trained in the notebook). For each,
the best of 3 in-kernel exports split into: analysis (the closure, value planning, requirements),
capture (saving the notebook's values), and the fresh process's import, load and replay of the
recorded predictions; and the CLI export where the notebook allows one (the gallery needs its live
values, so the CLI refuses it by design).
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
import contextlib, io, json, time, pathlib
m = get_ipython().magics_manager.registry["ModelMagics"]
runs = []
for _ in range(3):
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        get_ipython().run_line_magic("model_export", "bench-out --force")
    runs.append(dict(m.last_export_timings, total=time.perf_counter() - started))
values = pathlib.Path("bench-out/data/notebook_values")
size = sum(f.stat().st_size for f in values.rglob("*") if f.is_file()) if values.is_dir() else 0
print(json.dumps(dict(min(runs, key=lambda r: r["total"]), value_bytes=size, replayed=len(m.record))))
'''


def measure(notebook: Path, cli: bool = True) -> dict:
    nb = nbformat.read(notebook, as_version=4)
    k = Kernel(cwd=str(notebook.parent), env={"JPY_SESSION_NAME": str(notebook)})
    try:
        for cell in nb.cells:
            if cell.cell_type == "code" and "%model_export" not in cell.source:
                k.ok(cell.source, timeout=300)
        r = json.loads(k.ok(MEASURE, timeout=900).stdout.strip().splitlines()[-1])
    finally:
        k.shutdown()
    r["cells"] = sum(c.cell_type == "code" for c in nb.cells)
    r["cli_export_s"] = None
    if cli:
        out = notebook.parent / "bench-cli"
        cmd = [sys.executable, "-m", "kernel_magics.cli", "export", str(notebook), str(out), "--force"]
        r["cli_export_s"] = best(lambda: subprocess.run(cmd, check=True, capture_output=True))
    return r


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:,.0f} ms"


def main() -> None:
    notebooks = [("quickstart (torch)", "quickstart", True), ("scikit-learn pipeline", "wine_pipeline", False),
                 ("all-MiniLM-L6-v2 embeddings", "embeddings", False), ("tiny GPT-2 (trained here)", "tiny_gpt", False)]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for label, name, cli in notebooks:
            (tmp / name).mkdir()
            path = tmp / name / f"{name}.ipynb"
            path.write_bytes((ROOT / "notebooks" / f"{name}.ipynb").read_bytes())
            rows[label] = measure(path, cli)
        (tmp / "g").mkdir()
        rows["generated, 200 cells"] = measure(generated_notebook(tmp / "g" / "generated.ipynb"))
    print("| notebook | code cells | analysis | value capture | fresh process: import | load | replay (n) "
          "| `%model_export` total | `kernel-magics export` | values saved | capture rate |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        rate = f"{r['value_bytes'] / 2**20 / r['capture']:,.0f} MiB/s" if r["value_bytes"] and r["capture"] else "-"
        print(f"| {name} | {r['cells']} | {_ms(r['analysis'])} | {_ms(r['capture'])} | {_ms(r.get('import'))} "
              f"| {_ms(r.get('load'))} | {_ms(r.get('replay'))} ({r['replayed']}) | {_ms(r['total'])} "
              f"| {_ms(r['cli_export_s'])} | {r['value_bytes'] / 2**20:,.1f} MiB | {rate} |")


if __name__ == "__main__":
    main()
