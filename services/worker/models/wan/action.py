"""Matrix-Game 2.0 style keyboard and mouse conditioning inside DiT blocks.

The parameter names and shapes follow Matrix-Game 2.0's action module (``keyboard_embed``,
``mouse_mlp``, ``t_qkv``, ``img_attn_{q,k}_norm``, ``proj_mouse``, ``mouse_attn_q``,
``keyboard_attn_kv``, ``key_attn_{q,k}_norm``, ``proj_keyboard``), so its checkpoints load.

Each latent frame sees a window of the last ``window * vae_time_compression`` per-RGB-frame
actions. The mouse branch concatenates that window to every token and runs temporal
self-attention across the chunk's frames per spatial position; the keyboard branch lets
each token attend to the embedded keyboard windows of the chunk's frames. Unlike the
original, no rotary embedding is applied inside the action attention, and attention spans
the current chunk only (see docs/wan.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from services.worker.models.wan.config import ActionConfig


@dataclass(frozen=True, slots=True)
class ChunkActions:
    """Per-latent-frame action windows for one chunk.

    keyboard: (B, F, window * ratio, keyboard_dim); mouse: (B, F, window * ratio, mouse_dim).
    """

    keyboard: torch.Tensor
    mouse: torch.Tensor


class _HeadRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(
            x.dtype
        ) * self.weight


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(N, Lq, H, D) x (N, Lk, H, D) -> (N, Lq, H, D)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class ActionModule(nn.Module):
    def __init__(self, cfg: ActionConfig, dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        group = cfg.window * cfg.vae_time_compression
        hid = cfg.hidden_size
        self.keyboard_embed = nn.Sequential(
            nn.Linear(cfg.keyboard_dim, hid), nn.SiLU(), nn.Linear(hid, hid)
        )
        c = cfg.mouse_hidden_dim
        self.mouse_mlp = nn.Sequential(
            nn.Linear(cfg.mouse_dim * group + dim, c),
            nn.GELU(approximate="tanh"),
            nn.Linear(c, c),
            nn.LayerNorm(c),
        )
        self.t_qkv = nn.Linear(c, 3 * c, bias=cfg.qkv_bias)
        self.img_attn_q_norm = _HeadRMSNorm(c // cfg.heads)
        self.img_attn_k_norm = _HeadRMSNorm(c // cfg.heads)
        self.proj_mouse = nn.Linear(c, dim, bias=cfg.qkv_bias)
        kd = cfg.keyboard_hidden_dim
        self.key_attn_q_norm = _HeadRMSNorm(kd // cfg.heads)
        self.key_attn_k_norm = _HeadRMSNorm(kd // cfg.heads)
        self.mouse_attn_q = nn.Linear(dim, kd, bias=cfg.qkv_bias)
        self.keyboard_attn_kv = nn.Linear(hid * group, 2 * kd, bias=cfg.qkv_bias)
        self.proj_keyboard = nn.Linear(kd, dim, bias=cfg.qkv_bias)

    def forward(
        self, x: torch.Tensor, grid: tuple[int, int, int], actions: ChunkActions
    ) -> torch.Tensor:
        """The residual the action module adds to x (B, F*S, dim)."""
        cfg = self.cfg
        b, length, dim = x.shape
        f = grid[0]
        s = length // f
        heads = cfg.heads
        wdt = self.t_qkv.weight.dtype

        # Mouse: per spatial position, temporal attention over the chunk's frames.
        tokens = x.view(b, f, s, dim).transpose(1, 2)  # (B, S, F, dim)
        mouse = actions.mouse.to(wdt).reshape(b, 1, f, -1).expand(b, s, f, -1)
        m = self.mouse_mlp(torch.cat([tokens, mouse], dim=-1)).reshape(b * s, f, -1)
        q, k, v = self.t_qkv(m).view(b * s, f, 3, heads, -1).unbind(2)
        att = _attend(self.img_attn_q_norm(q), self.img_attn_k_norm(k), v)
        mouse_out = self.proj_mouse(att.reshape(b, s, f, -1).transpose(1, 2).reshape(b, length, -1))

        # Keyboard: every token attends to the keyboard windows of the chunk's frames.
        kb = self.keyboard_embed(actions.keyboard.to(wdt)).reshape(b, f, -1)
        kk, kv = self.keyboard_attn_kv(kb).view(b, f, 2, heads, -1).unbind(2)
        kq = self.mouse_attn_q(x).view(b, length, heads, -1)
        katt = _attend(self.key_attn_q_norm(kq), self.key_attn_k_norm(kk), kv)
        return mouse_out + self.proj_keyboard(katt.reshape(b, length, -1))
