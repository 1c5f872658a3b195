"""Configurations of the causal Wan family: DiT, VAE, action modules, streaming pipeline.

``wan21_t2v_1p3b()`` is Wan2.1-T2V-1.3B (CausVid, Self-Forcing and LongLive share it);
``tiny()`` is the same architecture at toy width for tests and demos on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True, slots=True)
class ActionConfig:
    """Matrix-Game 2.0 style keyboard/mouse modules, inserted into some DiT blocks."""

    blocks: tuple[int, ...]  # indices of the DiT blocks that carry an action module
    keyboard_dim: int = 4  # multi-hot keys (Matrix-Game 2.0 universal: W, S, A, D)
    mouse_dim: int = 2  # camera pitch/yaw deltas
    hidden_size: int = 128  # keyboard embedding width
    keyboard_hidden_dim: int = 1024
    mouse_hidden_dim: int = 1024
    heads: int = 16
    window: int = 3  # latent frames of action history each latent frame sees
    vae_time_compression: int = 4  # RGB frames per latent frame
    qkv_bias: bool = False


@dataclass(frozen=True, slots=True)
class DiTConfig:
    """The Wan2.1 diffusion transformer; defaults are the 1.3B model."""

    num_layers: int = 30
    dim: int = 1536
    num_heads: int = 12
    ffn_dim: int = 8960
    freq_dim: int = 256  # sinusoidal timestep embedding width
    text_dim: int = 4096  # umT5-XXL hidden size
    text_len: int = 512  # context is zero-padded to this many tokens
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    rope_theta: float = 10000.0
    action: ActionConfig | None = None

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by {self.num_heads} heads")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head dim {self.head_dim} must be even and >= 6 for 3D RoPE")


@dataclass(frozen=True, slots=True)
class VAEConfig:
    """The Wan2.1 VAE (z_dim 16, 8x spatial and 4x temporal compression)."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    # Per-channel latent statistics of Wan2.1's VAE: latents are (z - mean) / std.
    latent_mean: tuple[float, ...] = (
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    )  # fmt: skip
    latent_std: tuple[float, ...] = (
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
    )  # fmt: skip

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    """Streaming generation: chunking, KV window and the few-step schedule."""

    height: int = 480  # RGB pixels
    width: int = 832
    frames_per_chunk: int = 3  # latent frames generated per autoregressive step
    # Denoising timesteps on the 0..1000 training scale, before the shift is applied.
    timesteps: tuple[int, ...] = (1000, 750, 500, 250)
    shift: float = 5.0  # flow-matching timestep shift
    # Frames attended per chunk (cache + current chunk); 0 means unbounded (Self-Forcing).
    window_frames: int = 12
    sink_frames: int = 3  # first frames kept forever once the window rolls (LongLive)
    context_timestep: float = 0.0  # timestep of the clean pass that writes the KV cache
    # LongLive's KV re-cache: on a prompt switch, the cache entries of the most recent
    # frames (at most this many, and at most what the cache holds) are recomputed under
    # the new prompt from their clean latents; 0 turns it off.
    recache_frames: int = 9
    # Video to video (models with a VAE encoder): a chunk made from an input frame runs the
    # last round(v2v_strength * len(timesteps)) steps of the schedule (at least one), from
    # its input's latent noised to the first of them; 1.0 starts from pure noise.
    v2v_strength: float = 0.5
    fps: float = 16.0
    dtype: str = "float32"  # "bfloat16" on a GPU


@dataclass(frozen=True, slots=True)
class WanConfig:
    dit: DiTConfig = field(default_factory=DiTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def latent_hw(self) -> tuple[int, int]:
        f = self.vae.spatial_factor
        p = self.dit.patch_size
        h, w = self.pipeline.height, self.pipeline.width
        if h % (f * p[1]) or w % (f * p[2]):
            raise ValueError(f"{h}x{w} is not a multiple of {f * p[1]}x{f * p[2]}")
        return h // f, w // f

    def tokens_per_frame(self) -> int:
        h, w = self.latent_hw()
        return (h // self.dit.patch_size[1]) * (w // self.dit.patch_size[2])

    def cache_frames(self) -> int:
        """Latent frames the KV cache holds (0 = grows without bound)."""
        p = self.pipeline
        if p.window_frames <= 0:
            return 0
        return p.window_frames - p.frames_per_chunk


def wan21_t2v_1p3b(**pipeline: object) -> WanConfig:
    """Wan2.1-T2V-1.3B in causal form, 480x832, LongLive-style rolling window."""
    return WanConfig(pipeline=replace(PipelineConfig(), **pipeline))  # type: ignore[arg-type]


def matrix_game_2(**pipeline: object) -> WanConfig:
    """The Wan-shaped 1.3B model with Matrix-Game 2.0's action modules (352x640)."""
    defaults: dict[str, object] = {"height": 352, "width": 640, "window_frames": 15}
    defaults.update(pipeline)
    return WanConfig(
        dit=DiTConfig(action=ActionConfig(blocks=tuple(range(15)))),
        pipeline=replace(PipelineConfig(), **defaults),  # type: ignore[arg-type]
    )


def tiny(action: bool = False, **pipeline: object) -> WanConfig:
    """The same architecture at toy size: 2 blocks, dim 64, 64x96 RGB."""
    defaults: dict[str, object] = {
        "height": 64, "width": 96, "window_frames": 9, "sink_frames": 3, "recache_frames": 6,
    }  # fmt: skip
    defaults.update(pipeline)
    act = (
        ActionConfig(
            blocks=(0,), hidden_size=16, keyboard_hidden_dim=32, mouse_hidden_dim=32, heads=4
        )
        if action
        else None
    )
    return WanConfig(
        dit=DiTConfig(
            num_layers=2,
            dim=64,
            num_heads=4,
            ffn_dim=128,
            freq_dim=32,
            text_dim=48,
            text_len=16,
            action=act,
        ),
        vae=VAEConfig(dim=8),
        pipeline=replace(PipelineConfig(), **defaults),  # type: ignore[arg-type]
    )
