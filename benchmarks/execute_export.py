"""`kernel-magics export NOTEBOOK OUT --execute`: wall time of the whole command, side by side in one run.

Two ways of running the same command, alternated round by round:

- **as shipped**: the command as a user runs it. It reads the notebook with nbformat, whose jsonschema no longer
  builds the IRI grammar of rfc3987_syntax at import (cli.py says why);
- **with the IRI grammar**: the same command in a Python that imported rfc3987_syntax first (what every run paid
  before, where JupyterLab's dependencies installed it).

Also the refusal of a target that is not an export's (`--execute` checks it before the notebook runs), which now
comes before nbformat and nbclient are imported at all: its grammar column pays for the grammar but not for the
other imports that came before the refusal until then, so it understates what the refusal cost before.

Usage: `python benchmarks/execute_export.py [--rounds 3] [NOTEBOOK ...]` (default: the quickstart).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = "import sys\nfrom kernel_magics.cli import main\nsys.exit(main(sys.argv[1:]))"
WITH_GRAMMAR = "import rfc3987_syntax\n" + SHIPPED


def run(code: str, args: list[str], refused: bool = False) -> float:
    """Seconds of one command; it must do what is timed (export, or refuse the target), else the run stops."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    did = (done.returncode == 1 and "no export made it" in done.stderr) if refused else done.returncode == 0
    if not did:
        raise SystemExit(f"kernel-magics {' '.join(args)} did not {'refuse' if refused else 'export'}:\n"
                         f"{done.stdout}{done.stderr}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, default=[ROOT / "notebooks" / "quickstart.ipynb"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import importlib.util

    if importlib.util.find_spec("rfc3987_syntax") is None:
        raise SystemExit("rfc3987_syntax is not installed here: nothing to compare (the command pays nothing for it).")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        refused = Path(tmp, "not-an-export")
        refused.mkdir()
        (refused / "notes.txt").write_text("mine")
        for notebook in args.notebooks:
            times = {"shipped": [], "grammar": [], "refused shipped": [], "refused grammar": []}
            for _ in range(args.rounds):
                for name, code in (("shipped", SHIPPED), ("grammar", WITH_GRAMMAR)):
                    out = Path(tmp, "out")
                    shutil.rmtree(out, ignore_errors=True)
                    times[name].append(run(code, ["export", str(notebook), str(out), "--execute"]))
                    times[f"refused {name}"].append(run(code, ["export", str(notebook), str(refused), "--execute"],
                                                        refused=True))
            rows.append((notebook.name, {k: min(v) for k, v in times.items()}))
    print(f"best of {args.rounds} rounds, seconds (`kernel-magics export NOTEBOOK OUT --execute`)\n")
    print("| notebook | what | as shipped | with the IRI grammar | shipped / grammar |")
    print("|---|---|---|---|---|")
    for name, best in rows:
        for what, key in (("export", ""), ("refused target", "refused ")):
            shipped, grammar = best[f"{key}shipped"], best[f"{key}grammar"]
            print(f"| {name} | {what} | {shipped:.2f} | {grammar:.2f} | {shipped / grammar:.2f} |")


if __name__ == "__main__":
    main()
