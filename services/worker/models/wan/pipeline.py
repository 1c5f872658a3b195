"""Streaming generation for one session: chunks of latent frames, decoded frame by frame.

``WanPipeline`` owns the weights (DiT, VAE decoder, the prompt's cross-attention keys and
values) and is shared by every session; ``StreamState`` is everything one session carries
between frames. ``next_frame`` returns one RGB frame: it decodes the next pending latent
frame when the RGB buffer is empty, and generates a new chunk when no latent is pending.
A chunk is ``frames_per_chunk`` latent frames denoised together in ``steps`` few-step
updates against the KV cache, then passed once more at the context timestep to write their
clean keys/values into the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kernels.registry import KernelOps
from services.worker.models.wan.action import ChunkActions
from services.worker.models.wan.config import WanConfig
from services.worker.models.wan.dit import CausalWanDiT
from services.worker.models.wan.kv_cache import KVCache
from services.worker.models.wan.sampler import Schedule
from services.worker.models.wan.vae import StreamCache, WanVAEDecoder


def seeded_noise(
    seed: int, chunk: int, step: int, shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """Gaussian noise that depends only on (seed, chunk, step): drawn on the CPU."""
    key = np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32, chunk, step]).generate_state(1)
    gen = torch.Generator().manual_seed(int(key[0]))
    return torch.randn(shape, generator=gen).to(device)


@dataclass(slots=True)
class StreamState:
    """One session's generation state (all of it goes into a snapshot)."""

    seed: int
    kv: KVCache
    vae: StreamCache = field(default_factory=StreamCache)
    latent_frames: int = 0  # latent frames generated (the next chunk's RoPE offset)
    chunks: int = 0
    pending: torch.Tensor | None = None  # (1, C, n, h, w) latents not yet decoded
    rgb: list[np.ndarray] = field(default_factory=list)  # decoded frames not yet returned
    actions: torch.Tensor | None = None  # (n, keyboard_dim + mouse_dim) recent RGB-frame actions


class WanPipeline:
    def __init__(
        self,
        cfg: WanConfig,
        dit: CausalWanDiT,
        vae: WanVAEDecoder,
        context: torch.Tensor,
        ops: KernelOps,
        device: torch.device,
    ) -> None:
        p = cfg.pipeline
        if p.window_frames <= 0:
            raise ValueError("window_frames must be positive (frames attended per chunk)")
        ring_frames = cfg.cache_frames() - p.sink_frames
        if ring_frames < p.frames_per_chunk:
            raise ValueError(
                f"window of {p.window_frames} frames with {p.sink_frames} sink frames leaves "
                f"{ring_frames} rolling frames, fewer than a chunk ({p.frames_per_chunk})"
            )
        self.cfg = cfg
        self.dit = dit.eval()
        self.vae = vae.eval()
        self.ops = ops
        self.device = device
        self.schedule = Schedule.from_timesteps(p.timesteps, p.shift)
        self.latent_h, self.latent_w = cfg.latent_hw()
        self.tokens_per_frame = cfg.tokens_per_frame()
        with torch.inference_mode():
            self.context_kv = dit.embed_context(context.unsqueeze(0).to(device))

    # -- state -----------------------------------------------------------------------

    def new_state(self, seed: int) -> StreamState:
        return StreamState(seed=seed, kv=self.empty_cache())

    def empty_cache(self) -> KVCache:
        d, p = self.cfg.dit, self.cfg.pipeline
        tpf = self.tokens_per_frame
        return KVCache.empty(
            layers=d.num_layers,
            batch=1,
            heads=d.num_heads,
            head_dim=d.head_dim,
            sink_tokens=p.sink_frames * tpf,
            ring_tokens=(self.cfg.cache_frames() - p.sink_frames) * tpf,
            dtype=self.dit.patch_embedding.weight.dtype,
            device=self.device,
        )

    # -- generation ------------------------------------------------------------------

    @torch.inference_mode()
    def next_frame(
        self, st: StreamState, steps: int, action: torch.Tensor | None = None
    ) -> np.ndarray:
        """The session's next RGB frame (H, W, 3) uint8; ``action`` conditions new chunks."""
        if not st.rgb:
            if st.pending is None or st.pending.shape[2] == 0:
                self.generate_chunk(st, steps, action)
            assert st.pending is not None
            latent, st.pending = st.pending[:, :, :1], st.pending[:, :, 1:]
            rgb = self.vae.decode_frame(latent, st.vae)  # (1, 3, T, H, W)
            frames = self.ops.decode_to_uint8(rgb[0].transpose(0, 1))  # (T, H, W, 3)
            st.rgb.extend(frames.cpu().numpy())
        return st.rgb.pop(0)

    def generate_chunk(self, st: StreamState, steps: int, action: torch.Tensor | None) -> None:
        cfg = self.cfg
        f = cfg.pipeline.frames_per_chunk
        shape = (1, cfg.dit.in_dim, f, self.latent_h, self.latent_w)
        sched = self.schedule.truncated(steps)
        chunk_actions = self._chunk_actions(st, action)
        x = seeded_noise(st.seed, st.chunks, 0, shape, self.device)
        for i, sigma in enumerate(sched.sigmas):
            t = torch.full((1, f), 1000.0 * sigma, device=self.device)
            flow = self.dit(
                x, t, self.context_kv, st.kv, st.latent_frames, False, self.ops, chunk_actions
            )
            sigma_next = sched.next_sigma(i)
            noise = (
                seeded_noise(st.seed, st.chunks, i + 1, shape, self.device)
                if sigma_next > 0
                else None
            )
            x = self.ops.sampler_update(x, flow, sigma, sigma_next, noise)
        # The clean pass: commit this chunk's keys/values to the cache.
        t0 = torch.full((1, f), cfg.pipeline.context_timestep, device=self.device)
        self.dit(x, t0, self.context_kv, st.kv, st.latent_frames, True, self.ops, chunk_actions)
        st.latent_frames += f
        st.chunks += 1
        st.pending = x if st.pending is None else torch.cat([st.pending, x], dim=2)

    def _chunk_actions(self, st: StreamState, action: torch.Tensor | None) -> ChunkActions | None:
        """Per-latent-frame windows of per-RGB-frame actions; the chunk repeats ``action``."""
        a = self.cfg.dit.action
        if a is None:
            return None
        if action is None:
            action = torch.zeros(a.keyboard_dim + a.mouse_dim)
        ratio, f = a.vae_time_compression, self.cfg.pipeline.frames_per_chunk
        first = st.latent_frames == 0
        new_rgb = 1 + ratio * (f - 1) if first else ratio * f
        hist = st.actions if st.actions is not None else action.new_zeros(0, action.numel())
        seq = torch.cat([hist, action.float().view(1, -1).expand(new_rgb, -1)], dim=0)
        group = a.window * ratio
        pad = max(0, group - len(hist) - 1)
        seq_padded = torch.cat([seq[:1].expand(pad, -1), seq], dim=0)
        ends = [len(hist) + (1 + ratio * j if first else ratio * (j + 1)) + pad for j in range(f)]
        windows = torch.stack([seq_padded[e - group : e] for e in ends])  # (F, group, dims)
        st.actions = seq[-group:].clone()
        windows = windows.unsqueeze(0).to(self.device)
        return ChunkActions(
            keyboard=windows[..., : a.keyboard_dim], mouse=windows[..., a.keyboard_dim :]
        )
