"""The Truss model contract, read from a class once: what to call and how.

As Truss's ``MethodDescriptor`` / ``ArgConfig`` (model_wrapper.py): async-ness,
generator-ness and which arguments a method takes (none, the input, the
request, or the input and the request) are decided when the class is defined,
and a form Truss refuses is a :class:`ModelDefinitionError` with Truss's reason.
"""

from __future__ import annotations

import collections.abc
import enum
import inspect
import re
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .errors import ModelDefinitionError
from .routes import ENDPOINT_METHODS  # (served on routes of their own, beside predict)
from .serialization import is_pydantic_class

__all__ = ["ArgConfig", "MethodSpec", "ModelContract", "init_kwargs", "INIT_KWARGS", "code_fingerprint",
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


def definition_code(value: Any, state: bool = True, _depth: int = 0, _closed_by_name: bool = False) -> Any:
    """What a notebook class or function does, to tell a definition a cell replaced from the one run again: a
    function's code (its docstring aside), defaults and the values it closes over; a class's bases (a notebook one
    by its own definition), and each attribute but the dunders Python sets: functions and what decorators wrap
    (``lru_cache``, ``cached_property``, ``partialmethod``, static and class methods, properties), nested classes, and
    plain values (a threshold, a default of a dataclass field). Compared in one process: two definitions from the
    same source agree (a cell run again); an edited method, default or class attribute does not.

    ``state=False`` compares two runs of the same source: what differs then is what the definition read when it ran
    (a default `fn=helper`, an attribute `t = THRESH`), not the state its own code moved since (a cache a class
    attribute holds, a counter), which model.py's definition does not have either way."""
    if _depth > 8:
        return ("deep",)
    if isinstance(value, type):
        module = value.__module__
        parts: list = [definition_code(b, state, _depth + 1) if b.__module__ == module and b is not value
                       else f"{b.__module__}.{b.__qualname__}" for b in value.__bases__]
        for attr, item in sorted(vars(value).items()):
            if attr in _SET_BY_PYTHON or (attr.startswith("__") and attr.endswith("__") and not (
                    inspect.isfunction(item) or isinstance(item, (property, staticmethod, classmethod)))):
                continue  # (a dunder value is Python's or a framework's bookkeeping: pydantic's __pydantic_fields__)
            parts.append((attr, _attribute_code(item, value, _depth, module, state)))
        for attr in ("__pydantic_fields__", "__dataclass_fields__"):
            # A field's default, which pydantic keeps only there (`t: float = 0.5` edited to 0.7), by what it says
            fields = vars(value).get(attr)
            if isinstance(fields, dict):
                parts.append((attr, tuple((name, re.sub(r" at 0x[0-9a-fA-F]+", "", repr(field))[:500])
                                          for name, field in fields.items())))
        return ("class", tuple(parts))
    fn = inspect.unwrap(value) if callable(value) else value
    code = getattr(fn, "__code__", None)
    if code is None:
        return code_fingerprint(fn)
    key = _code_key(code)
    doc = getattr(fn, "__doc__", None)
    if key[5] and key[5][0] == ("str", repr(doc)) or doc is None and key[5][:1] == (("NoneType", "None"),):
        # (A docstring added, edited or removed changes no answer: Python 3.11 keeps a function's docstring, or
        # None without one, as its first constant.)
        key = key[:5] + (key[5][1:],)
    from .fingerprint import cell_is_filled

    # What a function reads that the notebook defines (a default `fn=helper`, a decorator factory's argument) is
    # compared by its code, one level deep (what that reads in turn by name): by name alone a class run again,
    # unchanged, after `helper` was defined again with other code read as the same definition as the earlier
    # class, whose default still holds the earlier `helper`.
    home = None if _closed_by_name else fn.__module__
    cells = tuple(_closed_over_code(c.cell_contents, _depth, home, state) if cell_is_filled(c) else None
                  for c in (fn.__closure__ or ()))
    return ("function", key, tuple(_value_code(d, _depth, home, state) for d in fn.__defaults__ or ()),
            tuple((k, _value_code(d, _depth, home, state)) for k, d in (fn.__kwdefaults__ or {}).items()), cells)


def _closed_over_code(value: Any, depth: int, home: Optional[str], state: bool) -> Any:
    """A function a closure holds that no top-level name binds (the method a decorator without ``functools.wraps``
    wraps, a local function) is compared by its code: by name, an edited method under such a decorator read as the
    same code. One level deep (what it closes over in turn by name): local functions that call each other would
    otherwise be walked again for every path between them."""
    if home is not None and inspect.isfunction(value) and "." in value.__qualname__:
        return definition_code(value, state, depth + 1, _closed_by_name=True)
    return _value_code(value, depth, home, state)


# What Python sets on a class, or caches on it later (copyreg's __slotnames__ once an instance is pickled, abc's
# registry): not the notebook's code.
_SET_BY_PYTHON = frozenset({"__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__firstlineno__",
                            "__static_attributes__", "__annotations__", "__orig_bases__", "__parameters__",
                            "__slotnames__", "__abstractmethods__", "_abc_impl"})


def _attribute_code(item: Any, owner: type, depth: int, home: str, state: bool) -> Any:
    if isinstance(item, property):
        return ("property", *(definition_code(f, state, depth + 1) if f is not None else None
                              for f in (item.fget, item.fset, item.fdel)))
    if isinstance(item, (staticmethod, classmethod)):
        return (type(item).__name__, definition_code(item.__func__, state, depth + 1))
    if isinstance(item, type) and not item.__qualname__.startswith(owner.__qualname__ + "."):
        return f"{item.__module__}.{item.__qualname__}"  # (a class it refers to, defined elsewhere)
    func = getattr(item, "func", None)  # functools.cached_property, partialmethod, partial
    if func is not None and callable(func) and not inspect.isfunction(item):
        return (type(item).__name__, definition_code(func, state, depth + 1),
                _value_code(getattr(item, "args", ()), depth, home, state),
                _value_code(getattr(item, "keywords", {}), depth, home, state))
    if isinstance(item, type) or inspect.isfunction(item) or hasattr(item, "__wrapped__"):
        return definition_code(item, state, depth + 1)
    return _value_code(item, depth, home, state)


def _value_code(value: Any, depth: int, home: Optional[str] = None, state: bool = True, inside: bool = False) -> Any:
    """A plain value, compared by what it is (a new lock or a new empty dict in a class run again is the same). A
    function or class of ``home`` (the notebook's module) also by its code, one level deep, as an earlier definition
    of the same name may be what it holds; any other by name, as model.py imports it by that name. Without ``state``
    (definition_code), what a container holds or an object is counts only for the notebook code in it."""
    if depth > 8:
        return ("deep",)
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return (type(value).__name__, repr(value)) if state or not inside else None
    if isinstance(value, (tuple, list, set, frozenset, dict)):
        items = value.items() if isinstance(value, dict) else ((None, v) for v in value)
        codes = [(repr(k), code) for k, v in items
                 for code in [_value_code(v, depth + 1, home, state, inside=True)] if state or code is not None]
        if isinstance(value, (set, frozenset)):
            codes.sort(key=repr)
        return (type(value).__name__, tuple(codes)) if state or codes else None
    if inspect.isfunction(value) or isinstance(value, type):
        name = f"{value.__module__}.{value.__qualname__}"
        if home is not None and value.__module__ == home:
            return (name, definition_code(value, state, depth + 1, _closed_by_name=True))
        return name
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    if not state:
        return (kind,) if not inside else None
    return (kind, re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))[:500])


def _code_key(code) -> tuple:
    consts = tuple(_code_key(c) if inspect.iscode(c) else (type(c).__name__, repr(c)) for c in code.co_consts)
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
