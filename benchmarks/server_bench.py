"""Our server vs Truss 0.18.36's own, side by side in one run.

Each model is served with `kernel-magics serve` and with Truss's server, one after the other and
alternating over rounds (best round kept), driven by the same load generator (bench_server.py from
../shared/truss_reference, aiohttp, on the same 2 cores):

- echo / echo_stream (bench_trusses): req/s and latency at concurrency 1 and 32;
- gil-stream: a sync generator doing ~1 ms of GIL-holding work per token, 30 tokens: time to first chunk;
- the gallery (notebooks/, exported from their kernels): the tiny GPT-2 streaming 30 tokens, MiniLM embedding a
  batch of 32 texts, the scikit-learn pipeline; Truss's server runs them with the models' libraries;
- slow reader: a 200 MiB stream (1 MiB chunks) read at a fixed 20 MiB/s: the server's peak memory above its
  memory before the request, and how far the generator ran ahead of the reader;
- logs: echo and echo_stream on our server with the default access log and /metrics, against the same
  server with both off (what `--log-level warning --no-metrics` sets), switched within one server four times
  a second (toggled_server.py, windowed_load.py): the cost of the bookkeeping; `--separate` adds the older
  comparison of three separate servers;
- startup: seconds from the process's start to liveness (GET /) and to readiness for the MiniLM gallery
  export (`--minilm DIR` reuses an export; otherwise the notebook runs once), on both engines;
- stalled: 200 clients that ask for a stream and read nothing, then probes (readiness, liveness) timed;
  header flood: 50 clients sending unfinished headers (up to 16 MiB each), the server's memory growth.

    .venv/bin/python benchmarks/server_bench.py [--only echo,gil,gallery,slow,logs,startup,stalled] [--rounds 2]
        [--seconds 40] [--parts] [--separate [--pin]]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

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



def drive(python: Path, url: str, payload: str, concurrency: int, requests: int, stream: bool, warmup: int = 20,
          cpus: Optional[set] = None) -> dict:
    """The load generator's run against ``url``; ``cpus``: the CPUs it may run on (all of them by default)."""
    cmd = [str(python), str(TRUSS_REFERENCE / "bench_server.py"), "--url", url, "--payload", payload,
           "--concurrency", str(concurrency), "--requests", str(requests), "--warmup", str(warmup), "--json"]
    if stream:
        cmd.append("--stream")
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, preexec_fn=pin)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_pairs(python: Path, cases: list, rounds: int, servers=None) -> dict:
    """cases: (label, directory, payload, [(concurrency, requests)], stream, venv for Truss)."""
    results: dict = {}
    for _ in range(rounds):
        for label, path, payload, loads, stream, venv in cases:
            pair = servers or (("truss", lambda p: serve_truss(p, venv=venv)), ("ours", serve_ours))
            for server, start in pair:
                with start(path) as s:
                    for c, n in loads:
                        r = drive(python, s.predict_url(), payload, c, n, stream)
                        key = (label, c, server)
                        if r["errors"]:
                            print(f"warning: {server} {label} c={c}: {r['errors']} errors", file=sys.stderr)
                        elif key not in results or r["req_per_s"] > results[key]["req_per_s"]:
                            results[key] = r
    return results


def table(results: dict, cases: list, names=("Truss 0.18.36", "kernel-magics"), vs="Truss") -> None:
    print("| model | concurrency | server | req/s | p50 ms | p99 ms | first chunk p50 ms | first chunk p99 ms "
          f"| req/s ours/{vs} | p99 ours/{vs} | first-chunk p99 ours/{vs} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, _, _, loads, stream, _ in cases:
        for c, _ in loads:
            theirs, ours = results.get((label, c, "truss")), results.get((label, c, "ours"))
            if not theirs or not ours:
                continue
            for name, r in zip(names, (theirs, ours)):
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


# ---------------------------------------------------------------------- logs: the cost of the bookkeeping

def bookkeeping_in_process(n: int = 60_000) -> str:
    """What the log line and the metrics cost a request, timed in one process on an event loop (no HTTP,
    no load generator), each beside what it replaced: a request's counts in our lists against
    prometheus_client's Counter and Histogram (in a registry of their own), the access tuple the loop
    keeps, and the lines made from a burst of 300 tuples in one go against one ``access`` call each."""
    import asyncio
    import time

    from prometheus_client import CollectorRegistry, Counter, Histogram

    from kernel_magics.serving import logs
    from kernel_magics.serving.access import _LATENCY_BOUNDS, Metrics

    route, path = "/v1/models/{model_name}:predict", "/v1/models/model:predict"
    registry = CollectorRegistry()
    ours = Metrics(registry=registry)
    counter = Counter("km_bench_requests", "", ["route", "status"], registry=registry)
    histogram = Histogram("km_bench_seconds", "", ["route"], buckets=_LATENCY_BOUNDS, registry=registry)

    counters: dict = {}
    histograms: dict = {}

    def theirs(route: str, status: int, seconds: float) -> None:  # Metrics.record as it was (57fd45e)
        key = (route, status)
        counter_child = counters.get(key)
        if counter_child is None:
            counter_child = counters[key] = counter.labels(route, str(status))
        histogram_child = histograms.get(route)
        if histogram_child is None:
            histogram_child = histograms[route] = histogram.labels(route)
        counter_child.inc()
        histogram_child.observe(seconds)

    def per_call(fn, *args) -> float:
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(n // 5):
                fn(*args)
            best = min(best, (time.perf_counter() - started) / (n // 5) * 1e6)
        return best

    async def on_a_loop() -> tuple:
        saved_gather, logs._LOOP_GATHER = logs._LOOP_GATHER, 3600.0  # (the burst made below, not by the timer)
        try:
            started = time.perf_counter()
            for i in range(n):
                logs.access_line("POST", path, 200, 1.25, f"abc-{i}")
            line = (time.perf_counter() - started) / n * 1e6
        finally:
            logs._LOOP_GATHER = saved_gather
        items = logs._burst.lines[:300]
        logs.flush_access_lines()
        formatter = logs._listener.handler.formatter
        made = per_call(formatter.access_lines, items) / len(items)
        one_by_one = per_call(lambda: [formatter.access(c, logs._ACCESS_FORMAT % a, r) for c, r, a in items]) / len(items)
        return line, made, one_by_one

    saved = sys.stderr
    with open(os.devnull, "w") as sink:
        sys.stderr = sink
        try:
            stop = logs.configure("info", "text")
            record, before = per_call(ours.record, route, 200, 0.0012), per_call(theirs, route, 200, 0.0012)
            line, made, one_by_one = asyncio.run(on_a_loop())
            stop()
        finally:
            sys.stderr = saved
    return (f"In one process, per request: the counts {record:.2f} us (prometheus_client's Counter and Histogram: "
            f"{before:.2f} us, {before / record:.1f}x); the access tuple kept on the loop {line:.2f} us; its line made "
            f"with the burst's {made:.2f} us (one `access` call each: {one_by_one:.2f} us, {one_by_one / made:.1f}x). "
            f"In all {record + line + made:.2f} us.")


def pin_threads(pid: int, cpus: set) -> None:
    """Every thread of process ``pid`` on ``cpus`` (sched_setaffinity of a pid moves its main thread only)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # a thread that ended meanwhile
            pass


def logs_cost(python: Path, rounds: int, pin: bool = False) -> None:
    """The same server with the access log and /metrics on (the default) and off, plus a control: a
    second, identical "off" server. Each round starts the three afresh; they run at once (an idle
    server costs nothing) and are driven in turn, in bursts, in an order that rotates every round;
    medians over the rounds. Run one after the other, two identical servers differed by up to 16%
    depending on which went second, and a slow drift of the machine (other processes, the CPU's
    clock) lands on whichever server was measured then; interleaved short bursts share that drift. The control's ratio (off2/off) is
    the method's own noise: "on/off" only says something where it is outside that. Medians of
    req/s, and of each server's CPU time per request, which the load generator's share of the 2
    cores disturbs less than req/s. ``pin``: each server on CPU 0 (every thread), the load generator on CPU 1, so the
    two never share a core (this VM's speed still swings: benchmarks/README.md, "(seventh)")."""
    import contextlib
    import statistics

    bench = TRUSS_REFERENCE / "bench_trusses"
    payload = '{"text": "hello", "n": 5}'
    settings = {"off": ("--log-level", "warning", "--no-metrics"), "on": (), "off2": ("--log-level", "warning", "--no-metrics")}
    names = list(settings)
    seen: dict = {}
    for label, stream in (("echo", False), ("echo_stream", True)):
        for i in range(rounds):
            order = names[i % 3:] + names[:i % 3]
            if i % 6 >= 3:
                order.reverse()
            # Fresh servers each round: one process can run a few percent faster or slower than another with
            # the same settings for as long as it lives (its memory layout, its hash seed), so each setting's
            # median is taken over as many processes as rounds.
            with contextlib.ExitStack() as stack:
                servers = {name: stack.enter_context(serve_ours(bench / label, *args)) for name, args in settings.items()}
                for c, n in ((1, 1000), (32, 5000)):
                    for setting in order:
                        s = servers[setting]
                        server = psutil.Process(s.proc.pid)
                        if pin:
                            pin_threads(s.proc.pid, {0})  # (again: threads started since)
                        before = server.cpu_times()
                        r = drive(python, s.predict_url(), payload, c, n, stream, warmup=100, cpus={1} if pin else None)
                        after = server.cpu_times()
                        cpu = (after.user + after.system - before.user - before.system) / (n + 100) * 1e6
                        seen.setdefault((label, c, setting), []).append((r["req_per_s"], cpu))
    print(f"Access log and /metrics on (default) against both off, and a second identical 'off' server as the "
          f"control; each round three fresh servers, served at once and driven in turn; median of {rounds} rounds:")
    print()
    print("| model | concurrency | req/s off | req/s on | on/off | control off2/off | server CPU per request off | on | on - off | off2 - off |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label in ("echo", "echo_stream"):
        for c in (1, 32):
            rate, cpu = {}, {}
            for setting in names:
                v = seen[(label, c, setting)]
                rate[setting] = statistics.median(x[0] for x in v)
                cpu[setting] = statistics.median(x[1] for x in v)
            print(f"| {label} | {c} | {rate['off']:.0f} | {rate['on']:.0f} | {rate['on'] / rate['off']:.3f} "
                  f"| {rate['off2'] / rate['off']:.3f} | {cpu['off']:.0f} us | {cpu['on']:.0f} us "
                  f"| {cpu['on'] - cpu['off']:+.0f} us | {cpu['off2'] - cpu['off']:+.0f} us |")


def logs_toggled(python: Path, seconds: float, window: float = 0.25, guard: float = 0.06,
                 modes: tuple = ("on-off", "off-off"), cases: tuple = (("echo", False), ("echo_stream", True)),
                 concurrencies: tuple = (1, 32), pin: bool = True) -> None:
    """The access log and /metrics switched on and off within one server, a quarter of a second at a
    time (``window``; benchmarks/toggled_server.py), under one load generator's run
    (benchmarks/windowed_load.py): each on window is compared with the off windows beside it, so the
    machine's drift (its speed swings by a fifth from one second to the next here) and what differs
    between two server processes (several percent) are out of the comparison. The control is the same
    run with both off in every window: what the method reads where nothing changes. Responses that end
    within ``guard`` of their window's start are left out (they may have started in the window before);
    the access lines of an on window are handed to the writer before it ends (toggled_server.py).
    ``pin``: the server's threads on CPU 0 and the load generator on CPU 1, so neither takes the
    other's core.

    Per pair of neighbouring windows, on/off of the responses (every on window is in two pairs: one with
    the window before it, one with the window after it, so a steady drift cancels); the geometric mean
    over the pairs with its 95% interval (two standard errors of the mean log ratio); and the server's
    CPU per response, on and off (its whole process: the writer thread included)."""
    import math
    import statistics

    bench = TRUSS_REFERENCE / "bench_trusses"
    payload = '{"text": "hello", "n": 5}'
    rows = []
    with tempfile.TemporaryDirectory(prefix="km-toggled-") as tmp:
        for label, stream in cases:
            for mode in modes:
                samples = Path(tmp) / f"{label}-{mode}.cpu"
                launcher = (str(ROOT / "benchmarks" / "toggled_server.py"), str(window), mode, str(samples))
                with serve_ours(bench / label, launcher=launcher) as s:
                    if pin:
                        pin_threads(s.proc.pid, {0})  # (threads it starts later inherit it)
                    for c in concurrencies:
                        cmd = [str(python), str(ROOT / "benchmarks" / "windowed_load.py"), "--url", s.predict_url(),
                               "--payload", payload, "--concurrency", str(c), "--seconds", str(seconds),
                               "--window", str(window), "--guard", str(guard)] + (["--stream"] if stream else [])
                        on_cpu_1 = (lambda: os.sched_setaffinity(0, {1})) if pin else None
                        out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True,
                                                        preexec_fn=on_cpu_1).stdout)
                        cpu = {int(k): float(v) for k, v in (line.split() for line in samples.read_text().splitlines())}
                        windows = {int(k): v for k, v in out["windows"].items()}
                        ks = sorted(k for k in windows if k + 1 in windows and k in cpu and k + 1 in cpu)
                        # (a window without a response after its guard: a stall of most of a window; its pairs
                        # are left out, and counted)
                        stalled = [k for k in ks if not windows[k][0] or not windows[k + 1][0]]
                        ks = [k for k in ks if k not in stalled]
                        logs = [math.log(windows[k][0] / windows[k + 1][0]) * (1 if k % 2 == 0 else -1) for k in ks]
                        # Neighbouring pairs share a window, so their spread understates the error: each half (every
                        # other pair) shares none, and the larger of the halves' standard errors is the interval's.
                        mean = statistics.fmean(logs)
                        se = max(statistics.stdev(half) / math.sqrt(len(half)) for half in (logs[0::2], logs[1::2]))
                        per = {0: [], 1: []}  # CPU per response, even (on) and odd (off) windows
                        for k in windows:
                            if k in cpu and k + 1 in cpu and windows[k][1]:
                                per[k % 2].append((cpu[k + 1] - cpu[k]) / windows[k][1] * 1e6)
                        rate = {p: statistics.fmean(windows[k][0] for k in windows if k % 2 == p) / (window - guard)
                                for p in (0, 1)}
                        rows.append((label, c, mode, rate[0], rate[1], math.exp(mean), math.exp(mean - 2 * se),
                                     math.exp(mean + 2 * se), len(logs), statistics.fmean(per[0]),
                                     statistics.fmean(per[1]), out["errors"], len(stalled)))
    print(bookkeeping_in_process())
    print()
    print(f"Access log and /metrics switched within one server, {window:g} s on, {window:g} s off, {seconds:g} s "
          f"per row (control: off in both):")
    print()
    print("| model | concurrency | windows | req/s on | req/s off | on/off (95% interval) | pairs (left out: a stall) "
          "| server CPU per request on / off | on - off | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, c, mode, on, off, ratio, lo, hi, n, cpu_on, cpu_off, errors, stalled in rows:
        kind = {"on-off": "both on / off", "log-off": "log on / off", "metrics-off": "metrics on / off",
                "off-off": "control: off / off"}[mode]
        print(f"| {label} | {c} | {kind} | {on:.0f} | {off:.0f} | **{ratio:.3f}** ({lo:.3f} to {hi:.3f}) | {n} ({stalled}) "
              f"| {cpu_on:.0f} / {cpu_off:.0f} us | {cpu_on - cpu_off:+.0f} us | {errors} |")


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


# ---------------------------------------------------------------------- startup: liveness and readiness

def startup(export: Path, venv) -> None:
    """Seconds from the server process's start to liveness, and to readiness (polled every 20 ms); on Ray, also
    to the first liveness answered by Serve's proxy through the replicas (until then the stand-in answers)."""
    import os
    import time

    import httpx

    from server_harness import free_port

    # One SSL context for every poll: httpx.get builds one per call otherwise (certifi's certificates, about 46 ms
    # of CPU), and two polls every 20 ms took a whole core from the servers whose start this measures.
    context = httpx.create_ssl_context()
    print("| server | MiniLM export: process start to liveness (GET /) | to readiness (GET /v1/models/model) "
          "| to Serve's proxy answering liveness |")
    print("|---|---|---|---|")
    for name in ("Truss 0.18.36", "kernel-magics", "kernel-magics --engine ray (a local Ray)"):
        port, work = free_port(), Path(tempfile.mkdtemp(prefix="km-startup-"))
        ray = name.endswith("(a local Ray)")
        if name.startswith("Truss"):
            # serve_with_truss.sh first lays the directory out as Truss's image would (a copy), then starts main.py.
            cmd = [str(TRUSS_REFERENCE / "serve_with_truss.sh"), str(export), str(port), str(work)]
            env = {**os.environ, **({"TRUSS_REF_VENV": str(venv)} if venv else {})}
        else:
            cmd, env = [sys.executable, "-m", "kernel_magics.cli", "serve", str(export), "--port", str(port)], None
            if ray:
                cmd += ["--engine", "ray", "--replicas", "1"]  # its Ray's files go when it stops
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
        live = ready = proxy = None
        try:
            while ready is None and time.perf_counter() - started < 300 and proc.poll() is None:
                for path in ("/", "/v1/models/model"):
                    try:
                        answer = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=1, verify=context)
                        ok = answer.status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    if ok and path == "/" and live is None:
                        live = time.perf_counter() - started
                    if ok and path == "/" and proxy is None and "x-kernel-magics-replica" in answer.headers:
                        proxy = time.perf_counter() - started
                    if ok and path != "/":
                        ready = time.perf_counter() - started
                time.sleep(0.02)
        finally:
            if ray:  # the command takes its deployment and its Ray down itself
                proc.terminate()
                try:
                    proc.wait(120)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
                    proc.wait(30)
            else:
                os.killpg(proc.pid, 15)
                proc.wait(30)
            shutil.rmtree(work, ignore_errors=True)
        show = lambda t: f"{t:.2f} s" if t is not None else "never"  # noqa: E731
        print(f"| {name} | {show(live)} | {show(ready)} | {show(proxy) if ray else '-'} |")


# ---------------------------------------------------------------------- stalled readers, header flood

def stalled_and_flood(tmp: Path, readers: int = 200, flooders: int = 50) -> None:
    import socket
    import threading
    import time

    import httpx

    marks = tmp / "stall-marks"
    marks.mkdir()
    path = write_truss(tmp / "stall", BIG_STREAM, f'environment_variables: {{KM_MARKS: "{marks}"}}\n'
                       "runtime: {predict_concurrency: 1000}\n")
    print(f"| server | {readers} stalled stream readers: readiness p50 / max ms | liveness max ms "
          f"| {flooders} clients x unfinished headers: memory growth | refused |")
    print("|---|---|---|---|---|")
    for name, start in (("Truss 0.18.36", serve_truss), ("kernel-magics", serve_ours)):
        with start(path) as s:
            host, port = s.url.removeprefix("http://").split(":")
            socks = []
            body = json.dumps({"mib": 2}).encode()
            for _ in range(readers):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect((host, int(port)))
                sock.sendall(b"POST /v1/models/model:predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                             b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                socks.append(sock)
            time.sleep(2)  # let every stream start and stall (a benchmark, not a test)
            ready, live = [], []
            for _ in range(20):
                for url, into in ((s.url + "/v1/models/model", ready), (s.url + "/", live)):
                    t = time.perf_counter()
                    try:
                        httpx.get(url, timeout=30)
                        into.append((time.perf_counter() - t) * 1000)
                    except httpx.HTTPError:
                        into.append(30000.0)
            for sock in socks:
                sock.close()
            server = psutil.Process(s.proc.pid)
            tree = [server, *server.children(recursive=True)]
            base = sum(p.memory_info().rss for p in tree)
            refused = [0]

            def flood() -> None:
                with socket.create_connection((host, int(port))) as sock:
                    sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nx-big: ")
                    try:
                        for _ in range(256):  # up to 16 MiB of one header that never ends
                            sock.sendall(b"a" * 65536)
                    except OSError:
                        refused[0] += 1

            threads = [threading.Thread(target=flood) for _ in range(flooders)]
            for t in threads:
                t.start()
            peak = base
            while any(t.is_alive() for t in threads):
                peak = max(peak, sum(p.memory_info().rss for p in tree))
                time.sleep(0.05)
            ready.sort()
            print(f"| {name} | {ready[len(ready) // 2]:.1f} / {ready[-1]:.1f} | {max(live):.1f} "
                  f"| {(peak - base) / 2**20:.0f} MiB | {refused[0]} of {flooders} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="echo,gil,gallery,slow,logs,startup,stalled")
    parser.add_argument("--rounds", type=int, default=2, help="Alternate the servers this many times; best kept.")
    parser.add_argument("--minilm", type=Path, default=None, help="A MiniLM gallery export to time the startup of.")
    parser.add_argument("--seconds", type=float, default=40.0,
                        help="logs: seconds of load per row of the one-server comparison (half on, half off).")
    parser.add_argument("--parts", action="store_true",
                        help="logs: the log and the metrics also switched one at a time.")
    parser.add_argument("--separate", action="store_true",
                        help="logs: also the older comparison of three separate servers (on, off, off again).")
    parser.add_argument("--pin", action="store_true",
                        help="logs --separate: each server on CPU 0 and the load generator on CPU 1 (Linux, 2 CPUs "
                             "or more; the one-server comparison always pins where there are 2 CPUs).")
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
        if "logs" in only:
            print()
            logs_toggled(python, args.seconds, modes=("on-off", "log-off", "metrics-off", "off-off") if args.parts
                         else ("on-off", "off-off"), pin=(os.cpu_count() or 1) >= 2)
            if args.separate:
                print()
                logs_cost(python, max(args.rounds, 6), pin=args.pin)
        if "startup" in only:
            minilm = args.minilm
            if minilm is None:
                (tmp / "startup").mkdir()
                minilm = gallery_exports(tmp / "startup")["embeddings"]
            print()
            startup(minilm, truss_venv_with_models())
        if "stalled" in only:
            print()
            stalled_and_flood(tmp)


if __name__ == "__main__":
    main()
