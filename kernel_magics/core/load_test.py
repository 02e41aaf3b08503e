"""How fast will this model serve? A closed-loop load test of a live model, in-process, through the runtime.

``%model_bench`` drives :class:`~kernel_magics.core.runtime.ModelHost` exactly as the server does (the
same predict path: validation, pre/postprocess, the concurrency bound, the batcher), at a few levels of
concurrency, each bounded by a request count and a time limit. No HTTP: what it measures is the model
and the runtime, the part a deployment cannot make faster. No IPython import here; the magic displays.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

__all__ = ["LevelResult", "bench_level", "run_bench", "advice", "format_level", "plot_png"]


@dataclass
class LevelResult:
    """One concurrency level: what completed, how fast, and the batch sizes the model ran."""

    concurrency: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, one per completed request
    errors: int = 0
    first_error: Optional[str] = None
    batch_sizes: list[int] = field(default_factory=list)

    @property
    def completed(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        """Completed requests per second."""
        return self.completed / self.seconds if self.seconds > 0 else 0.0

    def percentile_ms(self, q: float) -> Optional[float]:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return 1000 * ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]  # nearest rank

    @property
    def mean_batch(self) -> Optional[float]:
        return sum(self.batch_sizes) / len(self.batch_sizes) if self.batch_sizes else None


async def bench_level(host: Any, model_input: Any, concurrency: int, requests: int, duration: float) -> LevelResult:
    """``concurrency`` callers, each sending its next request when its last one is answered, until
    ``requests`` were sent or ``duration`` seconds passed."""
    result = LevelResult(concurrency)
    unsubscribe = host.subscribe(lambda e: result.batch_sizes.append(e.data["size"]) if e.kind == "batch" else None)
    sent = 0
    started = time.perf_counter()
    deadline = started + duration

    async def caller() -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < deadline:
            sent += 1
            begun = time.perf_counter()
            try:
                await host.collect(model_input)
            except Exception as exc:
                result.errors += 1
                if result.first_error is None:
                    result.first_error = host.describe_error(exc)
                if not result.latencies and result.errors >= concurrency:
                    return  # nothing works: no point sending the rest
                continue
            result.latencies.append(time.perf_counter() - begun)

    try:
        await asyncio.gather(*(caller() for _ in range(concurrency)))
    finally:
        result.seconds = time.perf_counter() - started
        unsubscribe()
    return result


async def run_bench(host: Any, model_input: Any, concurrencies: list[int], requests: int, duration: float,
                    on_level: Optional[Callable[[LevelResult], None]] = None) -> list[LevelResult]:
    """Each level in turn (one warm-up request first, so the first level does not pay for a cold start)."""
    await host.collect(model_input)
    levels = []
    for concurrency in concurrencies:
        level = await bench_level(host, model_input, concurrency, requests, duration)
        levels.append(level)
        if on_level is not None:
            on_level(level)
    return levels


def format_level(level: LevelResult) -> str:
    """One line per level. Every measured number has a unit next to it (a notebook's saved output is
    compared with its numbers masked: notebooks/nbval_sanitize.cfg)."""
    if not level.latencies:
        return f"concurrency {level.concurrency}: no request succeeded ({level.first_error})"
    parts = [f"concurrency {level.concurrency}: {level.rate:.1f} req/s",
             f"p50 {level.percentile_ms(50):.1f} ms", f"p99 {level.percentile_ms(99):.1f} ms"]
    if level.batch_sizes:
        parts.append(f"batch size mean {level.mean_batch:.1f} max {max(level.batch_sizes)}")
    if level.errors:
        parts.append(f"{level.errors} failed ({level.first_error})")
    return ", ".join(parts)


def advice(levels: list[LevelResult], batches: bool, streams: bool) -> Optional[str]:
    """Whether the model would gain from batching: throughput flat over concurrency while the model runs
    one request at a time. None when the levels cannot tell (one level, or failures)."""
    ok = [lv for lv in levels if lv.latencies]
    if batches:
        return ("The model batches (predict_batch): concurrent requests share its calls, as the batch sizes show; "
                "a server and Truss's own server batch the same way.")
    if len(ok) < 2 or streams:
        return None
    low, high = min(ok, key=lambda lv: lv.concurrency), max(ok, key=lambda lv: lv.concurrency)
    gain = high.rate / low.rate if low.rate else 0.0
    if gain < 1.5:
        return (f"Throughput stays flat from concurrency {low.concurrency} to {high.concurrency} ({gain:.2f}x): "
                "requests run one at a time. If the model can take several inputs in one call (embeddings, "
                "classifiers, rerankers), batching would likely help: write `predict_batch(self, inputs)` and add "
                "`model_metadata: {batching: {max_batch_size: 32, max_wait_ms: 5}}` to %%model_config "
                "(docs/batching.md).")
    return (f"Throughput grows with concurrency ({gain:.2f}x from {low.concurrency} to {high.concurrency}): the "
            "model already serves requests side by side.")


def plot_png(levels: list[LevelResult], title: str = "") -> Optional[bytes]:
    """Requests/s and p50/p99 latency against concurrency, as PNG bytes; None without matplotlib."""
    try:
        from matplotlib.figure import Figure  # a bare Figure: no pyplot, the notebook's backend untouched
    except ImportError:
        return None
    import io

    ok = [lv for lv in levels if lv.latencies]
    if not ok:
        return None
    xs = [lv.concurrency for lv in ok]
    fig = Figure(figsize=(7.5, 3), dpi=90)
    rate, latency = fig.subplots(1, 2)
    rate.plot(xs, [lv.rate for lv in ok], marker="o")
    for lv in ok:
        if lv.batch_sizes:
            rate.annotate(f"batch {lv.mean_batch:.1f}", (lv.concurrency, lv.rate), textcoords="offset points",
                          xytext=(0, 6), ha="center", fontsize=8)
    rate.set(xlabel="concurrency", ylabel="requests/s", title="throughput")
    latency.plot(xs, [lv.percentile_ms(50) for lv in ok], marker="o", label="p50")
    latency.plot(xs, [lv.percentile_ms(99) for lv in ok], marker="o", label="p99")
    latency.set(xlabel="concurrency", ylabel="ms", title="latency")
    latency.legend()
    for ax in (rate, latency):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_ylim(bottom=0)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()
