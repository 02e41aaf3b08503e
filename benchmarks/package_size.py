"""The base install, before and after the split into extras, and the cold start of the command, side by side.

Builds the wheel, installs it into fresh venvs (with the old dependency list, as the base install was, and as it is
now), counts distributions and sizes, then times `kernel-magics --help` against `truss --help` from the reference
venv (cold: a new process each time, best and median of 7).

    .venv/bin/python benchmarks/package_size.py
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from server_harness import truss_reference_python  # noqa: E402

# The base dependencies before the split (pyproject.toml as it was): the server, nbval and jupyterlab included.
BEFORE = ["ipykernel>=7", "ipython>=8.12", "ipywidgets>=8.1", "anywidget>=0.9", "jupyterlab>=4", "pyyaml>=6",
          "pydantic>=2.6", "packaging>=23", "fastapi>=0.110", "uvicorn[standard]>=0.29", "nbval>=0.11"]


def venv_with(path: Path, *requirements: str) -> tuple[int, float]:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    python = path / "bin" / "python"
    baseline = {d["name"] for d in json.loads(subprocess.run(
        [str(python), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True, check=True).stdout)}
    subprocess.run([str(python), "-m", "pip", "install", "-q", *requirements], check=True, capture_output=True)
    listed = json.loads(subprocess.run([str(python), "-m", "pip", "list", "--format", "json"],
                                       capture_output=True, text=True, check=True).stdout)
    site = next((path / "lib").glob("python3*/site-packages"))
    size = sum(f.stat().st_size for f in site.rglob("*") if f.is_file()) / 2**20
    return len([d for d in listed if d["name"] not in baseline]), size


def cold_start(command: list[str], runs: int = 7) -> tuple[float, float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True)
        times.append(time.perf_counter() - started)
    return min(times), statistics.median(times)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--wheel", "--outdir", str(tmp), str(ROOT)],
                       check=True, capture_output=True)
        (wheel,) = tmp.glob("*.whl")
        rows = {
            "before (one base install: server, nbval, jupyterlab included)": venv_with(
                tmp / "before", *BEFORE, f"{wheel}"),
            "after: base (`pip install kernel-magics`)": venv_with(tmp / "base", str(wheel)),
            "after: with the server (`[serve]`)": venv_with(tmp / "serve", f"kernel-magics[serve] @ {wheel.as_uri()}"),
        }
        print("| install | distributions | size in site-packages |")
        print("|---|---|---|")
        for name, (count, size) in rows.items():
            print(f"| {name} | {count} | {size:,.0f} MiB |")
        ours = cold_start([str(tmp / "base" / "bin" / "kernel-magics"), "--help"])
    truss_python = truss_reference_python()
    print()
    print("| command (cold, new process) | best | median | ratio (median) |")
    print("|---|---|---|---|")
    print(f"| `kernel-magics --help` | {ours[0] * 1e3:.0f} ms | {ours[1] * 1e3:.0f} ms | 1 |")
    if truss_python is not None:
        theirs = cold_start([str(truss_python.parent / "truss"), "--help"])
        print(f"| `truss --help` (0.18.36) | {theirs[0] * 1e3:.0f} ms | {theirs[1] * 1e3:.0f} ms "
              f"| {theirs[1] / ours[1]:.1f} |")


if __name__ == "__main__":
    main()
