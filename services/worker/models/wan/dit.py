"""The Wan2.1 diffusion transformer in causal, chunked form.

Parameter names follow the original Wan checkpoints exactly (``patch_embedding``,
``text_embedding.0``, ``blocks.N.self_attn.q`` ...), so a Wan / CausVid / Self-Forcing /
LongLive state dict loads without renaming. One call denoises one chunk of latent frames
attending to the per-block KV cache of earlier chunks; with ``write_cache`` the chunk's
keys and values are committed to the cache (the clean pass after the last step).

The residual stream and the adaLN modulation run in float32, the linear layers in the
model dtype (bfloat16 on a GPU), as in the reference implementation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels.reference import rope_tables
from kernels.registry import KernelOps
from services.worker.models.wan.action import ActionModule, ChunkActions
from services.worker.models.wan.config import DiTConfig
from services.worker.models.wan.kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """(N,) timesteps to (N, dim) float32: [cos | sin] of t * 10000^(-i / half)."""
    half = dim // 2
    pos = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    ang = torch.outer(pos, freqs)
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=1).float()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, Lq, H, D) x (B, Lk, H, D) -> (B, Lq, H, D), no mask."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, ...],
        grid: tuple[int, int, int],
        cache: KVCache,
        layer: int,
        write_cache: bool,
        ops: KernelOps,
    ) -> torch.Tensor:
        b, length, dim = x.shape
        shape = (b, length, self.heads, dim // self.heads)
        q = ops.rope_apply(self.norm_q(self.q(x)).view(shape), rope, *grid)
        k = ops.rope_apply(self.norm_k(self.k(x)).view(shape), rope, *grid)
        v = self.v(x).view(shape)
        past_k, past_v = cache.read(layer)
        if past_k.shape[1]:
            out = attention(q, torch.cat([past_k.to(k.dtype), k], 1),
                            torch.cat([past_v.to(v.dtype), v], 1))  # fmt: skip
        else:
            out = attention(q, k, v)
        if write_cache:
            cache.write(layer, k, v, ops)
        return self.o(out.reshape(b, length, dim))


class CrossAttention(nn.Module):
    """Text cross-attention; the context's keys/values are computed once per prompt."""

    def __init__(self, dim: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, dim = context.shape
        shape = (b, n, self.heads, dim // self.heads)
        return self.norm_k(self.k(context)).view(shape), self.v(context).view(shape)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, length, dim = x.shape
        q = self.norm_q(self.q(x)).view(b, length, self.heads, dim // self.heads)
        k, v = kv
        if k.shape[0] != b:
            k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
        return self.o(attention(q, k, v).reshape(b, length, dim))


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig, index: int) -> None:
        super().__init__()
        dim = cfg.dim
        self.eps = cfg.eps
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.eps)
        self.norm3 = LayerNorm32(dim, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.eps)
        self.ffn = nn.Sequential(
            nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)
        self.action_model: ActionModule | None = None
        if cfg.action is not None and index in cfg.action.blocks:
            self.action_model = ActionModule(cfg.action, dim)

    def forward(
        self,
        x: torch.Tensor,
        e6: torch.Tensor,
        context_kv: tuple[torch.Tensor, torch.Tensor],
        rope: tuple[torch.Tensor, ...],
        grid: tuple[int, int, int],
        cache: KVCache,
        layer: int,
        write_cache: bool,
        actions: ChunkActions | None,
        ops: KernelOps,
    ) -> torch.Tensor:
        b, length, dim = x.shape
        f = grid[0]
        per_frame = (b, f, length // f, dim)
        mod = self.modulation.float().unsqueeze(1) + e6  # (B, F, 6, dim)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(2)
        wdt = self.norm3.weight.dtype

        h = ops.adaln_modulate(x.view(per_frame), shift1, scale1, self.eps).view(b, length, dim)
        y = self.self_attn(h.to(wdt), rope, grid, cache, layer, write_cache, ops)
        x = x + (y.float().view(per_frame) * gate1.unsqueeze(2)).view(b, length, dim)

        x = x + self.cross_attn(self.norm3(x).to(wdt), context_kv).float()
        if self.action_model is not None and actions is not None:
            x = x + self.action_model(x.to(wdt), grid, actions).float()

        h = ops.adaln_modulate(x.view(per_frame), shift2, scale2, self.eps).view(b, length, dim)
        y = self.ffn(h.to(wdt))
        return x + (y.float().view(per_frame) * gate2.unsqueeze(2)).view(b, length, dim)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(
        self, x: torch.Tensor, e: torch.Tensor, frames: int, ops: KernelOps
    ) -> torch.Tensor:
        b, length, dim = x.shape
        mod = self.modulation.float().unsqueeze(1) + e.unsqueeze(2)  # (B, F, 2, dim)
        shift, scale = mod.unbind(2)
        h = ops.adaln_modulate(x.view(b, frames, length // frames, dim), shift, scale, self.eps)
        return self.head(h.view(b, length, dim).to(self.head.weight.dtype))


class CausalWanDiT(nn.Module):
    """Wan2.1 DiT that denoises one chunk at a time against a KV cache."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(
            cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(
            nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.num_layers)])
        self.head = Head(cfg)

    def embed_context(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """umT5 embeddings (B, L <= text_len, text_dim) to every block's cross-attn k/v.

        The context is zero-padded to ``text_len`` before the embedding, as in Wan.
        """
        b, n, d = context.shape
        if n > self.cfg.text_len or d != self.cfg.text_dim:
            raise ValueError(
                f"text context {tuple(context.shape)} does not fit "
                f"(<= {self.cfg.text_len}, {self.cfg.text_dim})"
            )
        padded = context.new_zeros(b, self.cfg.text_len, d)
        padded[:, :n] = context
        wdt = self.patch_embedding.weight.dtype
        ctx = self.text_embedding(padded.to(wdt))
        return [blk.cross_attn.context_kv(ctx) for blk in self.blocks if isinstance(blk, Block)]

    def forward(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        context_kv: list[tuple[torch.Tensor, torch.Tensor]],
        cache: KVCache,
        frame_offset: int,
        write_cache: bool,
        ops: KernelOps,
        actions: ChunkActions | None = None,
    ) -> torch.Tensor:
        """Predict the flow of one chunk.

        latents: (B, C, F, H, W); timesteps: (B, F) on the 0..1000 scale; frame_offset: the
        absolute index of the chunk's first latent frame (its RoPE position).
        """
        cfg = self.cfg
        b, _, f, h, w = latents.shape
        pt, ph, pw = cfg.patch_size
        grid = (f // pt, h // ph, w // pw)
        wdt = self.patch_embedding.weight.dtype
        x = self.patch_embedding(latents.to(wdt)).flatten(2).transpose(1, 2).float()
        length = x.shape[1]

        e = self.time_embedding(
            sinusoidal_embedding(cfg.freq_dim, timesteps.reshape(-1)).to(wdt)
        ).float()  # (B*F, dim)
        e6 = self.time_projection(e.to(wdt)).float().view(b, grid[0], 6, cfg.dim)
        e = e.view(b, grid[0], cfg.dim)

        rope = rope_tables(cfg.head_dim, frame_offset, *grid, cfg.rope_theta, x.device)
        for i, block in enumerate(self.blocks):
            x = block(x, e6, context_kv[i], rope, grid, cache, i, write_cache, actions, ops)
        if write_cache:
            cache.advance(length)
        out = self.head(x, e, grid[0], ops).float()  # (B, L, pt*ph*pw*C)
        out = out.view(b, *grid, pt, ph, pw, cfg.out_dim)
        out = torch.einsum("bfhwpqrc->bcfphqwr", out)
        return out.reshape(b, cfg.out_dim, f, h, w)
