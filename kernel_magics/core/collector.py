"""Python's cyclic garbage collector around a model's import and load, in the processes that only serve or check.

Importing torch and transformers makes about half a million objects that live as long as the process. While
they are made, each growth of a quarter triggers a full collection that walks all of them again: about 1 s of
the 5 s those imports take here. Once they are made, every later full collection still walks them: a stall of
about 300 ms on a server's event loop every few thousand requests. Neither is done in the kernel, which
unloads and reloads and where the user's own code runs.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator

__all__ = ["imports_uncollected", "freeze_what_loaded"]


@contextlib.contextmanager
def imports_uncollected() -> Iterator[None]:
    """No cyclic collection while model.py (or the imports it starts with) runs; as it was afterwards.

    Imports leave little cyclic garbage (what they make, they keep), so memory does not grow for it; the
    next collection after this block finds whatever there is."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def freeze_what_loaded() -> None:
    """Leave what the import and the load made to reference counting, out of every later collection's walk.

    For a process that loads once (a server, a replica). Collected first, so the load's cyclic garbage is
    freed rather than kept for good."""
    gc.collect()
    gc.freeze()
