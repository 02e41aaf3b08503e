"""A Ray cluster of several nodes on this one machine, every port on 127.0.0.1: the multi-node path, tried locally.

Each node is a separate set of Ray processes (its own raylet, object store and workers), started
with Ray's own test helper (ray.cluster_utils.Cluster) with a custom resource naming it
(`node_head`, `node_w1` ...), so placement can be seen; on a real cluster every machine runs
`ray start` instead. Prints `ADDRESS host:port` and one `NODE name node-id` line per node, then
reads commands on stdin, one a line:

    kill NAME       kill that node's processes at once (a lost machine); prints `KILLED NAME`
    add NAME        start another node; prints `NODE NAME node-id`
    exit (or EOF)   stop every node

With --serve-port, Ray Serve is started on the cluster too (its HTTP proxy on 127.0.0.1:PORT, on
the head), as an operator would before deploying; `kernel-magics serve --address` then leaves it
running when it stops.

    python benchmarks/local_ray_cluster.py --workers 2 [--serve-port 8000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

# Single-node addressing: every node takes 127.0.0.1 as its address and listens there (set before ray is imported).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus", type=float, default=1, help="CPUs each node offers (default 1).")
    parser.add_argument("--temp-dir", default=None)
    parser.add_argument("--serve-port", type=int, default=None, help="Start Ray Serve with its proxy on this port.")
    args = parser.parse_args()
    temp = args.temp_dir or tempfile.mkdtemp(prefix="km-ray-cluster-")
    # Ray's helper writes the cluster's address there (Ray's own choice of temp dir: RAY_TMPDIR, TMPDIR, /tmp).
    os.makedirs(os.path.join(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir(), "ray"), exist_ok=True)
    from ray.cluster_utils import Cluster

    node_args = {"num_cpus": args.cpus, "object_store_memory": 80 * 2**20, "node_ip_address": "127.0.0.1"}
    # Dead nodes are noticed within a few seconds instead of Ray's default 15 s or more.
    system = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3, "health_check_timeout_ms": 1000}
    cluster = Cluster(initialize_head=True, head_node_args={
        **node_args, "resources": {"node_head": 1}, "include_dashboard": False, "temp_dir": temp,
        "_system_config": system})
    nodes = {}

    def add(name: str) -> None:
        node = cluster.add_node(**node_args, resources={f"node_{name}": 1})
        nodes[name] = node
        print(f"NODE {name} {node.node_id}", flush=True)

    print(f"ADDRESS {cluster.address}", flush=True)
    print(f"NODE head {cluster.head_node.node_id}", flush=True)
    for i in range(args.workers):
        add(f"w{i + 1}")
    if args.serve_port:
        import ray
        from ray import serve

        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": args.serve_port}, proxy_location="HeadOnly")
        print(f"SERVE 127.0.0.1:{args.serve_port}", flush=True)
    print("READY", flush=True)
    try:
        for line in sys.stdin:
            command, _, name = line.strip().partition(" ")
            if command == "kill" and name in nodes:
                cluster.remove_node(nodes.pop(name), allow_graceful=False)
                print(f"KILLED {name}", flush=True)
            elif command == "add" and name and name not in nodes:
                add(name)
            elif command == "exit":
                break
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
