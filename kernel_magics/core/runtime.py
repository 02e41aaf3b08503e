"""ModelHost: the one implementation of the Truss model contract.

The kernel, ``kernel-magics serve``, ``%model_serve`` and every Ray replica drive
a model through this class, so the notebook and the deployment cannot drift:
kwargs by signature, ``load`` (in a worker thread, as Truss runs it), predict
(sync, async, generator, async generator; the input, the request, both or
neither, as Truss allows), pre/postprocess, ``is_healthy``, the OpenAI-style
methods, Pydantic input and output, JSON serialization, and the predict
concurrency bound. No IPython, widget or HTTP import here; displays subscribe
to :class:`HostEvent` and read :meth:`ModelHost.status`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import ctypes
import enum
import gc
import inspect
import json
import os
import re
import threading
import time
import traceback
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

from . import devices
from .batching import Batcher, BatchStats, call_sync
from .capture import capture_lines
from .config import ModelConfig
from .contract import INIT_KWARGS, MethodSpec, ModelContract, init_kwargs
from .errors import InputValidationError, ModelDefinitionError, ModelNotReadyError
from .secrets import SecretStore
from .serialization import is_response, to_json_body, to_jsonable, truss_would_refuse
from .slots import PredictSlots
from .streams import ChunkStream, close_quietly, is_stream, join_chunks
from .tracebacks import trim_traceback, user_traceback

__all__ = ["ModelHost", "ModelState", "HostEvent", "DefineReport", "ChunkStream", "join_chunks", "MethodNotFound"]


class ModelState(str, enum.Enum):
    NOT_DEFINED = "not defined"
    DEFINED = "defined"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class MethodNotFound(ModelNotReadyError):
    """The model has no such method (an OpenAI-style route it does not implement)."""


@dataclass(frozen=True)
class HostEvent:
    """Something a display may want to show. ``kind``: state, load_started, log, load_finished, load_failed, predicted."""

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


class _Release:
    """Frees a predict slot exactly once, when the model's code has really finished."""

    def __init__(self, slots: PredictSlots, held: bool = True) -> None:
        self._slots, self._done = slots, not held

    def __call__(self, *_: Any) -> None:
        if not self._done:
            self._done = True
            self._slots.release()


_FRAME_FILE = re.compile(r'File "([^"\n]+)",')  # a traceback frame's file


class ModelHost:
    """Holds one model class and its live instance, and runs the contract on it."""

    def __init__(
        self,
        config: Optional[ModelConfig] = None,
        *,
        secrets: Optional[SecretStore] = None,
        base_dir: Optional[Path] = None,
        environment: Optional[dict] = None,
        init_config: Optional[dict] = None,
    ) -> None:
        self._config = config or ModelConfig()
        # What __init__ gets as `config`: a Truss directory's YAML as written (Truss passes it so);
        # None means the typed config's own dict (a notebook's %%model_config).
        self._init_config = init_config
        self.secrets = secrets if secrets is not None else SecretStore(self._config.secret_names)
        self.secrets.set_names(self._config.secret_names)
        self.base_dir = Path(base_dir) if base_dir else Path.cwd()
        self.environment = environment
        self.contract: Optional[ModelContract] = None
        self.instance: Any = None
        # __init__ or load() changed by a hot swap since the live instance was made: it still holds what the old
        # ones made (a replay that differs names this)
        self.swapped_since_load: list[str] = []
        self.state = ModelState.NOT_DEFINED
        self.error: Optional[BaseException] = None
        self.error_text: Optional[str] = None  # the failure with its traceback, secrets redacted
        self.device: Optional[str] = None
        self.load_seconds: Optional[float] = None
        self.last_predict_seconds: Optional[float] = None
        self.last_first_chunk_seconds: Optional[float] = None
        self._listeners: list[Callable[[HostEvent], None]] = []
        self._slots: Optional[tuple[asyncio.AbstractEventLoop, PredictSlots]] = None
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._health_executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        # Held while a load runs: a definition (or another load) waits for it, so the live
        # instance and the contract never disagree.
        self._load_lock = threading.RLock()
        self._load_thread: Optional[threading.Thread] = None
        # Set when the worker thread's load has ended. Waiters wait on this, never on Thread.join:
        # on CPython 3.11 a KeyboardInterrupt inside join() marks a running thread as stopped.
        self._load_done: Optional[threading.Event] = None
        # The notebook turns this on: each result is checked for what Truss's own server could not
        # encode (last_raw_issue says where), so it can warn before a deploy.
        self.check_truss_compat = False
        self.last_raw_issue: Optional[str] = None
        self.last_health: Optional[bool] = None  # what is_healthy() said last (None: no such method)
        # A model with predict_batch: one batcher per live instance (core/batching.py), the sizes it ran.
        self._batcher: Optional[tuple[Any, weakref.WeakKeyDictionary]] = None
        self._batcher_lock = threading.Lock()  # two loops' first requests (the kernel's and a server's) at once
        self.last_batch_sizes: collections.deque[int] = collections.deque(maxlen=16)
        # The notebook names its cells' code as its own tracebacks do ("Cell In[3]", not the file ipykernel
        # compiled the cell as): a code file's name -> that label, or None to keep the name.
        self.code_label: Optional[Callable[[str], Optional[str]]] = None

    # ------------------------------------------------------------------ config, events, errors

    @property
    def config(self) -> ModelConfig:
        return self._config

    @config.setter
    def config(self, config: ModelConfig) -> None:
        self._config = config
        self._init_config = None
        self.secrets.set_names(config.secret_names)
        slots = self._slots
        if slots is not None:  # predict_concurrency may have changed: one bound goes on, the requests in it kept
            slots[1].resize(config.runtime.predict_concurrency)
        self._batcher = None  # and the batching settings

    @property
    def data_dir(self) -> Path:
        return (self.base_dir / self._config.data_dir).resolve()

    @property
    def model_class(self) -> Optional[type]:
        return self.contract.model_class if self.contract else None

    def describe_error(self, exc: BaseException) -> str:
        """``Type: message`` of an exception, secrets redacted: what every display and log shows."""
        return self.secrets.redact(f"{type(exc).__name__}: {exc}")

    def format_error(self, exc: BaseException) -> str:
        """The exception with its (user-frames-only) traceback, secrets redacted. Trimmed here too: the frames
        it gathered on its way out after the runtime trimmed it (the server's, the batcher's hand-over) are ours."""
        tb = user_traceback(exc.__traceback__)
        text = "".join(traceback.format_exception(type(exc), exc, tb))
        if self.code_label is not None:
            text = _FRAME_FILE.sub(lambda m: (self.code_label(m.group(1)) or m.group(0)[:-1]) + ",", text)
        return self.secrets.redact(text)

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

    def status(self) -> dict:
        """One snapshot of the host for every display: %model_status, the lab panel, readiness."""
        gpu = self.device if (self.device or "").startswith("cuda") else None
        return {
            "class_name": self._config.model_class_name if self.contract is not None else None,
            "model_name": self._config.model_name,
            # As a Truss readiness probe sees it: a loaded model whose is_healthy() said no is not ready.
            "state": "unhealthy" if self.state is ModelState.READY and self.last_health is False else self.state.value,
            "healthy": self.last_health,
            "device": devices.describe_device(self.device) if self.device else None,
            "gpu_memory": devices.memory_stats(gpu),
            "load_seconds": self.load_seconds,
            "last_predict_ms": None if self.last_predict_seconds is None else round(self.last_predict_seconds * 1000, 2),
            "first_chunk_ms": None if self.last_first_chunk_seconds is None
            else round(self.last_first_chunk_seconds * 1000, 2),
            "secrets": [{"name": n, "set": self.secrets.source_of(n) is not None} for n in self._config.secret_names],
            "batching": self._batching_status(),
            "error": self.describe_error(self.error) if self.error is not None else None,
        }

    # ------------------------------------------------------------------ define / hot reload

    def define(self, model_class: Any) -> DefineReport:
        """Make ``model_class`` the model. With a live instance, swap its class and keep its state.

        Raises ModelDefinitionError (and changes nothing) when the class breaks the contract.
        During a load it waits for the load to finish, then applies to what the load made.
        """
        contract = ModelContract.inspect(model_class, batching=self._config.batching is not None)
        with self._load_lock:
            old = self.contract
            if self.instance is None or old is None:
                self.contract = contract
                if self.state in (ModelState.NOT_DEFINED, ModelState.DEFINED, ModelState.FAILED):
                    self._clear_error()
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
            self.swapped_since_load += [n for n in changed if n not in self.swapped_since_load]
        self._emit("state", hot_swapped=True)
        return DefineReport(hot_swapped=True, changed=changed)

    # ------------------------------------------------------------------ load / unload

    def init_kwargs(self) -> dict[str, Any]:
        """The keyword arguments ``__init__`` gets, chosen by its signature as Truss does."""
        available = {
            "config": self._init_config if self._init_config is not None else self._config.to_dict(),
            "data_dir": self.data_dir,
            "secrets": self.secrets,
            "environment": self.environment,
        }
        assert set(available) == set(INIT_KWARGS)
        return init_kwargs(self.model_class, available)

    @property
    def loading(self) -> bool:
        done = self._load_done
        return done is not None and not done.is_set()

    def wait_load(self, timeout: Optional[float] = None) -> bool:
        """Wait for a worker-thread load to end (at most ``timeout`` s); True when none runs.
        Short timeouts in a loop keep a kernel interrupt deliverable."""
        done = self._load_done
        return done is None or done.wait(timeout)

    def load(self, device: Optional[str] = None, *, echo: bool = True,
             before_ready: Optional[Callable[[], None]] = None) -> None:
        """Instantiate the class and call ``load()``, in this thread.

        ``device`` (``cpu``, ``cuda:N``) is torch's default device while load runs;
        None lets the model choose, as in a deployment. What load prints or logs is
        sent as ``log`` events; ``echo`` also lets it through to where it would go
        (off when a view shows it, so it shows once). A failure leaves the state
        ``failed`` and re-raises the user's exception with our frames trimmed.
        ``before_ready`` runs after a successful load, before the state says ready (a
        server's collection and freeze: core/collector.py).
        """
        if self.contract is None:
            raise ModelNotReadyError("No model is defined yet: run a %%model cell (a class with predict) first.")
        with self._load_lock:
            self._load(device, echo, before_ready)

    def _load(self, device: Optional[str], echo: bool, before_ready: Optional[Callable[[], None]] = None) -> None:
        self.unload()
        self.swapped_since_load = []
        self.last_health = None
        self._set_state(ModelState.LOADING)
        watch = device or devices.guess_gpu()
        self._emit("load_started", device=device, memory=devices.memory_stats(watch))
        started = time.perf_counter()
        # As in a deployment, the config's environment_variables are set before the model runs.
        os.environ.update(self._config.environment_variables)
        instance = None
        try:
            with capture_lines(lambda source, line: self._emit("log", source=source, line=line), echo=echo,
                               redact=self.secrets.redact):
                with devices.default_device(device):
                    instance = self.model_class(**self.init_kwargs())
                    if self.contract.load is not None:
                        instance.load()
        except BaseException as exc:
            instance = None  # a half-made instance must not outlive the failure
            self.error = trim_traceback(exc)
            self.error_text = self.format_error(exc)
            self.load_seconds = time.perf_counter() - started
            self._set_state(ModelState.FAILED, error=exc)
            self._emit("load_failed", error=exc, text=self.error_text, seconds=self.load_seconds)
            raise
        self.instance = instance
        self.load_seconds = time.perf_counter() - started
        self.device = devices.infer_device(instance) or device or "cpu"
        if before_ready is not None:
            before_ready()
        self._set_state(ModelState.READY)
        self._emit("load_finished", seconds=self.load_seconds, device=self.device,
                   memory=devices.memory_stats(self.device if self.device.startswith("cuda") else watch))

    def start_load(self, device: Optional[str] = None, *, echo: bool = True,
                   on_done: Optional[Callable[[Optional[BaseException]], None]] = None) -> threading.Thread:
        """Load in a worker thread (the one way every adapter loads off its own thread).

        The state is LOADING before this returns, so a request that arrives at once
        gets "not ready" rather than a stale answer. ``on_done`` gets None, or the exception.
        """
        if self.contract is None:
            raise ModelNotReadyError("No model is defined yet: run a %%model cell (a class with predict) first.")
        if self.loading:
            raise ModelNotReadyError("The model is already loading; wait for that load to finish.")
        self._set_state(ModelState.LOADING)
        done = self._load_done = threading.Event()

        def run() -> None:
            try:
                try:
                    self.load(device, echo=echo)
                except BaseException as exc:
                    if on_done is not None:
                        on_done(exc)
                    return
                if on_done is not None:
                    on_done(None)
            finally:
                done.set()

        ctx = contextvars.copy_context()  # output and widget messages belong to the caller's cell
        thread = threading.Thread(target=ctx.run, args=(run,), name="model-load", daemon=True)
        self._load_thread = thread
        thread.start()
        return thread

    def interrupt_load(self, timeout: float = 10.0) -> bool:
        """Raise KeyboardInterrupt inside a running load (at its next Python line); True if it stopped.

        Code inside a long C call (a big tensor op) sees it when that call returns.
        """
        thread, done = self._load_thread, self._load_done
        if thread is None or done is None or done.is_set():
            return True
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(KeyboardInterrupt))
        return done.wait(timeout)

    def unload(self) -> bool:
        """Drop the instance and whatever a failure still holds, and free memory; returns whether
        anything was released (a loaded model, or a failed load's leftovers)."""
        had = self.instance is not None or self.error is not None
        self.instance = None
        self._batcher = None  # it holds the instance
        self.device = None
        if self.error is not None:
            self._clear_error()
        if had:
            devices.free_memory()
        if self.contract is not None and self.state in (ModelState.READY, ModelState.FAILED):
            self._set_state(ModelState.DEFINED)
        return had

    def _clear_error(self) -> None:
        if self.error is not None:
            release_frames(self.error)
        self.error = None

    # ------------------------------------------------------------------ health

    async def is_healthy(self) -> Optional[bool]:
        """Truss's health check: None without ``is_healthy`` (or while loading), else its answer
        (an exception counts as False)."""
        contract, instance = self.contract, self.instance
        if contract is None or contract.is_healthy is None or instance is None or self.state is not ModelState.READY:
            self.last_health = None
            return None
        try:
            healthy = bool(await self._call(instance, contract.is_healthy, None, None, pool=self._health_pool()))
        except Exception:
            healthy = False
        if healthy != self.last_health:
            self.last_health = healthy
            self._emit("health", healthy=healthy)
        return healthy

    # ------------------------------------------------------------------ predict

    def _require_ready(self) -> tuple[ModelContract, Any]:
        contract, instance = self.contract, self.instance
        if self.state is ModelState.READY and instance is not None:
            return contract, instance
        if self.state is ModelState.LOADING:
            raise ModelNotReadyError("The model is still loading; predict once it is ready.")
        if self.state is ModelState.FAILED:
            raise ModelNotReadyError(
                f"The model's last load failed ({self.describe_error(self.error)}); fix it and load again."
            )
        if contract is None:
            raise ModelNotReadyError("No model is defined yet: run a %%model cell, then %model_load.")
        raise ModelNotReadyError("The model is defined but not loaded: run %model_load first.")

    def _predict_slots(self) -> PredictSlots:
        # One bound per event loop, as the semaphore it replaced: a loop that stopped with slots taken (the kernel's
        # runner after %unload_ext) must not hold up the next one.
        loop = asyncio.get_running_loop()
        slots = self._slots
        if slots is None or slots[0] is not loop:
            slots = self._slots = (loop, PredictSlots(self._config.runtime.predict_concurrency, self._pool))
        return slots[1]

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            # Truss runs sync user code in anyio's pool of 40 threads; so do we. A sync stream takes
            # a thread only while it makes a chunk, never while it waits for its reader.
            self._executor = _ModelPool(40, thread_name_prefix="model-predict")
        return self._executor

    def _health_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._health_executor is None:
            # Its own thread: readiness never waits behind model work holding the predict pool.
            self._health_executor = _ModelPool(1, thread_name_prefix="model-health")
        return self._health_executor

    def close(self) -> None:
        """Let the worker threads go (a server that stops); a later call starts new ones."""
        for pool in (self._executor, self._health_executor):
            if pool is not None:
                pool.shutdown(wait=False)
        self._executor = self._health_executor = None

    async def _call(self, instance: Any, spec: MethodSpec, model_input: Any, request: Any,
                    pool: Optional[concurrent.futures.Executor] = None) -> Any:
        """Call a user method with the arguments it takes: await it if async, else run it in a worker thread."""
        fn = getattr(instance, spec.name)
        args = spec.args(model_input, request)
        if spec.is_generator:
            return fn(*args)
        if spec.is_async:
            return await fn(*args)
        ctx = contextvars.copy_context()  # keeps output routed to the calling cell
        return await asyncio.wrap_future((pool or self._pool()).submit(ctx.run, call_sync, fn, *args))

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

    async def predict(self, model_input: Any, *, request: Any = None, method: str = "predict",
                      encoded: bool = False, gone: Optional[Callable[[], Awaitable[None]]] = None) -> Any:
        """Run preprocess → predict → postprocess and return JSON-ready data, a ChunkStream, or
        the model's own Response object.

        Predict runs inside the ``runtime.predict_concurrency`` bound; a stream holds its slot
        until its generator has really closed. ``method`` names an OpenAI-style method
        (``chat_completions`` ...), called as Truss does: alone, outside the bound.
        ``request`` is what request-taking methods get. ``encoded``: a result that is data comes as
        the JSON body a server sends (:class:`JSONBody`). ``gone``: an awaitable that ends when the caller
        has left; a predict still waiting for its slot then never runs (:class:`CallerGone`). User
        exceptions propagate with their own frames only.
        """
        contract, instance = self._require_ready()  # one snapshot: a reload cannot pull it away mid-call
        started = time.perf_counter()
        try:
            if method != "predict":
                return await self._endpoint(contract, instance, method, model_input, request, started, encoded)
            if not contract.skips_input_parsing:
                model_input = self.validate_input(model_input)
            if contract.predict_batch is None and self._config.batching is not None:
                raise ModelDefinitionError(
                    f"The config declares model_metadata.batching, but `{contract.model_class.__name__}` has no "
                    "predict_batch. Write `def predict_batch(self, inputs: list) -> list:` (one result per input, in "
                    "order) instead of predict, or remove the batching section.")
            if contract.preprocess:
                model_input = await self._call(instance, contract.preprocess, model_input, request)
            slots, spec = self._predict_slots(), contract.predict
            if contract.predict_batch is None and not (spec.is_generator or spec.is_async):
                # A sync predict: its worker thread hands the slot on when the model's code returns (core/slots.py),
                # unless it returned a stream, which keeps the slot until it has closed.
                result = await slots.run_sync(instance, spec.name, *spec.args(model_input, request), gone=gone)
                release = _Release(slots, held=is_stream(result))
            else:
                await slots.acquire(gone)
                release = _Release(slots)
                try:
                    if contract.predict_batch is not None:
                        result = await self._batcher_for(instance, contract).submit(model_input)
                    else:
                        result = await self._call(instance, spec, model_input, request)
                except BaseException:
                    release()
                    raise
            if is_stream(result):
                if contract.postprocess:
                    close_quietly(result)
                    release()
                    raise ModelDefinitionError(
                        "predict returned a generator (streaming), and streaming output cannot be postprocessed "
                        "(Truss refuses this too). Do all processing inside predict, or remove postprocess."
                    )
                return ChunkStream(result, on_close=lambda s: self._stream_closed(s, release), started=started,
                                   executor=self._pool())
            release()
            if is_response(result):
                if contract.postprocess:
                    raise ModelDefinitionError("predict returned a response object, which cannot be postprocessed "
                                               "(Truss refuses this too). Remove postprocess, or return data.")
                return result
            if contract.postprocess:
                result = await self._call(instance, contract.postprocess, result, request)
            if self.check_truss_compat:
                self.last_raw_issue = truss_would_refuse(result)
            output = to_json_body(result) if encoded else to_jsonable(result)
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                trim_traceback(exc)
            raise
        self._predicted(started)
        return output

    async def _endpoint(self, contract: ModelContract, instance: Any, method: str, model_input: Any,
                        request: Any, started: float, encoded: bool) -> Any:
        spec = contract.endpoint(method)
        if spec is None:
            raise MethodNotFound(f"The model has no `{method}` method. Add `def {method}(self, model_input):` "
                                 "to the model class to serve this route.")
        if not contract.skips_input_parsing:
            model_input = self.validate_input(model_input)
        result = await self._call(instance, spec, model_input, request)
        if is_stream(result):
            return ChunkStream(result, on_close=lambda s: self._stream_closed(s, None), started=started,
                               executor=self._pool())
        if is_response(result):
            return result
        output = to_json_body(result) if encoded else to_jsonable(result)
        self._predicted(started)
        return output

    def _batcher_for(self, instance: Any, contract: ModelContract) -> Batcher:
        """The live instance's batcher; a model and a config that disagree about batching are refused."""
        settings = self._config.batching
        if settings is None:
            raise ModelDefinitionError(
                f"`{contract.model_class.__name__}` has predict_batch, but the config does not declare batching. Add "
                "`model_metadata: {batching: {max_batch_size: 32, max_wait_ms: 5}}` to %%model_config (config.yaml), "
                "or write `predict` instead of predict_batch.")
        with self._batcher_lock:
            if self._batcher is None or self._batcher[0] is not instance:
                self._batcher = (instance, weakref.WeakKeyDictionary())
            # One per event loop: a queue belongs to its loop (a second loop would otherwise find futures it
            # cannot await).
            loop = asyncio.get_running_loop()
            batcher = self._batcher[1].get(loop)
            if batcher is None:
                async def run(inputs: list) -> list:
                    spec = self.contract.predict if self.contract and self.contract.predict_batch else contract.predict
                    return await self._call(instance, spec, inputs, None)

                batcher = self._batcher[1][loop] = Batcher(run, settings.max_batch_size, settings.max_wait_s,
                                                           on_batch=self._batched)
            return batcher

    def _batched(self, stats: BatchStats) -> None:
        self.last_batch_sizes.append(stats.size)
        self._emit("batch", size=stats.size, wait=stats.wait_s, seconds=stats.run_s)

    def _batching_status(self) -> Optional[dict]:
        settings = self._config.batching
        if settings is None and (self.contract is None or self.contract.predict_batch is None):
            return None
        return {"max_batch_size": settings.max_batch_size if settings else None,
                "max_wait_ms": settings.max_wait_ms if settings else None,
                "last_batch_sizes": list(self.last_batch_sizes)}

    def _predicted(self, started: float) -> None:
        self.last_predict_seconds = time.perf_counter() - started
        self.last_first_chunk_seconds = None
        self._emit("predicted", seconds=self.last_predict_seconds)

    def _stream_closed(self, stream: ChunkStream, release: Optional[_Release]) -> None:
        if release is not None:
            release()
        self.last_predict_seconds = stream.elapsed
        self.last_first_chunk_seconds = stream.first_chunk_seconds
        self._emit("predicted", seconds=stream.elapsed, first_chunk=stream.first_chunk_seconds,
                   chunks=stream.chunks, streamed=True)

    async def collect(self, model_input: Any, *, request: Any = None, method: str = "predict") -> Any:
        """Predict and, for a stream, gather it as every adapter does (:func:`join_chunks`)."""
        result = await self.predict(model_input, request=request, method=method)
        if not isinstance(result, ChunkStream):
            return result
        chunks = []
        async with result:
            async for chunk in result:
                chunks.append(chunk)
        return join_chunks(chunks)


class _ModelPool(concurrent.futures.ThreadPoolExecutor):
    """Worker threads for model code that count the calls in progress: what a process that stops still waits for
    (:func:`calls_in_model_code`)."""

    def submit(self, fn, /, *args, **kwargs):
        return super().submit(_counted, fn, *args, **kwargs)


_IN_MODEL_CODE = [0]
_IN_MODEL_CODE_LOCK = threading.Lock()


def _counted(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    with _IN_MODEL_CODE_LOCK:
        _IN_MODEL_CODE[0] += 1
    try:
        return fn(*args, **kwargs)
    finally:
        with _IN_MODEL_CODE_LOCK:
            _IN_MODEL_CODE[0] -= 1


def calls_in_model_code() -> int:
    """How many worker threads of this process's hosts are running model code now (a thread that runs waiting
    predicts back to back counts once)."""
    return _IN_MODEL_CODE[0]


def release_frames(exc: Optional[BaseException]) -> None:
    """Let go of what an exception's traceback keeps alive (the locals of every frame), through
    its cause and context too; the exception itself and its message stay."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if exc.__traceback__ is not None:
            clear_traceback(exc.__traceback__)
            exc.__traceback__ = None
        if exc.__cause__ is not None:
            release_frames(exc.__cause__)
        exc = exc.__context__
    gc.collect()


def clear_traceback(tb: Any) -> None:
    """Clear the locals of a traceback's function frames, the snapshot dicts displays read
    (``frame.f_locals``) included; module and class frames (namespaces) are left alone."""
    walk = tb
    while walk is not None:
        frame = walk.tb_frame
        if frame.f_code.co_flags & inspect.CO_OPTIMIZED:
            try:
                frame.f_locals.clear()
            except Exception:
                pass
        walk = walk.tb_next
    traceback.clear_frames(tb)


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
