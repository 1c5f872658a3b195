"""The Wan2.1 VAE decoder in streaming form: one latent frame in, RGB frames out.

Every temporal convolution is causal; in streaming mode each one keeps the last frames of
its input (``CACHE_T``) between calls, so decoding latent frames one at a time equals
decoding them all at once. The first latent frame yields one RGB frame and each later one
yields ``temporal_factor`` (4) frames, because the temporal upsamplers skip their first
call. Parameter names follow Wan's VAE checkpoint (``decoder.*``, ``conv2``); the encoder
half of that checkpoint (``encoder.*``, ``conv1``) is verified at load time and dropped
here. ``vae_encoder.py`` builds that half (for video-to-video) from the blocks below.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from services.worker.models.wan.config import VAEConfig

CACHE_T = 2  # input frames a causal 3x3x3 convolution needs from the previous call


@dataclass(slots=True)
class StreamCache:
    """Cached trailing frames of every causal conv, in call order.

    An entry is None before the layer's first call. For a temporal upsampler, an entry with
    zero frames means "first call done, nothing cached yet" (its second call pads with
    zeros instead of cached frames).
    """

    slots: list[torch.Tensor | None] = field(default_factory=list)
    cursor: int = 0

    def take(self) -> tuple[int, torch.Tensor | None]:
        if self.cursor == len(self.slots):
            self.slots.append(None)
        idx = self.cursor
        self.cursor += 1
        return idx, self.slots[idx]


def _tail(x: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
    """The last CACHE_T frames of x, borrowing the previous call's last frame if short."""
    tail = x[:, :, -CACHE_T:]
    if tail.shape[2] < CACHE_T and prev is not None and prev.shape[2] > 0:
        tail = torch.cat([prev[:, :, -1:].to(tail.dtype), tail], dim=2)
    return tail.clone()


class CausalConv3d(nn.Conv3d):
    """Conv3d padded causally in time (all temporal padding in front)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int | tuple[int, int, int],
        padding: int | tuple[int, int, int] = 0,
        stride: int | tuple[int, int, int] = 1,
    ) -> None:
        super().__init__(cin, cout, kernel, stride=stride, padding=0)
        p = (padding, padding, padding) if isinstance(padding, int) else padding
        self.time_pad = 2 * p[0]
        self.space_pad = (p[2], p[2], p[1], p[1])

    def forward(self, x: torch.Tensor, cached: torch.Tensor | None = None) -> torch.Tensor:
        front = self.time_pad
        if cached is not None and cached.shape[2] > 0 and front > 0:
            x = torch.cat([cached.to(x.dtype), x], dim=2)
            front -= cached.shape[2]
        x = F.pad(x, (*self.space_pad, front, 0))
        return super().forward(x)

    def stream(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        idx, prev = cache.take()
        cache.slots[idx] = _tail(x, prev)
        return self.forward(x, prev)


def stream_layers(layers: Iterable[nn.Module], x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
    """Apply ``layers`` in order; those with a ``stream`` method get the cache, in call order."""
    for layer in layers:
        stream = getattr(layer, "stream", None)
        x = stream(x, cache) if stream is not None else layer(x)
    return x


class RMSNormChannels(nn.Module):
    """RMS norm over the channel axis (dim 1), with Wan's sqrt(C) scale and a gamma."""

    def __init__(self, dim: int, images: bool) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        # Index layout matches the checkpoint: 0 norm, 1 act, 2 conv, 3 norm, 4 act, 5 drop, 6 conv
        self.residual = nn.Sequential(
            RMSNormChannels(cin, images=False),
            nn.SiLU(),
            CausalConv3d(cin, cout, 3, padding=1),
            RMSNormChannels(cout, images=False),
            nn.SiLU(),
            nn.Identity(),
            CausalConv3d(cout, cout, 3, padding=1),
        )
        self.shortcut: nn.Module = CausalConv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def stream(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        h = self.shortcut(x)
        return stream_layers(self.residual, x, cache) + h


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention applied to each frame on its own."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNormChannels(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def stream(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(frames)).reshape(b * t, 3, c, h * w)
        q, k, v = (qkv[:, i].transpose(1, 2).unsqueeze(1) for i in range(3))
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2)
        out = self.proj(out.reshape(b * t, c, h, w))
        return x + out.reshape(b, t, c, h, w).transpose(1, 2)


class Upsample(nn.Module):
    """2x spatial upsampling (nearest + conv, halving channels); optionally 2x in time."""

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
            nn.Conv2d(dim, dim // 2, 3, padding=1),
        )
        if temporal:
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))

    def stream(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        b, c, t, h, w = x.shape
        if self.temporal:
            idx, prev = cache.take()
            if prev is None:  # first call: the first latent frame is not doubled in time
                cache.slots[idx] = x[:, :, :0].clone()
            else:
                tail = x[:, :, -CACHE_T:]
                if tail.shape[2] < CACHE_T:
                    front = prev[:, :, -1:] if prev.shape[2] else torch.zeros_like(tail)
                    tail = torch.cat([front.to(tail.dtype), tail], dim=2)
                y = self.time_conv(x, prev if prev.shape[2] else None)
                cache.slots[idx] = tail.clone()
                # channels (2, c) interleave into time: frame i becomes frames 2i, 2i + 1
                x = y.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        t = x.shape[2]
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        out = self.resample(frames)
        return out.view(b, t, *out.shape[1:]).transpose(1, 2)


class Decoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.dim * m for m in (mult[-1], *mult[::-1])]
        temporal_up = tuple(reversed(cfg.temporal_downsample))
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0]),
            AttentionBlock(dims[0]),
            ResidualBlock(dims[0], dims[0]),
        )
        ups: list[nn.Module] = []
        for i, (cin, cout) in enumerate(itertools.pairwise(dims)):
            if i > 0:
                cin //= 2  # the previous upsampler halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                ups.append(ResidualBlock(cin, cout))
                cin = cout
            if i != len(mult) - 1:
                ups.append(Upsample(cout, temporal=temporal_up[i]))
        self.upsamples = nn.Sequential(*ups)
        self.head = nn.Sequential(
            RMSNormChannels(dims[-1], images=False),
            nn.SiLU(),
            CausalConv3d(dims[-1], 3, 3, padding=1),
        )

    def stream(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        x = self.conv1.stream(x, cache)
        return stream_layers((*self.middle, *self.upsamples, *self.head), x, cache)


class WanVAEDecoder(nn.Module):
    """``conv2`` + ``decoder`` of the Wan VAE, decoding one latent frame per call."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)
        self.register_buffer(
            "latent_mean", torch.tensor(cfg.latent_mean).view(1, -1, 1, 1, 1), persistent=False
        )
        self.register_buffer(
            "latent_std", torch.tensor(cfg.latent_std).view(1, -1, 1, 1, 1), persistent=False
        )

    def decode_frame(self, latent: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        """latent (B, z_dim, 1, h, w), normalized -> RGB (B, 3, T, 8h, 8w) in about [-1, 1].

        T is 1 on the first call of ``cache`` and ``temporal_factor`` afterwards.
        """
        if latent.shape[2] != 1:
            raise ValueError(f"decode_frame takes one latent frame, got {latent.shape[2]}")
        wdt = self.conv2.weight.dtype
        std, mean = self.latent_std, self.latent_mean
        assert isinstance(std, torch.Tensor) and isinstance(mean, torch.Tensor)
        z = latent.to(wdt) * std.to(wdt) + mean.to(wdt)
        cache.cursor = 0
        return self.decoder.stream(self.conv2(z), cache)
