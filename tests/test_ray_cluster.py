"""Scale-out beyond one node: a Ray cluster of a head and two workers on this machine (all on 127.0.0.1).

The cluster comes from benchmarks/local_ray_cluster.py (separate Ray node processes, each with a
custom resource naming it); `kernel-magics serve DIR --engine ray --address HEAD` joins it, as it would
join machines started with `ray start`. Covers replicas spread over nodes, a node lost under load, and
clusters that cannot run the model.
"""

import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from server_harness import free_port, serve_ours, write_truss

pytest.importorskip("ray", reason="ray[serve] is not installed (pip install 'kernel-magics[ray]')")

WHERE = '''
class Model:
    def predict(self, model_input):
        import ray

        return {"node": ray.get_runtime_context().get_node_id()}
'''


@pytest.fixture
def cluster(ray_cluster):
    return ray_cluster  # the shared one (conftest): a head and two workers


def listening_addresses(root: psutil.Process) -> set:
    found = set()
    for p in [root, *root.children(recursive=True)]:
        try:
            found |= {c.laddr.ip for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            pass
    return found


def answers_from(served, cluster) -> dict:
    """Replica -> node name, for a burst of 32 requests at once."""
    from server_harness import post_concurrently

    seen = {}
    for r in post_concurrently(served.predict_url(), [{}] * 32):
        if r.status_code == 200:
            seen[r.headers["x-kernel-magics-replica"]] = cluster.name_of(r.json()["node"])
    return seen


def test_replicas_spread_over_nodes_and_come_back_after_a_lost_node(cluster, tmp_path):
    d = write_truss(tmp_path / "where", WHERE, "resources: {cpu: '1', memory: 100Mi}\n")
    with serve_ours(d, "--replicas-per-node", "1", engine=cluster, replicas=2, timeout=120) as s:
        # Two replicas on two different nodes, both answering (the replica header names which). Serve routes
        # to the replica beside its proxy first, so the requests come at once, more than one replica queues.
        seen = answers_from(s, cluster)
        assert len(seen) == 2 and len(set(seen.values())) == 2, seen
        # A second deployment would take over the same routes: refused, the first one untouched.
        second = subprocess.run([sys.executable, "-m", "kernel_magics", "serve", str(d), "--engine", "ray", "--address",
                                 cluster.address, "--port", str(cluster.serve_port)], capture_output=True, text=True,
                                timeout=180)
        assert second.returncode == 1 and "another `kernel-magics serve` deployment" in second.stderr.splitlines()[-1]
        assert len(answers_from(s, cluster)) == 2
        # Everything of the cluster and of the deployment listens on loopback.
        assert listening_addresses(psutil.Process(cluster.proc.pid)) <= {"127.0.0.1", "::ffff:127.0.0.1"}
        # A node lost under a bounded load: Serve brings the replica back on a node that can host it.
        victim = next(name for name in seen.values() if name != "head")
        counts = {"ok": 0, "failed": 0}
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(timeout=10) as client:
                while not stop.is_set():
                    try:
                        ok = client.post(s.predict_url(), json={}).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    counts["ok" if ok else "failed"] += 1
                    time.sleep(0.02)

        thread = threading.Thread(target=load)
        thread.start()
        time.sleep(1)
        cluster.command(f"kill {victim}", f"KILLED {victim}")
        killed = time.monotonic()
        readiness = set()
        recovered = None
        while time.monotonic() - killed < 90:
            readiness.add(httpx.get(s.url + "/v1/models/model", timeout=10).status_code)
            if 503 in readiness and recovered is None:
                answers = answers_from(s, cluster)
                if len(answers) == 2 and httpx.get(s.url + "/v1/models/model").status_code == 200:
                    recovered = time.monotonic() - killed
                    break
            time.sleep(0.5)
        stop.set()
        thread.join()
        assert 503 in readiness  # readiness told the truth while a replica was missing
        assert recovered is not None, (readiness, counts)
        assert victim not in answers.values() and len(set(answers.values())) == 2
        print(f"\nrecovered in {recovered:.1f} s; {counts['failed']} failed of {counts['ok'] + counts['failed']}")
        assert counts["failed"] <= 50 and counts["ok"] > 0
        cluster.command(f"add {victim}", f"NODE {victim}")  # for the tests after this one
    # Ctrl-C (SIGTERM here) took only the deployment down: the cluster the user started keeps running.
    assert s.proc.returncode == 0 and cluster.alive()


@pytest.mark.parametrize("config, args, fragments", [
    ("resources: {accelerator: T4}\n", [], ["No node of the cluster can host a replica", "1 GPU (T4)", "0 GPU"]),
    ("requirements: [km-not-on-this-cluster==1.0]\n", [],
     ["lacks km-not-on-this-cluster==1.0 (not installed)", "node 127.0.0.1"]),
    ("resources: {cpu: '1', memory: 100Mi}\n", ["--replicas", "4", "--replicas-per-node", "1"],
     ["4 replicas at most 1 per node need 4 nodes", "the cluster has 3"]),
    # Serve runs on the cluster already, on another port: it would ignore ours.
    ("", [], ["Ray Serve already runs on the cluster", "a running Serve keeps its address", "--port"]),
])
def test_a_cluster_that_cannot_run_the_model_says_why_at_once(cluster, tmp_path, config, args, fragments):
    d = write_truss(tmp_path / "m", "class Model:\n    def predict(self, x):\n        return x\n", config)
    done = subprocess.run([sys.executable, "-m", "kernel_magics", "serve", str(d), "--engine", "ray", "--address",
                           cluster.address, "--port", str(free_port()), *args], capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    for fragment in fragments:
        assert fragment in last, last
    assert cluster.alive()
