"""Precomputed umT5 text embeddings, so the 5.7B text encoder need not be loaded.

A prompt file is a safetensors (or torch ``.pt``) file holding one tensor named
``context`` shaped (tokens, 4096): the umT5-XXL encoder output for the prompt's real
tokens (no padding; the DiT pads to 512 itself). ``.pt`` files may hold the tensor itself
or a dict with a ``context`` entry, and are read with ``weights_only=True``.

This is the fixed-prompt mode. To take prompts at run time, a model loads the encoder
itself (``umt5.py``: ``PromptEncoder.encode`` gives tensors of this same layout).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from windflow.errors import CheckpointError


def load_text_embedding(path: str | Path, text_dim: int, text_len: int) -> torch.Tensor:
    """The (tokens, text_dim) float32 context of one prompt."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"text embedding file {p} does not exist")
    if p.suffix == ".safetensors":
        tensors = load_file(str(p))
        ctx = tensors.get("context")
    else:
        obj = torch.load(p, map_location="cpu", weights_only=True)
        ctx = obj.get("context") if isinstance(obj, dict) else obj
    if not isinstance(ctx, torch.Tensor):
        raise CheckpointError(f"{p}: expected a tensor named 'context'")
    if ctx.dim() == 3 and ctx.shape[0] == 1:
        ctx = ctx[0]
    if ctx.dim() != 2 or ctx.shape[1] != text_dim or not 0 < ctx.shape[0] <= text_len:
        raise CheckpointError(
            f"{p}: context has shape {tuple(ctx.shape)}, expected (1..{text_len}, {text_dim})"
        )
    return ctx.float()


def save_text_embedding(path: str | Path, context: torch.Tensor) -> None:
    save_file({"context": context.float().contiguous()}, str(path))


def random_text_embedding(seed: int, tokens: int, text_dim: int) -> torch.Tensor:
    """A stand-in prompt for random-weight configurations (tests, benchmarks)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, text_dim, generator=gen) * 0.1
