"""The README's notebook cells run as pasted, trailing comments and all, in a real kernel."""

import re
from pathlib import Path

import pytest

from kernel_harness import Kernel

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_cells() -> list[str]:
    """The README's ```python and ```yaml blocks that are notebook cells (a magic's line in them), in order."""
    blocks = re.findall(r"^```(?:python|yaml)\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    return [b for b in blocks if re.search(r"^%", b, flags=re.M)]


def test_the_readme_has_the_quickstart_and_its_magic_lines_carry_comments():
    cells = readme_cells()
    lines = [line for cell in cells for line in cell.splitlines() if line.startswith("%")]
    assert cells[0].strip() == "%load_ext kernel_magics"
    # What made 5 of 14 lines fail when pasted: a comment after a line magic.
    assert sum("  # " in line for line in lines if not line.startswith("%%")) >= 5


def test_every_readme_cell_runs_as_pasted(tmp_path):
    from server_harness import free_port

    k = Kernel(cwd=str(tmp_path))
    try:
        for cell in readme_cells():
            # The one change: a port that is free here (8080 may be taken on a shared machine).
            cell = cell.replace("--port 8080", f"--port {free_port()}")
            ex = k.execute(cell)
            assert ex.error is None and "Error" not in ex.stderr, f"{cell}\n{ex.error_text}{ex.stderr}"
            if "%model_predict" in cell:
                assert ex.result == "{'score': 3.0, 'label': 'positive'}"
            if "%model_export" in cell:
                assert "Replayed 1 recorded prediction" in ex.stdout
                assert (tmp_path / "word-sentiment" / "model" / "model.py").is_file()
                again = k.execute(cell)  # Run All again: the notebook's own export is replaced, without --force
                assert again.error is None and "(replacing the earlier export there)" in again.stdout, again.error_text
            if "%model_serve" in cell:
                assert "Serving the notebook model at http://127.0.0.1:" in ex.stdout and "Stopped" in ex.stdout
        # A `#` inside the JSON input is data; the one after it starts the comment.
        ex = k.execute('%model_predict {"text": "good #1 good"}  # two goods')
        assert ex.result == "{'score': 2.0, 'label': 'positive'}", ex.error_text + ex.stderr
    finally:
        k.shutdown()
