"""Show users their own frames: drop the plumbing between our code and theirs."""

from __future__ import annotations

import os
import sysconfig
from types import TracebackType
from typing import Optional

__all__ = ["user_traceback", "trim_traceback"]

# The whole kernel_magics package (this file is in its core/).
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
# Threads, asyncio and concurrent.futures sit between the runtime and user code.
_STDLIB_DIR = os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep


def _is_plumbing(filename: str) -> bool:
    if filename.startswith("<frozen "):  # importlib between TrussDir and a model.py that fails at import
        return True
    path = os.path.abspath(filename)
    return path.startswith(_PACKAGE_DIR) or (
        path.startswith(_STDLIB_DIR) and "site-packages" not in path
    )


def user_traceback(tb: Optional[TracebackType]) -> Optional[TracebackType]:
    """The part of ``tb`` from the first frame that is user code. When no frame is: nothing for an exception
    the batcher handed over (``predict_batch`` returned it in a slot, or returned the wrong number of results:
    the model has no frame in it, only ours would show), else all of it (our own failure: its frames help)."""
    start = _first_user_frame(tb)
    if start is not None:
        return start
    return None if _handed_over(tb) is not None else tb


def trim_traceback(exc: BaseException) -> BaseException:
    """Cut our leading frames off ``exc``'s traceback, in place; returns ``exc``. An exception the batcher
    handed over keeps only the hand-over's frames: what the raise adds above them later is not the user's
    either, and a later :func:`user_traceback` must still know to show nothing."""
    tb = exc.__traceback__
    exc.__traceback__ = _first_user_frame(tb) or _handed_over(tb) or tb
    return exc


def _first_user_frame(tb: Optional[TracebackType]) -> Optional[TracebackType]:
    while tb is not None and _is_plumbing(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    return tb


def _handed_over(tb: Optional[TracebackType]) -> Optional[TracebackType]:
    """The entry where the batcher gave a caller its result's exception, if ``tb`` passes there."""
    from .batching import Batcher  # standard library only: no cost

    while tb is not None and tb.tb_frame.f_code is not Batcher.submit.__code__:
        tb = tb.tb_next
    return tb
