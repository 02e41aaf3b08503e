"""A load generator that says which window each response ended in (server_bench.py --only logs).

    python windowed_load.py --url URL --payload JSON --concurrency N --seconds S --window W --guard G [--stream]

Requests as ../shared/truss_reference/bench_server.py sends them (aiohttp, uvloop when there is one, N at
a time, a stream read chunk by chunk), for S seconds after a second of warm-up. A response counts in
window ``floor(time.monotonic() / W)``, the clock benchmarks/toggled_server.py switches by; the ones
that end within G seconds of their window's start are counted apart, as they may have started in the
window before. Prints one JSON object: errors, and per window wholly measured [responses after G,
responses].
"""

import argparse
import asyncio
import json
import time

import aiohttp


async def run(a) -> dict:
    body, headers = a.payload.encode(), {"Content-Type": "application/json"}
    windows: dict = {}
    errors = 0
    measure_from = time.monotonic() + 1.0
    until = measure_from + a.seconds
    connector = aiohttp.TCPConnector(limit=a.concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def worker() -> None:
            nonlocal errors
            while time.monotonic() < until:
                try:
                    async with session.post(a.url, data=body, headers=headers) as r:
                        if a.stream:
                            async for _ in r.content.iter_any():
                                pass
                        else:
                            await r.read()
                        ok = 200 <= r.status < 300
                except Exception:  # noqa: BLE001 (counted, as bench_server.py counts them)
                    ok = False
                ended = time.monotonic()
                if not ok:
                    errors += 1
                elif measure_from <= ended < until:
                    k = int(ended // a.window)
                    counts = windows.setdefault(k, [0, 0])
                    counts[1] += 1
                    if ended - k * a.window >= a.guard:
                        counts[0] += 1

        await asyncio.gather(*(worker() for _ in range(a.concurrency)))
    whole = {k: v for k, v in windows.items() if k * a.window >= measure_from and (k + 1) * a.window <= until}
    return {"errors": errors, "windows": whole}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--payload", required=True)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--window", type=float, default=0.25)
    p.add_argument("--guard", type=float, default=0.06)
    p.add_argument("--stream", action="store_true")
    a = p.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(run(a))))


if __name__ == "__main__":
    main()
