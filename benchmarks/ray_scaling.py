"""Ray Serve scaling (issue 8), side by side in one run with the same load generator.

1. A CPU-bound predict (about 5 ms of pure Python that holds the GIL) served by
   `kernel-magics serve --engine ray` with 1 and with 2 replicas, concurrency 8.
2. The Ray path's overhead: `kernel-magics serve` (uvicorn, one process) vs
   `--engine ray --replicas 1` on the echo model, concurrency 8.

    .venv/bin/python benchmarks/ray_scaling.py [--requests 800]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from server_harness import TRUSS_REFERENCE, serve_ours, truss_reference_python, write_truss  # noqa: E402

CPU_BOUND = """
import time


class Model:
    def predict(self, model_input):
        end = time.perf_counter() + 0.005
        n = 0
        while time.perf_counter() < end:  # pure Python: holds the GIL the whole time
            n += 1
        return {"n": n > 0}
"""


def drive(python: Path, url: str, requests: int, concurrency: int = 8) -> dict:
    out = subprocess.run([str(python), str(TRUSS_REFERENCE / "bench_server.py"), "--url", url,
                          "--payload", '{"text": "hello"}', "--concurrency", str(concurrency),
                          "--requests", str(requests), "--warmup", "40", "--json"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=800)
    args = parser.parse_args()
    python = truss_reference_python()
    if python is None:
        sys.exit("The load generator's venv is not set up: run ../shared/truss_reference/setup.sh (make test does).")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cpu = write_truss(Path(tmp) / "cpu", CPU_BOUND, "runtime: {predict_concurrency: 1}\nresources: {cpu: '1'}\n")
        echo = TRUSS_REFERENCE / "bench_trusses" / "echo"
        for label, path, engine, replicas in (
            ("cpu-bound 5 ms, Ray, 1 replica", cpu, "ray", 1),
            ("cpu-bound 5 ms, Ray, 2 replicas", cpu, "ray", 2),
            ("echo, kernel-magics serve (uvicorn)", echo, "uvicorn", 1),
            ("echo, Ray, 1 replica", echo, "ray", 1),
        ):
            with serve_ours(path, engine=engine, replicas=replicas) as s:
                r = drive(python, s.predict_url(), args.requests)
            rows.append((label, r))
    by = dict(rows)
    print("| setup (concurrency 8) | req/s | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {r['req_per_s']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} |")
    one, two = by["cpu-bound 5 ms, Ray, 1 replica"], by["cpu-bound 5 ms, Ray, 2 replicas"]
    plain, ray1 = by["echo, kernel-magics serve (uvicorn)"], by["echo, Ray, 1 replica"]
    print(f"\n2 replicas / 1 replica throughput: {two['req_per_s'] / one['req_per_s']:.2f}x "
          f"(p99 {one['p99_ms']:.1f} -> {two['p99_ms']:.1f} ms)")
    print(f"Ray path / plain serve on echo: {ray1['req_per_s'] / plain['req_per_s']:.2f}x req/s "
          f"(p99 {plain['p99_ms']:.1f} vs {ray1['p99_ms']:.1f} ms)")


if __name__ == "__main__":
    main()
