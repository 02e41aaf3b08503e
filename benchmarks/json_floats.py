"""The JSON of float results (core/serialization.dumps), side by side in one run: json.dumps against orjson's path.

1. In this process: one embedding (384 floats, float32 widened as torch's tolist() gives them), and a batch of 32
   of them as `[{"embedding": [...]}, ...]`; the best of 5 timings of each, and their ratio.
2. Served: the batched all-MiniLM-L6-v2 export of benchmarks/batching.py (one sentence per request, concurrency 32)
   by `kernel-magics serve` with orjson, and by the same server with orjson hidden from it (it then writes with
   json.dumps, as the base install does), in alternating rounds; the model alone (the limit) at the start and the
   end. Median req/s of the rounds and the share of the limit.

    .venv/bin/python benchmarks/json_floats.py [--rounds 3] [--requests 600]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import random
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import batching  # noqa: E402
from server_harness import serve_ours  # noqa: E402  (batching put tests/ on the path)


def in_process() -> None:
    from kernel_magics.core.serialization import dumps

    rng = random.Random(1)
    one = [struct.unpack("f", struct.pack("f", rng.gauss(0, 0.1)))[0] for _ in range(384)]
    batch = [{"embedding": [struct.unpack("f", struct.pack("f", rng.gauss(0, 0.1)))[0] for _ in range(384)]}
             for _ in range(32)]
    print("| result | json.dumps | dumps (orjson's path) | ratio |")
    print("|---|---|---|---|")
    for label, value, n in (("one embedding, 384 floats", one, 2000), ("32 embeddings in dicts", batch, 100)):
        assert dumps(value) == json.dumps(value)
        times = {}
        for name, fn in (("json", json.dumps), ("ours", dumps)):
            best = float("inf")
            for _ in range(5):
                started = time.perf_counter()
                for _ in range(n):
                    fn(value)
                best = min(best, (time.perf_counter() - started) / n)
            times[name] = best
        print(f"| {label} | {times['json'] * 1e6:.0f} us | {times['ours'] * 1e6:.0f} us "
              f"| {times['json'] / times['ours']:.1f}x |")


def served(rounds: int, requests: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="km-json-floats-"))
    # Every process here extracts the model's weights (90 MB) into a temp dir: all of them inside this one.
    (work / "tmp").mkdir()
    os.environ["TMPDIR"] = tempfile.tempdir = str(work / "tmp")
    config = "model_name: minilm\nmodel_metadata:\n  batching: {max_batch_size: 32, max_wait_ms: 5}\n"
    export = batching.export(work / "batched", batching.BATCHED, config)
    # A module named orjson that cannot be imported, first on the server's path, as if it were not installed (FastAPI
    # also looks for it): the server writes with json.dumps.
    hidden = work / "no-orjson"
    hidden.mkdir()
    (hidden / "orjson.py").write_text("raise ModuleNotFoundError(\"No module named 'orjson'\", name='orjson')\n")
    try:
        limits = [batching.limit("cpu", 32)[32]]
        rates: dict = {"orjson": [], "json.dumps": []}
        for i in range(rounds):
            order = ["orjson", "json.dumps"] if i % 2 == 0 else ["json.dumps", "orjson"]
            for name in order:
                env = {"PYTHONPATH": str(hidden)} if name == "json.dumps" else None
                with serve_ours(export, env=env, timeout=300, wait_ready=True) as s:
                    r = batching.drive(s.predict_url(), 32, requests)
                    assert not r["errors"], r
                    rates[name].append(r["req_per_s"])
        limits.append(batching.limit("cpu", 32)[32])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    limit = sum(limits) / 2
    print(f"The model alone: {limits[0]:.0f} and {limits[1]:.0f} sentences/s at 32 per call (start, end).")
    print()
    print("| server (MiniLM, batched, concurrency 32) | req/s per round | median | of the limit |")
    print("|---|---|---|---|")
    for name in ("json.dumps", "orjson"):
        median = statistics.median(rates[name])
        print(f"| kernel-magics serve, {name} | {', '.join(f'{r:.0f}' for r in rates[name])} | {median:.0f} "
              f"| {median / limit:.2f} |")
    print(f"\norjson / json.dumps: {statistics.median(rates['orjson']) / statistics.median(rates['json.dumps']):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--only", default="process,served")
    args = parser.parse_args()
    if "process" in args.only:
        in_process()
        print()
    if "served" in args.only:
        served(args.rounds, args.requests)


if __name__ == "__main__":
    main()
