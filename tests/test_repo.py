"""The repository as a user finds it: the license in the repo and in both distributions, authors and links,
and an `[all]` install that does not pull torch (on Linux, an unpinned torch is the multi-GB CUDA build)."""

import json
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def extra_requirements(extra: str) -> set[str]:
    """The distributions an extra brings, following the extras it names of this project."""
    import re

    found = set()
    for requirement in PROJECT["optional-dependencies"][extra]:
        name, _, rest = re.match(r"([A-Za-z0-9_.-]+)(\[([^\]]*)\])?", requirement).groups()
        if name == PROJECT["name"]:
            for inner in rest.split(","):
                found |= extra_requirements(inner.strip())
        else:
            found.add(name.lower())
    return found


def test_license_authors_and_links():
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    assert PROJECT["authors"] and PROJECT["urls"]["Source"].startswith("https://github.com/")
    package = json.loads((REPO / "extension" / "package.json").read_text())  # the Extension Manager shows these
    assert package["license"] == "Apache-2.0" and package["homepage"] == PROJECT["urls"]["Homepage"]
    assert package["repository"]["url"].startswith(PROJECT["urls"]["Source"])


def test_the_all_extra_brings_no_torch_and_the_readme_says_how_to_get_the_cpu_wheel():
    everything = extra_requirements("all")
    assert {"fastapi", "uvicorn", "ray"} <= everything
    assert "torch" not in everything and not {"sentence-transformers", "transformers"} & everything
    assert "torch" in extra_requirements("examples")  # the gallery's models need it: there, and documented
    readme = (REPO / "README.md").read_text()
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in readme
    assert "pip install -c constraints.txt 'kernel-magics[examples]'" in readme


@pytest.mark.package
@pytest.mark.slow
def test_the_wheel_and_the_sdist_carry_the_license(dist):
    wheel, sdist = dist
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        licensed = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert licensed and "Apache License" in whl.read(licensed[0]).decode()
        metadata = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata
    assert "Author: The kernel-magics authors" in metadata
    with tarfile.open(sdist) as tar:
        assert any(n.endswith("/LICENSE") and n.count("/") == 1 for n in tar.getnames())
