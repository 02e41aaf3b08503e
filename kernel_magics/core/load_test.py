"""How fast will this model serve? A closed-loop load test of a live model, in-process or over HTTP.

``%model_bench`` drives :class:`~kernel_magics.core.runtime.ModelHost` exactly as the server does (the
same predict path: validation, pre/postprocess, the concurrency bound, the batcher), at a few levels of
concurrency, each bounded by a request count and a time limit: what it measures is the model and the
runtime, the part a deployment cannot make faster. With ``--http`` the same levels send real HTTP POSTs
to ``%model_serve`` (:class:`OverHTTP`, one keep-alive connection per caller, standard library only: the
base install has no HTTP client), so the server's own cost shows too. One driver (:func:`bench_level`)
serves both: a target only says how one caller sends one request. No IPython import here; the magic displays.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

from .errors import KernelMagicsError

__all__ = ["LevelResult", "InProcess", "OverHTTP", "HTTPStatusError", "bench_level", "run_bench", "advice",
           "format_level", "plot_png"]

Send = Callable[[], Awaitable[Any]]  # one request, answered; raises when it failed


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


# ---------------------------------------------------------------------- targets: how one caller sends a request

class InProcess:
    """Requests through the runtime, as the server makes them, without HTTP."""

    where = "in-process"

    def __init__(self, host: Any, model_input: Any) -> None:
        self.host, self.model_input = host, model_input

    @contextlib.asynccontextmanager
    async def caller(self) -> AsyncIterator[Send]:
        host, model_input = self.host, self.model_input
        yield lambda: host.collect(model_input)

    async def warm_up(self) -> None:
        await self.host.collect(self.model_input)  # a failure is the model's: it shows with its own frames

    def describe(self, error: BaseException) -> str:
        return self.host.describe_error(error)


class HTTPStatusError(Exception):
    """An answer with an error status: a failed request, its body shown as an in-process exception is."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status, body)
        self.status, self.body = status, body

    def __str__(self) -> str:
        text = " ".join(self.body.decode("utf-8", "replace").split())
        return f"HTTP {self.status}: {text[:300] + ' ...' if len(text) > 300 else text}"


class OverHTTP:
    """Requests as HTTP POSTs of the input as JSON to a predict URL; each caller keeps its own connection."""

    def __init__(self, url: str, model_input: Any, *, where: str = "over HTTP",
                 redact: Callable[[str], str] = lambda text: text) -> None:
        """Raises TypeError or ValueError when the input cannot be sent as JSON."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"{url} is not an http:// URL")
        self.url, self.where, self._redact = url, where, redact
        self._address = (parts.hostname, parts.port or 80)
        body = json.dumps(model_input).encode()
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        self._request = (f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1") + body

    @contextlib.asynccontextmanager
    async def caller(self) -> AsyncIterator[Send]:
        connection = _Connection(self._address, self._request)
        with contextlib.suppress(OSError):  # connect before the first request is timed; a failure counts there
            await connection.open()
        try:
            yield connection.post
        finally:
            connection.close()

    async def warm_up(self) -> None:
        try:
            async with self.caller() as send:
                await send()
        except Exception as exc:  # (no frame of it is the model's: the message is all there is to show)
            raise KernelMagicsError(
                f"The first request to {self.url} failed ({self.describe(exc)}), so nothing was measured. Check "
                "that the served model answers this input (%model_predict with the same input shows its error), "
                "then run %model_bench --http again.") from None

    def describe(self, error: BaseException) -> str:
        text = str(error) if isinstance(error, HTTPStatusError) else f"{type(error).__name__}: {error}"
        return self._redact(text)


class _Connection:
    """One keep-alive HTTP/1.1 connection that sends the same request, one at a time, and reads each answer
    whole (a Content-Length body, a chunked stream, or up to the close)."""

    def __init__(self, address: tuple[str, int], request: bytes) -> None:
        self._address, self._request = address, request
        self._reader: Optional[asyncio.StreamReader] = None
        self._writer: Optional[asyncio.StreamWriter] = None

    async def open(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(*self._address)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def post(self) -> bytes:
        reused = self._writer is not None
        if not reused:
            await self.open()
        try:
            self._writer.write(self._request)
            await self._writer.drain()
            status = await self._reader.readline()
            if not status and reused:  # the server closed the idle connection before reading: a new one
                self.close()
                return await self.post()
            code, body, keep = await self._read_response(status)
        except BaseException:
            self.close()  # a half-read answer (or a cancel) leaves the connection unusable
            raise
        if not keep:
            self.close()
        if code >= 400:
            raise HTTPStatusError(code, body)
        return body

    async def _read_response(self, status_line: bytes) -> tuple[int, bytes, bool]:
        reader = self._reader
        if not status_line:
            raise ConnectionError("the server closed the connection without answering")
        fields = status_line.split(None, 2)
        if len(fields) < 2 or not fields[0].startswith(b"HTTP/") or not fields[1].isdigit():
            raise ConnectionError(f"not an HTTP answer: {status_line[:80]!r}")
        headers = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        keep = headers.get(b"connection") != b"close" and fields[0] != b"HTTP/1.0"
        if headers.get(b"transfer-encoding", b"").endswith(b"chunked"):
            chunks = []
            while True:
                size = int((await reader.readline()).split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunks.append(await reader.readexactly(size))
                await reader.readexactly(2)  # the CRLF after each chunk
            body = b"".join(chunks)
        elif b"content-length" in headers:
            body = await reader.readexactly(int(headers[b"content-length"]))
        else:
            body, keep = await reader.read(), False
        return int(fields[1]), body, keep


# ---------------------------------------------------------------------- the closed loop

async def bench_level(target: Any, concurrency: int, requests: int, duration: float,
                      host: Any = None) -> LevelResult:
    """``concurrency`` callers, each sending its next request when its last one is answered, until
    ``requests`` were sent or ``duration`` seconds passed. ``host``: whose batch events give the batch sizes."""
    result = LevelResult(concurrency)
    unsubscribe = (host.subscribe(lambda e: result.batch_sizes.append(e.data["size"]) if e.kind == "batch" else None)
                   if host is not None else (lambda: None))
    sent = 0
    started = time.perf_counter()
    deadline = started + duration

    async def caller() -> None:
        nonlocal sent
        async with target.caller() as send:
            while sent < requests and time.perf_counter() < deadline:
                sent += 1
                begun = time.perf_counter()
                try:
                    await send()
                except Exception as exc:
                    result.errors += 1
                    if result.first_error is None:
                        result.first_error = target.describe(exc)
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


async def run_bench(target: Any, concurrencies: list[int], requests: int, duration: float,
                    on_level: Optional[Callable[[LevelResult], None]] = None, host: Any = None) -> list[LevelResult]:
    """Each level in turn (one warm-up request first, so the first level does not pay for a cold start)."""
    await target.warm_up()
    levels = []
    for concurrency in concurrencies:
        level = await bench_level(target, concurrency, requests, duration, host=host)
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


def advice(levels: list[LevelResult], batches: bool, streams: bool, bound: Optional[int] = None) -> Optional[str]:
    """Whether the model would gain from batching: it runs one request at a time (``bound``, its
    ``runtime.predict_concurrency``, is 1), or throughput stays flat over concurrency. ``bound`` None: not known
    here (Ray replicas, each with its own). None when the levels cannot tell (one level, or failures)."""
    ok = [lv for lv in levels if lv.latencies]
    if batches:
        return ("The model batches (predict_batch): concurrent requests share its calls, as the batch sizes show; "
                "a server and Truss's own server batch the same way.")
    if len(ok) < 2 or streams:
        return None
    low, high = min(ok, key=lambda lv: lv.concurrency), max(ok, key=lambda lv: lv.concurrency)
    gain = high.rate / low.rate if low.rate else 0.0
    span = f"{gain:.2f}x from concurrency {low.concurrency} to {high.concurrency}"
    batching = ("If the model can take several inputs in one call (embeddings, classifiers, rerankers), batching "
                "would likely help: write `predict_batch(self, inputs)` and add "
                "`model_metadata: {batching: {max_batch_size: 32, max_wait_ms: 5}}` to %%model_config "
                "(docs/batching.md).")
    # Throughput alone cannot tell at a bound of 1: it still grows with concurrency wherever the server's own work per
    # request overlaps the model's, most for a model that takes microseconds.
    if bound == 1:
        why = (f"throughput went {span} as the server's own work overlapped the model's" if gain >= 1.5
               else f"throughput {span}")
        return (f"runtime.predict_concurrency is 1: requests run one at a time ({why}). {batching} If predict "
                "mostly waits (I/O, or an async predict), a higher runtime.predict_concurrency lets requests run "
                "side by side.")
    if gain < 1.5:
        at_once = f": running up to {bound} requests at once does not raise it" if bound else ""
        return f"Throughput stays flat ({span}){at_once}. {batching}"
    return f"Throughput grows with concurrency ({span}): the model already serves requests side by side."


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
