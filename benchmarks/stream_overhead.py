"""Stream view overhead in one real kernel (issue 4), driven by jupyter_client.

A 10,000-chunk generator is consumed (a) in a bare loop in the kernel (the model's predict
called directly, chunks appended to a list) and (b) through `%model_predict` with the stream
view (widgets on, as in JupyterLab). The client counts the comm messages and the bytes it
receives on iopub, and the time from the first chunk yielded to the first widget message.

Generators: "fast" does about 10 microseconds of work per token (formatting and a little
arithmetic, like a cheap decode step); "0.2 ms" sleeps 0.2 ms per chunk; "bare yield" yields
a constant (no work at all: there the fixed cost of a predict and a widget shows).
Best of 5 runs each.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from kernel_harness import Kernel  # noqa: E402

MODEL = '''%%model
class Model:
    def predict(self, model_input):
        n, kind = model_input["n"], model_input["kind"]
        global FIRST_YIELD
        FIRST_YIELD = time.time()
        if kind == "bare":
            for _ in range(n):
                yield "x"
        elif kind == "fast":
            acc = 0
            for i in range(n):
                for j in range(150):  # about 10 µs of "decoding" a token
                    acc = (acc * 31 + i + j) % 1000003
                yield f"tok{acc % 97} "
        else:
            for i in range(n):
                time.sleep(0.0002)
                yield f"tok{i % 97} "
'''

BARE = '''
_t = time.perf_counter()
_out = []
for _c in Model().predict({"n": N, "kind": KIND}):
    _out.append(_c)
print(json.dumps({"bare_s": time.perf_counter() - _t, "output_bytes": len("".join(_out))}))
'''

VIEW = '''
_t = time.perf_counter()
_r = get_ipython().run_line_magic("model_predict", json.dumps({"n": N, "kind": KIND}))
print(json.dumps({"view_s": time.perf_counter() - _t, "first_yield": FIRST_YIELD}))
'''


def measure(k: Kernel, kind: str, n: int = 10_000) -> dict:
    k.ok(f"N, KIND = {n}, {kind!r}")
    best: dict = {}
    for _ in range(5):
        bare = json.loads(k.ok(BARE).stdout)
        received: list = []
        ex = k.ok(VIEW, on_message=lambda m: received.append((time.time(), m)))
        view = json.loads(ex.stdout.strip().splitlines()[-1])
        comm = [(t, m) for t, m in received if m["msg_type"] == "comm_msg"]
        deltas = [(t, m) for t, m in comm if m["content"]["data"].get("method") == "custom"]
        iopub_bytes = sum(len(json.dumps(m["content"])) for _, m in received)
        run = {
            "bare_s": bare["bare_s"], "view_s": view["view_s"], "ratio": view["view_s"] / bare["bare_s"],
            "comm_msgs": len(comm), "deltas": len(deltas), "iopub_bytes": iopub_bytes,
            "output_bytes": bare["output_bytes"],
            "first_msg_ms": (deltas[0][0] - view["first_yield"]) * 1000 if deltas else float("nan"),
        }
        if not best or run["ratio"] < best["ratio"]:
            best = run
    return best


def main() -> None:
    k = Kernel()
    try:
        k.ok("%load_ext kernel_magics\n%config ModelMagics.widgets = 'always'\nimport json, time")
        k.ok(MODEL)
        k.ok("%model_load --no-widget")
        rows = {kind: measure(k, kind) for kind in ("fast", "slow", "bare")}
    finally:
        k.shutdown()
    names = {"fast": "fast (~10 µs/token)", "slow": "0.2 ms per chunk", "bare": "bare yield (no work)"}
    print("| generator (10,000 chunks) | bare loop | through the stream view | ratio | comm messages (deltas) "
          "| msgs per s of streaming | iopub bytes / output bytes | first chunk → first widget msg |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, r in rows.items():
        print(f"| {names[kind]} | {r['bare_s'] * 1e3:.1f} ms | {r['view_s'] * 1e3:.1f} ms | {r['ratio']:.2f} "
              f"| {r['comm_msgs']} ({r['deltas']}) | {r['deltas'] / r['view_s']:.1f} "
              f"| {r['iopub_bytes'] / r['output_bytes']:.2f} | {r['first_msg_ms']:.1f} ms |")


if __name__ == "__main__":
    main()
