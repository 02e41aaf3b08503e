"""`make demo`: run the quickstart notebook headlessly and print its predictions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from kernel_magics.serving.background import free_port

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "demo-out"


def main() -> int:
    OUT.mkdir(exist_ok=True)
    # torch's optimizers make a torchinductor_<user> folder in the system temp dir on their first step (the notebook
    # trains, and so does the export's check, which loads it): the demo's own folder holds it instead. Every process
    # below (the kernel, the export, the server) inherits it.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(OUT / ".torchinductor"))
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
    serve_and_ask(export)
    return 0


def serve_and_ask(export: Path) -> None:
    """Serve the export with `kernel-magics serve`, send one prediction over HTTP, stop the server."""
    import httpx

    port = free_port()  # (beside the ephemeral range: no outgoing connection takes it first)
    print(f"\nServing it: kernel-magics serve {export.relative_to(ROOT)} --port {port}", flush=True)
    server = subprocess.Popen([sys.executable, "-m", "kernel_magics.cli", "serve", str(export), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        context = httpx.create_ssl_context()  # once: httpx.get makes one per call (46 ms of CPU) otherwise
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models/model", timeout=1, verify=context).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            raise SystemExit(f"the server did not become ready:\n{server.stderr.read() if server.poll() is not None else ''}")
        body = {"prompt": "Beautiful is", "max_new_tokens": 40}
        print(f"curl -X POST http://127.0.0.1:{port}/v1/models/model:predict -d '{json.dumps(body)}'")
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/models/model:predict", json=body, timeout=30)
        print(f"  -> {answer.status_code} {answer.text}")
    finally:
        server.terminate()
        server.wait(timeout=30)
        print("Server stopped.")


if __name__ == "__main__":
    sys.exit(main())
