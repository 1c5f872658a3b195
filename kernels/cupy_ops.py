"""CuPy launches of the RawKernels in ``kernels/cuda/`` on torch CUDA tensors.

Tensors are passed by device pointer (no copies) and every launch goes on torch's current
stream, so these calls order correctly with the surrounding torch work. Only imported by
the registry when a CUDA device is present; each function mirrors ``kernels.reference``.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
import torch

from kernels.reference import launch_grid, rope_split
from kernels.sources import source_by_name

_BLOCK = 256


@cache
def _module(name: str, device_index: int) -> Any:
    import cupy

    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=source_by_name(name).text(), options=("--std=c++17",))


def _function(name: str, entry: str, t: torch.Tensor) -> Any:
    return _module(name, t.device.index or 0).get_function(entry)


def _suffix(t: torch.Tensor) -> str:
    if t.dtype == torch.float32:
        return "f32"
    if t.dtype == torch.bfloat16:
        return "bf16"
    raise TypeError(f"kernels take float32 or bfloat16 tensors, got {t.dtype}")


def _ptr(t: torch.Tensor | None) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


def _launch(fn: Any, t: torch.Tensor, grid: int, block: int, args: tuple[Any, ...]) -> None:
    import cupy

    stream = torch.cuda.current_stream(t.device)
    with cupy.cuda.Device(t.device.index or 0), cupy.cuda.ExternalStream(stream.cuda_stream):
        fn((grid,), (block,), args)


def sampler_update(
    x: torch.Tensor,
    flow: torch.Tensor,
    sigma: float,
    sigma_next: float,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    x, flow = x.contiguous(), flow.to(x.dtype).contiguous()
    noise = None if noise is None else noise.to(x.dtype).contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    fn = _function("sampler_update", f"sampler_update_{_suffix(x)}", x)
    args = (
        _ptr(x), _ptr(flow), _ptr(noise), _ptr(out), np.float32(sigma),
        np.float32(sigma_next), np.int32(noise is not None), np.int64(n),
    )  # fmt: skip
    _launch(fn, x, launch_grid(n, _BLOCK), _BLOCK, args)
    return out


def adaln_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    b, f, s, c = x.shape
    x = x.contiguous()
    shift = shift.float().contiguous()
    scale = scale.float().contiguous()
    out = torch.empty_like(x)
    fn = _function("adaln_modulate", f"adaln_modulate_{_suffix(x)}", x)
    args = (_ptr(x), _ptr(shift), _ptr(scale), _ptr(out), np.int32(s), np.int32(c),
            np.float32(eps))  # fmt: skip
    _launch(fn, x, b * f * s, _BLOCK, args)
    return out


def rope_apply(
    x: torch.Tensor,
    tables: tuple[torch.Tensor, ...],
    frames: int,
    height: int,
    width: int,
) -> torch.Tensor:
    _, length, heads, d = x.shape
    x = x.contiguous()
    tabs = [t.float().contiguous() for t in tables]
    nf, nh, nw = rope_split(d)
    out = torch.empty_like(x)
    total_pairs = x.numel() // 2
    fn = _function("rope_apply", f"rope_apply_{_suffix(x)}", x)
    args = (
        _ptr(x), _ptr(out), *(_ptr(t) for t in tabs), np.int32(height), np.int32(width),
        np.int32(heads), np.int32(d), np.int32(nf), np.int32(nh), np.int32(nw),
        np.int64(total_pairs), np.int64(length),
    )  # fmt: skip
    _launch(fn, x, launch_grid(total_pairs, _BLOCK), _BLOCK, args)
    return out


def kv_ring_write(
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    sink: int,
    ring: int,
    n_written: int,
) -> None:
    _, n_new, heads, d = new_k.shape
    if n_written + n_new > sink and n_new > ring:
        raise ValueError(f"kv window: writing {n_new} tokens into a ring of {ring}")
    new_k = new_k.to(cache_k.dtype).contiguous()
    new_v = new_v.to(cache_v.dtype).contiguous()
    total = new_k.numel()
    fn = _function("kv_ring_write", f"kv_ring_write_{_suffix(cache_k)}", cache_k)
    args = (
        _ptr(cache_k), _ptr(cache_v), _ptr(new_k), _ptr(new_v), np.int64(n_new),
        np.int64(heads * d), np.int64(sink), np.int64(max(ring, 1)), np.int64(n_written),
        np.int64(total),
    )  # fmt: skip
    _launch(fn, cache_k, launch_grid(total, _BLOCK), _BLOCK, args)


def decode_to_uint8(rgb: torch.Tensor) -> torch.Tensor:
    b, _, h, w = rgb.shape
    rgb = rgb.contiguous()
    out = torch.empty((b, h, w, 3), dtype=torch.uint8, device=rgb.device)
    total = out.numel()
    fn = _function("decode_tail", f"decode_to_uint8_{_suffix(rgb)}", rgb)
    args = (_ptr(rgb), _ptr(out), np.int64(h * w), np.int64(total))
    _launch(fn, rgb, launch_grid(total, _BLOCK), _BLOCK, args)
    return out


def rgb_to_yuv420(rgb: torch.Tensor) -> torch.Tensor:
    b, h, w, _ = rgb.shape
    if h % 2 or w % 2:
        raise ValueError(f"I420 needs even height and width, got {h}x{w}")
    rgb = rgb.contiguous()
    out = torch.empty((b, h * w * 3 // 2), dtype=torch.uint8, device=rgb.device)
    blocks = b * (h // 2) * (w // 2)
    fn = _function("decode_tail", "rgb_to_yuv420", rgb)
    args = (_ptr(rgb), _ptr(out), np.int32(h), np.int32(w), np.int64(blocks))
    _launch(fn, rgb, launch_grid(blocks, _BLOCK), _BLOCK, args)
    return out
