"""The restyle model's network: a small convolutional net per style and a learned gate.

For style s and an input frame x (RGB in [0, 1]), ``hidden`` channels per layer:

    h1 = relu(conv3x3_s(x) + conv1x1_s(levels(x)))   # x's border pixels repeated
    h2 = relu(conv3x3_s(h1))                         # zero padding
    h3 = relu(conv1x1_s(h2))
    f  = conv1x1_s(h3) + skip_s(x)                   # the styled frame (a 5x5 view of x)

``levels(x)`` codes each channel of each pixel in ``levels`` hat functions (1 at its level,
falling to 0 at the neighbouring ones: a piecewise-linear basis over [0, 1]), so the first
layer can take any smooth function of a pixel's colour (a grade, a posterization, a colour
map) by a linear map; ``skip_s`` (a 3x3 colour matrix, the identity at the start) makes the
rest a correction of the input. Then the temporal term, with the previous output frame p
(what the session made last):

    d   = mean over channels of |f - p|
    g   = clamp(a_s - b_s * d, 0, 1)                 # a learned gate per style
    out = f + g * (p - f)

a frame leans on the last one where they differ little (flicker, noise) and not where they
differ much (motion, a cut): a session's frames depend on its history.

Two passes share the weights. ``RestyleNet.fresh``/``blend`` (training) run all styles at
once as (grouped) convolutions. ``Server`` (the model's step) runs each session's
convolutions as matrix products on the same shapes whether it is stepped alone or in a
batch: a 3x3 convolution is nine products accumulated in a fixed order over shifted views
of a zero-bordered, row-padded buffer (no copies), one session at a time (its buffers stay
in cache); everything else is elementwise (exact, whatever the batch). So a session's
frames are bit-identical alone or batched.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

_ALIGN = 16  # floats: per-session buffers are multiples of 64 bytes


@dataclass(frozen=True)
class RestyleConfig:
    height: int = 64
    width: int = 64
    styles: int = 5
    hidden: int = 32
    levels: int = 16  # hat functions per channel (0: none)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class RestyleNet(nn.Module):
    def __init__(self, cfg: RestyleConfig) -> None:
        super().__init__()
        if (
            min(cfg.height, cfg.width, cfg.styles, cfg.hidden) < 1
            or cfg.levels in (1,)
            or cfg.levels < 0
        ):
            raise ValueError(f"a RestyleConfig needs positive sizes (levels 0 or >= 2), got {cfg}")
        self.cfg = cfg
        s, c = cfg.styles, cfg.hidden
        self.w1 = nn.Parameter(torch.randn(s, c, 3, 3, 3) * (2.0 / 27) ** 0.5)
        self.b1 = nn.Parameter(torch.zeros(s, c))
        self.w0 = nn.Parameter(
            torch.randn(s, c, 3 * cfg.levels) * (2.0 / max(1, 3 * cfg.levels)) ** 0.5
        )
        self.w2 = nn.Parameter(torch.randn(s, c, c, 3, 3) * (2.0 / (9 * c)) ** 0.5)
        self.b2 = nn.Parameter(torch.zeros(s, c))
        self.wm = nn.Parameter(torch.randn(s, c, c) * (2.0 / c) ** 0.5)
        self.bm = nn.Parameter(torch.zeros(s, c))
        self.w3 = nn.Parameter(torch.randn(s, 3, c) * (1.0 / c) ** 0.5 * 0.1)
        self.b3 = nn.Parameter(torch.zeros(s, 3))
        self.skip = nn.Parameter(torch.eye(3).repeat(s, 1, 1))  # starts as the input itself
        # gate = clamp(a - b * d, 0, 1): starts at a mild pull towards the last frame
        self.gate = nn.Parameter(torch.tensor([0.3, 3.0]).repeat(s, 1))

    # ---- training: every style at once ----

    def fresh(self, x: torch.Tensor) -> torch.Tensor:
        """The styled frames f of x (N, 3, H, W) in every style -> (N, S, 3, H, W)."""
        n = x.shape[0]
        s, c = self.cfg.styles, self.cfg.hidden
        conv = torch.nn.functional.conv2d
        pad = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
        h = conv(pad, self.w1.reshape(s * c, 3, 3, 3), self.b1.reshape(-1))
        if self.cfg.levels:
            h = h + conv(
                levels(x.unsqueeze(2), self.cfg.levels).flatten(1, 2),
                self.w0.reshape(s * c, -1, 1, 1),
            )
        h = torch.relu(h)
        h = torch.relu(
            torch.nn.functional.conv2d(
                h, self.w2.reshape(s * c, c, 3, 3), self.b2.reshape(-1), padding=1, groups=s
            )
        )
        h = torch.relu(conv(h, self.wm.reshape(s * c, c, 1, 1), self.bm.reshape(-1), groups=s))
        f = conv(h, self.w3.reshape(s * 3, c, 1, 1), self.b3.reshape(-1), groups=s)
        f = f + conv(x, self.skip.reshape(s * 3, 3, 1, 1))
        return f.view(n, s, 3, *x.shape[2:])

    def blend(self, fresh: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """The gated blend of ``fresh`` (N, S, 3, H, W) with ``prev`` (N, S or 1, 3, H, W)."""
        a, b = self.gate[:, 0].view(1, -1, 1, 1, 1), self.gate[:, 1].view(1, -1, 1, 1, 1)
        d = (fresh - prev).abs().sum(2, keepdim=True) / 3.0
        g = (a - b * d).clamp(0.0, 1.0)
        return (fresh + g * (prev - fresh)).clamp(0.0, 1.0)

    # ---- serving: batch-invariant ----

    def serving_weights(self) -> dict[str, torch.Tensor]:
        """The weights laid out for ``serve`` (detached, contiguous)."""
        s, c = self.cfg.styles, self.cfg.hidden
        with torch.no_grad():
            return {
                # (S, 9, Cout, Cin): one matrix per kernel tap (dy, dx), row-major
                "w1": self.w1.permute(0, 3, 4, 1, 2).reshape(s, 9, c, 3).contiguous(),
                "b1": self.b1.reshape(s, c, 1).contiguous(),
                "w0": self.w0.detach().contiguous(),
                "w2": self.w2.permute(0, 3, 4, 1, 2).reshape(s, 9, c, c).contiguous(),
                "b2": self.b2.reshape(s, c, 1).contiguous(),
                "wm": self.wm.detach().contiguous(),
                "bm": self.bm.reshape(s, c, 1).contiguous(),
                "w3": self.w3.detach().contiguous(),
                "b3": self.b3.reshape(s, 3, 1).contiguous(),
                "skip": self.skip.detach().contiguous(),
                "gate_a": self.gate[:, 0].detach().clone(),
                "gate_b": self.gate[:, 1].detach().clone(),
            }


def levels(x: torch.Tensor, k: int) -> torch.Tensor:
    """Hat codes of x (A, C, 1, ...) in [0, 1] -> (A, C, k, ...): code j is 1 at
    x = j / (k - 1) and falls linearly to 0 at the neighbouring levels (elementwise: exact,
    whatever the batch)."""
    at = torch.arange(k, dtype=x.dtype).view(k, *([1] * (x.dim() - 3)))
    return (1.0 - (x * float(k - 1) - at).abs()).clamp_(min=0.0)


class Server:
    """The serving pass of a ``RestyleNet`` (the model's step): its weights laid out for
    it, and its constants for the net's frame size."""

    def __init__(self, net: RestyleNet) -> None:
        cfg = net.cfg
        self.cfg = cfg
        self.w = net.serving_weights()
        h, w = cfg.height, cfg.width
        self.row = w + 2  # a padded row
        self.n = h * self.row  # outputs computed per channel (2 junk columns a row)
        # rows: 1 border, h, 1 border, 1 more (the last taps' views run past the border)
        self.length = -(-((h + 3) * self.row) // _ALIGN) * _ALIGN
        self.taps = [dy * self.row + dx for dy in range(3) for dx in range(3)]
        mask = torch.ones(h, self.row)
        mask[:, w:] = 0.0
        self.mask = mask.view(1, self.n)  # zero at the junk columns

    def fresh(self, x: torch.Tensor, styles: list[int]) -> torch.Tensor:
        """The styled frames f of x (B, 3, H, W) in [0, 1], session i in ``styles[i]``,
        -> (B, 3, H, W)."""
        cfg, wt = self.cfg, self.w
        b, c = x.shape[0], cfg.hidden
        h, w, row, n = cfg.height, cfg.width, self.row, self.n
        pad = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
        inp = x.new_zeros(b, 3, self.length)
        inp[:, :, : (h + 2) * row] = pad.reshape(b, 3, -1)
        hid = x.new_zeros(b, c, self.length)
        out = x.new_empty(b, 3, n)
        for i, s in enumerate(styles):
            src = inp[i : i + 1]
            center = src[:, :, row + 1 : row + 1 + n]
            h1 = self._conv(src, wt["w1"][s], wt["b1"][s])
            if cfg.levels:
                h1.baddbmm_(
                    wt["w0"][s].unsqueeze(0), levels(center.unsqueeze(2), cfg.levels).flatten(1, 2)
                )
            torch.relu_(h1)
            # into the next layer's zero-bordered buffer, the junk columns zeroed: they
            # land on its left and right borders
            hid[i : i + 1, :, row + 1 : row + 1 + n] = h1 * self.mask
            h2 = self._conv(hid[i : i + 1], wt["w2"][s], wt["b2"][s])
            torch.relu_(h2)
            h3 = torch.baddbmm(wt["bm"][s].unsqueeze(0), wt["wm"][s].unsqueeze(0), h2)
            torch.relu_(h3)
            f = torch.baddbmm(wt["b3"][s].unsqueeze(0), wt["w3"][s].unsqueeze(0), h3)
            f.baddbmm_(wt["skip"][s].unsqueeze(0), center)
            out[i : i + 1] = f
        return out.view(b, 3, h, row)[..., :w]

    def _conv(self, src: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """3x3 convolution of one session's padded buffer (1, Cin, length) -> (1, Cout, n):
        nine products over shifted views, accumulated in a fixed order."""
        n = self.n
        out = torch.baddbmm(bias.unsqueeze(0), weight[0].unsqueeze(0), src[:, :, :n])
        for k in range(1, 9):
            off = self.taps[k]
            out.baddbmm_(weight[k].unsqueeze(0), src[:, :, off : off + n])
        return out

    def blend(self, fresh: torch.Tensor, prev: torch.Tensor, styles: list[int]) -> torch.Tensor:
        """``RestyleNet.blend`` for (B, 3, H, W), each session's gate by its style:
        elementwise ops only, the channel sum in a fixed order."""
        idx = torch.tensor(styles, dtype=torch.long)
        a = self.w["gate_a"][idx].view(-1, 1, 1, 1)
        b = self.w["gate_b"][idx].view(-1, 1, 1, 1)
        diff = (fresh - prev).abs()
        d = (diff[:, 0:1] + diff[:, 1:2] + diff[:, 2:3]) / 3.0
        g = (a - b * d).clamp(0.0, 1.0)
        return (fresh + g * (prev - fresh)).clamp(0.0, 1.0)
