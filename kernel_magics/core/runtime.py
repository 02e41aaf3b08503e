"""ModelHost: the one implementation of the Truss model contract.

The kernel and the server both drive a model through this class, so the
notebook and the deployment cannot drift: kwargs by signature, ``load``,
predict (sync, async, generator, async generator), pre/postprocess, Pydantic
input and output, JSON serialization, and the predict concurrency bound.
No IPython or widget import here; displays subscribe to :class:`HostEvent`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import enum
import inspect
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from . import devices
from .capture import capture_lines
from .config import ModelConfig
from .contract import INIT_KWARGS, ModelContract, init_kwargs
from .errors import InputValidationError, ModelDefinitionError, ModelNotReadyError
from .secrets import SecretStore
from .serialization import to_jsonable
from .tracebacks import trim_traceback

__all__ = ["ModelHost", "ModelState", "HostEvent", "DefineReport", "ChunkStream"]


class ModelState(str, enum.Enum):
    NOT_DEFINED = "not defined"
    DEFINED = "defined"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class HostEvent:
    """Something a display may want to show. ``kind``: state, load_started, load_finished, load_failed, predicted."""

    kind: str
    state: ModelState
    data: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DefineReport:
    """What happened when a class was (re)defined."""

    hot_swapped: bool = False
    changed: tuple[str, ...] = ()  # "__init__" / "load" whose code changed under a live instance
    swap_error: Optional[str] = None

    @property
    def needs_reload(self) -> bool:
        return bool(self.changed) or self.swap_error is not None


class ModelHost:
    """Holds one model class and its live instance, and runs the contract on it."""

    def __init__(
        self,
        config: Optional[ModelConfig] = None,
        *,
        secrets: Optional[SecretStore] = None,
        base_dir: Optional[Path] = None,
        environment: Optional[dict] = None,
    ) -> None:
        self._config = config or ModelConfig()
        self.secrets = secrets if secrets is not None else SecretStore(self._config.secret_names)
        self.secrets.set_names(self._config.secret_names)
        self.base_dir = Path(base_dir) if base_dir else Path.cwd()
        self.environment = environment
        self.contract: Optional[ModelContract] = None
        self.instance: Any = None
        self.state = ModelState.NOT_DEFINED
        self.error: Optional[BaseException] = None
        self.device: Optional[str] = None
        self.load_seconds: Optional[float] = None
        self.last_predict_seconds: Optional[float] = None
        self.last_first_chunk_seconds: Optional[float] = None
        self._listeners: list[Callable[[HostEvent], None]] = []
        self._slots: Optional[tuple[asyncio.AbstractEventLoop, asyncio.Semaphore]] = None
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None

    # ------------------------------------------------------------------ config, events

    @property
    def config(self) -> ModelConfig:
        return self._config

    @config.setter
    def config(self, config: ModelConfig) -> None:
        self._config = config
        self.secrets.set_names(config.secret_names)
        self._slots = None  # predict_concurrency may have changed

    @property
    def data_dir(self) -> Path:
        return (self.base_dir / self._config.data_dir).resolve()

    @property
    def model_class(self) -> Optional[type]:
        return self.contract.model_class if self.contract else None

    def subscribe(self, listener: Callable[[HostEvent], None]) -> Callable[[], None]:
        """Call ``listener`` with every HostEvent; returns a function that unsubscribes."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _emit(self, kind: str, **data: Any) -> None:
        event = HostEvent(kind, self.state, data)
        for listener in list(self._listeners):
            listener(event)

    def _set_state(self, state: ModelState, **data: Any) -> None:
        self.state = state
        self._emit("state", **data)

    # ------------------------------------------------------------------ define / hot reload

    def define(self, model_class: Any) -> DefineReport:
        """Make ``model_class`` the model. With a live instance, swap its class and keep its state.

        Raises ModelDefinitionError (and changes nothing) when the class breaks the contract.
        """
        contract = ModelContract.inspect(model_class)
        old = self.contract
        if self.instance is None or old is None:
            self.contract = contract
            if self.state in (ModelState.NOT_DEFINED, ModelState.DEFINED, ModelState.FAILED):
                self.error = None
                self._set_state(ModelState.DEFINED)
            return DefineReport()
        changed = tuple(contract.changed_methods(old))
        try:
            # Same idea as IPython's autoreload / Truss's hot_reload: the live object
            # keeps its attributes (loaded weights) and gets the new methods.
            self.instance.__class__ = contract.model_class
        except TypeError as exc:
            return DefineReport(changed=changed, swap_error=str(exc))
        self.contract = contract
        self._emit("state", hot_swapped=True)
        return DefineReport(hot_swapped=True, changed=changed)

    # ------------------------------------------------------------------ load / unload

    def init_kwargs(self) -> dict[str, Any]:
        """The keyword arguments ``__init__`` gets, chosen by its signature as Truss does."""
        available = {
            "config": self._config.to_dict(),
            "data_dir": self.data_dir,
            "secrets": self.secrets,
            "environment": self.environment,
        }
        assert set(available) == set(INIT_KWARGS)
        return init_kwargs(self.model_class, available)

    def load(self, device: Optional[str] = None) -> None:
        """Instantiate the class and call ``load()``, in this thread.

        ``device`` (``cpu``, ``cuda:N``) is torch's default device while load runs;
        None lets the model choose, as in a deployment. A failure leaves the state
        ``failed`` and re-raises the user's exception with our frames trimmed.
        """
        if self.contract is None:
            raise ModelNotReadyError("No model is defined yet: run a %%model cell (a class with predict) first.")
        self.unload()
        self.error = None
        self._set_state(ModelState.LOADING)
        watch = device or devices.guess_gpu()
        self._emit("load_started", device=device, memory=devices.memory_stats(watch))
        started = time.perf_counter()
        # As in a deployment, the config's environment_variables are set before the model runs.
        os.environ.update(self._config.environment_variables)
        try:
            with capture_lines(lambda source, line: self._emit("log", source=source, line=line)):
                with devices.default_device(device):
                    instance = self.model_class(**self.init_kwargs())
                    if self.contract.load is not None:
                        instance.load()
        except BaseException as exc:
            self.error = trim_traceback(exc)
            self.load_seconds = time.perf_counter() - started
            self._set_state(ModelState.FAILED, error=exc)
            self._emit("load_failed", error=exc, seconds=self.load_seconds)
            raise
        self.instance = instance
        self.load_seconds = time.perf_counter() - started
        self.device = devices.infer_device(instance) or device or "cpu"
        self._set_state(ModelState.READY)
        self._emit("load_finished", seconds=self.load_seconds, device=self.device,
                   memory=devices.memory_stats(self.device if self.device.startswith("cuda") else watch))

    def unload(self) -> bool:
        """Drop the instance and free memory; returns whether there was one."""
        had = self.instance is not None
        self.instance = None
        self.device = None
        if had:
            devices.free_memory()
        if self.contract is not None and self.state in (ModelState.READY, ModelState.FAILED):
            self.error = None
            self._set_state(ModelState.DEFINED)
        return had

    # ------------------------------------------------------------------ predict

    def _require_ready(self) -> ModelContract:
        if self.state is ModelState.READY and self.instance is not None:
            return self.contract
        if self.state is ModelState.LOADING:
            raise ModelNotReadyError("The model is still loading; predict once it is ready.")
        if self.state is ModelState.FAILED:
            raise ModelNotReadyError(
                f"The model's last load failed ({type(self.error).__name__}: {self.error}); fix it and load again."
            )
        if self.contract is None:
            raise ModelNotReadyError("No model is defined yet: run a %%model cell, then %model_load.")
        raise ModelNotReadyError("The model is defined but not loaded: run %model_load first.")

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots[0] is not loop:
            self._slots = (loop, asyncio.Semaphore(self._config.runtime.predict_concurrency))
        return self._slots[1]

    async def _call(self, name: str, arg: Any) -> Any:
        """Call a non-generator user method: await it if async, else run it in a worker thread."""
        spec = getattr(self.contract, name)
        fn = getattr(self.instance, name)
        args = (arg,) if spec.takes_input else ()
        if spec.is_async:
            return await fn(*args)
        if spec.is_generator:
            return fn(*args)
        if self._executor is None:
            # Truss runs sync user code in anyio's pool of 40 threads; so do we.
            self._executor = concurrent.futures.ThreadPoolExecutor(40, thread_name_prefix="model-predict")
        ctx = contextvars.copy_context()  # keeps output routed to the calling cell
        return await asyncio.get_running_loop().run_in_executor(self._executor, ctx.run, fn, *args)

    def validate_input(self, model_input: Any) -> Any:
        """Validate into the Pydantic input type, if predict (or preprocess) declares one."""
        input_type = self.contract.input_type if self.contract else None
        if input_type is None or isinstance(model_input, input_type):
            return model_input
        import pydantic

        try:
            return input_type.model_validate(model_input)
        except pydantic.ValidationError as exc:
            raise InputValidationError(_describe_input_error(exc, input_type), _plain_errors(exc)) from None

    def validate_json_input(self, body: bytes) -> Any:
        """Parse a request body into the Pydantic input type as Truss does (pydantic's parse_raw):
        json.loads first, a decoding error reported at ``__root__``, then validation."""
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise InputValidationError(f"The input is not valid JSON: {exc}.", [{"loc": ("__root__",), "msg": str(exc)}]) from None
        return self.validate_input(data)

    async def predict(self, model_input: Any) -> Any:
        """Run preprocess → predict → postprocess and return JSON-ready data or a ChunkStream.

        Predict runs inside the ``runtime.predict_concurrency`` bound; a stream
        holds its slot until it ends or is closed. User exceptions propagate with
        their own frames only.
        """
        contract = self._require_ready()
        started = time.perf_counter()
        try:
            model_input = self.validate_input(model_input)
            if contract.preprocess:
                model_input = await self._call("preprocess", model_input)
            slot = self._semaphore()
            await slot.acquire()
            try:
                result = await self._call("predict", model_input)
            except BaseException:
                slot.release()
                raise
            if inspect.isgenerator(result) or inspect.isasyncgen(result):
                if contract.postprocess:
                    _close_quietly(result)
                    slot.release()
                    raise ModelDefinitionError(
                        "predict returned a generator (streaming), and streaming output cannot be postprocessed "
                        "(Truss refuses this too). Do all processing inside predict, or remove postprocess."
                    )
                return ChunkStream(result, on_close=lambda s: self._stream_closed(s, slot), started=started)
            slot.release()
            if contract.postprocess:
                result = await self._call("postprocess", result)
            output = to_jsonable(result)
        except BaseException as exc:
            trim_traceback(exc)
            raise
        self.last_predict_seconds = time.perf_counter() - started
        self.last_first_chunk_seconds = None
        self._emit("predicted", seconds=self.last_predict_seconds)
        return output

    def _stream_closed(self, stream: "ChunkStream", slot: asyncio.Semaphore) -> None:
        slot.release()
        self.last_predict_seconds = stream.elapsed
        self.last_first_chunk_seconds = stream.first_chunk_seconds
        self._emit("predicted", seconds=stream.elapsed, first_chunk=stream.first_chunk_seconds,
                   chunks=stream.chunks, streamed=True)

    async def collect(self, model_input: Any) -> Any:
        """Predict and, for a stream, gather it: text chunks joined, else the list of chunks."""
        result = await self.predict(model_input)
        if not isinstance(result, ChunkStream):
            return result
        chunks = []
        async with result:
            async for chunk in result:
                chunks.append(chunk)
        return join_chunks(chunks)


def join_chunks(chunks: list) -> Any:
    """What a streamed prediction amounts to: one string for text chunks, else a JSON list."""
    if chunks and all(isinstance(c, (str, bytes)) for c in chunks):
        return "".join(c.decode("utf-8", "replace") if isinstance(c, bytes) else c for c in chunks)
    return to_jsonable(chunks, what="the streamed chunks")


_DONE = object()


class ChunkStream:
    """The chunks of a streaming predict, as an async iterator.

    A sync generator runs in one worker thread of its own that pushes chunks to
    the loop (one thread hop per stream, not per chunk); an async generator is
    iterated on the loop. ``aclose()`` (or leaving ``async with``) stops the
    generator so its ``finally`` runs, and frees the predict slot exactly once.
    """

    def __init__(self, generator: Any, *, on_close: Callable[["ChunkStream"], None], started: float) -> None:
        self._gen = generator
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()
        self._started = started
        self._closed = False
        self._stop = threading.Event()
        self._queue: Optional[asyncio.Queue] = None
        self._pump: Optional[threading.Thread] = None
        self._pump_done: Optional[asyncio.Future] = None
        self.chunks = 0
        self.first_chunk_seconds: Optional[float] = None
        self.elapsed: float = 0.0

    @property
    def is_async(self) -> bool:
        return inspect.isasyncgen(self._gen)

    @property
    def started(self) -> float:
        """``time.perf_counter()`` when the predict began (for time to first chunk)."""
        return self._started

    def take_sync(self) -> Any:
        """Hand a sync generator to a caller that iterates it in its own thread.

        Used where per-chunk thread hops would cost more than the generator
        itself (the notebook's stream view). The caller must call
        :meth:`close_sync` when done; counting chunks is then up to it.
        """
        if self.is_async or self._pump is not None:
            raise RuntimeError("take_sync needs a sync generator that is not being iterated")
        return self._gen

    def close_sync(self, chunks: int = 0, first_chunk_seconds: Optional[float] = None) -> None:
        """Close a generator taken with :meth:`take_sync`; safe from any thread."""
        if self._closed:
            return
        self._closed = True
        _close_quietly(self._gen)
        self.chunks, self.first_chunk_seconds = chunks, first_chunk_seconds
        self.elapsed = time.perf_counter() - self._started
        self._loop.call_soon_threadsafe(self._on_close, self)  # the slot belongs to the loop

    def __aiter__(self) -> "ChunkStream":
        return self

    async def __aenter__(self) -> "ChunkStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def __anext__(self) -> Any:
        if self._closed:
            raise StopAsyncIteration
        try:
            if self.is_async:
                chunk = await self._gen.__anext__()
            else:
                chunk = await self._next_from_pump()
        except StopAsyncIteration:
            await self.aclose()
            raise
        except BaseException as exc:
            trim_traceback(exc)
            await self.aclose()
            raise
        self.chunks += 1
        if self.first_chunk_seconds is None:
            self.first_chunk_seconds = time.perf_counter() - self._started
        return chunk

    async def _next_from_pump(self) -> Any:
        if self._pump is None:
            loop = asyncio.get_running_loop()
            self._queue = asyncio.Queue()
            self._pump_done = loop.create_future()
            ctx = contextvars.copy_context()
            self._pump = threading.Thread(
                target=ctx.run, args=(self._run_pump, loop), name="model-stream", daemon=True
            )
            self._pump.start()
        kind, value = await self._queue.get()
        if kind == "chunk":
            return value
        if kind == "error":
            raise value
        raise StopAsyncIteration

    def _run_pump(self, loop: asyncio.AbstractEventLoop) -> None:
        put = self._queue.put_nowait
        try:
            for chunk in self._gen:
                loop.call_soon_threadsafe(put, ("chunk", chunk))
                if self._stop.is_set():
                    break
            item = ("end", None)
        except BaseException as exc:  # forwarded to the consumer
            item = ("error", exc)
        finally:
            # Closing here, in the thread that ran it, is the only safe place:
            # a generator cannot be closed from another thread while it runs.
            _close_quietly(self._gen)
        loop.call_soon_threadsafe(put, item)
        loop.call_soon_threadsafe(lambda: self._pump_done.done() or self._pump_done.set_result(None))

    async def aclose(self) -> None:
        """Stop the generator (its ``finally`` runs) and release the predict slot."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.is_async:
                await self._gen.aclose()
            elif self._pump is not None:
                self._stop.set()
                await asyncio.shield(self._pump_done)
            else:
                _close_quietly(self._gen)
        finally:
            self.elapsed = time.perf_counter() - self._started
            self._on_close(self)


def _close_quietly(gen: Any) -> None:
    if inspect.isgenerator(gen):
        try:
            gen.close()
        except Exception:
            pass


def _plain_errors(exc: Any) -> list[dict]:
    return [{"loc": tuple(e["loc"]), "msg": e["msg"]} for e in exc.errors(include_url=False, include_input=False)]


def _describe_input_error(exc: Any, input_type: type) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "input"
        parts.append(f"`{loc}`: {err['msg']}")
    more = len(exc.errors()) - 5
    extra = f"; and {more} more" if more > 0 else ""
    return f"The input does not match {input_type.__name__}: {'; '.join(parts)}{extra}."
