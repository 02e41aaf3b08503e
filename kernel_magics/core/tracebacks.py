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
    """The part of ``tb`` from the first frame that is user code (all of it if none is)."""
    start = tb
    while start is not None and _is_plumbing(start.tb_frame.f_code.co_filename):
        start = start.tb_next
    return start if start is not None else tb


def trim_traceback(exc: BaseException) -> BaseException:
    """Cut our leading frames off ``exc``'s traceback, in place; returns ``exc``."""
    exc.__traceback__ = user_traceback(exc.__traceback__)
    return exc
