"""Execute notebooks in place with nbclient (stores fresh outputs for nbval).

Stored outputs must not carry the paths of the machine that ran them: the repository, the venv and
temporary folders are written as <repo>, <venv> and <tmp>.
"""

import re
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
PATHS = [(re.escape(sys.prefix), "<venv>"), (re.escape(str(ROOT)), "<repo>"),
         (re.escape(tempfile.gettempdir()) + r"/[^\s'\"]*", "<tmp>")]


def scrub(text: str) -> str:
    for pattern, replacement in PATHS:
        text = re.sub(pattern, replacement, text)
    return text


def scrub_outputs(nb) -> None:
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if "text" in output:
                output["text"] = scrub(output["text"])
            for mime, value in output.get("data", {}).items():
                if isinstance(value, str) and mime.startswith("text/"):
                    output["data"][mime] = scrub(value)


if __name__ == "__main__":
    for path in map(Path, sys.argv[1:]):
        nb = nbformat.read(path, as_version=4)
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
        scrub_outputs(nb)
        nbformat.write(nb, path)
        print("executed", path)
