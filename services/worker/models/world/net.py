"""The built-in world model's network: a block-causal transformer over per-frame tokens.

A frame is cut into ``patch``x``patch`` patches, one token each. Two kinds of token block:
*clean* blocks (a frame already made, whose keys and values go into the KV cache) and
*noisy* blocks (the frame being denoised, conditioned on the action, the denoising time
and the previous frame at the same patch). Every block attends to itself and to the
``window`` clean frames before it; a learned bias per (head, age) tells frames apart by
age, so the cache is a window that rolls.

Every matrix product is batched per session (``bmm``/``baddbmm`` with the batch as the
batch dimension): a session's numbers are computed by the same kernel calls on the same
shapes whether it is stepped alone or with others, so its frames are bit-identical either
way (the runtime's fork, replay and recovery rely on it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import cast

import torch
from torch import nn


@dataclass(frozen=True)
class NetConfig:
    height: int = 64
    width: int = 64
    patch: int = 16
    dim: int = 192
    depth: int = 4
    heads: int = 4
    mlp: int = 2
    window: int = 4
    n_actions: int = 5

    @property
    def tokens(self) -> int:
        return (self.height // self.patch) * (self.width // self.patch)

    @property
    def patch_dim(self) -> int:
        return self.patch * self.patch * 3

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer(x)`` for x (B, N, in) as one GEMM per batch element (batch-invariant)."""
    b = x.shape[0]
    w = layer.weight.t().unsqueeze(0).expand(b, -1, -1)
    if layer.bias is None:
        return torch.bmm(x, w)
    return torch.baddbmm(layer.bias.view(1, 1, -1), x, w)


class Block(nn.Module):
    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.mlp * d)
        self.fc2 = nn.Linear(cfg.mlp * d, d)
        # attention bias by the age of the key's frame (0 = the query's own block)
        self.age_bias = nn.Parameter(torch.zeros(cfg.heads, cfg.window + 1))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of x (B, N, D), each (B, N, D)."""
        q, k, v = linear(self.norm1(x), self.qkv).chunk(3, dim=-1)
        return q, k, v

    def attend(
        self,
        x: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        age: torch.Tensor,
    ) -> torch.Tensor:
        """Attention of q (B, Nq, D) over k, v (B, Nk, D), then the MLP.

        ``age`` (B, Nq, Nk) long: the key's frame age for each query, or -1 (masked).
        """
        b, nq, d = q.shape
        nk = k.shape[1]
        h = self.heads
        dh = d // h
        qh = q.view(b, nq, h, dh).transpose(1, 2).reshape(b * h, nq, dh)
        kh = k.view(b, nk, h, dh).transpose(1, 2).reshape(b * h, nk, dh)
        vh = v.view(b, nk, h, dh).transpose(1, 2).reshape(b * h, nk, dh)
        scores = torch.bmm(qh, kh.transpose(1, 2)) * (dh**-0.5)
        bias = self.age_bias[:, age.clamp(min=0)]  # (H, B, Nq, Nk)
        bias = bias.permute(1, 0, 2, 3).masked_fill((age < 0).unsqueeze(1), float("-inf"))
        scores = scores + bias.reshape(b * h, nq, nk)
        attn = torch.softmax(scores, dim=-1)
        o = torch.bmm(attn, vh).view(b, h, nq, dh).transpose(1, 2).reshape(b, nq, d)
        x = x + linear(o, self.out)
        y = linear(torch.nn.functional.gelu(linear(self.norm2(x), self.fc1)), self.fc2)
        return x + y


class WorldNet(nn.Module):
    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.embed = nn.Linear(cfg.patch_dim, d)
        self.embed_prev = nn.Linear(cfg.patch_dim, d, bias=False)
        self.embed_motion = nn.Linear(cfg.patch_dim, d, bias=False)
        self.pos = nn.Parameter(torch.zeros(1, cfg.tokens, d))
        self.kind = nn.Parameter(torch.zeros(2, d))  # 0 clean, 1 noisy
        self.action = nn.Embedding(cfg.n_actions, d)
        self.time_in = nn.Linear(1, d)
        self.time_out = nn.Linear(d, d)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.patch_dim)
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.kind, std=0.02)
        # the prediction is a change to the previous frame: it starts as "copy the last frame"
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def layers(self) -> list[Block]:
        return [cast(Block, b) for b in self.blocks]

    # ---- patches ----

    def patchify(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) in [-1, 1] -> (B, T, patch_dim)."""
        b = frames.shape[0]
        p = self.cfg.patch
        x = frames.view(b, self.cfg.height // p, p, self.cfg.width // p, p, 3)
        return x.permute(0, 1, 3, 2, 4, 5).reshape(b, self.cfg.tokens, self.cfg.patch_dim)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        p = self.cfg.patch
        gh, gw = self.cfg.height // p, self.cfg.width // p
        x = tokens.view(b, gh, gw, p, p, 3).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, self.cfg.height, self.cfg.width, 3)

    # ---- token inputs ----

    def clean_tokens(self, frames: torch.Tensor) -> torch.Tensor:
        """Input tokens of clean frames (B, H, W, 3) -> (B, T, D)."""
        return linear(self.patchify(frames), self.embed) + self.pos + self.kind[0]

    def noisy_tokens(
        self,
        x_t: torch.Tensor,
        prev: torch.Tensor,
        before: torch.Tensor,
        t: torch.Tensor,
        action: torch.Tensor,
    ) -> torch.Tensor:
        """Input tokens of the frame being denoised: noisy frame x_t, the previous frame and
        its change from the one before (motion at a glance), time t (B,), action (B,)
        -> (B, T, D)."""
        time = linear(
            torch.nn.functional.silu(linear(t.view(-1, 1, 1), self.time_in)), self.time_out
        )
        cond = time + self.action(action).unsqueeze(1)
        x = linear(self.patchify(x_t), self.embed) + linear(self.patchify(prev), self.embed_prev)
        x = x + linear(self.patchify(prev - before), self.embed_motion)
        return x + self.pos + self.kind[1] + cond

    def output(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Final tokens (B, T, D) -> predicted clean frame (B, H, W, 3), as a change to
        ``base`` (the previous frame): what does not move needs no work, and an untrained
        head starts as the copy-last-frame baseline."""
        return base + self.unpatchify(linear(self.norm(x), self.head))


def block_ages(frames: int, window: int, tokens: int) -> torch.Tensor:
    """The (query, key) age matrix of a training sequence laid out as
    [clean frames 0..F-1 | noisy frames 1..F] (F = ``frames`` blocks of each kind).

    Clean block m sees clean blocks m-window..m (ages window..0); noisy block n (the frame
    after clean m = n-1) sees clean blocks n-window..n-1 (ages window..1) and itself (0):
    exactly what the KV cache holds at inference. -1 = masked.
    """
    n = 2 * frames
    ages = torch.full((n, n), -1, dtype=torch.long)
    for m in range(frames):  # clean queries
        for j in range(max(0, m - window), m + 1):
            ages[m, j] = m - j
    for i in range(frames):  # noisy query i predicts frame i+1
        q = frames + i
        for j in range(max(0, i + 1 - window), i + 1):
            ages[q, j] = i + 1 - j
        ages[q, q] = 0
    return ages.repeat_interleave(tokens, 0).repeat_interleave(tokens, 1)


def train_forward(
    net: WorldNet,
    context: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    actions: torch.Tensor,
    ages: torch.Tensor,
    base: torch.Tensor,
) -> torch.Tensor:
    """Teacher-forced prediction of every frame of a sequence at once.

    context (B, F, H, W, 3): clean frames 0..F-1 (possibly noise-augmented); base: the same
    frames un-augmented (the residual base of each prediction);
    x_t (B, F, H, W, 3): noisy versions of frames 1..F; t (B, F); actions (B, F) (the
    action that turns frame i into i+1). Returns predicted clean frames 1..F (B, F, H, W, 3).
    """
    b, f = context.shape[:2]
    cfg = net.cfg
    flat = context.reshape(b * f, cfg.height, cfg.width, 3)
    clean = net.clean_tokens(flat).view(b, f * cfg.tokens, cfg.dim)
    # the frame before each context frame (the first has none: no motion, as at a start)
    before = torch.cat([context[:, :1], context[:, :-1]], dim=1).reshape(flat.shape)
    noisy = net.noisy_tokens(
        x_t.reshape(b * f, cfg.height, cfg.width, 3),
        flat,
        before,
        t.reshape(-1),
        actions.reshape(-1),
    ).view(b, f * cfg.tokens, cfg.dim)
    z = torch.cat([clean, noisy], dim=1)
    age = ages.unsqueeze(0).expand(b, -1, -1)
    for block in net.layers:
        q, k, v = block.project(z)
        z = block.attend(z, q, k, v, age)
    out = net.output(
        z[:, f * cfg.tokens :].reshape(b * f, cfg.tokens, cfg.dim),
        base.reshape(b * f, cfg.height, cfg.width, 3),
    )
    return out.view(b, f, cfg.height, cfg.width, 3)
