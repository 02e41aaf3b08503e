"""The gallery of real models (notebooks/): each one, run in a real kernel and exported from it, is
accepted by truss's own loader, and served by `kernel-magics serve` and by Truss's own server it answers
every prediction the notebook recorded exactly as the notebook did. (nbval checks the notebooks' own
outputs in `make test` too.)"""

import json
import shutil
from pathlib import Path

import httpx
import nbformat
import pytest

from kernel_magics.core.replay import compare
from server_harness import serve_ours, serve_truss, truss_venv_with_models
from test_export import run_notebook_cells

REPO = Path(__file__).resolve().parents[1]
RECORDED = ("import json\nprint(json.dumps([r.as_dict() for r in "
            "get_ipython().magics_manager.registry['ModelMagics'].record]))")


@pytest.mark.parametrize("name", ["wine_pipeline", "embeddings", "tiny_gpt"])
def test_gallery_notebook_export_answers_as_the_notebook_on_both_servers(tmp_path, name, truss_validate):
    path = tmp_path / f"{name}.ipynb"
    shutil.copy(REPO / "notebooks" / f"{name}.ipynb", path)
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(RECORDED))
    nbformat.write(nb, path)
    kernel, results = run_notebook_cells(path)
    kernel.shutdown()
    recorded = json.loads(results[-1].stdout.strip().splitlines()[-1])
    export_cell = next(r for r in results if "Exported `Model` as a Truss" in r.stdout)
    assert f"Replayed {len(recorded)} recorded prediction" in export_cell.stdout and recorded
    (exported,) = list((tmp_path / "exports").iterdir())
    truss_validate(exported)
    servers = [("kernel-magics serve", serve_ours(exported))]
    venv = truss_venv_with_models()
    if venv is not None:
        servers.append(("Truss's server", serve_truss(exported, venv=venv)))
    for label, server in servers:
        with server as served:
            for item in recorded:
                answer = httpx.post(served.predict_url(), json=item["input"], timeout=60)
                assert answer.status_code == 200, (label, answer.text)
                body = answer.json() if answer.headers["content-type"] == "application/json" else answer.text
                assert compare(item["output"], body) is None, (label, item["input"], compare(item["output"], body))
