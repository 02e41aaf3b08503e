"""One prediction from a Truss directory, as ``truss predict`` gives one: load, answer, stop.

The same TrussDir and ModelHost as the server, so the answer is the one a request
would get: a result as one JSON line, a stream chunk by chunk as it is produced.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import KernelMagicsError

__all__ = ["predict_once", "ModelFailed"]


class ModelFailed(KernelMagicsError):
    """The model's own code raised while loading or predicting; ``traceback_text`` holds its frames."""

    def __init__(self, message: str, traceback_text: str) -> None:
        super().__init__(message)
        self.traceback_text = traceback_text


def predict_once(root: Path, model_input: Any, *, write: Callable[[bytes], None],
                 secrets_dir: Optional[Path] = None) -> None:
    """Load the directory's model and hand its answer to ``write`` as bytes: the result's JSON and a
    newline, or each chunk of a stream as it comes (text as UTF-8, other chunks as JSON lines)."""
    from .truss_dir import TrussDir

    truss = TrussDir.open(root)
    secrets_dir = Path(secrets_dir).resolve() if secrets_dir is not None else None
    with truss.as_working_directory():
        _predict_in_root(truss, model_input, write, secrets_dir)


def _predict_in_root(truss: Any, model_input: Any, write: Callable[[bytes], None], secrets_dir: Optional[Path]) -> None:
    from .runtime import ChunkStream
    from .serialization import is_response
    from .streams import chunk_bytes
    from .tracebacks import trim_traceback

    try:
        host = truss.host(secrets_dir=secrets_dir, hint="or put a file named {name} in the --secrets-dir folder")
    except KernelMagicsError:
        raise
    except Exception as exc:  # model.py itself failed at import: the user's frames, then one line
        import traceback

        raise ModelFailed(f"importing model/model.py raised {type(exc).__name__}: {exc}. "
                          f"{_what_to_fix(exc, 'model.py')} (its traceback is above).",
                          "".join(traceback.format_exception(trim_traceback(exc)))) from None
    try:
        host.load()
    except KernelMagicsError:
        raise
    except Exception as exc:
        raise ModelFailed(f"load() failed: {host.describe_error(exc)}. {_what_to_fix(exc, 'load()')} (its traceback "
                          "is above).", host.format_error(trim_traceback(exc))) from None

    async def answer() -> None:
        # encoded: the bytes the server sends (a Pydantic result as its own JSON), so predict == serve
        result = await host.predict(model_input, encoded=True)
        if isinstance(result, ChunkStream):
            async with result:
                async for chunk in result:
                    write(chunk_bytes(chunk))
        elif is_response(result):
            write(bytes(getattr(result, "body", b"") or b""))
        else:
            write(bytes(result) + b"\n")

    try:
        asyncio.run(answer())
    except KernelMagicsError:
        raise
    except Exception as exc:
        raise ModelFailed(f"predict failed: {host.describe_error(exc)} (its traceback is above).",
                          host.format_error(trim_traceback(exc))) from None
    finally:
        host.unload()


def _what_to_fix(exc: BaseException, code: str) -> str:
    """The sentence that says what to change in ``code``, or which file to put back."""
    from .truss_dir import missing_file_advice

    if isinstance(exc, FileNotFoundError) and exc.filename:
        return missing_file_advice(code, code, exc.filename)
    return f"Fix {code}"
