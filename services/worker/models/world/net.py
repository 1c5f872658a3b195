"""The built-in world model's network: a block-causal transformer over per-frame tokens.

A frame is cut into ``patch``x``patch`` patches, one token each. Two kinds of token block:
*clean* blocks (a frame already made, whose keys and values go into the KV cache) and
*noisy* blocks (the frame being denoised, conditioned on the action, the denoising time
and the previous frame at the same patch). Every block attends to itself and to the
``window`` clean frames before it; a learned bias per (head, age) tells frames apart by
age, so the cache is a window that rolls.

The head is categorical: for every pixel, logits over the arena's palette (its ``colors``
colours), plus a learned bias towards the previous frame's colour at that pixel (an
untrained head is the copy-last-frame baseline). A frame is the palette's colour of the
arg-max, which is also the clean-frame estimate the few-step sampler re-noises between
passes. Frames made this way are exact palette images, so what
the model feeds back to itself in a long rollout is never off-palette junk. With ``warp``
a pixel may also take the last frame's colour from one of ``WARP_OFFSETS`` (the ways the
arena's objects move), and with ``motion`` it sees which offset explained the last move
around it (block matching); serving then decodes only the pixels some offset could change
(``plan``, ``decode``). With ``rigid`` a frame is decoded object by object
(``rigid_colors``): each thing that moves takes the one offset that makes the likeliest
frame and moves whole, never into anything, so objects never smear, split or fade.

Every matrix product is batched per session (``bmm``/``baddbmm`` with the batch as the
batch dimension), and the sparse serving decoder works column by column: a session's
numbers are computed by the same kernel calls on the same shapes whether it is stepped
alone or with others, so its frames are bit-identical either way (the runtime's fork,
replay and recovery rely on it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple, cast

import torch
from torch import nn

from services.worker.models.world import sim

# (dy, dx): the next frame's pixel (y, x) may take the last frame's colour at (y - dy,
# x - dx), i.e. content that moved by (dy, dx): still first, then a ball's moves (1 px on
# either axis or both) and the agent's (2 px on one axis).
WARP_OFFSETS: tuple[tuple[int, int], ...] = (
    (0, 0),
    (-1, 0), (1, 0), (0, -1), (0, 1),
    (-1, -1), (-1, 1), (1, -1), (1, 1),
    (-2, 0), (2, 0), (0, -2), (0, 2),
)  # fmt: skip
_REACH = 2  # the farthest a warp offset reaches
_WINDOW = 5  # the motion match's window: 5 x 5 pixels around each pixel
_LOG2E = 1.4426950408889634
_COLUMNS = 64  # the serving decoder's pixels in play are padded to a multiple of this
# the things that move (``sim.MOVING``: the agent, the balls): their colours, in the order
# the arena moves them, and a bit for each
_MOVING_COLORS = tuple(int(k) for k in sim.MOVING.nonzero()[0])
_MOVING = torch.tensor(_MOVING_COLORS)
_THING_BITS = torch.tensor([1 << i for i in range(len(_MOVING_COLORS))], dtype=torch.uint8)


class Prior(NamedTuple):
    """What the pixel decoder's output builds on in a step (``WorldNet.prior``)."""

    base: torch.Tensor  # the keep bias (B, colors, P), or with warp the moved colours (B, O, P)
    offsets: torch.Tensor | None  # motion 2's and collide's bias on the offsets (B, O, P)


class RigidPlan(NamedTuple):
    """What decoding a step's frames object by object needs of its last frames, once per
    step (``rigid_plan``), for ``rigid_colors``: over columns of pixels (N of them, of
    ``sessions``), and per thing that moves (``sim.MOVING``, in order) its columns."""

    own: torch.Tensor  # (N,) the last frame's colours
    sessions: int
    # all things' columns (K): the flat indices into the scores (colors, M) of its colour
    # and of the colour the column has if it moves away, and where each offset brings it
    moving_at: torch.Tensor  # (K,)
    staying_at: torch.Tensor  # (K,)
    brought: torch.Tensor  # (K, offsets) bool
    rows: torch.Tensor  # (K,) where each adds up: session x things + thing
    cols: tuple[torch.Tensor, ...]  # (k,) per thing: its columns (it or an offset brings it)
    brings: tuple[torch.Tensor, ...]  # (k, offsets) bool: where each offset brings it
    session: tuple[torch.Tensor, ...]  # (k,) their sessions
    was: tuple[torch.Tensor, ...]  # the columns it is at in the last frame
    leaving: tuple[torch.Tensor, ...]  # (sessions, offsets) bool: ``WorldNet.leaving``'s


class DecodePlan(NamedTuple):
    """The pixels in play of a step's sessions and their decoder inputs (``WorldNet.plan``)."""

    sel: torch.Tensor  # (N,) their indices in the batch's pixels (session-major raster)
    # the rest per column, N padded to a multiple of _COLUMNS (pads repeat the first pixel)
    rows: torch.Tensor  # their rows in the head's token-major per-pixel features
    local: torch.Tensor  # (local, .) their local features
    base: torch.Tensor  # (outputs, .) their logits' constant part (bias, keep, offsets')
    moved: torch.Tensor  # (offsets, .) the colour each offset brings
    keep: torch.Tensor  # (B * H * W,) the last frame's colours: the pixels not in play
    rigid: RigidPlan | None  # with rigid: what object-by-object decoding needs


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
    colors: int = len(sim.PALETTE)
    pixel: int = 8  # per-pixel feature channels the head makes from each token
    local: int = 16  # channels of the local pixel decoder
    # frames the local pixel decoder sees: 2 (the last two) or 3 (also the one before
    # them: after a bounce a ball pauses on one axis for a frame, and only three frames
    # show which way it goes next)
    local_frames: int = 2
    # dilation of a third, residual 3x3 convolution of the local decoder (0: none; 2: a
    # 9x9 view, a ball's whole width, so a shape can be restored and a bounce seen locally)
    local_dilation: int = 0
    # 1: each pixel may also copy the last frame's colour from one of ``WARP_OFFSETS`` (the
    # ways the arena's objects move), its logits beside the palette's; 0: palette only
    warp: int = 0
    # 1: the pixel decoder also sees, for every warp offset, how well moving the frame
    # before the last by it explains the last frame around the pixel (block matching over
    # a 5x5 window: the motion each pixel took last, which an object keeps between bounces);
    # 2: also as a bias on each offset's logit, -gain x the pixels of its window it fails
    # to explain (an untrained decoder continues every pixel's last motion)
    motion: int = 0
    # 1: the pixel decoder also sees, for every warp offset, whether the object that offset
    # would bring to a pixel, and the object at the pixel, would run into something if it
    # moved by it (another colour or the arena's edge anywhere along its whole side: the
    # frame-wide view a bounce needs, which a 5x5 window cannot give), and it biases the
    # offsets' logits by it, a learned gain (needs warp 1)
    collide: int = 0
    # 1: the pixel decoder also sees the action directly (a learned vector per action
    # added to every pixel's local features), not only through the transformer's tokens
    action_local: int = 0
    # 1: a frame is decoded object by object (``rigid_colors``): each thing that moves takes
    # the one warp offset under which the decoder finds the frame it makes likeliest, and
    # moves whole; everything else keeps its colour. 0: every pixel takes its own arg-max
    # colour (an object's pixels may disagree: smeared, split or faded). Needs warp 1. No
    # weights of its own, but it changes the frames, so it is part of the model version.
    rigid: int = 0

    @property
    def tokens(self) -> int:
        return (self.height // self.patch) * (self.width // self.patch)

    @property
    def patch_dim(self) -> int:
        return self.patch * self.patch * 3

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _training(module: nn.Module) -> bool:
    """Whether gradients flow into ``module``'s weights: training, where batch invariance
    does not matter and one folded kernel call per batch is much cheaper (a per-session
    weight gradient is B matrices summed). Serving and the no-grad passes of the training
    script take the batch-invariant path."""
    return torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer(x)`` for x (B, N, in) as one GEMM per batch element (batch-invariant);
    folded into one GEMM when training (``_training``)."""
    if _training(layer):
        return torch.nn.functional.linear(x, layer.weight, layer.bias)
    w = _per_session(layer.weight.t(), x.shape[0])
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

    def age_bias_of(self, age: torch.Tensor, tokens: int = 1) -> torch.Tensor:
        """The attention's additive bias for ``age`` (B, Nq, Nk) long, the key's frame age
        for each query or -1 (masked) -> (B, H, Nq * tokens, Nk * tokens): with ``tokens``
        > 1 the ages are per block of that many tokens (one gather per block pair, not per
        token pair). A batch dimension of 1 is shared by all (training: one gather, one
        small gradient). The same for every denoising pass of a step: computed once."""
        bias = self.age_bias[:, age.clamp(min=0)]  # (H, B or 1, Nq, Nk)
        bias = bias.permute(1, 0, 2, 3).masked_fill((age < 0).unsqueeze(1), float("-inf"))
        if tokens == 1:
            return bias
        b, h, nq, nk = bias.shape
        grid = bias.view(b, h, nq, 1, nk, 1).expand(b, h, nq, tokens, nk, tokens)
        return grid.reshape(b, h, nq * tokens, nk * tokens)

    def attend(
        self,
        x: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor,
    ) -> torch.Tensor:
        """Attention of q (B, Nq, D) over k, v (B, Nk, D) with ``age_bias_of``'s ``bias``,
        then the MLP."""
        b, nq, d = q.shape
        nk = k.shape[1]
        h = self.heads
        dh = d // h
        qh = q.view(b, nq, h, dh).transpose(1, 2).reshape(b * h, nq, dh)
        kh = k.view(b, nk, h, dh).transpose(1, 2).reshape(b * h, nk, dh)
        vh = v.view(b, nk, h, dh).transpose(1, 2).reshape(b * h, nk, dh)
        scores = torch.bmm(qh, kh.transpose(1, 2)).view(b, h, nq, nk) * (dh**-0.5) + bias
        attn = torch.softmax(scores.view(b * h, nq, nk), dim=-1)
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
        if cfg.colors != len(sim.PALETTE):
            raise ValueError(f"the arena has {len(sim.PALETTE)} colours, not {cfg.colors}")
        if cfg.local_frames not in (2, 3):
            raise ValueError(f"local_frames must be 2 or 3, got {cfg.local_frames}")
        if cfg.local_dilation < 0:
            raise ValueError(f"local_dilation must be >= 0, got {cfg.local_dilation}")
        if cfg.warp not in (0, 1):
            raise ValueError(f"warp must be 0 or 1, got {cfg.warp}")
        if cfg.motion not in (0, 1, 2):
            raise ValueError(f"motion must be 0, 1 or 2, got {cfg.motion}")
        if cfg.motion == 2 and not cfg.warp:
            raise ValueError("motion 2 biases the warp offsets' logits: it needs warp 1")
        if cfg.collide not in (0, 1):
            raise ValueError(f"collide must be 0 or 1, got {cfg.collide}")
        if cfg.collide and not cfg.warp:
            raise ValueError("collide biases the warp offsets' logits: it needs warp 1")
        if cfg.action_local not in (0, 1):
            raise ValueError(f"action_local must be 0 or 1, got {cfg.action_local}")
        if cfg.rigid not in (0, 1):
            raise ValueError(f"rigid must be 0 or 1, got {cfg.rigid}")
        if cfg.rigid and not cfg.warp:
            raise ValueError("rigid moves objects by the warp offsets: it needs warp 1")
        c, loc = cfg.colors, cfg.local
        self.head = nn.Linear(d, cfg.patch * cfg.patch * cfg.pixel)
        # the local pixel decoder: two 3x3 convolutions over the last frames' colours
        # (once per step), mixed with the tokens' per-pixel features (every pass)
        self.local1 = nn.Conv2d(cfg.local_frames * c, loc, 3, padding=1)
        self.local2 = nn.Conv2d(loc, loc, 3, padding=1)
        dil = cfg.local_dilation
        self.local3 = nn.Conv2d(loc, loc, 3, padding=dil, dilation=dil) if dil > 0 else None
        self.mix = nn.Linear(cfg.pixel, loc, bias=False)
        self.motion_in = nn.Linear(len(WARP_OFFSETS), loc, bias=False) if cfg.motion else None
        self.motion_gain = (
            nn.Parameter(torch.ones(len(WARP_OFFSETS), 1)) if cfg.motion == 2 else None
        )
        o = len(WARP_OFFSETS)
        self.collide_in = nn.Linear(2 * o, loc, bias=False) if cfg.collide else None
        self.collide_gain = nn.Parameter(torch.zeros(o, 1)) if cfg.collide else None
        self.action_local = nn.Embedding(cfg.n_actions, loc) if cfg.action_local else None
        self.logits = nn.Linear(loc, c + (len(WARP_OFFSETS) if cfg.warp else 0))
        # logit bias for "the pixel keeps its colour" (with ``warp``: for the still offset):
        # with a zero output layer the model starts as the copy-last-frame baseline
        self.keep = nn.Parameter(torch.tensor(4.0))
        still = torch.zeros(c + (len(WARP_OFFSETS) if cfg.warp else 0))
        still[c:] = torch.tensor([1.0] + [0.0] * (len(WARP_OFFSETS) - 1)) if cfg.warp else 0.0
        self.register_buffer("still", still, persistent=False)
        # per colour: the bit of the thing that moves it is (``things_near``), else 0
        thing_bit = torch.zeros(cfg.colors, dtype=torch.uint8)
        thing_bit[list(_MOVING_COLORS)] = _THING_BITS
        self.register_buffer("thing_bit", thing_bit, persistent=False)
        opposite = [WARP_OFFSETS.index((-dy, -dx)) for dy, dx in WARP_OFFSETS]
        self.register_buffer("opposite", torch.tensor(opposite), persistent=False)
        # the pixels within reach of the arena's edge, and for each offset which of them it
        # would move out of the arena (offsets, border pixels) 0/1
        ys = torch.arange(cfg.height).repeat_interleave(cfg.width)
        xs = torch.arange(cfg.width).repeat(cfg.height)
        leaves = torch.stack(
            [
                (ys + dy < 0) | (ys + dy >= cfg.height) | (xs + dx < 0) | (xs + dx >= cfg.width)
                for dy, dx in WARP_OFFSETS
            ]
        )
        border = leaves.any(0).nonzero().squeeze(1)
        self.register_buffer("border", border, persistent=False)
        self.register_buffer("leaves", leaves[:, border].float(), persistent=False)
        # each raster pixel's row among a frame's token-major head features
        gh, gw, p = cfg.height // cfg.patch, cfg.width // cfg.patch, cfg.patch
        order = torch.arange(cfg.height * cfg.width).view(gh, p, gw, p).permute(0, 2, 1, 3)
        rows = torch.empty(cfg.height * cfg.width, dtype=torch.long)
        rows[order.reshape(-1)] = torch.arange(cfg.height * cfg.width)
        self.register_buffer("row_of_pixel", rows, persistent=False)
        self.register_buffer(
            "palette", torch.from_numpy(sim.PALETTE).float() / 127.5 - 1.0, persistent=False
        )
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.kind, std=0.02)
        nn.init.zeros_(self.logits.weight)
        if self.action_local is not None:
            nn.init.zeros_(self.action_local.weight)
        nn.init.zeros_(self.logits.bias)

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

    # ---- colours ----

    def color_index(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) in [-1, 1] -> (B, H, W) long: the nearest palette colour per pixel."""
        palette = cast(torch.Tensor, self.palette)
        # argmin |x - p|^2 = argmax 2 x.p - |p|^2, channel by channel (elementwise per
        # pixel: batch-invariant; a reduction over a last axis of 3 is many times slower)
        two_p = 2.0 * palette
        score = frames[..., 0:1] * two_p[:, 0] - (palette**2).sum(-1)
        score = score + frames[..., 1:2] * two_p[:, 1]
        score = score + frames[..., 2:3] * two_p[:, 2]
        return score.argmax(-1)

    # ---- token inputs ----

    def clean_tokens(self, frames: torch.Tensor) -> torch.Tensor:
        """Input tokens of clean frames (B, H, W, 3) -> (B, T, D)."""
        return linear(self.patchify(frames), self.embed) + self.pos + self.kind[0]

    def noisy_context(
        self, prev: torch.Tensor, before: torch.Tensor, action: torch.Tensor
    ) -> torch.Tensor:
        """The part of a denoised frame's input tokens that every pass of a step shares:
        the previous frame, its change from the one before (motion at a glance) and the
        action (B,) -> (B, T, D)."""
        x = linear(self.patchify(prev), self.embed_prev)
        x = x + linear(self.patchify(prev - before), self.embed_motion)
        return x + self.pos + self.kind[1] + self.action(action).unsqueeze(1)

    def noisy_tokens(
        self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor
    ) -> torch.Tensor:
        """Input tokens of the frame being denoised: noisy frame x_t, time t (B,) and the
        step's ``noisy_context`` -> (B, T, D)."""
        time = linear(
            torch.nn.functional.silu(linear(t.view(-1, 1, 1), self.time_in)), self.time_out
        )
        return linear(self.patchify(x_t), self.embed) + context + time

    def local_features(
        self,
        history: Sequence[torch.Tensor],
        match: torch.Tensor | None = None,
        hits: torch.Tensor | None = None,
        actions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """What the pixel decoder sees of the last ``local_frames`` frames (their colour
        indices, (B, H, W) long, the latest first; ``history`` may hold more) around each
        pixel (a 5x5 neighbourhood: everything moves at most 2 px a frame) ->
        (B, local, H * W), with ``motion`` the last two frames' ``motion_match`` mixed in
        (``match`` where the caller has it), with ``collide`` the last frame's
        ``collisions`` (``hits``, likewise), with ``action_local`` the ``actions`` (B,)
        given. The same for every denoising pass of a step."""
        out = self.conv_features(history)
        b = out.shape[0]
        if self.motion_in is not None:
            if match is None:
                match = self.motion_match(history[0], history[1])
            out = torch.baddbmm(out, _per_session(self.motion_in.weight, b), match)
        if self.collide_in is not None:
            if hits is None:
                hits = self.collisions(history[0])
            out = torch.baddbmm(out, _per_session(self.collide_in.weight, b), hits.float())
        if self.action_local is not None:
            if actions is None:
                raise ValueError("an action_local decoder needs the step's actions")
            out = out + self.action_local(actions).unsqueeze(2)
        return out

    def conv_features(self, history: Sequence[torch.Tensor]) -> torch.Tensor:
        """``local_features`` without the motion match, the collisions and the action: the
        convolutions over the last frames' colours (B, local, H * W)."""
        hot = self._one_hot(history)
        if _training(self.local1):
            return self._local(hot).flatten(2)
        # one convolution call per session: the same call on the same shape whether a
        # session is stepped alone or in a batch (batch-invariant, like ``linear``; one
        # call on 8 sessions, in either memory layout, was no faster in a step here)
        return torch.cat([self._local(m.unsqueeze(0)) for m in hot]).flatten(2)

    def conv_columns(
        self, history: Sequence[torch.Tensor], session: torch.Tensor, pixel: torch.Tensor
    ) -> torch.Tensor:
        """``conv_features`` at some pixels only, as columns (each one's session and raster
        index, N a multiple of ``_COLUMNS``) -> (local, N): the first convolution over
        whole frames (one call per session), the second at those pixels alone, where a
        dense call per session makes ten times the pixels (the same numbers, to
        rounding). The second is one product per block of ``_COLUMNS`` columns, every
        block the same shape (``bmm``): a column's numbers do not depend on the others.
        With ``local_dilation``, ``conv_features``' columns."""
        if self.local3 is not None:
            return self.conv_features(history)[session, :, pixel].t().contiguous()
        hot = self._one_hot(history)
        first = torch.cat([torch.relu(self.local1(m.unsqueeze(0))) for m in hot])
        c, h, w = first.shape[1:]
        pad = torch.nn.functional.pad(first, (1, 1, 1, 1)).transpose(0, 1).reshape(c, -1)
        # the 3x3 window of each pixel in the padded frames (its top-left corner at (y, x)):
        # (channels x 9 taps, N), in the order of the weight's (in, dy, dx)
        corner = session * ((h + 2) * (w + 2)) + (pixel // w) * (w + 2) + pixel % w
        taps = torch.tensor([dy * (w + 2) + dx for dy in range(3) for dx in range(3)])
        at = (corner.unsqueeze(0) + taps.to(corner.device).unsqueeze(1)).view(-1)
        window = pad.index_select(1, at).view(c * 9, -1, _COLUMNS).transpose(0, 1)
        weight = self.local2.weight.reshape(self.local2.weight.shape[0], -1)
        bias = cast(torch.Tensor, self.local2.bias).view(1, -1, 1)
        blocks = torch.baddbmm(bias, _per_session(weight, window.shape[0]), window)
        return blocks.transpose(0, 1).reshape(weight.shape[0], -1)

    def _one_hot(self, history: Sequence[torch.Tensor]) -> torch.Tensor:
        """The last ``local_frames`` frames' colour indices -> one-hot (B, frames x colors,
        H, W), the latest first: the local decoder's input."""
        c, n = self.cfg.colors, self.cfg.local_frames
        if len(history) < n:
            raise ValueError(f"the local decoder sees {n} frames, got {len(history)}")
        b, h, w = history[0].shape
        hot = torch.zeros(b, n * c, h, w, device=history[0].device)
        for j, idx in enumerate(history[:n]):
            hot.scatter_(1, idx.unsqueeze(1) + j * c, 1.0)
        return hot

    def motion_match(self, last: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
        """Colour indices of the last frame and the one before, (B, H, W) -> (B, offsets,
        H * W): for each warp offset, the share of the 5x5 pixels around each pixel whose
        colour in the last frame is the one before's moved by that offset."""
        b, h, w = last.shape
        return _share(self.motion_counts(last, before)).view(b, len(WARP_OFFSETS), h * w)

    def motion_counts(self, last: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
        """``motion_match`` as counts of pixels (0.._WINDOW ** 2), uint8 (B, offsets, H, W)."""
        b, h, w = last.shape
        small = torch.uint8  # a colour index fits; moving 13 copies of a frame is 8x cheaper
        same = (moved(before.to(small)) == last.to(small).view(b, 1, h * w)).to(small)
        return _box_sum(same.view(b, len(WARP_OFFSETS), h, w), _WINDOW)

    def collisions(self, last: torch.Tensor) -> torch.Tensor:
        """Colour indices of the last frame (B, H, W) -> uint8 (B, 2 x offsets, H * W): for
        each warp offset, whether the colour it would bring to each pixel (first half) and
        the pixel's own colour (second half) runs into something when all of that colour
        moves by the offset: another colour than the background, or the arena's edge,
        anywhere along its side. (The background itself never runs into anything.) A
        colour is an object here: every object of the arena has its own."""
        b, h, w = last.shape
        n = h * w
        small = last.to(torch.uint8)
        session = torch.arange(b, device=last.device).repeat_interleave(n)
        sources = moved(small).permute(1, 0, 2).reshape(len(WARP_OFFSETS), b * n)
        hits = self._collide(self.leaving(small), session, sources, last.reshape(b * n))
        return hits.view(2 * len(WARP_OFFSETS), b, n).permute(1, 0, 2)

    def _collide(
        self,
        leaving: torch.Tensor,
        session: torch.Tensor,
        sources: torch.Tensor,
        own: torch.Tensor,
    ) -> torch.Tensor:
        """``collisions`` of some pixels of a batch of frames, as columns: the frames'
        ``leaving`` (B, colors, offsets), each pixel's session (N,), the colours the warp
        offsets bring to it (offsets, N) and its own colour (N,) -> uint8 (2 x offsets, N).

        Where two colours meet is read from the columns, so they must hold every such
        pixel: they do when they are the pixels in play (``plan``), as a pixel with a
        neighbour of another colour within 2 px is in play if either colour moves (in this
        arena two still colours, the background and the obstacles, never run into each
        other). Where a colour meets the arena's edge is read from the frames' border,
        whatever the columns. Integer work and sums of 0s and 1s only: exact, whatever
        the batch."""
        b = leaving.shape[0]
        o, c = len(WARP_OFFSETS), self.cfg.colors
        # what a pixel would move onto: what the opposite offset brings to it
        ahead = sources[cast(torch.Tensor, self.opposite)]
        own8 = own.to(torch.uint8)
        clash = (ahead != 0) & (ahead != own8) & (own8 != 0)
        # one flag per session, colour and offset: does any of its pixels clash
        table = leaving.to(torch.uint8).contiguous().view(b * c, o)
        table.view(b, c, o)[:, 0] = 0  # the background runs into nothing
        k, i = clash.nonzero(as_tuple=True)
        table[session[i] * c + own[i], k] = 1
        row = session * c
        mine = table.index_select(0, row + own).t()
        offset = torch.arange(o, device=own.device).view(o, 1)
        incoming = table.view(-1)[(sources.long() + row) * o + offset]
        return torch.cat([incoming, mine])

    def things_near(self, frames: torch.Tensor) -> torch.Tensor:
        """Colour indices (B, H, W) -> uint8 (B, H * W): for each pixel, bit i set if the
        i-th thing that moves (``sim.MOVING``, in order) is at it or a warp offset would
        bring it there."""
        bits = cast(torch.Tensor, self.thing_bit)[frames.long()]
        shifted = moved(bits)
        out = shifted[:, 0].clone()
        for o in range(1, len(WARP_OFFSETS)):
            out |= shifted[:, o]
        return out

    def leaving(self, frames: torch.Tensor) -> torch.Tensor:
        """Colour indices (B, H, W) -> bool (B, colors, offsets): whether any pixel of a
        colour would leave the arena if all of it moved by an offset (read from the
        frames' border; sums of 0s and 1s: exact, whatever the batch)."""
        b = frames.shape[0]
        border = cast(torch.Tensor, self.border)
        edge = torch.zeros(b, border.shape[0], self.cfg.colors, device=frames.device)
        edge.scatter_(2, frames.reshape(b, -1)[:, border].long().unsqueeze(2), 1.0)
        leaves = cast(torch.Tensor, self.leaves)  # (offsets, border pixels) 0/1
        return (torch.bmm(_per_session(leaves, b), edge) > 0).transpose(1, 2)

    def _local(self, hot: torch.Tensor) -> torch.Tensor:
        h = self.local2(torch.relu(self.local1(hot)))
        if self.local3 is not None:
            h = h + self.local3(torch.relu(h))
        return h

    def prior(
        self,
        prev_idx: torch.Tensor,
        match: torch.Tensor | None = None,
        hits: torch.Tensor | None = None,
    ) -> Prior:
        """(B, H, W) colour indices of the previous frame (and with ``motion`` 2 the last two
        frames' ``motion_match``, with ``collide`` the last frame's ``collisions``) -> what
        ``output`` builds on, once per step: the logit bias towards keeping each pixel's
        colour, (B, colors, H * W) float (what does not move needs no work, and an
        untrained decoder starts as the copy-last-frame baseline); with ``warp``, the
        colour each warp offset would copy to each pixel, (B, offsets, H * W) long (the
        background beyond the arena), and with ``motion`` 2 or ``collide`` the offsets'
        logit bias."""
        b = prev_idx.shape[0]
        if self.cfg.warp:
            if self.motion_gain is not None and match is None:
                raise ValueError("motion 2 needs the last two frames' motion_match")
            if self.collide_gain is not None and hits is None:
                raise ValueError("collide needs the last frame's collisions")
            return Prior(moved(prev_idx), self._offset_bias(match, hits))
        keep = torch.zeros(b, self.cfg.colors, prev_idx[0].numel(), device=prev_idx.device)
        return Prior(keep.scatter_(1, prev_idx.view(b, 1, -1), 1.0) * self.keep, None)

    def output(self, x: torch.Tensor, local: torch.Tensor, prior: Prior) -> torch.Tensor:
        """Final tokens (B, T, D), ``local_features`` and ``prior`` -> per-pixel palette
        logits (B, colors, H, W). Channels first: every GEMM here is short and wide.
        (With ``warp`` and no gradients, per-pixel colour probabilities up to a factor
        instead of logits: the same arg-max, without a log. Serving a warp decoder takes
        ``plan`` and ``decode`` instead.)

        With ``warp`` a colour's logit is the log of its own exponentiated logit plus those
        of the offsets that would copy it (a mixture of "paint c" and "move what is there
        by o"): one choice of offset moves an object whole, so exact motion is the easy
        thing to learn, and a colour no offset brings can still be painted."""
        cfg = self.cfg
        b = x.shape[0]
        p, gh, gw = cfg.patch, cfg.height // cfg.patch, cfg.width // cfg.patch
        pixel = linear(self.norm(x), self.head).view(b, gh, gw, p, p, cfg.pixel)
        pixel = pixel.permute(0, 5, 1, 3, 2, 4).reshape(b, cfg.pixel, cfg.height * cfg.width)
        h = torch.baddbmm(local, _per_session(self.mix.weight, b), pixel).relu_()
        if not cfg.warp:
            logits = torch.baddbmm(
                prior.base + self.logits.bias.view(1, -1, 1), _per_session(self.logits.weight, b), h
            )
            return logits.view(b, cfg.colors, cfg.height, cfg.width)
        # the keep bias sits on the still offset: folded into the output layer's bias
        c = cfg.colors
        bias = self._warp_bias()
        raw = torch.bmm(_per_session(self.logits.weight, b), h).add_(bias.view(1, -1, 1))
        if prior.offsets is not None:
            if _training(self.logits):
                raw = torch.cat([raw[:, :c], raw[:, c:] + prior.offsets], 1)
            else:
                raw[:, c:] += prior.offsets
        top = raw.amax(1, keepdim=True).detach()
        # exp as exp2 (several times faster on CPU), each pixel's largest logit at 0
        if _training(self.logits):
            e = torch.exp2((raw - top) * _LOG2E)
        else:
            e = raw.sub_(top).mul_(_LOG2E).exp2_()
        mass = e[:, :c].scatter_add(1, prior.base, e[:, c:])
        if not _training(self.logits):
            # serving needs the arg-max only: the same as the log's, no log taken
            return mass.view(b, c, cfg.height, cfg.width)
        logits = torch.log(mass.clamp_min(1e-30)) + top
        return logits.view(b, c, cfg.height, cfg.width)

    def _warp_bias(self) -> torch.Tensor:
        """A warp decoder's output bias: the layer's own, the keep bias on the still
        offset (colors + offsets,)."""
        return self.logits.bias + self.keep * cast(torch.Tensor, self.still)

    def _offset_bias(
        self, match: torch.Tensor | None, hits: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The bias on each offset's logit (offsets on the second-last axis), or None:
        ``motion`` 2's from its ``motion_match`` share, -gain x the window's pixels it does
        not explain; ``collide``'s, -gain x whether what it brings would run into something
        (the first half of ``collisions``)."""
        bias = None
        if self.motion_gain is not None:
            assert match is not None
            bias = (match - 1.0) * (float(_WINDOW**2) * self.motion_gain)
        if self.collide_gain is not None:
            assert hits is not None
            blocked = hits[..., : len(WARP_OFFSETS), :].float() * -self.collide_gain
            bias = blocked if bias is None else bias + blocked
        return bias

    # ---- serving: the pixels in play only ----

    def plan(
        self,
        history: Sequence[torch.Tensor],
        counts: torch.Tensor | None,
        actions: torch.Tensor | None = None,
    ) -> DecodePlan:
        """A warp decoder's serving plan for every pass of a step: the pixels in play and
        their share of the step's decoder inputs (``conv_features`` of the last frames'
        colour indices ``history``, the latest first, at those pixels: ``conv_columns``;
        with ``motion`` the last two frames' ``motion_counts``; with ``collide`` the last
        frame's ``collisions``, computed here; with ``action_local`` the ``actions``),
        mixed in as ``local_features`` does, for the pixels in play only.
        A pixel is in play if one of the 13 pixels a warp offset would bring to it has
        another colour in the last frame, and it or one of them is a thing that moves
        (``sim.MOVING``). Nothing in the arena moves more than 2 px a frame, so any other
        pixel keeps its colour (~90% of a frame: the background, the objects' insides,
        the obstacles' edges away from anything that moves)."""
        cfg = self.cfg
        if not cfg.warp:
            raise ValueError("only a warp decoder decodes the pixels in play alone")
        prev_idx = history[0]
        b, h, w = prev_idx.shape
        n = h * w
        flat = prev_idx.reshape(b * n)
        small = prev_idx.to(torch.uint8)  # moving 13 copies of a frame: 8x cheaper
        sources = moved(small)
        reach = self.things_near(prev_idx)  # a thing that moves is at or near: (B, n)
        sel = (_any(sources != small.view(b, 1, n), 1) & (reach != 0)).view(b * n)
        sel = sel.nonzero().squeeze(1)
        # padded to a multiple of _COLUMNS with copies of the first pixel in play: every
        # elementwise kernel then runs its vector body over all columns, never a scalar
        # tail (exp2's vector and scalar forms round differently), so a column's bits do
        # not depend on how many others there are
        padded = sel.new_zeros(-(-sel.shape[0] // _COLUMNS) * _COLUMNS)
        padded[: sel.shape[0]] = sel
        if sel.shape[0]:
            padded[sel.shape[0] :] = sel[0]
        session, pixel = padded // n, padded % n
        rows = session * n + cast(torch.Tensor, self.row_of_pixel)[pixel]

        def columns(t: torch.Tensor) -> torch.Tensor:  # (B, C, P) -> (C, padded N)
            return t[session, :, pixel].t()

        base = self._warp_bias().view(-1, 1).expand(-1, padded.shape[0])
        local = self.conv_columns(history, session, pixel)
        brought = columns(sources)
        match = hit = None
        if self.motion_in is not None:
            if counts is None:
                raise ValueError("a motion decoder needs the last two frames' motion_counts")
            match = _share(columns(counts.view(b, len(WARP_OFFSETS), n)))
            _mix_in(local, self.motion_in.weight, match)
        leaving = self.leaving(small) if self.collide_in is not None or cfg.rigid else None
        if self.collide_in is not None:
            assert leaving is not None
            flags = self._collide(leaving, session, brought, flat[padded])
            # mostly zeros: the sum of the weights of the flags that are set, each pixel's
            # in the order of its flags (index_add_ goes through its indices in order)
            k, i = flags.nonzero(as_tuple=True)
            weights = self.collide_in.weight.t().contiguous()
            extra = local.new_zeros(local.shape[1], local.shape[0]).index_add_(0, i, weights[k])
            local += extra.t()
            hit = flags.float()
        if self.action_local is not None:
            if actions is None:
                raise ValueError("an action_local decoder needs the step's actions")
            local += self.action_local(actions)[session].t()
        offsets = self._offset_bias(match, hit)
        if offsets is not None:
            base = torch.cat([base[: cfg.colors], base[cfg.colors :] + offsets])
        rigid = None
        if cfg.rigid:
            assert leaving is not None
            m = sel.shape[0]
            mine = brought.t()[:m]  # (N, offsets), contiguous
            near = reach.view(b * n)[sel]
            rigid = rigid_plan(flat[sel], mine, session[:m], near, leaving, padded.shape[0])
        return DecodePlan(
            sel=sel,
            rows=rows,
            local=local,
            base=base.contiguous(),
            moved=brought.long().contiguous(),
            keep=flat,
            rigid=rigid,
        )

    def decode(self, x: torch.Tensor, plan: DecodePlan, whole: bool = True) -> torch.Tensor:
        """Serving, a warp decoder: final tokens (B, T, D) -> each pixel's arg-max colour
        (B, H, W) long, the pixels in play decoded as ``output`` would (to rounding), the
        others kept; with ``rigid`` and ``whole`` (a step's last pass: its frame) the
        objects moved whole instead (``rigid_colors``, as ``frame_of`` would).

        Column by column: every product is accumulated channel by channel over the pixels
        in play of all sessions at once, so a pixel's numbers do not depend on which
        others are decoded with it (batch-invariant without one call per session)."""
        cfg = self.cfg
        b = x.shape[0]
        out = plan.keep.clone()
        if plan.sel.numel():
            scores = self.scores(x, plan)
            if whole and plan.rigid is not None:
                out[plan.sel] = rigid_colors(scores, plan.rigid)
            else:
                out[plan.sel] = scores.t().contiguous().argmax(1)[: plan.sel.shape[0]]
        return out.view(b, cfg.height, cfg.width)

    def scores(self, x: torch.Tensor, plan: DecodePlan) -> torch.Tensor:
        """``decode``'s colour scores of the pixels in play (colors, padded N): their
        probabilities up to a factor per pixel."""
        cfg = self.cfg
        feats = linear(self.norm(x), self.head).reshape(-1, cfg.pixel)[plan.rows].t()
        h = _mix_in(plan.local.clone(), self.mix.weight, feats).relu_()
        raw = _mix_in(plan.base.clone(), self.logits.weight, h)
        c = cfg.colors
        raw.sub_(raw.amax(0, keepdim=True)).mul_(_LOG2E).exp2_()
        return raw[:c].scatter_add(0, plan.moved, raw[c:])

    def colors_of(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., colors, H, W) logits -> (..., H, W, 3) in [-1, 1]: the arg-max's colour."""
        return cast(torch.Tensor, self.palette)[arg_max_color(logits)]

    def frame_of(self, scores: torch.Tensor, prev_idx: torch.Tensor) -> torch.Tensor:
        """The dense decoder's frames: ``output``'s scores without gradients (B, colors, H,
        W) and the colour indices of the frames before them (B, H, W) -> colour indices
        (B, H, W): with ``rigid`` the objects moved whole (``rigid_colors``, over every
        pixel a thing that moves is at or within reach of: serving's frames, to
        rounding), else each pixel's arg-max."""
        if not self.cfg.rigid:
            return arg_max_color(scores)
        b, c, h, w = scores.shape
        n = h * w
        reach = self.things_near(prev_idx).view(b * n)
        sel = reach.nonzero().squeeze(1)
        columns = scores.reshape(b, c, n).transpose(0, 1).reshape(c, b * n)[:, sel]
        sources = moved(prev_idx).transpose(1, 2).reshape(b * n, len(WARP_OFFSETS))[sel]
        out = prev_idx.reshape(b * n).clone()
        leaving = self.leaving(prev_idx)
        rigid = rigid_plan(out[sel], sources, sel // n, reach[sel], leaving, sel.shape[0])
        out[sel] = rigid_colors(columns, rigid)
        return out.view(b, h, w)


def arg_max_color(logits: torch.Tensor) -> torch.Tensor:
    """(..., colors, H, W) -> (..., H, W) long: the arg-max over the colour axis (taken
    channels-last: a reduction over a strided axis is many times slower)."""
    return logits.movedim(-3, -1).contiguous().argmax(-1)


def rigid_plan(
    own: torch.Tensor,
    sources: torch.Tensor,
    session: torch.Tensor,
    reach: torch.Tensor,
    leaving: torch.Tensor,
    width: int,
) -> RigidPlan:
    """``RigidPlan`` of N columns of pixels: the last frame's colour of each (N,), the colour
    each warp offset brings to it (N, offsets), its session (N,), which things that move
    it is within reach of (N,) (``WorldNet.things_near``), ``WorldNet.leaving`` of the
    sessions' last frames, and the width M >= N of the scores to be decoded (a plan's
    padded columns). The columns must hold every pixel within 2 px of a moving colour's
    edge (a plan's pixels in play do). All things at once: (thing, column) pairs in the
    order of the things, then of the columns."""
    things = _MOVING.to(own.device)
    bits = (reach.unsqueeze(0) & _THING_BITS.to(reach.device).view(-1, 1)) != 0
    thing, col = bits.nonzero().unbind(1)
    color, mine = things[thing], own[col]
    brought = sources[col] == color.to(sources.dtype).unsqueeze(1)  # (K, offsets)
    # if it moves away, the column has the background where it was, else its own colour
    rest = torch.where(mine == color, 0, mine)
    counts = torch.bincount(thing, minlength=len(_MOVING_COLORS)).tolist()
    sessions = session[col]
    return RigidPlan(
        own=own,
        sessions=leaving.shape[0],
        moving_at=color * width + col,
        staying_at=rest * width + col,
        brought=brought,
        rows=sessions * len(_MOVING_COLORS) + thing,
        cols=col.split(counts),
        brings=brought.split(counts),
        session=sessions.split(counts),
        was=tuple((own == c).nonzero().squeeze(1) for c in _MOVING_COLORS),
        leaving=tuple(leaving[:, c].contiguous() for c in _MOVING_COLORS),
    )


def rigid_colors(scores: torch.Tensor, plan: RigidPlan) -> torch.Tensor:
    """A frame decoded object by object (``NetConfig.rigid``): each column's colour
    probabilities up to a factor (colors, M) and the step's ``RigidPlan`` -> the colours of
    its N columns (N,).

    Every object of the arena is rigid, has its own colour and moves by one warp offset a
    frame, never into anything, in the palette's order (the agent, then each ball, as
    ``sim.WorldSim.step`` moves them). So a frame is one offset per thing that moves
    (``sim.MOVING``). For each such colour and offset: the log-probability, summed over
    the columns that offset could change, of the frame in which that colour alone moves by
    it. Taken in order, each colour moves by its most likely offset (the first on a tie)
    among those that keep it inside the arena and off everything there: the obstacles,
    the objects already moved, at their new places, and the ones not yet moved, at their
    old ones. Staying is always possible, so an object never smears, splits, fades or runs
    into another: it keeps every pixel it has, and its pixels agree on where it went.
    Per-column work, sums in column order per session (``index_add_`` goes through its
    indices in order) and integer counts: a session's choice does not depend on the
    others."""
    c = scores.shape[0]
    total = scores[0].clone()
    for k in range(1, c):  # a fixed order of additions, whatever the columns
        total += scores[k]
    logp = (scores.clamp_min(1e-30).log() - total.log()).view(-1)
    things, offsets = len(_MOVING_COLORS), plan.brought.shape[1]
    # each column's log-probability in the frame where its thing alone moves by each offset
    moving, staying = logp.take(plan.moving_at), logp.take(plan.staying_at)
    alone = torch.where(plan.brought, moving.unsqueeze(1), staying.unsqueeze(1))
    score = logp.new_zeros(plan.sessions * things, offsets)
    score = score.index_add_(0, plan.rows, alone).view(plan.sessions, things, -1)
    frame = plan.own.clone()  # the frame as the objects move, one after the other
    for i, color in enumerate(_MOVING_COLORS):
        cols, brings, session = plan.cols[i], plan.brings[i], plan.session[i]
        frame[plan.was[i]] = 0  # the background where it was...
        # ...and the offsets that would run it into whatever is there now
        clash = (brings & (frame[cols] != 0).unsqueeze(1)).to(torch.int32)
        hits = torch.zeros(plan.sessions, offsets, dtype=torch.int32, device=frame.device)
        barred = (hits.index_add_(0, session, clash) > 0) | plan.leaving[i]
        choice = score[:, i].masked_fill(barred, float("-inf")).argmax(1)
        went = brings.gather(1, choice[session].unsqueeze(1)).squeeze(1)
        frame[cols[went]] = color  # ...and it where it went
    return frame


def _mix_in(out: torch.Tensor, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out += weight @ x`` for columns x (K, N), one input channel at a time: each
    column's sum is taken in the same order, whatever N is (batch-invariant)."""
    for k in range(x.shape[0]):
        out.addcmul_(weight[:, k : k + 1], x[k : k + 1])
    return out


def _any(flags: torch.Tensor, dim: int) -> torch.Tensor:
    """``flags.any(dim)`` of a bool tensor, as the largest of its bytes: torch's ``any``
    over an inner axis runs a scalar loop (~30x slower here)."""
    return flags.view(torch.uint8).amax(dim).bool()


def _share(counts: torch.Tensor) -> torch.Tensor:
    """Motion-match counts (uint8) -> the share of the window they are, float."""
    return counts.float() / float(_WINDOW**2)


def _box_sum(x: torch.Tensor, k: int) -> torch.Tensor:
    """The sum over the k x k window around each pixel of x (..., H, W), zeros beyond the
    edge: k shifted adds along each axis (several times faster than a pooling kernel on
    small integer counts)."""
    h, w = x.shape[-2:]
    pad = torch.nn.functional.pad(x, (k // 2,) * 4)
    rows = pad[..., :w].clone()
    for d in range(1, k):
        rows += pad[..., d : d + w]
    out = rows[..., :h, :].clone()
    for d in range(1, k):
        out += rows[..., d : d + h, :]
    return out


def moved(idx: torch.Tensor) -> torch.Tensor:
    """Colour indices (B, H, W) -> (B, offsets, H * W): the frame moved by each warp offset
    (what is at (y - dy, x - dx) comes to (y, x); the background beyond the arena)."""
    b, h, w = idx.shape
    r = _REACH
    pad = torch.nn.functional.pad(idx, (r, r, r, r), value=0)
    shifted = [pad[:, r - dy : r - dy + h, r - dx : r - dx + w] for dy, dx in WARP_OFFSETS]
    return torch.stack(shifted, 1).view(b, len(WARP_OFFSETS), h * w)


def _per_session(weight: torch.Tensor, b: int) -> torch.Tensor:
    """A weight matrix (M, N) as (B, M, N) for ``bmm``: one GEMM per session."""
    return weight.unsqueeze(0).expand(b, -1, -1)


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
    first_before: torch.Tensor,
    first_earlier: torch.Tensor | None = None,
) -> torch.Tensor:
    """Teacher-forced prediction of every frame of a sequence at once.

    context (B, F, H, W, 3): clean frames 0..F-1 (possibly noise-augmented); base: the same
    frames un-augmented (the residual base of each prediction);
    x_t (B, F, H, W, 3): noisy versions of frames 1..F; t (B, F); actions (B, F) (the
    action that turns frame i into i+1); first_before (B, H, W, 3): the frame before
    context frame 0 (its motion input); first_earlier: the frame before that (what a
    3-frame local decoder sees; default: first_before, as at a session's first step).
    Returns the palette logits of frames 1..F (B, F, colors, H, W).
    """
    b, f = context.shape[:2]
    cfg = net.cfg
    flat = context.reshape(b * f, cfg.height, cfg.width, 3)
    clean = net.clean_tokens(flat).view(b, f * cfg.tokens, cfg.dim)
    # the frame before each context frame
    before = torch.cat([first_before.unsqueeze(1), context[:, :-1]], dim=1).reshape(flat.shape)
    noisy = net.noisy_tokens(
        x_t.reshape(b * f, cfg.height, cfg.width, 3),
        t.reshape(-1),
        net.noisy_context(flat, before, actions.reshape(-1)),
    ).view(b, f * cfg.tokens, cfg.dim)
    z = torch.cat([clean, noisy], dim=1)
    age = ages.unsqueeze(0)  # the same for every sequence
    for block in net.layers:
        q, k, v = block.project(z)
        z = block.attend(z, q, k, v, block.age_bias_of(age))
    base_idx = net.color_index(base.reshape(b * f, cfg.height, cfg.width, 3))
    history = [net.color_index(flat), net.color_index(before)]
    if cfg.local_frames > 2:
        first = first_before if first_earlier is None else first_earlier
        earlier = torch.cat(
            [first.unsqueeze(1), first_before.unsqueeze(1), context[:, :-2]], dim=1
        )[:, :f]
        history.append(net.color_index(earlier.reshape(flat.shape)))
    match = net.motion_match(history[0], history[1]) if cfg.motion else None
    hits = net.collisions(history[0]) if cfg.collide else None
    out = net.output(
        z[:, f * cfg.tokens :].reshape(b * f, cfg.tokens, cfg.dim),
        net.local_features(history, match, hits, actions.reshape(-1)),
        net.prior(base_idx, match, hits),
    )
    return out.view(b, f, cfg.colors, cfg.height, cfg.width)
