"""GPU detection, device choice and memory, through torch when it is there.

torch is imported only when a caller asks about a specific device or torch is
already imported by the model, so models without torch never pay for it.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import re
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from .errors import KernelMagicsError

__all__ = ["GpuInfo", "list_gpus", "guess_gpu", "resolve_device", "default_device", "describe_device",
           "infer_device", "memory_stats", "free_memory"]

_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    total_bytes: int


def _torch(required: bool = False):
    if "torch" in sys.modules:
        return sys.modules["torch"]
    if required and importlib.util.find_spec("torch") is not None:
        import torch
        return torch
    return None


def list_gpus() -> list[GpuInfo]:
    """The CUDA devices torch can see (empty without torch or without a GPU)."""
    torch = _torch(required=True)
    if torch is None or not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append(GpuInfo(i, props.name, int(props.total_memory)))
    return out


def guess_gpu() -> Optional[str]:
    """``cuda:0`` when torch is already imported and sees a GPU, else None (never imports torch)."""
    torch = _torch()
    return "cuda:0" if torch is not None and torch.cuda.is_available() else None


def resolve_device(spec: str) -> Optional[str]:
    """Turn ``auto|cpu|cuda|cuda:N`` into a concrete device name.

    ``auto``: the kernel's first GPU when the notebook already uses torch and one
    is there, ``cpu`` when it uses torch without a GPU, and None (the model
    chooses, as in a deployment) when torch is not imported: a model without
    torch should not pay torch's import time.
    """
    spec = (spec or "auto").strip().lower()
    if not _DEVICE.fullmatch(spec):
        raise KernelMagicsError(f"Unknown device {spec!r}: use auto, cpu, cuda or cuda:N (for example cuda:0).")
    if spec == "auto":
        if _torch() is None:
            return None
        return guess_gpu() or "cpu"
    if spec == "cpu":
        return "cpu"
    gpus = list_gpus()
    if not gpus:
        raise KernelMagicsError(
            f"Device {spec!r} was asked for, but this kernel has no CUDA GPU "
            "(torch is missing or torch.cuda.is_available() is False). Use --device cpu or --device auto."
        )
    index = int(spec.split(":")[1]) if ":" in spec else 0
    if index >= len(gpus):
        raise KernelMagicsError(f"Device {spec!r} does not exist: this kernel sees {len(gpus)} GPU(s), cuda:0 to cuda:{len(gpus) - 1}.")
    return f"cuda:{index}"


@contextlib.contextmanager
def default_device(device: Optional[str]) -> Iterator[None]:
    """Make ``device`` torch's default device in this thread (no-op for None or without torch)."""
    torch = _torch(required=device is not None)
    if device is None or torch is None:
        yield
        return
    with torch.device(device):
        yield


def infer_device(obj: Any) -> Optional[str]:
    """The device of the first torch module or tensor among ``obj``'s attributes, if any."""
    torch = _torch()
    if torch is None or obj is None:
        return None
    for value in vars(obj).values() if hasattr(obj, "__dict__") else ():
        if isinstance(value, torch.nn.Module):
            for tensor in value.parameters():
                return str(tensor.device)
            for tensor in value.buffers():
                return str(tensor.device)
        elif isinstance(value, torch.Tensor):
            return str(value.device)
    return None


def describe_device(device: Optional[str]) -> str:
    """``cuda:0 · NVIDIA H100 80GB`` or ``cpu``."""
    if not device:
        return "cpu"
    torch = _torch()
    if device.startswith("cuda") and torch is not None and torch.cuda.is_available():
        index = int(device.split(":")[1]) if ":" in device else 0
        return f"cuda:{index} · {torch.cuda.get_device_name(index)}"
    return device


def memory_stats(device: Optional[str]) -> Optional[dict[str, int]]:
    """Allocated, reserved and total bytes of a CUDA device; None on CPU or without torch."""
    torch = _torch()
    if not device or not device.startswith("cuda") or torch is None or not torch.cuda.is_available():
        return None
    index = int(device.split(":")[1]) if ":" in device else 0
    return {
        "allocated": int(torch.cuda.memory_allocated(index)),
        "reserved": int(torch.cuda.memory_reserved(index)),
        "total": int(torch.cuda.get_device_properties(index).total_memory),
    }


def free_memory() -> None:
    """Collect garbage and return cached CUDA blocks to the driver."""
    gc.collect()
    torch = _torch()
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
