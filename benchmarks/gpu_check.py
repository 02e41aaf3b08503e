"""GPU check (issue 4): load the streaming model on a GPU, stream, unload; print the numbers.

Exports notebooks/streaming.ipynb (as `kernel-magics export` does), loads it through the
runtime the kernel and server share with `--device cuda`, streams 2,000 tokens the way the
notebook's stream view consumes them, unloads, and prints device, load time, tokens/s and
CUDA memory before load / after load / after unload. Runs in well under 3 minutes.

    python benchmarks/gpu_check.py            # needs a CUDA GPU
    python benchmarks/gpu_check.py --device cpu   # the same steps on the CPU (a dry run)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kernel_magics.core import devices  # noqa: E402
from kernel_magics.core.export import config_from_cells, export_model, materialize, read_notebook  # noqa: E402
from kernel_magics.core.loop import BackgroundLoop  # noqa: E402
from kernel_magics.notebook.streaming import StreamConsumer  # noqa: E402
from kernel_magics.core.truss_dir import load_truss_dir  # noqa: E402


class CountingSink:
    updates = 0

    def update(self, text, stats):
        self.updates += 1

    def finish(self, text, stats, outcome, error):
        self.outcome, self.error = outcome, error


def mib(mem) -> str:
    return "-" if not mem else f"{mem['allocated'] / 2**20:.1f} MiB allocated / {mem['reserved'] / 2**20:.1f} MiB reserved"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=2000)
    args = parser.parse_args()
    import torch  # the model needs it; importing first makes --device auto meaningful too

    device = devices.resolve_device(args.device)
    notebook = ROOT / "notebooks" / "streaming.ipynb"
    cells = read_notebook(notebook)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "stream-export"
        export_model(out, materialize(cells, config_from_cells(cells), notebook.parent, notebook.name),
                     base_dir=notebook.parent)
        host = load_truss_dir(out)
        watch = device if device and device.startswith("cuda") else None
        before = devices.memory_stats(watch)
        started = time.perf_counter()
        host.load(device)
        load_s = time.perf_counter() - started
        after_load = devices.memory_stats(watch)
        runner = BackgroundLoop()
        stream = runner.run(host.predict({"prompt": "Beautiful is", "max_new_tokens": args.tokens}))
        sink = CountingSink()
        consumer = StreamConsumer(sink)
        consumer.consume_sync(stream)
        stats = consumer.stats()
        host.unload()
        after_unload = devices.memory_stats(watch)
        runner.stop()
    result = {
        "device": devices.describe_device(host.device or device),
        "torch": torch.__version__,
        "load_s": round(load_s, 3),
        "tokens": stats.chunks,
        "tokens_per_s": round(stats.chunks_per_second, 1),
        "first_token_ms": round((stats.first_chunk_seconds or 0) * 1000, 2),
        "view_updates": sink.updates,
        "memory_before_load": mib(before),
        "memory_after_load": mib(after_load),
        "memory_after_unload": mib(after_unload),
        "allocated_back_to_before": None if not before else after_unload["allocated"] == before["allocated"],
        "outcome": sink.outcome,
    }
    for key, value in result.items():
        print(f"{key:>26}: {value}")
    print(json.dumps(result))
    return 0 if sink.outcome == "done" and result["allocated_back_to_before"] is not False else 1


if __name__ == "__main__":
    sys.exit(main())
