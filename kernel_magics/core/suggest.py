"""The option a mistyped one most likely meant, for the CLI's and the magics' usage errors."""

from __future__ import annotations

import difflib
from typing import Iterable, Sequence

__all__ = ["did_you_mean"]


def did_you_mean(typed: Sequence[str], known: Iterable[str]) -> str:
    """`` (did you mean --port?)`` for the options in ``typed`` (words starting with ``-``, ``=value`` allowed) that
    are near misses of ``known`` ones; ``""`` when none is."""
    known = list(known)
    options = [word.split("=")[0] for word in typed if word.startswith("-")]
    near = [m for word in options if word not in known for m in difflib.get_close_matches(word, known, n=1, cutoff=0.6)]
    return f" (did you mean {' or '.join(dict.fromkeys(near))}?)" if near else ""
