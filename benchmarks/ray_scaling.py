"""Ray Serve scaling (issue 8), side by side in one run with the same load generator.

1. A CPU-bound predict (about 5 ms of pure Python that holds the GIL) served by
   `kernel-magics serve --engine ray` with 1 and with 2 replicas, concurrency 8.
2. The Ray path's overhead: `kernel-magics serve` (uvicorn, one process) vs
   `--engine ray --replicas 1` on the echo model, concurrency 8.
3. Several nodes (issue 15), on a cluster of a head and two workers simulated on this machine
   (benchmarks/local_ray_cluster.py, 1 CPU each): the CPU-bound predict with 1 replica, and with
   2 replicas on 2 nodes (`--address HEAD --replicas-per-node 1`); the time until both replicas
   answer again after a worker node is killed under load; and an autoscaling trace
   (`--min-replicas 1 --max-replicas 3`): replicas running, second by second, under load and idle.

    .venv/bin/python benchmarks/ray_scaling.py [--requests 800] [--only single|multi]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
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


def single_node(python: Path, requests: int) -> None:
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
                r = drive(python, s.predict_url(), requests)
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


NODE_OF = """
import time


class Model:
    def predict(self, model_input):
        import ray

        end = time.perf_counter() + 0.005
        n = 0
        while time.perf_counter() < end:
            n += 1
        return {"node": ray.get_runtime_context().get_node_id()}
"""


def replica_counts() -> dict:
    """Replica states of the deployment, read from Serve's controller by a driver joined to the cluster."""
    from ray import serve

    app = serve.status().applications.get("kernel-magics")
    dep = app.deployments.get("TrussModel") if app else None
    return {str(getattr(k, "value", k)): n for k, n in (dep.replica_states if dep else {}).items() if n}


class Load:
    """A bounded closed-loop load on a thread: ``clients`` at a time; counts answers per second."""

    def __init__(self, url: str, clients: int) -> None:
        import httpx

        self.url, self.clients, self.ok, self.failed = url, clients, 0, 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(httpx,)) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def _run(self, httpx) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                try:
                    ok = client.post(self.url, json={}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    self.ok += 1
                else:
                    self.failed += 1
                    time.sleep(0.05)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def multi_node(python: Path, requests: int) -> None:
    import os

    import httpx

    from ray_harness import LocalCluster

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    cluster = LocalCluster(workers=2)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            d = write_truss(Path(tmp) / "cpu", NODE_OF, "runtime: {predict_concurrency: 1}\nresources: {cpu: '1', memory: 100Mi}\n")
            rows = []
            for label, replicas in (("1 replica (1 node)", 1), ("2 replicas on 2 nodes", 2)):
                with serve_ours(d, "--address", cluster.address, "--replicas-per-node", "1", engine="ray",
                                replicas=replicas, timeout=180) as s:
                    rows.append((label, drive(python, s.predict_url(), requests)))
            print("\n| cluster of 3 nodes on this machine, cpu-bound 5 ms (concurrency 8) | req/s | p50 ms | p99 ms | errors |")
            print("|---|---|---|---|---|")
            for label, r in rows:
                print(f"| {label} | {r['req_per_s']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} |")
            print(f"\n2 nodes / 1 node throughput: {rows[1][1]['req_per_s'] / rows[0][1]['req_per_s']:.2f}x")

            # A worker node lost under load (4 clients): time until both replicas answer again.
            with serve_ours(d, "--address", cluster.address, "--replicas-per-node", "1", engine="ray", replicas=2,
                            timeout=180) as s:
                from server_harness import post_concurrently

                def nodes_answering() -> set:
                    rs = post_concurrently(s.predict_url(), [{}] * 16)
                    return {cluster.name_of(r.json()["node"]) for r in rs if r.status_code == 200}

                victim = next(n for n in nodes_answering() if n != "head")
                load = Load(s.predict_url(), 4)
                time.sleep(2)
                cluster.command(f"kill {victim}", f"KILLED {victim}")
                killed = time.monotonic()
                seen_503, recovered = False, None
                while time.monotonic() - killed < 120:
                    seen_503 |= httpx.get(s.url + "/v1/models/model", timeout=10).status_code == 503
                    if seen_503 and len(nodes_answering()) == 2 and \
                            httpx.get(s.url + "/v1/models/model", timeout=10).status_code == 200:
                        recovered = time.monotonic() - killed
                        break
                    time.sleep(0.25)
                load.close()
                print(f"\nLost worker node under load (4 clients): both replicas answered again after "
                      f"{recovered:.1f} s" if recovered else "\nLost worker node: no recovery within 120 s", end="")
                print(f"; {load.failed} of {load.ok + load.failed} requests failed; readiness said 503 meanwhile: {seen_503}")
                cluster.command(f"add {victim}", f"NODE {victim}")

            # Autoscaling: 1..3 replicas, 2 ongoing requests per replica; 8 clients for 40 s, then idle.
            ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
            with serve_ours(d, "--address", cluster.address, "--min-replicas", "1", "--max-replicas", "3",
                            "--target-ongoing-requests", "2", engine="ray", replicas=1, timeout=180) as s:
                trace = []
                start = time.monotonic()
                load = Load(s.predict_url(), 8)
                last_ok = 0
                while time.monotonic() - start < 75:
                    if load is not None and time.monotonic() - start > 40:
                        load.close()
                        last_ok, load = load.ok, None
                    time.sleep(5)
                    counts = replica_counts()
                    served = load.ok if load else last_ok
                    trace.append((time.monotonic() - start, counts.get("RUNNING", 0),
                                  sum(counts.values()) - counts.get("RUNNING", 0), served, load is not None))
                if load is not None:
                    load.close()
            ray.shutdown()
            print("\n| t (s) | load | replicas running | starting/stopping | answers so far |")
            print("|---|---|---|---|---|")
            for t, running, other, served, loaded in trace:
                print(f"| {t:.0f} | {'8 clients' if loaded else 'idle'} | {running} | {other} | {served} |")
    finally:
        cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=800)
    parser.add_argument("--only", choices=["single", "multi"])
    args = parser.parse_args()
    python = truss_reference_python()
    if python is None:
        sys.exit("The load generator's venv is not set up: run ../shared/truss_reference/setup.sh (make test does).")
    if args.only != "multi":
        single_node(python, args.requests)
    if args.only != "single":
        multi_node(python, args.requests)


if __name__ == "__main__":
    main()
