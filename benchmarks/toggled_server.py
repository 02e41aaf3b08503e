"""`kernel-magics serve` whose access log and /metrics switch on and off by the clock (server_bench.py --only logs).

    python benchmarks/toggled_server.py WINDOW MODE SAMPLES serve DIR --port PORT ...

The command line after SAMPLES is the CLI's own. Window k is ``floor(time.monotonic() / WINDOW)`` (one clock for
every process on Linux, so the load generator bins its responses by the same rule): with MODE ``on-off`` the
bookkeeping is on in even windows and off in odd ones; ``log-off`` and ``metrics-off`` switch one of the two
(the other stays off); with ``off-off`` both are off in every window (the control: what the method itself reads
as a difference). One process serves both settings, so what separates two servers with the same settings (their
memory layout, their hash seed, where the scheduler put them: several percent on this VM) is not in the
comparison, and a drift of the machine lands on both settings within a second. Off is what
``--log-level warning --no-metrics`` sets: the root logger at WARNING (the access line is asked for and not made)
and no metrics. At each window's start the process's CPU time is appended to SAMPLES: ``k seconds``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time

MODES = ("on-off", "log-off", "metrics-off", "off-off")
# The loop makes its access lines 0.1 s after a burst began (serving/logs.py, _LOOP_GATHER): those of an on window's
# last 0.1 s would be made in the off window after it. The loop is asked to hand them over this long before the
# window ends (the lines of the last moment still go to a burst of the next window: a fifth of a window's lines
# at most, made in about 1 us each).
_FLUSH_BEFORE = 0.02


def _switch(apps: list, loops: list, window: float, mode: str, samples: str) -> None:
    from kernel_magics.serving.access import RequestLog
    from kernel_magics.serving.logs import flush_access_lines

    while not loops or not apps or apps[0].middleware_stack is None:  # built at the first request (a probe)
        time.sleep(0.01)
    layer, loop, root = apps[0].middleware_stack, loops[0], logging.getLogger()
    while not isinstance(layer, RequestLog):
        layer = layer.app
    metrics = layer.metrics
    with open(samples, "w") as out:
        k = int(time.monotonic() // window)
        while True:
            on = k % 2 == 0
            root.setLevel(logging.INFO if on and mode in ("on-off", "log-off") else logging.WARNING)
            layer.metrics = metrics if on and mode in ("on-off", "metrics-off") else None
            out.write(f"{k} {time.process_time()}\n")
            out.flush()
            k += 1
            if on:  # this window's access lines made on the loop within it, not in the next one
                time.sleep(max(0.0, k * window - _FLUSH_BEFORE - time.monotonic()))
                loop.call_soon_threadsafe(flush_access_lines)
            time.sleep(max(0.0, k * window - time.monotonic()))


def main() -> int:
    window, mode, samples = float(sys.argv[1]), sys.argv[2], sys.argv[3]
    if mode not in MODES:
        raise SystemExit(f"MODE is one of {', '.join(MODES)}, not {mode!r}")
    import asyncio

    from kernel_magics.cli import main as cli
    from kernel_magics.serving import server

    apps: list = []
    loops: list = []
    create_app = server.create_app

    def capture(*args, **kwargs):
        app = create_app(*args, **kwargs)
        apps.append(app)
        lifespan = app.router.lifespan_context

        @contextlib.asynccontextmanager
        async def noting_the_loop(app):
            loops.append(asyncio.get_running_loop())
            async with lifespan(app) as state:
                yield state

        app.router.lifespan_context = noting_the_loop
        return app

    server.create_app = capture  # (serving/uvicorn_engine.py imports it when it serves)
    threading.Thread(target=_switch, args=(apps, loops, window, mode, samples), daemon=True).start()
    return cli(sys.argv[4:])


if __name__ == "__main__":
    sys.exit(main())
