"""Reading Wan-family checkpoints: wrappers, prefixes, LoRA merge and strict checking.

Supported on disk (all local; nothing is fetched from a hub):

* plain Wan state dicts (``diffusion_pytorch_model.safetensors``, possibly sharded, and
  ``Wan2.1_VAE.pth``), as safetensors or ``.pt``/``.pth``;
* training checkpoints that wrap the DiT, as Self-Forcing, CausVid and LongLive save them:
  ``{"generator_ema": {...}, "generator": {...}}`` with a ``model.`` prefix on every key;
* LongLive-style LoRA files (``lora_A``/``lora_B`` pairs, peft naming, optionally wrapped
  in ``generator_lora``/``lora``), merged into the base weights at load time.

Loading is strict: every expected key present, none unexpected, shapes equal; otherwise a
``CheckpointError`` names the first mismatches.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from services.worker.models.wan.keys import Shapes
from windflow.errors import CheckpointError

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

# Wrapper entries, in order of preference (EMA weights first when present).
WRAPPER_KEYS: tuple[str, ...] = ("generator_ema", "generator", "state_dict", "model", "module")
LORA_WRAPPER_KEYS: tuple[str, ...] = ("generator_lora", "lora", "state_dict")
# Prefixes that wrappers put in front of every key (DiffusionWrapper, DDP, FSDP, peft).
PREFIXES: tuple[str, ...] = (
    "base_model.model.", "_fsdp_wrapped_module.", "module.", "model.",
)  # fmt: skip
_MAX_LISTED = 5


def read_tensors(path: str | Path) -> Any:
    """The object stored in a safetensors or torch file (torch files: weights only)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint file {p} does not exist")
    if p.suffix == ".safetensors":
        return load_file(str(p))
    try:
        return torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) torch files cannot be memory-mapped
        return torch.load(p, map_location="cpu", weights_only=True)


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def unwrap(
    obj: Any, wrapper_keys: tuple[str, ...] = WRAPPER_KEYS, *, ema: bool = True
) -> StateDict:
    """The flat state dict inside a (possibly wrapped) checkpoint, prefixes stripped."""
    keys = wrapper_keys if ema else tuple(k for k in wrapper_keys if not k.endswith("_ema"))
    seen = 0
    while not _is_state_dict(obj):
        seen += 1
        if not isinstance(obj, Mapping) or seen > 3:
            raise CheckpointError(
                f"not a state dict or a known wrapper (looked for {', '.join(keys)})"
            )
        inner = next((obj[k] for k in keys if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            found = ", ".join(sorted(map(str, obj))[:8])
            raise CheckpointError(
                f"checkpoint holds neither tensors nor any of {', '.join(keys)} (found: {found})"
            )
        obj = inner
    return strip_prefixes(dict(obj))


def strip_prefixes(sd: StateDict) -> StateDict:
    """Remove wrapper prefixes that every key shares (repeatedly, e.g. ``model.module.``)."""
    changed = True
    while changed and sd:
        changed = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                changed = True
    return sd


def check_state_dict(sd: Mapping[str, torch.Tensor], expected: Shapes, what: str) -> None:
    """Raise ``CheckpointError`` unless ``sd`` has exactly ``expected``'s keys and shapes."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [
        f"{k}: {tuple(sd[k].shape)} != {expected[k]}"
        for k in expected
        if k in sd and tuple(sd[k].shape) != tuple(expected[k])
    ]
    if not (missing or unexpected or wrong):
        return
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)):
        if items:
            more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:_MAX_LISTED])}{more}")
    raise CheckpointError(f"{what} does not match the architecture: " + "; ".join(parts))


_LORA_RE = re.compile(r"^(?P<base>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


def merge_lora(
    sd: StateDict, lora: StateDict, alpha: float | None = None, scale: float = 1.0
) -> StateDict:
    """Merge LoRA pairs into ``sd``: W += scale * (alpha / rank) * B @ A.

    ``alpha`` None means alpha == rank. Every pair must target an existing 2-D weight with
    matching shapes; a key that is not a LoRA factor is an error.
    """
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in strip_prefixes(lora).items():
        m = _LORA_RE.match(key)
        if m is None:
            if key.endswith(".alpha") or key.endswith("lora_alpha"):
                continue
            raise CheckpointError(f"LoRA file has a key that is not a lora_A/lora_B weight: {key}")
        pairs.setdefault(m["base"], {})[m["ab"]] = tensor
    if not pairs:
        raise CheckpointError("LoRA file holds no lora_A/lora_B weights")
    out = dict(sd)
    for base, ab in sorted(pairs.items()):
        target = f"{base}.weight"
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"LoRA for {target} lacks lora_{'B' if 'A' in ab else 'A'}")
        if target not in out:
            raise CheckpointError(f"LoRA targets {target}, which the base checkpoint lacks")
        a, b = ab["A"].float(), ab["B"].float()
        w = out[target]
        rank = a.shape[0]
        if b.shape[1] != rank or (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise CheckpointError(
                f"LoRA for {target}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit "
                f"weight {tuple(w.shape)}"
            )
        factor = scale * ((alpha if alpha is not None else rank) / rank)
        out[target] = (w.float() + factor * (b @ a)).to(w.dtype)
    log.info("merged %d LoRA pairs", len(pairs))
    return out


def read_dit_dir(path: Path) -> StateDict:
    """The DiT weights of a Wan model directory (single or sharded safetensors, or .pt)."""
    shards = sorted(path.glob("diffusion_pytorch_model*.safetensors"))
    if not shards:
        shards = sorted(path.glob("diffusion_pytorch_model*.pt")) + sorted(
            path.glob("diffusion_pytorch_model*.bin")
        )
    if not shards:
        raise CheckpointError(f"no diffusion_pytorch_model*.safetensors in {path}")
    sd: StateDict = {}
    for shard in shards:
        sd.update(unwrap(read_tensors(shard)))
    return sd


def find_vae(path: Path) -> Path:
    for name in ("Wan2.1_VAE.pth", "Wan2.1_VAE.safetensors", "vae.safetensors", "vae.pth"):
        if (path / name).is_file():
            return path / name
    raise CheckpointError(f"no Wan2.1_VAE.pth (or vae.safetensors) in {path}")


def load_into(module: torch.nn.Module, sd: StateDict, expected: Shapes, what: str) -> None:
    """Strict-check ``sd`` and copy it into ``module`` (cast to the module's dtypes)."""
    check_state_dict(sd, expected, what)
    own = module.state_dict()
    check_state_dict(own, expected, f"{what} (module)")  # the modules match the spec
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=True)
