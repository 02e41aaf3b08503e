"""The Truss model contract, read from a class once: what to call and how.

Like Truss's ``MethodDescriptor``, async-ness, generator-ness and arity are
decided when the class is defined, and a bad signature is a
:class:`ModelDefinitionError` quoting the signature it got.
"""

from __future__ import annotations

import collections.abc
import inspect
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .errors import ModelDefinitionError
from .serialization import is_pydantic_class

__all__ = ["MethodSpec", "ModelContract", "init_kwargs", "INIT_KWARGS", "code_fingerprint"]

# The keyword arguments Truss may pass to ``Model.__init__``.
INIT_KWARGS = ("config", "data_dir", "secrets", "environment")


@dataclass(frozen=True)
class MethodSpec:
    """How to call one model method."""

    name: str
    is_async: bool
    is_generator: bool
    takes_input: bool

    @classmethod
    def of(cls, model_class: type, name: str) -> Optional["MethodSpec"]:
        fn = getattr(model_class, name, None)
        if fn is None:
            return None
        if not callable(fn):
            raise ModelDefinitionError(f"`{model_class.__name__}.{name}` must be a method, not {type(fn).__name__}.")
        params = _params_after_self(fn)
        if name == "load" and params:
            raise ModelDefinitionError(
                f"`{model_class.__name__}.load` must take no arguments besides self; got load{_signature(fn)}. "
                "Read what load needs from the config, data_dir or secrets passed to __init__."
            )
        if name != "load" and len(params) > 1:
            raise ModelDefinitionError(
                f"`{model_class.__name__}.{name}` must take one argument (the model input) besides self; "
                f"got {name}{_signature(fn)}."
            )
        return cls(
            name=name,
            is_async=inspect.iscoroutinefunction(fn),
            is_generator=inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn),
            takes_input=bool(params),
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

    @classmethod
    def inspect(cls, model_class: Any) -> "ModelContract":
        """Check ``model_class`` against the Truss contract; raise ModelDefinitionError if it breaks it."""
        if not isinstance(model_class, type):
            raise ModelDefinitionError(f"The model must be a class, not {type(model_class).__name__}.")
        predict = MethodSpec.of(model_class, "predict")
        if predict is None:
            raise ModelDefinitionError(
                f"`{model_class.__name__}` has no `predict` method. Add `def predict(self, model_input):` "
                "returning the prediction."
            )
        preprocess = MethodSpec.of(model_class, "preprocess")
        # Truss validates the request against the first method that receives it.
        first = "preprocess" if preprocess else "predict"
        return cls(
            model_class=model_class,
            predict=predict,
            load=MethodSpec.of(model_class, "load"),
            preprocess=preprocess,
            postprocess=MethodSpec.of(model_class, "postprocess"),
            input_type=_pydantic_input_type(getattr(model_class, first)),
        )

    def truss_schema(self) -> Optional[dict]:
        """What Truss's ``/schema`` route answers, or None when predict is not annotated."""
        last = getattr(self.model_class, "postprocess" if self.postprocess else "predict")
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


def _code_key(code) -> tuple:
    consts = tuple(_code_key(c) if inspect.iscode(c) else (type(c).__name__, repr(c)) for c in code.co_consts)
    return (code.co_code, code.co_names, code.co_varnames, code.co_freevars, code.co_argcount, consts)


def _params_after_self(fn: Callable) -> list[inspect.Parameter]:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return []
    if isinstance(inspect.getattr_static(fn, "__self__", None), type) or inspect.ismethod(fn):
        return params  # classmethod: already bound
    params = params[1:] if params and params[0].kind in (
        inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) else params
    return [p for p in params if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
            and p.default is inspect.Parameter.empty]


def _signature(fn: Callable) -> str:
    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(...)"


def _pydantic_input_type(fn: Callable) -> Optional[type]:
    params = _params_after_self(fn)
    if not params:
        return None
    annotation = params[0].annotation
    if isinstance(annotation, str):
        try:
            annotation = typing.get_type_hints(fn).get(params[0].name, annotation)
        except Exception:
            return None
    return annotation if is_pydantic_class(annotation) else None
