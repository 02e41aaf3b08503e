"""The gallery of real models (notebooks/*.ipynb), each run once, in a real kernel started as nbclient
starts one (no Jupyter Server, so no widget frontend):

- every cell's output is the one saved in the notebook, compared as nbval compares them (streams joined,
  widget model ids and images aside, timings and ports sanitized by notebooks/nbval_sanitize.cfg; a
  cell marked `# NBVAL_IGNORE_OUTPUT` only has to run);
- where the notebook exports its model, truss's own loader accepts the export, and served by
  `kernel-magics serve` and by Truss's own server it answers every prediction the notebook recorded
  exactly as the notebook did.
"""

import json
import re
import shutil
import sys
from pathlib import Path

import httpx
import nbformat
import pytest

from kernel_magics.core.replay import compare
from server_harness import serve_ours, serve_truss, truss_venv_with_models

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.stem for p in (REPO / "notebooks").glob("*.ipynb"))
RECORDED = ("import json\nprint(json.dumps([r.as_dict() for r in "
            "get_ipython().magics_manager.registry['ModelMagics'].record]))")
# As nbval: these never compare (random widget model ids; images are not compared without nbdime).
SKIPPED_MIME = {"application/vnd.jupyter.widget-view+json", "image/png", "image/jpeg"}


def sanitize_patterns() -> list[tuple[str, str]]:
    text = (REPO / "notebooks" / "nbval_sanitize.cfg").read_text()
    return re.findall(r"^regex: (.*)$\n^replace: (.*)$", text, flags=re.MULTILINE)


def scrub_paths():
    """notebooks/execute.py's scrub: the saved outputs name the repo, the venv and temp folders by placeholder."""
    sys.path.insert(0, str(REPO / "notebooks"))
    try:
        from execute import scrub
    finally:
        sys.path.remove(str(REPO / "notebooks"))
    return scrub


def comparable(outputs: list, patterns, scrub) -> dict:
    """What nbval compares of a cell's outputs: each stream joined (\\r and \\b applied), every other
    output's values by mime type in order, an error's name and value."""
    found: dict = {}
    for output in outputs:
        kind = output.get("output_type") or output.get("type")
        if kind == "stream":
            found[output["name"]] = found.get(output["name"], "") + output["text"]
        elif kind == "error":
            found.setdefault("error", []).append((output["ename"], output["evalue"]))
        else:
            for mime, value in output.get("data", {}).items():
                if mime not in SKIPPED_MIME:
                    found.setdefault(mime, []).append(value if isinstance(value, str) else json.dumps(value))
    for name in ("stdout", "stderr"):
        if name in found:
            text = found[name]
            while re.search(r"[^\n]\x08", text):
                text = re.sub(r"[^\n]\x08", "", text)
            found[name] = re.sub(r"^.*\r(?=[^\n])", "", text, flags=re.MULTILINE)

    def clean(value: str) -> str:
        value = scrub(value)
        for regex, replace in patterns:
            value = re.sub(regex, replace, value)
        return value

    return {key: clean(v) if isinstance(v, str) else [clean(x) if isinstance(x, str) else x for x in v]
            for key, v in found.items()}


def output_ignored(cell) -> bool:
    first = cell.source.lstrip().splitlines()[0] if cell.source.strip() else ""
    tags = set(cell.get("metadata", {}).get("tags", []))
    return first.startswith(("# NBVAL_IGNORE_OUTPUT", "# NBVAL_SKIP")) or bool(tags & {"nbval-ignore-output",
                                                                                      "nbval-skip"})


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_gallery_notebook_shows_its_saved_outputs_and_its_export_answers_as_it_did(tmp_path, name, fresh_kernel,
                                                                                request):
    path = tmp_path / f"{name}.ipynb"
    shutil.copy(REPO / "notebooks" / f"{name}.ipynb", path)
    nb = nbformat.read(path, as_version=4)
    exports = any("%model_export" in cell.source for cell in nb.cells if cell.cell_type == "code")
    # The notebooks' own temp files (embeddings extracts its model's weights into a new temp dir in the
    # kernel, in the export's check and in each server) stay in this test's folder.
    temp = {"TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    kernel = fresh_kernel(cwd=tmp_path, env=temp, spare_checker=True)
    patterns, scrub = sanitize_patterns(), scrub_paths()
    results = []
    for number, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        ex = kernel.execute(cell.source, timeout=300)
        results.append(ex)
        assert ex.status == "ok", f"cell {number} failed:\n{cell.source}\n{ex.error_text}{ex.stderr}"
        if output_ignored(cell):
            continue
        want, got = comparable(cell.outputs, patterns, scrub), comparable(ex.outputs, patterns, scrub)
        assert got == want, f"cell {number} of {name}.ipynb shows other outputs than the saved ones:\n{cell.source}"
    if not exports:
        return
    truss_validate = request.getfixturevalue("truss_validate")
    recorded = json.loads(kernel.ok(RECORDED).stdout.strip().splitlines()[-1])
    export_cell = next(r for r in results if "Exported `Model` as a Truss" in r.stdout)
    assert f"Replayed {len(recorded)} recorded prediction" in export_cell.stdout and recorded
    kernel.shutdown()  # its model's memory is not needed while the two servers load theirs
    (exported,) = list((tmp_path / "exports").iterdir())
    truss_validate(exported)
    servers = [("kernel-magics serve", serve_ours(exported, env=temp))]
    venv = truss_venv_with_models()
    if venv is not None:
        servers.append(("Truss's server", serve_truss(exported, venv=venv, env=temp)))
    for label, server in servers:
        with server as served:
            for item in recorded:
                answer = httpx.post(served.predict_url(), json=item["input"], timeout=60)
                assert answer.status_code == 200, (label, answer.text)
                body = answer.json() if answer.headers["content-type"] == "application/json" else answer.text
                assert compare(item["output"], body) is None, (label, item["input"], compare(item["output"], body))
