"""Our server vs Truss 0.18.36's own, side by side in one run (issue 6).

Serves bench_trusses/echo and bench_trusses/echo_stream (../shared/truss_reference) with
`kernel-magics serve` and with Truss's server, one after the other, and drives both with the
same load generator (bench_server.py) at concurrency 1 and 32. Prints a table with ratios.

    .venv/bin/python benchmarks/server_bench.py [--requests-c1 1000] [--requests-c32 3000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from server_harness import TRUSS_REFERENCE, serve_ours, serve_truss, truss_reference_python  # noqa: E402

PAYLOAD = '{"text": "hello", "n": 5}'


def drive(python: Path, url: str, concurrency: int, requests: int, stream: bool) -> dict:
    cmd = [str(python), str(TRUSS_REFERENCE / "bench_server.py"), "--url", url, "--payload", PAYLOAD,
           "--concurrency", str(concurrency), "--requests", str(requests), "--warmup", "50", "--json"]
    if stream:
        cmd.append("--stream")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests-c1", type=int, default=1000)
    parser.add_argument("--requests-c32", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2, help="Alternate the servers this many times; best round kept.")
    args = parser.parse_args()
    python = truss_reference_python()
    if python is None:
        sys.exit("The truss reference is not set up: run ../shared/truss_reference/setup.sh (make test does).")
    results: dict = {}
    for _ in range(args.rounds):
        for model in ("echo", "echo_stream"):
            path = TRUSS_REFERENCE / "bench_trusses" / model
            for server, start in (("truss", serve_truss), ("kernel-magics", serve_ours)):
                with start(path) as s:
                    for c, n in ((1, args.requests_c1), (32, args.requests_c32)):
                        r = drive(python, s.predict_url(), c, n, stream=model == "echo_stream")
                        key = (model, c, server)
                        if r["errors"] == 0 and (key not in results or r["req_per_s"] > results[key]["req_per_s"]):
                            results[key] = r
                        elif r["errors"]:
                            print(f"warning: {server} {model} c={c}: {r['errors']} errors", file=sys.stderr)
    print("| model | concurrency | server | req/s | p50 ms | p99 ms | TTFB p50 ms | req/s ratio (ours / Truss) | p99 ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in ("echo", "echo_stream"):
        for c in (1, 32):
            theirs, ours = results[(model, c, "truss")], results[(model, c, "kernel-magics")]
            for name, r in (("Truss 0.18.36", theirs), ("kernel-magics", ours)):
                ttfb = f"{r['ttfb_p50_ms']:.2f}" if r.get("ttfb_p50_ms") is not None else "-"
                ratio = f"{ours['req_per_s'] / theirs['req_per_s']:.2f}" if r is ours else ""
                p99 = f"{ours['p99_ms'] / theirs['p99_ms']:.2f}" if r is ours else ""
                print(f"| {model} | {c} | {name} | {r['req_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {ttfb} | {ratio} | {p99} |")


if __name__ == "__main__":
    main()
