"""Streaming generation for one session: chunks of latent frames, decoded frame by frame.

``WanPipeline`` owns the weights (DiT, VAE decoder, the prompt's cross-attention keys and
values) and is shared by every session; ``StreamState`` is everything one session carries
between frames. ``next_frame`` returns one RGB frame: it decodes the next pending latent
frame when the RGB buffer is empty, and generates a new chunk when no latent is pending.
A chunk is ``frames_per_chunk`` latent frames denoised together in ``steps`` few-step
updates against the KV cache, then passed once more at the context timestep to write their
clean keys/values into the cache.

Prompts: a session records the prompt its cross-attention uses (``StreamState.prompt``,
None = the pipeline's default context). ``generate_chunk`` takes the prompt in effect; when
it differs from the session's, the session switches before the chunk is denoised: the new
prompt is encoded (``PromptEncoder``'s cache, then this pipeline's LRU of cross-attention
keys/values by the text's sha256) and, with ``PipelineConfig.recache_frames`` > 0, the KV
cache entries of the most recent frames are recomputed under the new prompt (LongLive's
KV re-cache, ``_recache``). Those frames' clean latents (and, for action models, their
action windows) are kept in ``StreamState.clean``/``clean_actions`` for that.

Video to video (a pipeline with a VAE encoder, CausVid-style restyle): ``generate_chunk``
takes the input frame in effect. With one, the chunk starts from that frame instead of
pure noise: its latent (``WanVAEEncoder.encode_image``, cached by ``InputFrame.digest``)
stands for every latent frame of the chunk, is noised to the sigma where the last
``v2v_steps`` steps of the schedule begin with the chunk's seeded noise (flow matching:
``x = (1 - sigma) z + sigma noise``), and those steps (at most ``steps`` of them) denoise it
under the session's prompt. A chunk is made at its first frame, so it restyles the one
input frame in effect then (frames sent during a chunk's playback apply from the next
chunk). Without an input frame a chunk is text-to-video, exactly as without an encoder.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from kernels.reference import ring_slots
from kernels.registry import KernelOps
from services.worker.models.base import InputFrame
from services.worker.models.wan.action import ChunkActions
from services.worker.models.wan.config import WanConfig
from services.worker.models.wan.dit import CausalWanDiT
from services.worker.models.wan.kv_cache import KVCache
from services.worker.models.wan.sampler import Schedule
from services.worker.models.wan.umt5 import PromptEncoder, prompt_key
from services.worker.models.wan.vae import StreamCache, WanVAEDecoder
from services.worker.models.wan.vae_encoder import WanVAEEncoder

ContextKV = list[tuple[torch.Tensor, torch.Tensor]]  # every block's cross-attention k/v


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
    prompt: str | None = None  # the prompt the cross-attention uses; None: the default
    # The last n <= recache_frames latent frames as the clean pass saw them (1, C, n, h, w),
    # and for action models their per-frame action windows (n, window * ratio, dims).
    clean: torch.Tensor | None = None
    clean_actions: torch.Tensor | None = None


class WanPipeline:
    def __init__(
        self,
        cfg: WanConfig,
        dit: CausalWanDiT,
        vae: WanVAEDecoder,
        context: torch.Tensor,
        ops: KernelOps,
        device: torch.device,
        encoder: PromptEncoder | None = None,
        prompt_kv_cache: int = 8,
        vae_encoder: WanVAEEncoder | None = None,
        input_cache: int = 8,
    ) -> None:
        """``vae_encoder``: turns on video to video (see the module docstring);
        ``input_cache``: how many encoded input frames are kept (LRU by digest)."""
        p = cfg.pipeline
        if p.window_frames <= 0:
            raise ValueError("window_frames must be positive (frames attended per chunk)")
        ring_frames = cfg.cache_frames() - p.sink_frames
        if ring_frames < p.frames_per_chunk:
            raise ValueError(
                f"window of {p.window_frames} frames with {p.sink_frames} sink frames leaves "
                f"{ring_frames} rolling frames, fewer than a chunk ({p.frames_per_chunk})"
            )
        if p.recache_frames < 0:
            raise ValueError(f"recache_frames must be >= 0, got {p.recache_frames}")
        if encoder is not None and encoder.dim != cfg.dit.text_dim:
            raise ValueError(
                f"text encoder width {encoder.dim} != the DiT's text_dim {cfg.dit.text_dim}"
            )
        if prompt_kv_cache < 1:
            raise ValueError("prompt_kv_cache must be at least 1")
        if not 0.0 < p.v2v_strength <= 1.0:  # NaN fails too
            raise ValueError(f"v2v_strength must be in (0, 1], got {p.v2v_strength}")
        if input_cache < 1:
            raise ValueError("input_cache must be at least 1")
        if vae_encoder is not None and (
            vae_encoder.cfg.z_dim != cfg.dit.in_dim
            or vae_encoder.cfg.spatial_factor != cfg.vae.spatial_factor
        ):
            raise ValueError(
                f"VAE encoder (z_dim {vae_encoder.cfg.z_dim}, spatial factor "
                f"{vae_encoder.cfg.spatial_factor}) does not fit the DiT (in_dim "
                f"{cfg.dit.in_dim}) and decoder (spatial factor {cfg.vae.spatial_factor})"
            )
        self.cfg = cfg
        self.dit = dit.eval()
        self.vae = vae.eval()
        self.ops = ops
        self.device = device
        self.encoder = encoder
        self.schedule = Schedule.from_timesteps(p.timesteps, p.shift)
        self.latent_h, self.latent_w = cfg.latent_hw()
        self.tokens_per_frame = cfg.tokens_per_frame()
        # frames whose clean latents a session keeps (none kept can be recached anyway)
        self.recache_frames = min(p.recache_frames, cfg.cache_frames())
        with torch.inference_mode():
            self.context_kv: ContextKV = dit.embed_context(context.unsqueeze(0).to(device))
        self.prompt_kv_cache = prompt_kv_cache
        self._prompt_kv: OrderedDict[str, ContextKV] = OrderedDict()
        self.vae_encoder = None if vae_encoder is None else vae_encoder.eval()
        n = len(self.schedule.sigmas)
        # video to video: the last v2v_steps steps of the schedule, from v2v_start on
        self.v2v_steps = max(1, min(n, math.floor(p.v2v_strength * n + 0.5)))
        self.v2v_start = n - self.v2v_steps
        self.input_cache = input_cache
        self._inputs: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.input_hits = 0
        self.input_misses = 0

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

    # -- prompts ---------------------------------------------------------------------

    @torch.inference_mode()
    def context_for(self, prompt: str | None) -> ContextKV:
        """The cross-attention keys/values of ``prompt`` (None: the default context)."""
        if prompt is None:
            return self.context_kv
        if self.encoder is None:
            raise ValueError("this pipeline has no text encoder: its prompt is fixed")
        key = prompt_key(prompt)
        kv = self._prompt_kv.get(key)
        if kv is not None:
            self._prompt_kv.move_to_end(key)
            return kv
        context = self.encoder.encode(prompt)
        kv = self.dit.embed_context(context.unsqueeze(0).to(self.device))
        self._prompt_kv[key] = kv
        while len(self._prompt_kv) > self.prompt_kv_cache:
            self._prompt_kv.popitem(last=False)
        return kv

    @torch.inference_mode()
    def switch_prompt(self, st: StreamState, prompt: str | None) -> None:
        """Make ``prompt`` the session's, re-caching its recent frames under it (a no-op
        if it already is)."""
        if prompt == st.prompt:
            return
        context = self.context_for(prompt)  # may raise: the state is untouched then
        if self.recache_frames and st.latent_frames:
            self._recache(st, context)
        st.prompt = prompt

    # -- video to video --------------------------------------------------------------

    @torch.inference_mode()
    def encode_input(self, frame: InputFrame) -> torch.Tensor:
        """The normalized latent of an input frame, (1, z_dim, 1, h, w) float32 on the
        pipeline's device; an LRU of ``input_cache`` encodings by ``frame.digest`` (which
        names the pixels: a held frame is encoded once)."""
        if self.vae_encoder is None:
            raise ValueError("this pipeline has no VAE encoder: it takes no input frames")
        z = self._inputs.get(frame.digest)
        if z is not None:
            self._inputs.move_to_end(frame.digest)
            self.input_hits += 1
            return z
        shape = (self.cfg.pipeline.height, self.cfg.pipeline.width, 3)
        if frame.rgb.shape != shape:
            raise ValueError(f"input frame is {frame.rgb.shape}, the pipeline makes {shape}")
        rgb = frame.rgb if frame.rgb.flags.writeable else frame.rgb.copy()  # torch warns
        z = self.vae_encoder.encode_image(rgb).to(self.device)
        self.input_misses += 1
        self._inputs[frame.digest] = z
        while len(self._inputs) > self.input_cache:
            self._inputs.popitem(last=False)
        return z

    def v2v_schedule(self, steps: int) -> Schedule:
        """The sigmas of a chunk made from an input frame: the schedule's last
        ``v2v_steps`` steps, of which the first ``steps`` (the quality ladder) run."""
        if not 1 <= steps <= len(self.schedule.sigmas):
            raise ValueError(f"steps must be in 1..{len(self.schedule.sigmas)}, got {steps}")
        start = self.v2v_start
        return Schedule(self.schedule.sigmas[start : start + min(steps, self.v2v_steps)])

    # -- generation ------------------------------------------------------------------

    @torch.inference_mode()
    def next_frame(
        self,
        st: StreamState,
        steps: int,
        action: torch.Tensor | None = None,
        prompt: str | None = None,
        frame: InputFrame | None = None,
    ) -> np.ndarray:
        """The session's next RGB frame (H, W, 3) uint8; ``action``, ``prompt`` (the
        prompt in effect, None = the default) and ``frame`` (the input frame in effect,
        None = text to video) condition new chunks only."""
        if not st.rgb:
            if st.pending is None or st.pending.shape[2] == 0:
                self.generate_chunk(st, steps, action, prompt, frame)
            assert st.pending is not None
            latent, st.pending = st.pending[:, :, :1], st.pending[:, :, 1:]
            rgb = self.vae.decode_frame(latent, st.vae)  # (1, 3, T, H, W)
            frames = self.ops.decode_to_uint8(rgb[0].transpose(0, 1))  # (T, H, W, 3)
            st.rgb.extend(frames.cpu().numpy())
        return st.rgb.pop(0)

    def generate_chunk(
        self,
        st: StreamState,
        steps: int,
        action: torch.Tensor | None,
        prompt: str | None = None,
        frame: InputFrame | None = None,
    ) -> None:
        """One chunk: from seeded noise (text to video), or with ``frame`` from that
        frame's latent noised part-way (video to video; see the module docstring)."""
        cfg = self.cfg
        # encoded first: a frame this pipeline cannot take leaves the state untouched
        z = None if frame is None else self.encode_input(frame)
        self.switch_prompt(st, prompt)
        context_kv = self.context_for(st.prompt)
        f = cfg.pipeline.frames_per_chunk
        shape = (1, cfg.dit.in_dim, f, self.latent_h, self.latent_w)
        sched = self.schedule.truncated(steps) if z is None else self.v2v_schedule(steps)
        chunk_actions = self._chunk_actions(st, action)
        x = seeded_noise(st.seed, st.chunks, 0, shape, self.device)
        if z is not None:  # the input's latent for every frame, noised to the first sigma
            sigma0 = sched.sigmas[0]
            x = (1.0 - sigma0) * z.expand(shape) + sigma0 * x
        for i, sigma in enumerate(sched.sigmas):
            t = torch.full((1, f), 1000.0 * sigma, device=self.device)
            flow = self.dit(
                x, t, context_kv, st.kv, st.latent_frames, False, self.ops, chunk_actions
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
        self.dit(x, t0, context_kv, st.kv, st.latent_frames, True, self.ops, chunk_actions)
        st.latent_frames += f
        st.chunks += 1
        st.pending = x if st.pending is None else torch.cat([st.pending, x], dim=2)
        self._keep_clean(st, x, chunk_actions)

    def _keep_clean(self, st: StreamState, x: torch.Tensor, acts: ChunkActions | None) -> None:
        """Keep the last ``recache_frames`` clean latents (and action windows)."""
        n = self.recache_frames
        if n == 0:
            return
        clean = x if st.clean is None else torch.cat([st.clean, x], dim=2)
        st.clean = clean[:, :, -n:].contiguous()
        if acts is not None:
            windows = torch.cat([acts.keyboard[0], acts.mouse[0]], dim=-1)  # (F, group, dims)
            if st.clean_actions is not None:
                windows = torch.cat([st.clean_actions, windows], dim=0)
            st.clean_actions = windows[-n:].contiguous()

    def _recache(self, st: StreamState, context_kv: ContextKV) -> None:
        """Recompute the KV cache entries of the session's most recent frames under
        ``context_kv`` (LongLive's KV re-cache after a prompt switch).

        The frames are those of the kept clean latents that are still in the cache's
        contiguous tail (all frames before the window rolls, the ring's afterwards: sink
        frames that are no longer adjacent keep their entries). They are redone in order,
        in pieces that follow the original chunk grid, each by the clean pass (context
        timestep, RoPE at the frames' own absolute positions, keys after RoPE as always)
        attending to every cached frame older than the piece, which for the frames already
        redone means their new entries, plus the piece itself: the causal structure they
        were made with. Each pass reads a scratch cache holding those older entries and
        writes the piece after them; the new entries are then copied into the piece's
        frames' own slots of the sink/ring layout. ``n_written`` is unchanged.
        """
        kv, tpf = st.kv, self.tokens_per_frame
        f = self.cfg.pipeline.frames_per_chunk
        frames = st.latent_frames
        if kv.n_written != frames * tpf:
            raise ValueError(f"KV cache holds {kv.n_written} tokens, not {frames} frames")
        cap, sink = kv.capacity // tpf, kv.sink // tpf
        tail = frames if frames <= cap else cap - sink
        kept = 0 if st.clean is None else st.clean.shape[2]
        n = min(kept, tail)
        if n == 0:
            return
        first = frames - n
        starts = [first, *range(math.ceil(first / f) * f, frames, f)]
        starts = sorted(set(starts))
        ends = [*starts[1:], frames]
        base = frames - kept  # absolute index of st.clean's first frame
        assert st.clean is not None
        for s, e in zip(starts, ends, strict=True):
            # slots of frames s.. (this piece and the later ones): left out of the context
            later = ring_slots((frames - s) * tpf, kv.sink, kv.ring, s * tpf)
            keep = torch.ones(kv.valid, dtype=torch.bool)
            keep[later] = False
            ctx_slots = keep.nonzero().squeeze(1).to(self.device)
            n_ctx, n_new = ctx_slots.numel(), (e - s) * tpf
            scratch = KVCache(
                keys=[_with_room(k, ctx_slots, n_new) for k in kv.keys],
                values=[_with_room(v, ctx_slots, n_new) for v in kv.values],
                sink=n_ctx,  # the writes go linearly after the context
                ring=n_new,
                n_written=n_ctx,
            )
            x = st.clean[:, :, s - base : e - base]
            acts = None
            if st.clean_actions is not None:
                a = self.cfg.dit.action
                assert a is not None
                w = st.clean_actions[s - base : e - base].unsqueeze(0).to(self.device)
                acts = ChunkActions(
                    keyboard=w[..., : a.keyboard_dim], mouse=w[..., a.keyboard_dim :]
                )
            t0 = torch.full((1, e - s), self.cfg.pipeline.context_timestep, device=self.device)
            self.dit(x, t0, context_kv, scratch, s, True, self.ops, acts)
            slots = later[:n_new].to(self.device)
            for layer in range(len(kv.keys)):
                kv.keys[layer].index_copy_(1, slots, scratch.keys[layer][:, n_ctx:])
                kv.values[layer].index_copy_(1, slots, scratch.values[layer][:, n_ctx:])

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


def _with_room(t: torch.Tensor, slots: torch.Tensor, extra: int) -> torch.Tensor:
    """The ``slots`` of a cache tensor (B, cap, H, D), then ``extra`` empty slots."""
    b, _, h, d = t.shape
    return torch.cat([t.index_select(1, slots), t.new_zeros(b, extra, h, d)], dim=1)
