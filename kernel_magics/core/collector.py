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
    """No automatic cyclic collection while model.py (or the imports it starts with) runs; as before afterwards.

    model.py is its imports, the saved values it loads and whatever else its top level does: the first two
    leave little cyclic garbage (what they make, they keep); the next collection after this block finds what
    there is. The collector's first threshold is set to 0 (which stops automatic collections) rather than
    ``gc.disable()``, so a model.py that calls ``gc.disable()`` or sets thresholds of its own keeps them, as
    under Truss's server: the threshold comes back only if it is still the 0 set here."""
    before = gc.get_threshold()
    paused = (0, *before[1:])
    gc.set_threshold(*paused)
    try:
        yield
    finally:
        if gc.get_threshold() == paused:
            gc.set_threshold(*before)


def freeze_what_loaded() -> None:
    """Leave what the import and the load made to reference counting, out of every later collection's walk.

    For a process that loads once (a server, a replica), before it says ready. Collected first, so the load's
    cyclic garbage is freed rather than kept for good. The price: a reference cycle among these objects that
    the model drops later stays in memory (``gc.unfreeze()`` after dropping it gives it back to the collector)."""
    gc.collect()
    gc.freeze()
