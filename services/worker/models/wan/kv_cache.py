"""Per-block KV cache for chunked autoregression, with a rolling window and sink frames.

Keys are cached after RoPE, so a cached token carries its position with it and attention
over the cache does not depend on slot order. That lets the window roll as a ring: the
first ``sink`` tokens stay forever (LongLive's attention sink), the rest of the capacity is
a ring that overwrites the oldest frames. Nothing is ever moved; ``kv_ring_write`` is the
fused k+v scatter on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.registry import KernelOps


@dataclass(slots=True)
class KVCache:
    """The self-attention cache of every block of one session."""

    keys: list[torch.Tensor]  # per block, (B, sink + ring, heads, head_dim)
    values: list[torch.Tensor]
    sink: int  # tokens never evicted
    ring: int  # tokens in the rolling part
    n_written: int = 0  # tokens written so far (global count)

    @classmethod
    def empty(
        cls,
        layers: int,
        batch: int,
        heads: int,
        head_dim: int,
        sink_tokens: int,
        ring_tokens: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> KVCache:
        cap = sink_tokens + ring_tokens
        shape = (batch, cap, heads, head_dim)
        return cls(
            keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
            values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
            sink=sink_tokens,
            ring=ring_tokens,
        )

    @property
    def capacity(self) -> int:
        return self.sink + self.ring

    @property
    def valid(self) -> int:
        """Slots holding a token (the cache fills slots in order before it rolls)."""
        return min(self.n_written, self.capacity)

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.valid
        return self.keys[layer][:, :n], self.values[layer][:, :n]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, ops: KernelOps) -> None:
        """Write one chunk's keys/values of ``layer``; call ``advance`` after all layers."""
        ops.kv_ring_write(self.keys[layer], self.values[layer], k, v, self.sink, self.ring,
                          self.n_written)  # fmt: skip

    def advance(self, tokens: int) -> None:
        self.n_written += tokens
