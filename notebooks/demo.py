"""`make demo`: run the quickstart notebook headlessly and print its predictions."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "demo-out"


def main() -> int:
    OUT.mkdir(exist_ok=True)
    notebook = OUT / "quickstart.ipynb"
    shutil.copy(ROOT / "notebooks" / "quickstart.ipynb", notebook)
    nb = nbformat.read(notebook, as_version=4)
    print(f"Executing {notebook.relative_to(ROOT)} in a fresh kernel ...", flush=True)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(OUT)}}).execute()
    nbformat.write(nb, notebook)
    print("\nPredictions from the notebook:")
    for cell in nb.cells:
        first = cell.source.splitlines()[0] if cell.source else ""
        if cell.cell_type == "code" and first.startswith(("%model_predict", "%%predict")):
            for output in cell.outputs:
                if output.output_type == "execute_result":
                    print(f"  {first}\n    -> {output.data['text/plain']}")
    print(f"\nThe executed notebook is at {notebook.relative_to(ROOT)}.")
    export = OUT / "tiny-chargen"
    print(f"\nExporting it without running it: kernel-magics export notebooks/quickstart.ipynb {export.relative_to(ROOT)}")
    subprocess.run([sys.executable, "-m", "kernel_magics.cli", "export", str(ROOT / "notebooks" / "quickstart.ipynb"),
                    str(export), "--force"], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
