"""The Wan2.1 VAE encoder in streaming form: RGB frames in, normalized latent means out.

The other half of ``Wan2.1_VAE.pth`` (``encoder.*`` and the 1x1x1 ``conv1`` that yields
the mean and log-variance), built from the decoder's blocks in ``vae.py``. Time is
compressed causally: the first frame is encoded alone into one latent frame and every
later group of ``temporal_factor`` (4) frames into one more, as Wan's ``encode`` does. Each
temporal downsampler passes its first frame through and then convolves (kernel 3, stride
2) with the last frame of its previous input prepended; the 3x3x3 convolutions keep their
last 2 input frames (``StreamCache``), so a video can be encoded in pieces: the first call
with ``1 + 4k`` frames, each later call with ``4k``.

Latents come out normalized like the ones the DiT works on, ``(mu - mean) / std`` with
Wan's 16 per-channel statistics (``VAEConfig.latent_mean``/``latent_std``), the inverse of
what ``WanVAEDecoder.decode_frame`` applies. The mean is returned, never a sample.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from services.worker.models.wan.config import VAEConfig
from services.worker.models.wan.keys import vae_encoder_keys
from services.worker.models.wan.loading import (
    StateDict,
    check_state_dict,
    find_vae,
    load_into,
    read_tensors,
    unwrap,
)
from services.worker.models.wan.vae import (
    AttentionBlock,
    CausalConv3d,
    ResidualBlock,
    RMSNormChannels,
    StreamCache,
    stream_layers,
)

# The keys of Wan2.1_VAE.pth this module holds; the rest (decoder.*, conv2.*) is not ours.
ENCODER_PREFIXES: tuple[str, ...] = ("encoder.", "conv1.")


class Downsample(nn.Module):
    """2x spatial downsampling (zero pad right/bottom, 3x3 stride-2 conv); optionally 2x in time.

    Wan's ``downsample2d``/``downsample3d``. In time, the first call passes its first frame
    through and convolves the rest from it; later calls prepend the previous call's last
    frame. Each call must bring an even number of frames after the first.
    """

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal
        self.resample = nn.Sequential(
            nn.ZeroPad2d((0, 1, 0, 1)),
            nn.Conv2d(dim, dim, 3, stride=2),
        )
        if temporal:
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def stream(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        b, c, t, h, w = x.shape
        out = self.resample(x.transpose(1, 2).reshape(b * t, c, h, w))
        x = out.view(b, t, *out.shape[1:]).transpose(1, 2)
        if not self.temporal:
            return x
        idx, prev = cache.take()
        cache.slots[idx] = x[:, :, -1:].clone()
        if prev is None:  # first call: frame 0 alone, then pairs anchored on it
            if t == 1:
                return x
            return torch.cat([x[:, :, :1], self.time_conv(x)], dim=2)
        return self.time_conv(torch.cat([prev.to(x.dtype), x], dim=2))


class Encoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.dim * m for m in (1, *mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        downs: list[nn.Module] = []
        for i, (cin, cout) in enumerate(itertools.pairwise(dims)):
            for _ in range(cfg.num_res_blocks):
                downs.append(ResidualBlock(cin, cout))
                cin = cout
            if i != len(mult) - 1:
                downs.append(Downsample(cout, temporal=cfg.temporal_downsample[i]))
        self.downsamples = nn.Sequential(*downs)
        self.middle = nn.Sequential(
            ResidualBlock(dims[-1], dims[-1]),
            AttentionBlock(dims[-1]),
            ResidualBlock(dims[-1], dims[-1]),
        )
        self.head = nn.Sequential(
            RMSNormChannels(dims[-1], images=False),
            nn.SiLU(),
            CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, padding=1),
        )

    def stream(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        x = self.conv1.stream(x, cache)
        return stream_layers((*self.downsamples, *self.middle, *self.head), x, cache)


class WanVAEEncoder(nn.Module):
    """``encoder`` + ``conv1`` of the Wan VAE, encoding frames causally across calls."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        # Kept out of the module's buffers so that .to(bfloat16) never rounds them.
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _latent_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._stats:
            shape = (1, -1, 1, 1, 1)
            mean = torch.tensor(self.cfg.latent_mean, dtype=torch.float32, device=device)
            std = torch.tensor(self.cfg.latent_std, dtype=torch.float32, device=device)
            self._stats[device] = (mean.view(shape), std.view(shape))
        return self._stats[device]

    def _check_frames(self, frames: torch.Tensor, first: bool) -> None:
        if frames.dim() != 5 or frames.shape[1] != 3:
            raise ValueError(f"frames must be (B, 3, T, H, W), got {tuple(frames.shape)}")
        t, h, w = frames.shape[2:]
        f, tf = self.cfg.spatial_factor, self.cfg.temporal_factor
        if h % f or w % f:
            raise ValueError(f"frame size {h}x{w} is not a multiple of {f}")
        if first and (t - 1) % tf:
            raise ValueError(f"the first call takes 1 + {tf}k frames, got {t}")
        if not first and (t == 0 or t % tf):
            raise ValueError(f"calls after the first take {tf}k frames (k >= 1), got {t}")

    def moments(self, frames: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        """frames (B, 3, T, H, W) in [-1, 1] -> raw (mu, log-variance), (B, 2 z_dim, t, h, w).

        t is ``1 + (T - 1) / 4`` on the first call of ``cache`` and ``T / 4`` afterwards;
        h, w are H, W over ``spatial_factor``. Computed in the weights' dtype.
        """
        self._check_frames(frames, first=not cache.slots)
        cache.cursor = 0
        x = frames.to(self.conv1.weight.dtype)
        return self.conv1(self.encoder.stream(x, cache))

    def encode_frames(self, frames: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        """frames (B, 3, T, H, W) in [-1, 1] -> normalized latent mean (B, z_dim, t, h, w).

        float32, ``(mu - latent_mean) / latent_std``: what ``WanVAEDecoder.decode_frame``
        takes. See ``moments`` for the frame counts and shapes.
        """
        mu = self.moments(frames, cache)[:, : self.cfg.z_dim].float()
        mean, std = self._latent_stats(mu.device)
        return (mu - mean) / std

    @torch.no_grad()
    def encode_image(self, frame: torch.Tensor | np.ndarray) -> torch.Tensor:
        """One RGB frame, uint8 (H, W, 3), as a first frame -> (1, z_dim, 1, h, w) float32.

        Deterministic (the mean, no sampling) and independent of any earlier call: what a
        per-chunk restyle of the newest input frame encodes.
        """
        img = torch.as_tensor(frame)
        if img.dtype != torch.uint8 or img.dim() != 3 or img.shape[2] != 3:
            raise ValueError(
                f"expected a uint8 (H, W, 3) frame, got {img.dtype} {tuple(img.shape)}"
            )
        x = img.to(self.conv1.weight.device).permute(2, 0, 1)[None, :, None].float()
        return self.encode_frames(x / 127.5 - 1.0, StreamCache())


def encoder_state(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """The ``encoder.*`` and ``conv1.*`` entries of a full Wan VAE state dict."""
    return {k: v for k, v in sd.items() if k.startswith(ENCODER_PREFIXES)}


def build_vae_encoder(
    cfg: VAEConfig,
    seed: int | None = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> WanVAEEncoder:
    """The encoder with random weights (seeded unless ``seed`` is None), created on ``device``."""
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[]), dev:
        if seed is not None:
            torch.manual_seed(seed)
        enc = WanVAEEncoder(cfg)
    return enc.to(dtype=dtype).eval()


def load_vae_encoder(
    source: Mapping[str, torch.Tensor] | str | Path,
    cfg: VAEConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> WanVAEEncoder:
    """The encoder with the weights of a Wan VAE checkpoint, checked strictly.

    ``source``: a state dict (all of ``Wan2.1_VAE.pth``, or just its encoder half), a
    ``.pth``/``.safetensors`` file, or a directory holding ``Wan2.1_VAE.pth``. Its
    ``encoder.*`` and ``conv1.*`` keys must be exactly ``vae_encoder_keys(cfg)`` with their
    shapes (other keys, e.g. the decoder's, are ignored); otherwise ``CheckpointError``
    names the missing, unexpected or mis-shaped keys.
    """
    cfg = cfg or VAEConfig()
    if isinstance(source, str | Path):
        path = Path(source)
        if path.is_dir():
            path = find_vae(path)
        what = f"VAE encoder of {path}"
        sd = unwrap(read_tensors(path))
    else:
        what = "VAE encoder state dict"
        sd = unwrap(source)
    sd = encoder_state(sd)
    expected = vae_encoder_keys(cfg)
    check_state_dict(sd, expected, what)  # before allocating anything
    with torch.device("meta"):
        enc = WanVAEEncoder(cfg)
    enc = enc.to_empty(device=torch.device(device)).to(dtype)
    load_into(enc, sd, expected, what)
    return enc.eval()
