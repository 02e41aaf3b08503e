"""Every GPU check the issues name, in one run; prints one JSON line per check and a summary.

1. stream (issue 4): exports notebooks/streaming.ipynb as `kernel-magics export` does, loads it
   with the runtime the kernel and server share on the device, streams N tokens the way the
   notebook's view consumes them, unloads: device, load time, tokens/s, CUDA memory before load,
   after load, after unload.
2. failed-load (issue 12): in a real kernel, a `load()` that allocates on the GPU and then raises;
   CUDA memory before the load, after the failure, and after `%model_unload`.
3. gallery (issue 17): the gallery notebooks that use torch, executed in a real kernel with
   `%model_load --device DEVICE`: device, load time, memory before / after load / after unload, and
   whether their own export (which replays the notebook's predictions) still passed.
4. ray-gpu (issue 15): one Ray Serve replica of a model with `resources.accelerator` set: the
   `num_gpus` Ray gave it, the GPU ids it sees and the replica's CUDA memory.

    python benchmarks/gpu_check.py                 # needs a CUDA GPU
    python benchmarks/gpu_check.py --device cpu    # the same steps on the CPU (a dry run; ray-gpu skipped)
    python benchmarks/gpu_check.py --only stream,failed-load
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CHECKS = ("stream", "failed-load", "gallery", "ray-gpu")
GALLERY = ("tiny_gpt.ipynb", "embeddings.ipynb", "streaming.ipynb")


def mib(mem) -> str:
    return "-" if not mem else f"{mem['allocated'] / 2**20:.1f} MiB allocated / {mem['reserved'] / 2**20:.1f} MiB reserved"


class CountingSink:
    updates = 0
    outcome = error = None

    def update(self, text, stats):
        self.updates += 1

    def finish(self, text, stats, outcome, error):
        self.outcome, self.error = outcome, error


def check_stream(device: str, tokens: int) -> dict:
    import torch  # the model needs it; importing first makes --device auto meaningful too

    from kernel_magics.core import devices
    from kernel_magics.core.export import export_model, materialize
    from kernel_magics.core.loop import BackgroundLoop
    from kernel_magics.core.notebook_file import config_from_cells, read_notebook
    from kernel_magics.core.truss_dir import TrussDir
    from kernel_magics.notebook.streaming import StreamConsumer

    device = devices.resolve_device(device)
    notebook = ROOT / "notebooks" / "streaming.ipynb"
    saved = read_notebook(notebook)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "stream-export"
        export_model(out, materialize(saved.cells, config_from_cells(saved.cells), notebook.parent, notebook.name),
                     base_dir=notebook.parent, replay=False)
        host = TrussDir.open(out).host()
        watch = device if device and device.startswith("cuda") else None
        before = devices.memory_stats(watch)
        started = time.perf_counter()
        host.load(device, echo=False)
        load_s = time.perf_counter() - started
        after_load = devices.memory_stats(watch)
        runner = BackgroundLoop()
        stream = runner.run(host.predict({"prompt": "Beautiful is", "max_new_tokens": tokens}))
        sink = CountingSink()
        consumer = StreamConsumer(sink)
        consumer.consume_sync(stream)
        stats = consumer.stats()
        described = devices.describe_device(host.device or device)
        host.unload()
        after_unload = devices.memory_stats(watch)
        runner.stop()
    return {
        "device": described, "torch": torch.__version__, "load_s": round(load_s, 3), "tokens": stats.chunks,
        "tokens_per_s": round(stats.chunks_per_second, 1),
        "first_token_ms": round((stats.first_chunk_seconds or 0) * 1000, 2), "view_updates": sink.updates,
        "memory_before_load": mib(before), "memory_after_load": mib(after_load),
        "memory_after_unload": mib(after_unload),
        "ok": sink.outcome == "done" and (not before or after_unload["allocated"] == before["allocated"]),
    }


PROBE = "import torch, json\nprint('KMGPU', json.dumps({0}))"


def _allocated(device: str) -> str:
    return f"torch.cuda.memory_allocated({device!r})" if device.startswith("cuda") else "0"


def check_failed_load(device: str) -> dict:
    from kernel_harness import Kernel

    k = Kernel()
    try:
        k.ok("%load_ext kernel_magics\nimport torch")
        k.ok(f"before = {_allocated(device)}")
        k.ok("%%model\nclass Model:\n    def load(self):\n"
             f"        self.big = torch.zeros(64 * 2**20, device={device!r})   # 256 MiB\n"
             "        held = torch.ones(32 * 2**20, device=self.big.device)    # 128 MiB, a local of the frame\n"
             "        raise RuntimeError('load failed on purpose')\n"
             "    def predict(self, model_input):\n        return 1")
        failed = k.execute(f"%model_load --device {device} --no-widget")
        k.ok(f"after_fail = {_allocated(device)}")
        k.ok("%model_unload")
        out = k.ok(PROBE.format(f"{{'before': before, 'after_fail': after_fail, 'after_unload': {_allocated(device)}}}"))
    finally:
        k.shutdown()
    found = json.loads(out.stdout.split("KMGPU", 1)[1])
    return {"load_raised": failed.status == "error", **{k: f"{v / 2**20:.1f} MiB" for k, v in found.items()},
            "ok": failed.status == "error" and found["after_unload"] == found["before"]}


def check_gallery(device: str) -> list[dict]:
    import nbformat
    from nbclient import NotebookClient

    rows = []
    for name in GALLERY:
        nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
        at = next(i for i, c in enumerate(nb.cells)
                  if c.cell_type == "code" and c.source.lstrip().startswith("%model_load"))
        nb.cells[at].source = nb.cells[at].source.replace("%model_load", f"%model_load --device {device} --no-widget", 1)
        nb.cells.insert(at + 1, nbformat.v4.new_code_cell(
            "_km = get_ipython().magics_manager.registry['ModelMagics'].host\n"
            f"_km_state = {{'device': str(_km.device), 'load_s': _km.load_seconds, 'before': _km_before, "
            f"'after_load': {_allocated(device)}}}"))
        nb.cells.insert(at, nbformat.v4.new_code_cell(f"import torch\n_km_before = {_allocated(device)}"))
        nb.cells.append(nbformat.v4.new_code_cell(
            "%model_unload\n" + PROBE.format(f"{{**_km_state, 'after_unload': {_allocated(device)}}}")))
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            row = {"notebook": name}
            try:
                NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp}}).execute()
            except Exception as exc:  # a failing cell: report which, keep going with the others
                rows.append({**row, "ok": False, "error": str(exc).strip().splitlines()[-1][:300]})
                continue
        text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
        found = json.loads(text.split("KMGPU", 1)[1])
        exported = any("answers as the notebook did" in o.get("text", "") for c in nb.cells for o in c.get("outputs", [])
                       if o.output_type == "stream")
        rows.append({**row, "device": found["device"], "load_s": round(found["load_s"], 3),
                     "run_s": round(time.perf_counter() - started, 1),
                     **{k: f"{found[k] / 2**20:.1f} MiB" for k in ("before", "after_load", "after_unload")},
                     "export_replayed": exported, "ok": found["after_unload"] == found["before"]})
    return rows


RAY_GPU = """
import torch


class Model:
    def load(self):
        self.weights = torch.ones(16 * 2**20, device="cuda")   # 64 MiB

    def predict(self, model_input):
        import ray

        return {"gpu_ids": [str(g) for g in ray.get_gpu_ids()], "device": str(self.weights.device),
                "name": torch.cuda.get_device_name(0), "allocated": torch.cuda.memory_allocated(),
                "reserved": torch.cuda.memory_reserved()}
"""


def check_ray_gpu() -> dict:
    import httpx

    from kernel_magics.core.config import ModelConfig
    from kernel_magics.serving.ray_engine import replica_options
    from server_harness import serve_ours, write_truss

    config = "resources: {accelerator: H100, cpu: '1', memory: 2Gi}\nrequirements: [torch]\n"
    asked = replica_options(ModelConfig.model_validate({"resources": {"accelerator": "H100"}}))["ray_actor_options"]
    with tempfile.TemporaryDirectory() as tmp:
        d = write_truss(Path(tmp) / "gpu", RAY_GPU, config)
        with serve_ours(d, engine="ray", replicas=1, timeout=300) as s:
            answer = httpx.post(s.predict_url(), json={}, timeout=60).json()
    return {"num_gpus_asked": asked["num_gpus"], **answer,
            "allocated": f"{answer['allocated'] / 2**20:.1f} MiB", "reserved": f"{answer['reserved'] / 2**20:.1f} MiB",
            "ok": bool(answer["gpu_ids"]) and answer["device"].startswith("cuda")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--only", default=",".join(CHECKS), help=f"Comma-separated, of: {', '.join(CHECKS)}.")
    args = parser.parse_args()
    wanted = [c.strip() for c in args.only.split(",") if c.strip()]
    results = {}
    for check in wanted:
        started = time.perf_counter()
        try:
            if check == "stream":
                result = check_stream(args.device, args.tokens)
            elif check == "failed-load":
                result = check_failed_load(args.device)
            elif check == "gallery":
                result = check_gallery(args.device)
            elif check == "ray-gpu":
                if not args.device.startswith("cuda"):
                    result = {"skipped": "needs --device cuda"}
                else:
                    result = check_ray_gpu()
            else:
                result = {"error": f"unknown check {check!r}"}
        except Exception:  # one check failing must not hide the others' numbers
            result = {"ok": False, "error": traceback.format_exc(limit=3)[-1500:]}
        results[check] = result
        print(json.dumps({"check": check, "seconds": round(time.perf_counter() - started, 1), "result": result}),
              flush=True)
    failed = [c for c, r in results.items()
              if (r.get("ok") is False if isinstance(r, dict) else not all(x.get("ok") for x in r))]
    print("SUMMARY", "all passed" if not failed else f"failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
