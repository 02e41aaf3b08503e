"""The Truss model contract, read from a class once: what to call and how.

As Truss's ``MethodDescriptor`` / ``ArgConfig`` (model_wrapper.py): async-ness,
generator-ness and which arguments a method takes (none, the input, the
request, or the input and the request) are decided when the class is defined,
and a form Truss refuses is a :class:`ModelDefinitionError` with Truss's reason.
"""

from __future__ import annotations

import collections.abc
import enum
import functools
import inspect
import re
import struct
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .errors import ModelDefinitionError
from .routes import ENDPOINT_METHODS  # (served on routes of their own, beside predict)
from .serialization import is_pydantic_class

__all__ = ["code_shape", "functools_wrapped", "ArgConfig", "MethodSpec", "ModelContract", "init_kwargs", "INIT_KWARGS", "code_fingerprint",
           "definition_code", "ENDPOINT_METHODS"]

# The keyword arguments Truss may pass to ``Model.__init__``.
INIT_KWARGS = ("config", "data_dir", "secrets", "environment")


class ArgConfig(enum.Enum):
    """Which arguments a model method takes besides self (Truss's ArgConfig)."""

    NONE = "none"
    INPUTS_ONLY = "input"
    REQUEST_ONLY = "request"
    INPUTS_AND_REQUEST = "input and request"


def is_request_type(annotation: Any) -> bool:
    """A Starlette/FastAPI ``Request`` annotation (without importing starlette when unused)."""
    if isinstance(annotation, str):
        return annotation.rsplit(".", 1)[-1] == "Request"
    if not isinstance(annotation, type):
        return False
    return any(c.__name__ == "Request" and c.__module__.startswith("starlette.") for c in annotation.__mro__)


@dataclass(frozen=True)
class MethodSpec:
    """How to call one model method."""

    name: str
    is_async: bool
    is_generator: bool
    arg_config: ArgConfig

    @property
    def takes_input(self) -> bool:
        return self.arg_config in (ArgConfig.INPUTS_ONLY, ArgConfig.INPUTS_AND_REQUEST)

    @property
    def takes_request(self) -> bool:
        return self.arg_config in (ArgConfig.REQUEST_ONLY, ArgConfig.INPUTS_AND_REQUEST)

    def args(self, model_input: Any, request: Any) -> tuple:
        return {ArgConfig.NONE: (), ArgConfig.INPUTS_ONLY: (model_input,), ArgConfig.REQUEST_ONLY: (request,),
                ArgConfig.INPUTS_AND_REQUEST: (model_input, request)}[self.arg_config]

    @classmethod
    def of(cls, model_class: type, name: str) -> Optional["MethodSpec"]:
        fn = getattr(model_class, name, None)
        if fn is None:
            return None
        if not callable(fn):
            raise ModelDefinitionError(f"`{model_class.__name__}.{name}` must be a method, not {type(fn).__name__}.")
        params = _params_after_self(fn)
        owner = f"{model_class.__name__}.{name}"
        if name == "is_healthy":
            params = _params_after_self(fn, all_kinds=True)  # Truss calls it with nothing at all
        if name in ("load", "is_healthy") and params:
            hint = (" Read what load needs from the config, data_dir or secrets passed to __init__."
                    if name == "load" else "")
            raise ModelDefinitionError(f"`{owner}` must take no arguments besides self; got {name}{_signature(fn)}.{hint}")
        if name == "load" and (inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)):
            raise ModelDefinitionError(
                f"`{owner}` is `async def`, but Truss 0.18 never awaits load() (it would do nothing when deployed). "
                "Make it a plain `def load(self):`; inside it, `asyncio.run(...)` works, in the notebook as on a server."
            )
        return cls(
            name=name,
            is_async=inspect.iscoroutinefunction(fn),
            is_generator=inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn),
            # Truss counts every parameter (defaults, *args and **kwargs too) when it decides the form.
            arg_config=_arg_config(fn, owner, _params_after_self(fn, all_kinds=True)),
        )


def _arg_config(fn: Callable, owner: str, params: list[inspect.Parameter]) -> ArgConfig:
    """Truss's rules (model_wrapper.ArgConfig.from_method), with its messages."""
    if not params:
        return ArgConfig.NONE
    annotations = [_annotation(fn, p) for p in params]
    if len(params) == 1:
        return ArgConfig.REQUEST_ONLY if is_request_type(annotations[0]) else ArgConfig.INPUTS_ONLY
    if len(params) == 2:
        if is_request_type(annotations[0]):
            raise ModelDefinitionError(
                f"`{owner}` takes two arguments with the request first; the request must be second: "
                f"{owner.split('.')[-1]}{_signature(fn)}."
            )
        if not is_request_type(annotations[1]):
            raise ModelDefinitionError(
                f"`{owner}` takes two arguments, so the second must be the request, annotated as one "
                f"(`request: fastapi.Request`); got {owner.split('.')[-1]}{_signature(fn)}. With one argument "
                "it gets the model input."
            )
        return ArgConfig.INPUTS_AND_REQUEST
    raise ModelDefinitionError(
        f"`{owner}` must take one argument (the model input), and optionally the request second; "
        f"got {owner.split('.')[-1]}{_signature(fn)}."
    )


@dataclass(frozen=True)
class ModelContract:
    """What a model class offers: its methods and its Pydantic input type, if any."""

    model_class: type
    predict: MethodSpec
    load: Optional[MethodSpec]
    preprocess: Optional[MethodSpec]
    postprocess: Optional[MethodSpec]
    input_type: Optional[type]
    is_healthy: Optional[MethodSpec] = None
    endpoints: tuple[MethodSpec, ...] = ()  # chat_completions ... that the class has
    # predict_batch(inputs) -> list: the model batches (core/batching.py); then predict is this spec.
    predict_batch: Optional[MethodSpec] = None

    @classmethod
    def inspect(cls, model_class: Any, *, batching: bool = False) -> "ModelContract":
        """Check ``model_class`` against the Truss contract; raise ModelDefinitionError if it breaks it.

        ``batching``: the config declares ``model_metadata.batching``. Without it, a class with a predict of its
        own serves through that predict, and a ``predict_batch`` beside it is the model's own helper (a Truss
        written elsewhere may have one; Truss's server ignores it), not a batching entry point."""
        if not isinstance(model_class, type):
            raise ModelDefinitionError(f"The model must be a class, not {type(model_class).__name__}.")
        predict = MethodSpec.of(model_class, "predict")
        from .batching import is_batching_predict

        helper = (not batching and predict is not None
                  and not is_batching_predict(getattr(model_class, "predict")))
        predict_batch = None if helper else _predict_batch_spec(model_class)
        if predict_batch is not None:
            predict = _batched_predict(model_class, predict, predict_batch)
        if predict is None and batching:
            raise ModelDefinitionError(
                f"`{model_class.__name__}` has neither `predict_batch` nor `predict`, and the config declares "
                "batching. Add `def predict_batch(self, inputs):` returning a list with one result per input."
            )
        if predict is None:
            raise ModelDefinitionError(
                f"`{model_class.__name__}` has no `predict` method. Add `def predict(self, model_input):` "
                "returning the prediction."
            )
        preprocess = MethodSpec.of(model_class, "preprocess")
        postprocess = MethodSpec.of(model_class, "postprocess")
        if preprocess and predict.arg_config is ArgConfig.REQUEST_ONLY:
            raise ModelDefinitionError(
                f"`{model_class.__name__}` has preprocess, so predict cannot take only the request (the result of "
                "preprocess would be discarded). Give predict the input argument too."
            )
        if postprocess and postprocess.arg_config is ArgConfig.REQUEST_ONLY:
            raise ModelDefinitionError(
                f"`{model_class.__name__}.postprocess` cannot take only the request (the result of predict would "
                "be discarded). Give it the predict result as its first argument."
            )
        # Truss validates the request against the first method that receives it.
        first = "preprocess" if preprocess else predict.name
        return cls(
            model_class=model_class,
            predict=predict,
            load=MethodSpec.of(model_class, "load"),
            preprocess=preprocess,
            postprocess=postprocess,
            input_type=_pydantic_input_type(getattr(model_class, first)),
            is_healthy=MethodSpec.of(model_class, "is_healthy"),
            endpoints=tuple(s for n in ENDPOINT_METHODS if (s := MethodSpec.of(model_class, n)) is not None),
            predict_batch=predict_batch,
        )

    @property
    def skips_input_parsing(self) -> bool:
        """Truss does not parse the body when only the request reaches the model."""
        return self.predict.arg_config is ArgConfig.REQUEST_ONLY and (
            self.preprocess is None or self.preprocess.arg_config is ArgConfig.REQUEST_ONLY)

    def endpoint(self, name: str) -> Optional[MethodSpec]:
        return next((s for s in self.endpoints if s.name == name), None)

    def truss_schema(self) -> Optional[dict]:
        """What Truss's ``/schema`` route answers, or None when predict is not annotated."""
        last = getattr(self.model_class, "postprocess" if self.postprocess else self.predict.name)
        try:
            annotation = typing.get_type_hints(last).get("return")
        except Exception:
            annotation = None
        output, streaming = None, None
        if is_pydantic_class(annotation):
            output, streaming = annotation, False
        else:
            origin = typing.get_origin(annotation)
            if isinstance(origin, type) and issubclass(origin, (collections.abc.Iterator, collections.abc.AsyncIterator)):
                streaming = True
            elif origin is typing.Union:
                models = [a for a in typing.get_args(annotation) if is_pydantic_class(a)]
                if models:
                    output, streaming = models[0], True
        if self.input_type is None and streaming is None:
            return None
        return {
            "input_schema": self.input_type.model_json_schema() if self.input_type else None,
            "output_schema": output.model_json_schema() if output else None,
            "supports_streaming": streaming,
        }

    def changed_methods(self, other: "ModelContract", names=("__init__", "load")) -> list[str]:
        """Which of ``names`` differ in code between this class and ``other``."""
        return [
            n for n in names
            if code_fingerprint(getattr(self.model_class, n, None))
            != code_fingerprint(getattr(other.model_class, n, None))
        ]


def _predict_batch_spec(model_class: type) -> Optional[MethodSpec]:
    spec = MethodSpec.of(model_class, "predict_batch")
    if spec is None:
        return None
    owner = f"{model_class.__name__}.predict_batch"
    if spec.is_generator:
        raise ModelDefinitionError(
            f"`{owner}` is a generator, but a batch cannot stream: return a list with one result per input. "
            "To stream, write a generator `predict` (one request at a time) instead of predict_batch.")
    if spec.arg_config is not ArgConfig.INPUTS_ONLY:
        raise ModelDefinitionError(f"`{owner}` must take one argument, the list of inputs (one per request); "
                                   f"got predict_batch{_signature(getattr(model_class, 'predict_batch'))}.")
    return spec


def _batched_predict(model_class: type, predict: Optional[MethodSpec], batch: MethodSpec) -> MethodSpec:
    """With predict_batch, each request's predict is a slot in a batch; a predict of the user's own is refused,
    except the one an export generated for Truss's server (``kernel_magics_batching.batched``)."""
    from .batching import is_batching_predict

    own = predict is not None and not is_batching_predict(getattr(model_class, "predict"))
    if own and predict.is_generator:
        raise ModelDefinitionError(
            f"`{model_class.__name__}` has a streaming (generator) predict and predict_batch, but streaming predicts "
            "are not batched. Remove predict_batch to stream one request at a time, or remove predict to batch.")
    if own:
        raise ModelDefinitionError(
            f"`{model_class.__name__}` has both predict and predict_batch. With predict_batch every request is "
            "answered through it (a lone request is a batch of one), so remove predict.")
    return MethodSpec("predict_batch", batch.is_async, False, ArgConfig.INPUTS_ONLY)


def init_kwargs(model_class: type, available: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``available`` that ``model_class.__init__`` accepts by name (all for ``**kwargs``)."""
    try:
        params = inspect.signature(model_class).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(available)
    return {k: v for k, v in available.items() if k in params}


def code_fingerprint(fn: Any) -> Any:
    """A comparable summary of a function's code that ignores line numbers.

    Two definitions fingerprint equal when only their position in a cell moved,
    so hot reload can tell whether ``__init__`` or ``load`` really changed.
    """
    fn = inspect.unwrap(fn) if callable(fn) else fn
    code = getattr(fn, "__code__", None)
    if code is None:
        return ("object", repr(fn)) if fn is not None and fn is not object.__init__ else None
    return _code_key(code)


def definition_code(value: Any) -> Any:
    """What a notebook class or function does, to tell a definition a cell replaced from the one run again: a
    function's code (its docstring aside), defaults and the values it closes over (a decorator's arguments too, under
    ``functools.wraps``); a class's bases (a notebook one by its own definition), and each attribute but the dunders
    Python sets: functions and what decorators wrap (``lru_cache``, ``cached_property``, ``partialmethod``, static
    and class methods, properties), nested classes, plain values (a threshold, a default of a dataclass or pydantic
    field) and what they hold. A function or class of the notebook's module held anywhere in it (a default
    `fn=helper`, a decorator factory's argument, an instance of a notebook class) is compared by its own code in
    turn, each once (memoized: a method's `super()` cell holds its class). Compared in one process: two definitions
    from the same source agree (a cell run again) unless what they read or hold differs since: `cfg = {'t': T}` after
    `T` changed, a default `fn=helper` after `helper` did, and state their own code moved (a counter, a lazy table,
    a singleton), which a value holding the earlier one reads where model.py's starts afresh."""
    return _Comparison().definition(value, 0)


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class _Comparison:
    """One definition_code walk: the memo of what it has compared (and what it is comparing, for cycles)."""

    def __init__(self) -> None:
        self.memo: dict[int, Any] = {}
        self.busy: set[int] = set()  # being compared (a method's `super()` cell holds its own class)
        self.held: list = []  # what the memo's ids belong to, alive until the walk ends
        # Values looked at, at most: a class attribute holding a large graph of objects is compared up to there (the
        # same in both definitions when nothing in that part differs)
        self.budget = 100_000

    def definition(self, value: Any, depth: int) -> Any:
        if depth > 8:
            return ("deep",)
        key = id(value)
        if key in self.busy:
            return ("cycle", getattr(value, "__qualname__", "?"))
        found = self.memo.get(key)
        if found is not None:
            return found
        self.busy.add(key)
        self.held.append(value)
        try:
            found = self.memo[key] = (self._class(value, depth) if isinstance(value, type)
                                      else self._function(value, depth))
        finally:
            self.busy.discard(key)
        return found

    def _class(self, value: type, depth: int) -> Any:
        module = value.__module__
        parts: list = [self.definition(b, depth + 1) if b.__module__ == module and b is not value
                       else f"{b.__module__}.{b.__qualname__}" for b in value.__bases__]
        for attr, item in sorted(vars(value).items()):
            if attr in _SET_BY_PYTHON or (attr.startswith("__") and attr.endswith("__") and not (
                    inspect.isfunction(item) or isinstance(item, (property, staticmethod, classmethod)))):
                continue  # (a dunder value is Python's or a framework's bookkeeping: pydantic's __pydantic_fields__)
            parts.append((attr, self._attribute(item, value, depth, module)))
        for attr in ("__pydantic_fields__", "__dataclass_fields__"):
            # A field's default, which pydantic keeps only there (`t: float = 0.5` edited to 0.7), by what it says
            fields = vars(value).get(attr)
            if isinstance(fields, dict):
                parts.append((attr, tuple((name, _ADDRESS.sub("", repr(field))[:500])
                                          for name, field in fields.items())))
        return ("class", tuple(parts))

    def _function(self, value: Any, depth: int) -> Any:
        inner = getattr(value, "__wrapped__", None) if inspect.isfunction(value) else None
        if inner is not None and callable(inner):
            # A wrapper made with functools.wraps: its own code and what it closes over (`@scale(2)`: the 2), then
            # what it wraps
            return ("wrapper", self._own(value, depth), self.definition(inner, depth + 1))
        fn = inspect.unwrap(value) if callable(value) else value
        return self._own(fn, depth)

    def _own(self, fn: Any, depth: int) -> Any:
        code = getattr(fn, "__code__", None)
        if code is None:
            return code_fingerprint(fn)
        # (Compared as any compilation gives it: the same def in a cell with and without `import re`, and a
        # docstring added, edited or removed, change no answer.)
        key = code_shape(code)
        from .fingerprint import cell_is_filled

        home = fn.__module__
        wrapped = getattr(fn, "__wrapped__", None)
        cells = tuple(self.value(c.cell_contents, depth, home)
                      if cell_is_filled(c) and c.cell_contents is not wrapped else None
                      for c in (fn.__closure__ or ()))
        defaults = tuple(self.value(d, depth, home) for d in fn.__defaults__ or ())
        keywords = tuple((k, self.value(d, depth, home)) for k, d in (fn.__kwdefaults__ or {}).items())
        return ("function", key, defaults, keywords, cells)

    def _attribute(self, item: Any, owner: type, depth: int, home: str) -> Any:
        if isinstance(item, property):
            return ("property", *(self.definition(f, depth + 1) if f is not None else None
                                  for f in (item.fget, item.fset, item.fdel)))
        if isinstance(item, (staticmethod, classmethod)):
            return (type(item).__name__, self.definition(item.__func__, depth + 1))
        if isinstance(item, type) and not item.__qualname__.startswith(owner.__qualname__ + "."):
            return self.value(item, depth, home)  # (a class it refers to, defined elsewhere)
        func = getattr(item, "func", None)  # functools.cached_property, partialmethod, partial
        if func is not None and callable(func) and not inspect.isfunction(item):
            return (type(item).__name__, self.definition(func, depth + 1),
                    self.value(getattr(item, "args", ()), depth, home),
                    self.value(getattr(item, "keywords", {}), depth, home))
        if isinstance(item, type) or inspect.isfunction(item) or hasattr(item, "__wrapped__"):
            return self.definition(item, depth + 1)
        return self.value(item, depth, home)

    def value(self, value: Any, depth: int, home: Optional[str]) -> Any:
        """A plain value, compared by what it is (a new lock or a new empty dict in a class run again is the same),
        and by the notebook code it holds: a function or class of ``home`` (the notebook's module) by its
        definition, an instance of a notebook class by its class and attributes, a ``functools.partial`` by its
        function and arguments. Any other function or class by name, as model.py imports it by that name."""
        self.budget -= 1
        if depth > 8 or self.budget < 0:
            return ("deep",)
        if inspect.isfunction(value) or isinstance(value, type):
            name = f"{value.__module__}.{value.__qualname__}"
            return (name, self.definition(value, depth + 1)) if value.__module__ == home else name
        if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
            return (type(value).__name__, repr(value))
        if isinstance(value, (tuple, list, set, frozenset, dict)):
            items = value.items() if isinstance(value, dict) else ((None, v) for v in value)
            codes = [(repr(k), self.value(v, depth + 1, home)) for k, v in items]
            if isinstance(value, (set, frozenset)):
                codes.sort(key=repr)
            return (type(value).__name__, tuple(codes))
        if isinstance(value, functools.partial):
            return ("partial", self.value(value.func, depth + 1, home), self.value(value.args, depth + 1, home),
                    self.value(value.keywords, depth + 1, home))
        kind = type(value)
        if kind.__module__ == home and id(value) not in self.busy:
            self.busy.add(id(value))  # (objects that refer to each other)
            try:
                return ("instance", self.definition(kind, depth + 1), self.value(_state(value), depth + 1, home))
            finally:
                self.busy.discard(id(value))
        from .fingerprint import fingerprint

        try:  # (an array, a tensor, a fitted estimator: by their data, which a repr summarizes away)
            found = fingerprint(value)
        except Exception:
            found = None
        if found is not None:
            return (f"{kind.__module__}.{kind.__qualname__}", found["kind"], found["digest"])
        try:
            text = _ADDRESS.sub("", repr(value))[:500]
        except Exception:  # (a repr that fails: compared by its type only)
            text = "?"
        return (f"{kind.__module__}.{kind.__qualname__}", text)


def _state(value: Any) -> dict:
    """An instance's attributes: its ``__dict__`` and its ``__slots__``."""
    try:
        found = dict(vars(value)) if isinstance(getattr(value, "__dict__", None), dict) else {}
        for cls in type(value).__mro__:
            slots = cls.__dict__.get("__slots__", ())
            for slot in (slots,) if isinstance(slots, str) else slots:
                if slot not in ("__dict__", "__weakref__") and hasattr(value, slot):
                    found.setdefault(slot, getattr(value, slot))
    except Exception:  # (an attribute lookup of the notebook's own that fails: compared by what was read)
        return {}
    return found


# What Python sets on a class, or caches on it later (copyreg's __slotnames__ once an instance is pickled, abc's
# registry): not the notebook's code.
_SET_BY_PYTHON = frozenset({"__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__firstlineno__",
                            "__static_attributes__", "__annotations__", "__orig_bases__", "__parameters__",
                            "__slotnames__", "__abstractmethods__", "_abc_impl"})


def functools_wrapped(value: Any) -> Any:
    """The function a functools cache wraps (`lru_cache(f)`, `cache(f)`), else None: such a wrapper is named and
    compared as the function it wraps, not pickled by its `__main__` name."""
    if type(value).__module__ != "functools":
        return None
    wrapped = getattr(value, "__wrapped__", None)
    return wrapped if inspect.isfunction(wrapped) else None


# Flags that change what a function does (not the __future__ ones a cell or model.py compiles it with).
_SHAPE_FLAGS = (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS | inspect.CO_GENERATOR | inspect.CO_COROUTINE
                | inspect.CO_ASYNC_GENERATOR | inspect.CO_ITERABLE_COROUTINE)
# (EXTENDED_ARG carries the high byte of a long jump's offset, which that compiler choice also moves)
_UNSHAPED = frozenset({"PRECALL", "CACHE", "NOP", "EXTENDED_ARG"})


def _constant(value: Any) -> str:
    """A constant as text that is the same in every process: a frozenset's repr follows the hash seed (`x in {'a',
    'b'}` compiles to one)."""
    if isinstance(value, frozenset):
        return "frozenset({" + ", ".join(sorted(_constant(v) for v in value)) + "})"
    if isinstance(value, tuple):
        return "(" + "".join(_constant(v) + ", " for v in value) + ")"
    if isinstance(value, float):
        return "float " + struct.pack(">d", value).hex()  # (every nan's repr is `nan`, whatever its sign)
    if type(value) is int:
        return hex(value)  # (repr refuses an int of over 4,300 digits)
    return repr(value)


@functools.lru_cache(maxsize=4096)  # (a code object hashes by its content: equal ones have one shape)
def code_shape(code: Any) -> tuple:
    """A function's code as any compilation of its text gives it: the instructions, what they name, where they jump
    and which of them a `try` covers, with the one choice the compiler makes from the rest of the module undone (3.11
    loads `re.sub` as an attribute when `import re` is in the same cell or module, as a method when not: the kernel's
    cell and model.py differ there). That choice moves byte offsets, so jumps and the exception table are written as
    positions in the instruction list. What a function compiled in the notebook and in model.py is compared by."""
    import bisect
    import dis

    try:
        instructions = [i for i in dis.get_instructions(code) if i.opname not in _UNSHAPED]
    except ValueError:  # (dis cannot show an int of over 4,300 digits: compared as compiled)
        return ("compiled", code.co_flags & _SHAPE_FLAGS, _code_key(code))
    offsets = [i.offset for i in instructions]

    def position(offset: Any) -> int:  # (of the first instruction kept at or after that offset)
        return bisect.bisect_left(offsets, offset)

    jumps = set(dis.hasjrel) | set(dis.hasjabs)
    ops = tuple(("LOAD_ATTR" if i.opname == "LOAD_METHOD" else i.opname,
                 position(i.argval) if i.opcode in jumps else
                 _constant(code.co_consts[i.arg]) if i.opname == "KW_NAMES" else  # (dis shows no value for it)
                 code_shape(i.argval) if inspect.iscode(i.argval) else _constant(i.argval))
                for i in instructions)
    handlers = tuple((position(e.start), position(e.end), position(e.target), e.depth, e.lasti)
                     for e in getattr(dis.Bytecode(code), "exception_entries", ()))
    return (code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags & _SHAPE_FLAGS,
            code.co_varnames, ops, handlers)


def _code_key(code) -> tuple:
    consts = tuple(_code_key(c) if inspect.iscode(c) else (type(c).__name__, _constant(c)) for c in code.co_consts)
    return (code.co_code, code.co_names, code.co_varnames, code.co_freevars, code.co_argcount, consts)


def _params_after_self(fn: Callable, all_kinds: bool = False) -> list[inspect.Parameter]:
    """The parameters a caller must fill (``all_kinds``: every parameter, as Truss counts them)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return []
    if isinstance(inspect.getattr_static(fn, "__self__", None), type) or inspect.ismethod(fn):
        return params  # classmethod: already bound
    params = params[1:] if params and params[0].kind in (
        inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) else params
    if all_kinds:
        return params
    return [p for p in params if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
            and p.default is inspect.Parameter.empty]


def _signature(fn: Callable) -> str:
    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(...)"


def _annotation(fn: Callable, param: inspect.Parameter) -> Any:
    annotation = param.annotation
    if isinstance(annotation, str):
        try:
            annotation = typing.get_type_hints(fn).get(param.name, annotation)
        except Exception:
            pass
    return annotation


def _pydantic_input_type(fn: Callable) -> Optional[type]:
    params = _params_after_self(fn)
    if not params:
        return None
    annotation = _annotation(fn, params[0])
    return annotation if is_pydantic_class(annotation) else None
