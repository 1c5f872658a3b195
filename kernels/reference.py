"""Torch reference implementations of every kernel: the CPU path and the GPU oracle.

Each function here defines the exact semantics its CuPy twin in ``kernels/cupy_ops.py``
must reproduce (within tolerance for float math, bit-exactly for the integer tails).
"""

from __future__ import annotations

import math

import torch


def sampler_update(
    x: torch.Tensor,
    flow: torch.Tensor,
    sigma: float,
    sigma_next: float,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """Few-step flow-matching update: x0 = x - sigma * flow, re-noised to ``sigma_next``.

    With ``noise`` None the result is x0 (the last step of a chunk); float32 math.
    """
    x0 = x.float() - sigma * flow.float()
    if noise is None:
        return x0.to(x.dtype)
    out = (1.0 - sigma_next) * x0 + sigma_next * noise.float()
    return out.to(x.dtype)


def adaln_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """LayerNorm over channels (no affine), then ``* (1 + scale) + shift`` per frame.

    x: (B, F, S, C); shift, scale: (B, F, C) float32. Returns x's dtype.
    """
    normed = torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    out = normed * (1.0 + scale.float().unsqueeze(2)) + shift.float().unsqueeze(2)
    return out.to(x.dtype)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Pairs of the head dimension rotated by frame, row and column (22/21/21 for 128)."""
    pairs = head_dim // 2
    third = pairs // 3
    return pairs - 2 * third, third, third


def rope_tables(
    head_dim: int,
    frame_offset: int,
    frames: int,
    height: int,
    width: int,
    theta: float = 10000.0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, ...]:
    """cos/sin tables (float32) for the frame, row and column axes.

    Axis k with ``n`` pairs rotates pair j by ``pos * theta ** (-2j / (2n))``; angles are
    computed in float64 so that large frame positions keep their precision.
    """
    nf, nh, nw = rope_split(head_dim)
    tables: list[torch.Tensor] = []
    for start, count, n in ((frame_offset, frames, nf), (0, height, nh), (0, width, nw)):
        inv = 1.0 / theta ** (torch.arange(n, dtype=torch.float64) * 2.0 / (2 * n))
        pos = torch.arange(start, start + count, dtype=torch.float64)
        ang = torch.outer(pos, inv)
        tables.append(torch.cos(ang).float().to(device))
        tables.append(torch.sin(ang).float().to(device))
    return tuple(tables)


def rope_apply(
    x: torch.Tensor,
    tables: tuple[torch.Tensor, ...],
    frames: int,
    height: int,
    width: int,
) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, L, H, D), L = frames * height * width."""
    cos_f, sin_f, cos_h, sin_h, cos_w, sin_w = tables
    b, length, heads, d = x.shape
    if length != frames * height * width:
        raise ValueError(f"rope: {length} tokens != {frames}x{height}x{width}")
    nf, nh, nw = cos_f.shape[1], cos_h.shape[1], cos_w.shape[1]
    grid = (frames, height, width)
    cos = torch.cat(
        [
            cos_f[:, None, None, :].expand(*grid, nf),
            cos_h[None, :, None, :].expand(*grid, nh),
            cos_w[None, None, :, :].expand(*grid, nw),
        ],
        dim=-1,
    ).reshape(1, length, 1, d // 2)
    sin = torch.cat(
        [
            sin_f[:, None, None, :].expand(*grid, nf),
            sin_h[None, :, None, :].expand(*grid, nh),
            sin_w[None, None, :, :].expand(*grid, nw),
        ],
        dim=-1,
    ).reshape(1, length, 1, d // 2)
    pairs = x.float().reshape(b, length, heads, d // 2, 2)
    a, c = pairs[..., 0], pairs[..., 1]
    out = torch.stack((a * cos - c * sin, a * sin + c * cos), dim=-1)
    return out.reshape(b, length, heads, d).to(x.dtype)


def ring_slots(n_new: int, sink: int, ring: int, n_written: int) -> torch.Tensor:
    """Cache slots of the next ``n_new`` tokens: sink slots first, then a ring."""
    g = torch.arange(n_written, n_written + n_new, dtype=torch.long)
    return torch.where(g < sink, g, sink + (g - sink) % max(ring, 1))


def kv_ring_write(
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    sink: int,
    ring: int,
    n_written: int,
) -> None:
    """Write new_k/new_v (B, n, H, D) into the caches (B, sink + ring, H, D) in place."""
    n_new = new_k.shape[1]
    if n_written + n_new > sink and n_new > ring:
        raise ValueError(f"kv window: writing {n_new} tokens into a ring of {ring}")
    slots = ring_slots(n_new, sink, ring, n_written).to(cache_k.device)
    cache_k.index_copy_(1, slots, new_k.to(cache_k.dtype))
    cache_v.index_copy_(1, slots, new_v.to(cache_v.dtype))


def decode_to_uint8(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] to (B, H, W, 3) uint8: clamp, scale, round half to even."""
    v = rgb.float().clamp(-1.0, 1.0)
    return ((v + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def rgb_to_yuv420(rgb: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 to planar I420 (B, H * W * 3 // 2), BT.601 limited range."""
    b, h, w, _ = rgb.shape
    if h % 2 or w % 2:
        raise ValueError(f"I420 needs even height and width, got {h}x{w}")
    px = rgb.to(torch.int32)
    r, g, bl = px[..., 0], px[..., 1], px[..., 2]
    y = ((66 * r + 129 * g + 25 * bl + 128) >> 8) + 16
    sums = px.reshape(b, h // 2, 2, w // 2, 2, 3).sum(dim=(2, 4))
    avg = (sums + 2) >> 2
    ar, ag, ab = avg[..., 0], avg[..., 1], avg[..., 2]
    u = ((-38 * ar - 74 * ag + 112 * ab + 128) >> 8) + 128
    v = ((112 * ar - 94 * ag - 18 * ab + 128) >> 8) + 128
    return torch.cat([y.reshape(b, -1), u.reshape(b, -1), v.reshape(b, -1)], dim=1).to(torch.uint8)


def launch_grid(total: int, block: int = 256, max_blocks: int = 65535 * 8) -> int:
    """Blocks for a grid-stride loop over ``total`` elements."""
    return max(1, min(max_blocks, math.ceil(total / block)))
