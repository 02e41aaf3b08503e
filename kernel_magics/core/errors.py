"""Exceptions raised by kernel_magics.

``KernelMagicsError`` and its subclasses are *user mistakes*: their message is
one paragraph saying what happened and what to change, and adapters show it
without a traceback (``UsageError`` in the kernel, a non-zero exit in the CLI,
a 4xx body in the server). Errors raised by the user's own code are never
wrapped in these; they keep their type and their (trimmed) traceback.
"""

from __future__ import annotations

from typing import Optional

__all__ = [
    "KernelMagicsError",
    "ConfigError",
    "ModelDefinitionError",
    "ModelNotReadyError",
    "SecretNotFound",
    "InputValidationError",
    "NotSerializableError",
    "in_words",
]


def in_words(items: list[str]) -> str:
    """Several things named in one sentence of a message: `a`, `a and b`, `a, b and c`."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


class KernelMagicsError(Exception):
    """A mistake the user can fix; the message says how."""


class PortUnavailable(KernelMagicsError):
    """`kernel-magics serve` cannot listen on the host and port it was given."""


class ConfigError(KernelMagicsError):
    """config.yaml (or a ``%%model_config`` cell) is not valid."""


class ModelDefinitionError(KernelMagicsError):
    """The model class does not follow the Truss contract."""


class ModelNotReadyError(KernelMagicsError):
    """An operation needs a defined or loaded model that is not there."""


class SecretNotFound(KernelMagicsError, KeyError):
    """A secret was read that has no value (or is not declared in the config).

    Subclasses ``KeyError`` so ``secrets.get(name)`` style code in a model works
    as it does with a plain mapping.
    """

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InputValidationError(KernelMagicsError):
    """The model input failed validation against predict's Pydantic input type."""

    def __init__(self, message: str, errors: Optional[list] = None) -> None:
        super().__init__(message)
        self.errors = errors or []  # pydantic's error dicts (loc, msg), for Truss's response text


class NotSerializableError(KernelMagicsError):
    """A prediction cannot be turned into JSON (the server would reject it)."""

    def __init__(self, message: str, truss_message: str = "", truss_type: str = "TypeError") -> None:
        super().__init__(message)
        self.truss_message = truss_message or message  # what Truss's server says about the same value
        self.truss_type = truss_type  # and the exception it names (json.dumps's)
