"""Our server vs Truss 0.18.36's own, side by side in one run.

Each model is served with `kernel-magics serve` and with Truss's server, one after the other and
alternating over rounds (best round kept), driven by the same load generator (bench_server.py from
../shared/truss_reference, aiohttp, on the same 2 cores):

- echo / echo_stream (bench_trusses): req/s and latency at concurrency 1 and 32;
- gil-stream: a sync generator doing ~1 ms of GIL-holding work per token, 30 tokens: time to first chunk;
- the gallery (notebooks/, exported from their kernels): the tiny GPT-2 streaming 30 tokens, MiniLM embedding a
  batch of 32 texts, the scikit-learn pipeline; Truss's server runs them with the models' libraries;
- slow reader: a 200 MiB stream (1 MiB chunks) read at a fixed 20 MiB/s: the server's peak memory above its
  memory before the request, and how far the generator ran ahead of the reader.

    .venv/bin/python benchmarks/server_bench.py [--only echo,gil,gallery,slow] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from server_harness import (  # noqa: E402
    BIG_STREAM, TRUSS_REFERENCE, serve_ours, serve_truss, slow_read, truss_reference_python, truss_venv_with_models, write_truss,
)

GIL_STREAM = '''
import time


class Model:
    def predict(self, model_input):
        def tokens():
            for i in range(30):
                end = time.perf_counter() + 0.001
                while time.perf_counter() < end:  # ~1 ms of work that holds the GIL
                    pass
                yield f"t{i} "
        return tokens()
'''



def drive(python: Path, url: str, payload: str, concurrency: int, requests: int, stream: bool, warmup: int = 20) -> dict:
    cmd = [str(python), str(TRUSS_REFERENCE / "bench_server.py"), "--url", url, "--payload", payload,
           "--concurrency", str(concurrency), "--requests", str(requests), "--warmup", str(warmup), "--json"]
    if stream:
        cmd.append("--stream")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_pairs(python: Path, cases: list, rounds: int) -> dict:
    """cases: (label, directory, payload, [(concurrency, requests)], stream, venv for Truss)."""
    results: dict = {}
    for _ in range(rounds):
        for label, path, payload, loads, stream, venv in cases:
            for server, start in (("truss", lambda p: serve_truss(p, venv=venv)), ("ours", serve_ours)):
                with start(path) as s:
                    for c, n in loads:
                        r = drive(python, s.predict_url(), payload, c, n, stream)
                        key = (label, c, server)
                        if r["errors"]:
                            print(f"warning: {server} {label} c={c}: {r['errors']} errors", file=sys.stderr)
                        elif key not in results or r["req_per_s"] > results[key]["req_per_s"]:
                            results[key] = r
    return results


def table(results: dict, cases: list) -> None:
    print("| model | concurrency | server | req/s | p50 ms | p99 ms | first chunk p50 ms | first chunk p99 ms "
          "| req/s ours/Truss | p99 ours/Truss | first-chunk p99 ours/Truss |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, _, _, loads, stream, _ in cases:
        for c, _ in loads:
            theirs, ours = results.get((label, c, "truss")), results.get((label, c, "ours"))
            if not theirs or not ours:
                continue
            for name, r in (("Truss 0.18.36", theirs), ("kernel-magics", ours)):
                f50 = f"{r['ttfb_p50_ms']:.2f}" if stream else "-"
                f99 = f"{r['ttfb_p99_ms']:.2f}" if stream else "-"
                ratios = ["", "", ""]
                if r is ours:
                    ratios = [f"{ours['req_per_s'] / theirs['req_per_s']:.2f}", f"{ours['p99_ms'] / theirs['p99_ms']:.2f}",
                              f"{ours['ttfb_p99_ms'] / theirs['ttfb_p99_ms']:.2f}" if stream else "-"]
                print(f"| {label} | {c} | {name} | {r['req_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
                      f"| {f50} | {f99} | {' | '.join(ratios)} |")


def gallery_exports(work: Path) -> dict[str, Path]:
    """Run the gallery notebooks (they export themselves) and return their export directories."""
    exports = {}
    for name in ("tiny_gpt", "embeddings", "wine_pipeline"):
        folder = work / name
        folder.mkdir()
        shutil.copy(ROOT / "notebooks" / f"{name}.ipynb", folder)
        subprocess.run([sys.executable, str(ROOT / "notebooks" / "execute.py"), str(folder / f"{name}.ipynb")],
                       check=True, capture_output=True)
        (exports[name],) = list((folder / "exports").iterdir())
    return exports


# ---------------------------------------------------------------------- the slow reader

def slow_reader(tmp: Path, mib: int, rate: float) -> None:
    marks = tmp / "marks"
    marks.mkdir()
    path = write_truss(tmp / "big", BIG_STREAM, f'environment_variables: {{KM_MARKS: "{marks}"}}\n')
    print("| server | stream | read at | peak server memory growth | generator ahead of the reader (max) | growth / stream |")
    print("|---|---|---|---|---|---|")
    for name, start in (("Truss 0.18.36", serve_truss), ("kernel-magics", serve_ours)):
        (marks / "made").unlink(missing_ok=True)
        with start(path) as s:
            r = slow_read(s.predict_url(), mib, rate, marks, psutil.Process(s.proc.pid))
        print(f"| {name} | {mib} MiB in 1 MiB chunks | {rate:.0f} MiB/s | {r['peak_growth_mib']:.0f} MiB "
              f"| {r['lead_mib']} MiB | {r['peak_growth_mib'] / mib:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="echo,gil,gallery,slow")
    parser.add_argument("--rounds", type=int, default=2, help="Alternate the servers this many times; best kept.")
    args = parser.parse_args()
    python = truss_reference_python()
    if python is None:
        sys.exit("The truss reference is not set up: run ../shared/truss_reference/setup.sh (make test does).")
    only = set(args.only.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = []
        if "echo" in only:
            bench = TRUSS_REFERENCE / "bench_trusses"
            payload = '{"text": "hello", "n": 5}'
            cases += [("echo", bench / "echo", payload, [(1, 1000), (32, 3000)], False, None),
                      ("echo_stream", bench / "echo_stream", payload, [(1, 1000), (32, 3000)], True, None)]
        if "gil" in only:
            cases.append(("gil-stream (30 x 1 ms)", write_truss(tmp / "gil", GIL_STREAM), "{}", [(1, 300)], True, None))
        if "gallery" in only:
            exports = gallery_exports(tmp)
            venv = truss_venv_with_models()
            texts = json.dumps({"texts": [f"sentence number {i} about notebooks and models" for i in range(32)]})
            row = [13.2, 1.78, 2.14, 11.2, 100, 2.65, 2.76, 0.26, 1.28, 4.38, 1.05, 3.4, 1050]
            cases += [
                ("tiny GPT-2, 30-token stream", exports["tiny_gpt"], '{"prompt": "Beautiful is", "max_new_tokens": 30}',
                 [(1, 200)], True, venv),
                ("MiniLM, batch of 32", exports["embeddings"], texts, [(1, 100)], False, venv),
                ("scikit-learn pipeline", exports["wine_pipeline"], json.dumps({"rows": [row] * 4}),
                 [(1, 1000), (32, 2000)], False, venv),
            ]
        if cases:
            table(run_pairs(python, cases, args.rounds), cases)
        if "slow" in only:
            print()
            slow_reader(tmp, mib=200, rate=20.0)


if __name__ == "__main__":
    main()
