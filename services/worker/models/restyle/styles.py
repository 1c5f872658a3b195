"""What the restyle model learns: five deterministic image transforms and a temporal filter.

The styles (``STYLES``, the model's actions) map a frame x (RGB in [0, 1]) to a styled one:

* ``none``: x itself;
* ``toon``: each channel posterized to 4 levels (a soft staircase: a 0.2-wide ramp between
  levels), darkened along the luminance's edges;
* ``thermal``: the slightly blurred luminance through a black-purple-red-orange-yellow-white
  colour map;
* ``sketch``: dark pencil lines along the luminance's edges on warm paper, lightly shaded;
* ``night``: a dark, blue-tinted grade (the luminance with deepened shadows, a little of
  the original colour kept).

Edges are Sobel gradients of the blurred luminance (``blur``: [1, 2, 1] x [1, 2, 1] / 16),
|gx| + |gy| (a unit step gives 3), the image's border pixels repeated. Every transform is
local (a 5x5 neighbourhood at most), built from ramps (``clamp``) and products, so a small
convolutional net can learn it.

The temporal filter (``blend``) makes a stream of styled frames stable: each frame is the
styled input pulled towards the previous output where the two differ little (flicker,
sensor noise, slow change: gate up to ``GATE``), and not at all where they differ by
``TOLERANCE`` or more on average over the channels (motion, a cut). ``Reference`` runs the
whole pipeline exactly, frame by frame: the target the model is trained against and
evaluated on.
"""

from __future__ import annotations

import numpy as np
import torch

STYLES: tuple[str, ...] = ("none", "toon", "thermal", "sketch", "night")

GATE = 0.5  # the most of the previous output a frame keeps
TOLERANCE = 0.1  # mean channel difference (in [0, 1]) past which nothing is kept

# thermal: colour-map stops (luminance, RGB)
_THERMAL_AT = (0.0, 0.25, 0.5, 0.7, 0.85, 1.0)
_THERMAL_RGB = (
    (0.04, 0.0, 0.12),
    (0.36, 0.02, 0.6),
    (0.85, 0.1, 0.32),
    (1.0, 0.5, 0.02),
    (1.0, 0.86, 0.12),
    (1.0, 1.0, 0.92),
)
_PAPER = (0.97, 0.94, 0.88)
_NIGHT_TINT = (0.3, 0.5, 0.92)
_NIGHT_LIFT = (0.01, 0.02, 0.06)


def luminance(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W), Rec. 601 weights."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _shifts(x: torch.Tensor) -> list[list[torch.Tensor]]:
    """The 3x3 neighbours of every pixel of (N, C, H, W), border repeated: [dy][dx]."""
    h, w = x.shape[-2:]
    p = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    return [[p[..., dy : dy + h, dx : dx + w] for dx in range(3)] for dy in range(3)]


def edges(lum: torch.Tensor) -> torch.Tensor:
    """|gx| + |gy| of the Sobel gradients of (N, 1, H, W)."""
    s = _shifts(lum)
    gx = (s[0][2] - s[0][0]) + 2.0 * (s[1][2] - s[1][0]) + (s[2][2] - s[2][0])
    gy = (s[2][0] - s[0][0]) + 2.0 * (s[2][1] - s[0][1]) + (s[2][2] - s[0][2])
    return gx.abs() + gy.abs()


def blur(x: torch.Tensor) -> torch.Tensor:
    """[1, 2, 1] x [1, 2, 1] / 16 of (N, C, H, W), border repeated."""
    s = _shifts(x)
    rows = [r[0] + 2.0 * r[1] + r[2] for r in s]
    return (rows[0] + 2.0 * rows[1] + rows[2]) / 16.0


def _ramp(x: torch.Tensor, start: float, width: float) -> torch.Tensor:
    return ((x - start) / width).clamp(0.0, 1.0)


def _colormap(
    v: torch.Tensor, at: tuple[float, ...], rgb: tuple[tuple[float, ...], ...]
) -> torch.Tensor:
    """Piecewise-linear map of (N, 1, H, W) in [0, 1] through ``rgb`` at ``at``."""
    out = torch.tensor(rgb[0], dtype=v.dtype).view(1, 3, 1, 1).expand(v.shape[0], 3, *v.shape[2:])
    for i in range(len(at) - 1):
        delta = torch.tensor(rgb[i + 1], dtype=v.dtype) - torch.tensor(rgb[i], dtype=v.dtype)
        out = out + delta.view(1, 3, 1, 1) * _ramp(v, at[i], at[i + 1] - at[i])
    return out


def toon(x: torch.Tensor) -> torch.Tensor:
    s = x * 3.0
    post = (_ramp(s, 0.4, 0.2) + _ramp(s, 1.4, 0.2) + _ramp(s, 2.4, 0.2)) / 3.0
    return post * (1.0 - 0.85 * _ramp(edges(blur(luminance(x))), 0.3, 0.5))


def thermal(x: torch.Tensor) -> torch.Tensor:
    return _colormap(blur(luminance(x)), _THERMAL_AT, _THERMAL_RGB)


def sketch(x: torch.Tensor) -> torch.Tensor:
    lum = luminance(x)
    line = 1.0 - 0.85 * _ramp(edges(blur(lum)), 0.12, 0.4)
    paper = torch.tensor(_PAPER, dtype=x.dtype).view(1, 3, 1, 1)
    return paper * (0.8 + 0.2 * blur(lum)) * line


def night(x: torch.Tensor) -> torch.Tensor:
    lum = luminance(x)
    dark = lum * (0.35 + 0.65 * lum)
    tint = torch.tensor(_NIGHT_TINT, dtype=x.dtype).view(1, 3, 1, 1)
    lift = torch.tensor(_NIGHT_LIFT, dtype=x.dtype).view(1, 3, 1, 1)
    return dark * tint + 0.12 * x * tint + lift


_TRANSFORMS = (lambda x: x, toon, thermal, sketch, night)


def stylize(x: torch.Tensor, style: int) -> torch.Tensor:
    """Style ``style`` (an index of ``STYLES``) of (N, 3, H, W) in [0, 1], clamped to [0, 1]."""
    return _TRANSFORMS[style](x).clamp(0.0, 1.0)


def blend(fresh: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """The temporal filter: ``fresh`` (N, 3, H, W) pulled towards ``prev`` by a gate that
    falls from ``GATE`` to 0 as their mean channel difference grows to ``TOLERANCE``."""
    d = ((fresh - prev).abs().sum(1, keepdim=True)) / 3.0
    gate = GATE * (1.0 - d / TOLERANCE).clamp(0.0, 1.0)
    return fresh + gate * (prev - fresh)


def to_float(frames: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [0, 1] -> uint8 (N, H, W, 3), rounded."""
    return (x.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy().copy()


class Reference:
    """The exact pipeline the model approximates, one output frame per input frame:
    ``stylize`` then ``blend`` with the previous output (uint8, as the model keeps it;
    black before the first frame)."""

    def __init__(self, n: int, height: int, width: int) -> None:
        self.prev = np.zeros((n, height, width, 3), dtype=np.uint8)

    def step(self, frames: np.ndarray, styles: np.ndarray | list[int]) -> np.ndarray:
        """uint8 input frames (N, H, W, 3) and a style per frame -> uint8 outputs."""
        x = to_float(frames)
        fresh = torch.empty_like(x)
        for s in set(int(v) for v in styles):
            rows = [i for i, v in enumerate(styles) if int(v) == s]
            fresh[rows] = stylize(x[rows], s)
        out = to_uint8(blend(fresh, to_float(self.prev)))
        self.prev = out
        return out


def seed_pattern(seed: int, height: int, width: int) -> np.ndarray:
    """The input a session restyles before its first frame arrives: colour bars over a grey
    ramp, a checker patch and a disc, their colours, sizes and places from ``seed``."""
    rng = np.random.default_rng([seed, 0x7E57])
    img = np.zeros((height, width, 3), dtype=np.float64)
    bars = np.array(
        [[1, 1, 1], [1, 1, 0], [0, 1, 1], [0, 1, 0], [1, 0, 1], [1, 0, 0], [0, 0, 1], [0, 0, 0]],
        dtype=np.float64,
    )
    level = rng.uniform(0.55, 0.9)
    order = rng.permutation(len(bars))
    cols = (np.arange(width) * len(bars)) // width
    top = (height * 2) // 3
    img[:top] = bars[order][cols][None] * level
    ramp = np.linspace(0.0, 1.0, width)
    if rng.random() < 0.5:
        ramp = ramp[::-1]
    img[top:] = ramp[None, :, None]
    yy, xx = np.mgrid[0:height, 0:width]
    cell = int(rng.integers(2, 6))
    cy, cx = (int(v) for v in rng.integers(4, min(height, width) - 20, size=2))
    checker = ((yy // cell + xx // cell) % 2).astype(np.float64)
    patch = (yy >= cy) & (yy < cy + 16) & (xx >= cx) & (xx < cx + 16)
    img[patch] = checker[patch][:, None] * rng.uniform(0.5, 1.0, size=3)
    r = rng.uniform(5, 11)
    dy, dx = rng.uniform(r, height - r), rng.uniform(r, width - r)
    disc = (yy + 0.5 - dy) ** 2 + (xx + 0.5 - dx) ** 2 < r * r
    img[disc] = rng.uniform(0.0, 1.0, size=3)
    return np.round(img * 255.0).astype(np.uint8)
