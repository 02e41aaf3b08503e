"""What keeping secrets out costs (issue 22, items 1 to 4), side by side in one run.

1. The export's byte scan (:class:`SecretScanner`, every form and encoding of a secret) over one large
   file, next to only reading that file in the same 1 MiB chunks and to the UTF-8-only search the export
   did before; and how much the kernel's peak memory grows while it scans.
2. Log records made through :func:`redact_log_records` next to plain ones.
3. A cell that prints 20,000 lines in a real kernel, without kernel_magics and with it (a secret declared
   and set), where ipykernel's output stream redacts each stretch it sends.

    .venv/bin/python benchmarks/secret_scan.py [--mib 256]
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from kernel_magics.core.secrets import CHUNK_SIZE, SecretScanner, redact_log_records  # noqa: E402

PLAIN = "sk-CANARY-bench-5d2e8f"
ODD = "sk-O\"DD\\can'ary-\u00e9-91c0\n"  # every escaping changes it: the most forms to look for


def best(fn, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def file_scan(mib: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "value.bin"
        with open(path, "wb") as out:
            for _ in range(mib):
                out.write(os.urandom(1 << 20))

        def read() -> None:
            with open(path, "rb") as f:
                while f.read(CHUNK_SIZE):
                    pass

        def utf8_only() -> None:
            needle, tail = PLAIN.encode(), b""
            with open(path, "rb") as f:
                while block := f.read(CHUNK_SIZE):
                    assert needle not in tail + block
                    tail = block[-len(needle):]

        scanners = {"one plain secret": SecretScanner({PLAIN: "tok"}),
                    "one secret every escaping changes": SecretScanner({ODD: "tok"})}
        before = peak_mib()
        base = best(read)
        rows = [("read only, 1 MiB chunks", base, ""), ("UTF-8 only (the export before)", best(utf8_only), "1")]
        for label, scanner in scanners.items():
            patterns = len(scanner._bytes)
            rows.append((f"SecretScanner, {label}", best(lambda s=scanner: s.find_in_file(path)), str(patterns)))
        grown = peak_mib() - before
        print(f"\n### file scan: {mib} MiB of random bytes (best of 3)\n")
        print("| scan | time | MiB/s | byte patterns | vs read only |\n|---|---|---|---|---|")
        for label, seconds, patterns in rows:
            print(f"| {label} | {seconds * 1000:,.0f} ms | {mib / seconds:,.0f} | {patterns or '-'} | "
                  f"{seconds / base:.1f}x |")
        print(f"\nPeak memory growth of this process while scanning: {grown:.1f} MiB.")


def log_records(n: int = 20_000) -> None:
    stream = io.StringIO()
    logger = logging.getLogger("bench.secret_scan")
    logger.propagate = False
    logger.addHandler(logging.StreamHandler(stream))
    logger.setLevel(logging.INFO)
    scanner = SecretScanner({PLAIN: "tok"})

    def emit() -> None:
        for i in range(n):
            logger.info("request %d took %.1f ms", i, 1.5)

    def redacted_emit() -> None:
        stop = redact_log_records(scanner.redact)
        try:
            emit()
        finally:
            stop()

    runs: dict[str, list[float]] = {"plain": [], "redacted": []}
    for _ in range(5):  # alternated, so the machine's drift falls on both
        runs["plain"].append(best(emit, 1))
        runs["redacted"].append(best(redacted_emit, 1))
    plain, redacted = min(runs["plain"]), min(runs["redacted"])
    print(f"\n### {n:,} log records through a StreamHandler (best of 5, alternated)\n")
    print("| records | time | per record | ratio |\n|---|---|---|---|")
    print(f"| plain | {plain * 1000:,.0f} ms | {plain / n * 1e6:.1f} µs | 1 |")
    print(f"| redacted at creation | {redacted * 1000:,.0f} ms | {redacted / n * 1e6:.1f} µs | "
          f"{redacted / plain:.2f}x |")


def kernel_prints(n: int = 20_000, rounds: int = 5) -> None:
    from kernel_harness import Kernel

    cell = f"for _i in range({n}):\n    print(_i)\n"
    plain = Kernel(env={"TRUSS_SECRET_tok": PLAIN})
    guarded = Kernel(env={"TRUSS_SECRET_tok": PLAIN})
    try:
        guarded.ok("%load_ext kernel_magics")
        guarded.ok("%%model_config\nsecrets: {tok: null}\n")
        times: dict[str, list[float]] = {"without kernel_magics": [], "with kernel_magics, a secret set": []}
        for _ in range(rounds):  # alternated, so the machine's drift falls on both
            for label, k in zip(times, (plain, guarded)):
                started = time.perf_counter()
                k.ok(cell)  # until the last output arrived and the kernel is idle
                times[label].append(time.perf_counter() - started)
    finally:
        plain.shutdown()
        guarded.shutdown()
    base = min(times["without kernel_magics"])
    print(f"\n### a cell printing {n:,} lines in a real kernel (best of {rounds}, alternated, until the client has "
          "every output)\n")
    print("| kernel | time | ratio |\n|---|---|---|")
    for label, runs in times.items():
        print(f"| {label} | {min(runs) * 1000:,.0f} ms | {min(runs) / base:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="size of the scanned file (default 256)")
    args = parser.parse_args()
    file_scan(args.mib)
    log_records()
    kernel_prints()


if __name__ == "__main__":
    main()
