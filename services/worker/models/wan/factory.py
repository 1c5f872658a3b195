"""Factories the worker's model registry calls (``services.worker.models.registry``).

* ``load_tiny``: the architecture at toy size with seeded random weights (tests, demos).
* ``load_checkpoint``: Wan2.1-T2V-1.3B in causal form from local files — a Wan model
  directory (DiT + VAE), optionally a Self-Forcing/CausVid/LongLive generator checkpoint
  replacing the DiT weights and a LongLive LoRA merged into them, plus a precomputed umT5
  prompt embedding.
* ``build_random``: any configuration with random weights (GPU benchmarks of the 1.3B).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from kernels.registry import KernelRegistry
from services.worker.models.wan.adapter import WanWorldModel
from services.worker.models.wan.config import (
    ActionConfig,
    DiTConfig,
    PipelineConfig,
    WanConfig,
    tiny,
    wan21_t2v_1p3b,
)
from services.worker.models.wan.dit import CausalWanDiT
from services.worker.models.wan.keys import dit_keys, vae_decoder_keys, vae_keys
from services.worker.models.wan.loading import (
    LORA_WRAPPER_KEYS,
    check_state_dict,
    find_vae,
    load_into,
    merge_lora,
    read_dit_dir,
    read_tensors,
    unwrap,
)
from services.worker.models.wan.pipeline import WanPipeline
from services.worker.models.wan.text import load_text_embedding, random_text_embedding
from services.worker.models.wan.vae import WanVAEDecoder
from windflow.errors import CheckpointError, InvalidArgument

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PIPELINE_FIELDS = set(PipelineConfig.__dataclass_fields__)


def _pipeline_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = set(options) - _PIPELINE_FIELDS
    if unknown:
        raise InvalidArgument(
            f"unknown Wan options: {', '.join(sorted(unknown))} "
            f"(pipeline options: {', '.join(sorted(_PIPELINE_FIELDS))})"
        )
    if "timesteps" in options:
        options["timesteps"] = tuple(int(t) for t in options["timesteps"])
    return options


def _device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build_modules(
    cfg: WanConfig, device: torch.device, dtype: torch.dtype, seed: int | None
) -> tuple[CausalWanDiT, WanVAEDecoder]:
    """Instantiate the DiT and VAE decoder; seeded random init when ``seed`` is given.

    Parameters are created on ``device`` directly (the 1.3B never passes through host RAM).
    """
    with torch.random.fork_rng(devices=[]), device:
        if seed is not None:
            torch.manual_seed(seed)
        dit = CausalWanDiT(cfg.dit)
        vae = WanVAEDecoder(cfg.vae)
    return dit.to(device=device, dtype=dtype), vae.to(device=device, dtype=dtype)


def _assemble(
    model_id: str,
    cfg: WanConfig,
    dit: CausalWanDiT,
    vae: WanVAEDecoder,
    context: torch.Tensor,
    device: torch.device,
    weights_id: str,
    description: str,
    kernels: str,
) -> WanWorldModel:
    ops = KernelRegistry(prefer=kernels).ops(device)  # type: ignore[arg-type]
    pipe = WanPipeline(cfg, dit, vae, context, ops, device)
    return WanWorldModel(model_id, pipe, weights_id, description)


def load_tiny(
    seed: int = 0,
    action: bool = False,
    device: str | None = "cpu",
    kernels: str = "auto",
    **pipeline: Any,
) -> WanWorldModel:
    """The causal Wan architecture at toy size (2 blocks, dim 64) with random weights."""
    cfg = tiny(action=action, **_pipeline_options(dict(pipeline)))
    dev = _device(device)
    dit, vae = build_modules(cfg, dev, _DTYPES[cfg.pipeline.dtype], seed)
    context = random_text_embedding(seed, 8, cfg.dit.text_dim)
    model_id = "matrix-game-2-tiny" if action else "wan-causal-tiny"
    return _assemble(
        model_id, cfg, dit, vae, context, dev, f"random:{seed}",
        "Causal Wan2.1 architecture at toy size with random weights", kernels,
    )  # fmt: skip


def build_random(
    cfg: WanConfig, device: str | None = None, seed: int = 0, kernels: str = "auto"
) -> WanWorldModel:
    """Any configuration (e.g. the full 1.3B) with random weights, for benchmarks."""
    dev = _device(device)
    dit, vae = build_modules(cfg, dev, _DTYPES[cfg.pipeline.dtype], seed)
    context = random_text_embedding(seed, 64, cfg.dit.text_dim)
    return _assemble(
        "wan2.1-causal-random", cfg, dit, vae, context, dev, f"random:{seed}",
        "Causal Wan2.1 with random weights (benchmark)", kernels,
    )  # fmt: skip


def load_dit_state(
    path: Path,
    generator: str | Path | None,
    lora: str | Path | None,
    lora_alpha: float | None,
    use_ema: bool,
) -> dict[str, torch.Tensor]:
    """The DiT state dict: the generator file if given, else the Wan directory's DiT."""
    if generator is not None:
        sd = unwrap(read_tensors(generator), ema=use_ema)
        source = str(generator)
    else:
        sd = read_dit_dir(path)
        source = str(path)
    if lora is not None:
        lora_sd = unwrap(read_tensors(lora), LORA_WRAPPER_KEYS)
        sd = merge_lora(sd, lora_sd, alpha=lora_alpha)
        source += f" + LoRA {lora}"
    log.info("DiT weights from %s", source)
    return sd


def load_checkpoint(
    path: str | None = None,
    text_embedding: str | None = None,
    generator: str | None = None,
    lora: str | None = None,
    lora_alpha: float | None = None,
    use_ema: bool = True,
    action: bool = False,
    device: str | None = None,
    kernels: str = "auto",
    model_id: str = "wan2.1-causal",
    size: str = "1.3b",
    **pipeline: Any,
) -> WanWorldModel:
    """Causal Wan2.1-T2V-1.3B from local files.

    ``path``: a Wan2.1-T2V-1.3B directory (``diffusion_pytorch_model*.safetensors`` and
    ``Wan2.1_VAE.pth``). ``generator``: a Self-Forcing / CausVid / LongLive checkpoint whose
    ``generator_ema`` (or ``generator``) replaces the directory's DiT. ``lora``: a LoRA file
    merged into the DiT (scale ``lora_alpha / rank``, default 1). ``text_embedding``: the
    prompt's umT5 output (see ``text.py``; default ``<path>/prompt.safetensors``).
    ``action``: Wan-shaped checkpoints with Matrix-Game 2.0 action modules in blocks 0-14.
    ``size``: "1.3b" (default) or "tiny" (the toy architecture, for round-trip tests).
    Remaining keyword options set ``PipelineConfig`` fields (height, width, timesteps, ...).
    """
    if not path:
        raise InvalidArgument(
            f"model {model_id!r} needs option path=<directory with the Wan2.1-T2V-1.3B "
            "weights>; nothing is downloaded at run time"
        )
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a directory")
    dev = _device(device)
    popts = _pipeline_options(dict(pipeline))
    popts.setdefault("dtype", "bfloat16" if dev.type == "cuda" else "float32")
    if size == "tiny":
        cfg = tiny(action=action, **popts)
    elif size == "1.3b":
        cfg = wan21_t2v_1p3b(**popts)
        if action:
            cfg = replace(cfg, dit=DiTConfig(action=ActionConfig(blocks=tuple(range(15)))))
    else:
        raise InvalidArgument(f"size must be '1.3b' or 'tiny', got {size!r}")
    prompt = Path(text_embedding) if text_embedding else root / "prompt.safetensors"
    context = load_text_embedding(prompt, cfg.dit.text_dim, cfg.dit.text_len)

    dtype = _DTYPES[cfg.pipeline.dtype]
    with torch.device("meta"):
        dit = CausalWanDiT(cfg.dit)
        vae = WanVAEDecoder(cfg.vae)
    dit_sd = load_dit_state(root, generator, lora, lora_alpha, use_ema)
    vae_path = find_vae(root)
    vae_sd = unwrap(read_tensors(vae_path))
    check_state_dict(vae_sd, vae_keys(cfg.vae), f"VAE checkpoint {vae_path}")
    vae_sd = {k: v for k, v in vae_sd.items() if k in vae_decoder_keys(cfg.vae)}

    dit = dit.to_empty(device=dev).to(dtype)
    vae = vae.to_empty(device=dev).to(dtype)
    load_into(dit, dit_sd, dit_keys(cfg.dit), "DiT checkpoint")
    load_into(vae, vae_sd, vae_decoder_keys(cfg.vae), f"VAE decoder of {vae_path}")
    vae.latent_mean = torch.tensor(cfg.vae.latent_mean, device=dev).view(1, -1, 1, 1, 1)
    vae.latent_std = torch.tensor(cfg.vae.latent_std, device=dev).view(1, -1, 1, 1, 1)
    weights_id = f"{root.resolve()}|{generator}|{lora}|{lora_alpha}|{use_ema}|{prompt}"
    return _assemble(
        model_id, cfg, dit, vae, context, dev, weights_id,
        "Causal Wan2.1-T2V-1.3B (CausVid / Self-Forcing / LongLive weights)", kernels,
    )  # fmt: skip


def load_matrix_game(path: str | None = None, **options: Any) -> WanWorldModel:
    """Wan-shaped checkpoints with Matrix-Game 2.0 action modules (keyboard + mouse)."""
    options.setdefault("height", 352)
    options.setdefault("width", 640)
    options.setdefault("window_frames", 15)
    return load_checkpoint(path=path, action=True, model_id="matrix-game-2", **options)


def load_tiny_action(**options: Any) -> WanWorldModel:
    """``load_tiny`` with Matrix-Game 2.0 action modules (keyboard + mouse)."""
    return load_tiny(action=True, **options)
