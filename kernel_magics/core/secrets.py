"""Secret values, resolved at run time and never stored on disk.

Mirrors Truss's ``Secrets`` mapping: names come from the config; values from
values set in memory (``%model_secret``), a mounted secrets directory (one
file per secret, as Truss mounts ``/secrets``) or ``TRUSS_SECRET_<name>``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Optional

from .errors import SecretNotFound

__all__ = ["SecretStore", "ENV_PREFIX"]

ENV_PREFIX = "TRUSS_SECRET_"


class SecretStore(Mapping):
    """A read-only mapping of secret name to value, passed to the model as ``secrets``.

    ``hint`` ends the "no value" message with how to provide one in the current
    adapter (``%model_secret NAME`` in a notebook, ``--secrets-dir`` for a server).
    """

    def __init__(
        self,
        names: Iterable[str] = (),
        *,
        secrets_dir: Optional[Path] = None,
        hint: str = "",
        defaults: Optional[Mapping[str, str]] = None,
    ) -> None:
        self._names = list(dict.fromkeys(names))
        self._overrides: dict[str, str] = {}
        # Values written in a config.yaml made elsewhere: the lowest priority, as in Truss.
        self._defaults: dict[str, str] = dict(defaults or {})
        self._secrets_dir = Path(secrets_dir) if secrets_dir else None
        self._hint = hint
        self._handed_out: set[str] = set()  # values given to the model, to scrub from logs

    # Names may change when the config cell is re-run; values set in memory stay.
    def set_names(self, names: Iterable[str]) -> None:
        self._names = list(dict.fromkeys(names))

    def set_value(self, name: str, value: str) -> None:
        """Keep a value in memory only (what ``%model_secret`` does)."""
        self._overrides[name] = value

    def source_of(self, name: str) -> Optional[str]:
        """Where the value of ``name`` comes from, or None when it has none. Never the value."""
        if name in self._overrides:
            return "set in this session"
        if self._secrets_dir and (self._secrets_dir / name).is_file():
            return f"file {self._secrets_dir / name}"
        if os.environ.get(ENV_PREFIX + name):
            return f"environment variable {ENV_PREFIX}{name}"
        if self._defaults.get(name):
            return "the default in config.yaml"
        return None

    def __getitem__(self, name: str) -> str:
        if name not in self._names:
            raise SecretNotFound(
                f"Secret '{name}' is not declared in the config. Add `{name}: null` under `secrets:` "
                f"in the config so the deployment knows to provide it."
            )
        value = self._resolve(name)
        if value:
            self._handed_out.add(value)
            return value
        hint = f" {self._hint.format(name=name)}" if self._hint else ""
        raise SecretNotFound(
            f"Secret '{name}' has no value: set the environment variable {ENV_PREFIX}{name}{hint}."
        )

    def _resolve(self, name: str) -> Optional[str]:
        if name in self._overrides:
            return self._overrides[name]
        if self._secrets_dir and (self._secrets_dir / name).is_file():
            return (self._secrets_dir / name).read_text()
        return os.environ.get(ENV_PREFIX + name) or self._defaults.get(name) or None

    def known_values(self) -> set[str]:
        """Every value a secret has or had here (for redaction; never shown)."""
        values = set(self._handed_out) | set(self._overrides.values()) | set(self._defaults.values())
        for name in self._names:
            try:
                value = self._resolve(name)
            except OSError:
                value = None
            if value:
                values.add(value)
        return values

    def redact(self, text: str) -> str:
        """``text`` with every secret value replaced by ``***``: the one redaction every display and log uses.

        Values shorter than 4 characters are left alone: replacing them would mangle ordinary text
        and hide nothing worth hiding.
        """
        for value in sorted(self.known_values(), key=len, reverse=True):
            if len(value) >= 4:
                text = text.replace(value, "***")
        return text

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        # Names and whether they are set; values never.
        state = ", ".join(f"{n}: {'set' if self.source_of(n) else 'not set'}" for n in self._names)
        return f"SecretStore({state})"
