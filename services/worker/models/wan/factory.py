"""Factories the worker's model registry calls (``services.worker.models.registry``).

* ``load_tiny``: the architecture at toy size with seeded random weights (tests, demos),
  with a tiny random-weight umT5 so that it takes prompts.
* ``load_checkpoint``: Wan2.1-T2V-1.3B in causal form from local files — a Wan model
  directory (DiT + VAE), optionally a Self-Forcing/CausVid/LongLive generator checkpoint
  replacing the DiT weights and a LongLive LoRA merged into them, plus either a
  precomputed umT5 prompt embedding (a fixed prompt) or the umT5-XXL encoder and its
  tokenizer (``t5=``, ``tokenizer=``: prompts switch at run time).
* ``build_random``: any configuration with random weights (GPU benchmarks of the 1.3B).

``load_tiny`` and ``load_checkpoint`` also give the model a VAE encoder (video to video:
it takes input frames, ``ModelInfo.input_frame``) unless ``v2v=False``: seeded random for
the tiny model, the encoder half of ``Wan2.1_VAE.pth`` for checkpoints.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from kernels.registry import KernelRegistry
from services.worker.models.base import PromptSpec
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
from services.worker.models.wan.umt5 import (
    ByteTokenizer,
    FileTokenizer,
    PromptEncoder,
    Tokenizer,
    load_umt5,
    random_umt5,
    umt5_tiny,
    umt5_xxl,
)
from services.worker.models.wan.vae import WanVAEDecoder
from services.worker.models.wan.vae_encoder import (
    WanVAEEncoder,
    build_vae_encoder,
    load_vae_encoder,
)
from windflow.errors import CheckpointError, InvalidArgument

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Longest prompt taken, in characters: umT5-XXL reads 512 tokens (~4 characters each);
# the tiny models' byte tokenizer reads text_len - 1 bytes, the rest is cut.
PROMPT_MAX_CHARS = 2048
TINY_PROMPT_MAX_CHARS = 256
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
    if "v2v_strength" in options:
        strength = float(options["v2v_strength"])
        if not 0.0 < strength <= 1.0:
            raise InvalidArgument(f"v2v_strength must be in (0, 1], got {strength}")
        options["v2v_strength"] = strength
    return options


def _flag(name: str, value: Any) -> bool:
    """A boolean option, also as the strings a config file may hold."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise InvalidArgument(f"option {name} must be true or false, got {value!r}")


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
    encoder: PromptEncoder | None = None,
    prompt: PromptSpec | None = None,
    vae_encoder: WanVAEEncoder | None = None,
) -> WanWorldModel:
    ops = KernelRegistry(prefer=kernels).ops(device)  # type: ignore[arg-type]
    pipe = WanPipeline(
        cfg, dit, vae, context, ops, device, encoder=encoder, vae_encoder=vae_encoder
    )
    if encoder is not None:
        weights_id += f"|text:{encoder.name}"
    if vae_encoder is not None:
        weights_id += "|vae-encoder"
    return WanWorldModel(model_id, pipe, weights_id, description, prompt=prompt)


def tiny_prompt_encoder(seed: int, cfg: WanConfig, device: torch.device) -> PromptEncoder:
    """A tiny umT5 with seeded random weights and the byte tokenizer (no files)."""
    model = random_umt5(umt5_tiny(cfg.dit.text_dim), seed, device)
    return PromptEncoder(model, ByteTokenizer(cfg.dit.text_len), f"umt5-tiny:random:{seed}")


def load_tiny(
    seed: int = 0,
    action: bool = False,
    device: str | None = "cpu",
    kernels: str = "auto",
    v2v: bool | str = True,
    **pipeline: Any,
) -> WanWorldModel:
    """The causal Wan architecture at toy size (2 blocks, dim 64) with random weights.

    It takes prompts: a tiny umT5 (random weights seeded by ``seed``, byte tokenizer)
    encodes them; the default prompt ("") is a fixed random embedding. It takes input
    frames (video to video) through a VAE encoder with random weights seeded by ``seed``,
    unless ``v2v=False``; without one it makes the same frames from no input."""
    cfg = tiny(action=action, **_pipeline_options(dict(pipeline)))
    dev = _device(device)
    dtype = _DTYPES[cfg.pipeline.dtype]
    dit, vae = build_modules(cfg, dev, dtype, seed)
    vae_encoder = build_vae_encoder(cfg.vae, seed, dev, dtype) if _flag("v2v", v2v) else None
    context = random_text_embedding(seed, 8, cfg.dit.text_dim)
    model_id = "matrix-game-2-tiny" if action else "wan-causal-tiny"
    return _assemble(
        model_id, cfg, dit, vae, context, dev, f"random:{seed}",
        "Causal Wan2.1 architecture at toy size with random weights", kernels,
        encoder=tiny_prompt_encoder(seed, cfg, dev),
        prompt=PromptSpec(max_chars=TINY_PROMPT_MAX_CHARS), vae_encoder=vae_encoder,
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


def load_prompt_encoder(
    t5: str | Path,
    tokenizer: str | Path | None,
    size: str,
    cfg: WanConfig,
    root: Path,
    device: torch.device,
) -> PromptEncoder:
    """umT5 from a local file (strictly checked) and its tokenizer.

    ``tokenizer``: a ``tokenizer.json`` or a directory holding one (default: the model
    directory, or its ``google/umt5-xxl``, Wan's layout). The tiny size takes the tiny
    umT5 and, without ``tokenizer``, the built-in byte tokenizer. bfloat16 on a GPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ucfg = umt5_tiny(cfg.dit.text_dim) if size == "tiny" else umt5_xxl()
    if ucfg.dim != cfg.dit.text_dim:
        raise InvalidArgument(f"umT5 width {ucfg.dim} != the DiT's text_dim {cfg.dit.text_dim}")
    model = load_umt5(t5, ucfg, device, dtype)
    tok: Tokenizer
    if tokenizer is None and size == "tiny":
        tok = ByteTokenizer(cfg.dit.text_len)
    else:
        tok = FileTokenizer(tokenizer if tokenizer is not None else root, cfg.dit.text_len)
    tok_name = getattr(tok, "path", "bytes")
    log.info("umT5 encoder from %s, tokenizer %s", t5, tok_name)
    return PromptEncoder(model, tok, f"{Path(t5).resolve()}|{tok_name}")


def load_checkpoint(
    path: str | None = None,
    text_embedding: str | None = None,
    t5: str | None = None,
    tokenizer: str | None = None,
    default_prompt: str | None = None,
    t5_device: str | None = None,
    generator: str | None = None,
    lora: str | None = None,
    lora_alpha: float | None = None,
    use_ema: bool = True,
    action: bool = False,
    device: str | None = None,
    kernels: str = "auto",
    model_id: str = "wan2.1-causal",
    size: str = "1.3b",
    v2v: bool | str = True,
    **pipeline: Any,
) -> WanWorldModel:
    """Causal Wan2.1-T2V-1.3B from local files.

    ``path``: a Wan2.1-T2V-1.3B directory (``diffusion_pytorch_model*.safetensors`` and
    ``Wan2.1_VAE.pth``). ``generator``: a Self-Forcing / CausVid / LongLive checkpoint whose
    ``generator_ema`` (or ``generator``) replaces the directory's DiT. ``lora``: a LoRA file
    merged into the DiT (scale ``lora_alpha / rank``, default 1). ``text_embedding``: the
    prompt's umT5 output (see ``text.py``; default ``<path>/prompt.safetensors``).
    ``t5``: Wan's umT5-XXL encoder file (``models_t5_umt5-xxl-enc-bf16.pth`` or a
    safetensors of it) and ``tokenizer``: umT5's ``tokenizer.json`` or its directory
    (default: ``path`` or ``path/google/umt5-xxl``): with them the model takes prompts
    (``ModelInfo.prompt``) and switches at chunk boundaries. Its default prompt is
    ``default_prompt`` (default "") encoded, or the ``text_embedding`` file if one is
    given (then "" stands for it). ``t5_device``: where the encoder runs (default: with
    the DiT). Without ``t5`` the prompt is fixed (the embedding file) and none is taken.
    ``action``: Wan-shaped checkpoints with Matrix-Game 2.0 action modules in blocks 0-14.
    ``size``: "1.3b" (default) or "tiny" (the toy architecture, for round-trip tests).
    ``v2v``: load the VAE encoder from the same ``Wan2.1_VAE.pth`` (strictly) so that the
    model takes input frames (video to video, ``v2v_strength``); False leaves it out.
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
    with_encoder = _flag("v2v", v2v)
    popts.setdefault("dtype", "bfloat16" if dev.type == "cuda" else "float32")
    if size == "tiny":
        cfg = tiny(action=action, **popts)
    elif size == "1.3b":
        cfg = wan21_t2v_1p3b(**popts)
        if action:
            cfg = replace(cfg, dit=DiTConfig(action=ActionConfig(blocks=tuple(range(15)))))
    else:
        raise InvalidArgument(f"size must be '1.3b' or 'tiny', got {size!r}")
    if t5 is None and (tokenizer is not None or default_prompt is not None):
        raise InvalidArgument("tokenizer= and default_prompt= need t5=<umT5 encoder file>")
    if text_embedding is not None and default_prompt is not None:
        raise InvalidArgument("give text_embedding= or default_prompt=, not both")
    encoder = None
    if t5 is not None:
        t5_dev = _device(t5_device) if t5_device else dev
        encoder = load_prompt_encoder(t5, tokenizer, size, cfg, root, t5_dev)
    if encoder is not None and text_embedding is None:
        prompt: Path | str = f"umt5:{default_prompt or ''!r}"
        context = encoder.encode(default_prompt or "")
    else:
        prompt = Path(text_embedding) if text_embedding else root / "prompt.safetensors"
        context = load_text_embedding(prompt, cfg.dit.text_dim, cfg.dit.text_len)
    spec = None
    if encoder is not None:
        spec = PromptSpec(max_chars=PROMPT_MAX_CHARS, default=default_prompt or "")

    dtype = _DTYPES[cfg.pipeline.dtype]
    with torch.device("meta"):
        dit = CausalWanDiT(cfg.dit)
        vae = WanVAEDecoder(cfg.vae)
    dit_sd = load_dit_state(root, generator, lora, lora_alpha, use_ema)
    vae_path = find_vae(root)
    vae_sd = unwrap(read_tensors(vae_path))
    check_state_dict(vae_sd, vae_keys(cfg.vae), f"VAE checkpoint {vae_path}")
    vae_encoder = None
    if with_encoder:
        vae_encoder = load_vae_encoder(vae_sd, cfg.vae, dev, dtype)
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
        encoder=encoder, prompt=spec, vae_encoder=vae_encoder,
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
