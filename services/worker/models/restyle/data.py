"""Input videos the restyle model trains and is evaluated on, made here, from a seed.

``clips(seed, n, length)`` gives ``n`` short 64x64 clips at 24 fps, uint8
(n, length, 64, 64, 3), each one of four kinds (``KINDS``, drawn per clip: 20%, 40%, 30%, 10%):

* ``arena``: the world model's 2-D arena (``world.sim``) under its sticky random policy:
  flat colours, crisp edges, small moving squares;
* ``shapes``: soft-edged discs and boxes (some striped) gliding at sub-pixel speeds over a
  gradient or a textured background;
* ``texture``: fractal (1/f) noise, colourized, under a panning camera: the statistics of
  natural images at this size, as a webcam's frames scaled down to 64x64 have;
* ``pattern``: the test pattern a session shows before its first input frame
  (``styles.seed_pattern``), still or sliding sideways.

Then what a camera adds, per clip: exposure drift and flicker, sometimes defocus, and
sensor noise that changes every frame (the flicker the temporal filter smooths). Pure
numpy/torch on the CPU; the same seed gives the same clips.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from services.worker.models.restyle.styles import seed_pattern
from services.worker.models.world import sim

KINDS: tuple[str, ...] = ("arena", "shapes", "texture", "pattern")
_KIND_P = (0.2, 0.4, 0.3, 0.1)
SIZE = 64


def _fractal(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Colourized 1/f noise (height, width, 3) in [0, 1]."""
    out = np.zeros((3, height, width), dtype=np.float32)
    slope = rng.uniform(0.6, 1.4)
    for cells in (3, 6, 12, 24, 48):
        grid = torch.from_numpy(
            rng.standard_normal((1, 3, cells + 3, cells + 3)).astype(np.float32)
        )
        up = torch.nn.functional.interpolate(
            grid, size=(height + 3 * height // cells, width + 3 * width // cells), mode="bicubic"
        )[0, :, :height, :width]
        out += up.numpy() * float(cells) ** (-slope)
    mix = rng.standard_normal((3, 3)).astype(np.float32) + np.eye(3, dtype=np.float32) * 1.5
    img = np.einsum("ij,jhw->hwi", mix, out)
    lo, hi = np.percentile(img, [1, 99], axis=(0, 1))
    img = (img - lo) / np.maximum(hi - lo, 1e-6)
    gain = rng.uniform(0.5, 1.1, size=3)
    return np.clip(img * gain + rng.uniform(-0.15, 0.2, size=3) * (1 - gain), 0.0, 1.0)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A gradient, flat colour or texture (size, size, 3), float in [0, 1]."""
    kind = rng.integers(3)
    if kind == 2:
        return _fractal(rng, size, size)
    a, b = rng.uniform(0, 1, size=(2, 3))
    if kind == 1:
        b = a
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)), 0.0, 1.0)
    return a * (1 - t[..., None]) + b * t[..., None]


@dataclass(frozen=True)
class _Shape:
    """A disc or a box gliding over a ``shapes`` clip."""

    disc: bool
    pos: np.ndarray  # (y, x) of its centre at frame 0
    vel: np.ndarray  # px per frame
    half: np.ndarray  # half height, half width
    color: np.ndarray
    color2: np.ndarray  # the other colour of its stripes
    stripes: float  # stripe width (0: plain)
    soft: float  # edge width (px)

    @staticmethod
    def draw(rng: np.random.Generator) -> _Shape:
        disc = bool(rng.random() < 0.5)
        pos = rng.uniform(-4, SIZE + 4, size=2)
        vel = rng.uniform(-2.5, 2.5, size=2)
        half = rng.uniform(3, 16, size=2)
        color = rng.uniform(0, 1, size=3)
        color2 = rng.uniform(0, 1, size=3)
        stripes = float(rng.uniform(2, 6)) if rng.random() < 0.3 else 0.0
        soft = float(rng.uniform(0.5, 2.0))
        return _Shape(disc, pos, vel, half, color, color2, stripes, soft)


def _shapes_clip(rng: np.random.Generator, length: int) -> np.ndarray:
    margin = 2 * length + 4
    canvas = _background(rng, SIZE + 2 * margin)
    pan = rng.integers(-1, 2, size=2) * rng.integers(0, 2)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5
    shapes = [_Shape.draw(rng) for _ in range(int(rng.integers(1, 7)))]
    out = np.empty((length, SIZE, SIZE, 3))
    for t in range(length):
        oy, ox = margin + pan * t
        frame = canvas[oy : oy + SIZE, ox : ox + SIZE].copy()
        for s in shapes:
            cy, cx = (float(v) for v in s.pos + s.vel * t)
            hy, hx = (float(v) for v in s.half)
            if s.disc:
                r = np.sqrt(((yy - cy) / hy) ** 2 + ((xx - cx) / hx) ** 2)
                inside = (1.0 - r) * min(hy, hx)
            else:
                inside = np.minimum(hy - np.abs(yy - cy), hx - np.abs(xx - cx))
            alpha = np.clip(inside / s.soft + 0.5, 0.0, 1.0)[..., None]
            color = np.broadcast_to(s.color, frame.shape)
            if s.stripes:
                band = (np.floor((yy + xx - cy - cx) / s.stripes) % 2)[..., None]
                color = color * (1 - band) + s.color2 * band
            frame = frame * (1 - alpha) + color * alpha
        out[t] = frame
    return out


def _texture_clip(rng: np.random.Generator, length: int) -> np.ndarray:
    margin = 2 * length + 4
    canvas = _fractal(rng, SIZE + 2 * margin, SIZE + 2 * margin)
    vel = rng.integers(-2, 3, size=2)
    out = np.empty((length, SIZE, SIZE, 3))
    for t in range(length):
        oy, ox = margin + vel * t
        out[t] = canvas[oy : oy + SIZE, ox : ox + SIZE]
    return out


def _pattern_clip(rng: np.random.Generator, length: int) -> np.ndarray:
    frame = seed_pattern(int(rng.integers(2**31)), SIZE, SIZE).astype(np.float64) / 255.0
    shift = int(rng.integers(-1, 2)) * int(rng.integers(0, 2))
    return np.stack([np.roll(frame, shift * t, axis=1) for t in range(length)])


def _camera(rng: np.random.Generator, clip: np.ndarray) -> np.ndarray:
    """Exposure drift and flicker, sometimes defocus, sensor noise; -> uint8."""
    length = clip.shape[0]
    gain = rng.uniform(0.75, 1.2) * (1 + rng.uniform(-0.02, 0.02) * np.arange(length))
    gain = gain * (1 + rng.uniform(0, 0.03) * rng.standard_normal(length))
    clip = clip * gain[:, None, None, None]
    if rng.random() < 0.2:
        p = np.pad(clip, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        blurred = np.zeros_like(clip)
        for dy in range(3):
            for dx in range(3):
                blurred += p[:, dy : dy + SIZE, dx : dx + SIZE]
        clip = blurred / 9.0
    if rng.random() < 0.6:
        sigma = rng.uniform(0.5, 6.0) / 255.0
        clip = clip + rng.standard_normal(clip.shape) * sigma
    return np.round(np.clip(clip, 0.0, 1.0) * 255.0).astype(np.uint8)


def clips(seed: int, n: int, length: int) -> np.ndarray:
    """``n`` clips of ``length`` frames, uint8 (n, length, 64, 64, 3), from ``seed``."""
    rng = np.random.default_rng([seed, 0xC11B])
    kinds = rng.choice(len(KINDS), size=n, p=_KIND_P)
    out = np.empty((n, length, SIZE, SIZE, 3), dtype=np.uint8)
    arena = np.flatnonzero(kinds == 0)
    if arena.size:
        seeds = [int(s) for s in rng.integers(0, 2**31, size=arena.size)]
        frames, _ = sim.generate_episodes(seeds, length - 1, int(rng.integers(2**31)))
        for i, j in enumerate(arena):
            out[j] = _camera(rng, frames[i].astype(np.float64) / 255.0)
    make = (_shapes_clip, _texture_clip, _pattern_clip)
    for j in np.flatnonzero(kinds != 0):
        out[j] = _camera(rng, make[kinds[j] - 1](rng, length))
    return out
