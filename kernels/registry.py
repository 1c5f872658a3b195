"""Which implementation of each kernel runs: CuPy on a CUDA device, torch otherwise.

``ops(device)`` returns a ``KernelOps`` whose methods are the kernels for tensors on that
device. A ``KernelRegistry`` can be pinned to torch (``prefer="torch"``) so that a GPU run
can be compared against the reference, which is what the GPU tests and benchmarks do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Literal

import torch

from kernels import reference

Backend = Literal["torch", "cupy"]
Preference = Literal["auto", "torch", "cupy"]

# The kernels every backend provides, by name.
KERNEL_NAMES: tuple[str, ...] = (
    "sampler_update",
    "adaln_modulate",
    "rope_apply",
    "kv_ring_write",
    "decode_to_uint8",
    "rgb_to_yuv420",
)


@cache
def cupy_available() -> bool:
    """True when CuPy imports and sees a CUDA device that torch also sees."""
    if not torch.cuda.is_available():
        return False
    try:
        import cupy

        return bool(cupy.cuda.is_available())
    except Exception:  # no driver, wrong CUDA major: the torch path serves
        return False


@dataclass(frozen=True, slots=True)
class KernelOps:
    """The kernels of one backend, as plain callables."""

    backend: Backend
    sampler_update: Callable[..., torch.Tensor]
    adaln_modulate: Callable[..., torch.Tensor]
    rope_apply: Callable[..., torch.Tensor]
    kv_ring_write: Callable[..., None]
    decode_to_uint8: Callable[..., torch.Tensor]
    rgb_to_yuv420: Callable[..., torch.Tensor]


def _ops_from(module: ModuleType, backend: Backend) -> KernelOps:
    return KernelOps(backend, *(getattr(module, name) for name in KERNEL_NAMES))


@cache
def torch_ops() -> KernelOps:
    return _ops_from(reference, "torch")


@cache
def cupy_ops() -> KernelOps:
    from kernels import cupy_ops as module

    return _ops_from(module, "cupy")


@dataclass(frozen=True, slots=True)
class KernelRegistry:
    """Picks a backend per device: CuPy for CUDA tensors when available, else torch."""

    prefer: Preference = "auto"

    def backend_for(self, device: torch.device | str) -> Backend:
        dev = torch.device(device)
        if self.prefer == "torch" or dev.type != "cuda":
            if self.prefer == "cupy" and dev.type != "cuda":
                raise ValueError(f"CuPy kernels need a CUDA device, not {dev}")
            return "torch"
        if cupy_available():
            return "cupy"
        if self.prefer == "cupy":
            raise RuntimeError("CuPy kernels requested but CuPy sees no CUDA device")
        return "torch"

    def ops(self, device: torch.device | str) -> KernelOps:
        return cupy_ops() if self.backend_for(device) == "cupy" else torch_ops()


DEFAULT_REGISTRY = KernelRegistry()
