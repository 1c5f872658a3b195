"""Key parity of the full-size modules against the original Wan checkpoint naming.

The modules are built on the meta device, so checking the 1.3B costs no memory.
"""

from __future__ import annotations

import torch

from services.worker.models.wan.config import ActionConfig, DiTConfig, VAEConfig
from services.worker.models.wan.dit import CausalWanDiT
from services.worker.models.wan.keys import Shapes, dit_keys, vae_decoder_keys, vae_encoder_keys
from services.worker.models.wan.vae import WanVAEDecoder
from services.worker.models.wan.vae_encoder import WanVAEEncoder


def _diff(module: torch.nn.Module, expected: Shapes, label: str) -> list[str]:
    own = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    problems = [f"{label}: missing {k}" for k in expected if k not in own]
    problems += [f"{label}: unexpected {k}" for k in own if k not in expected]
    problems += [
        f"{label}: {k} {own[k]} != {expected[k]}"
        for k in expected
        if k in own and own[k] != tuple(expected[k])
    ]
    return problems


def full_size_key_parity(include_action: bool = True) -> list[str]:
    """Mismatches between the 1.3B modules and the Wan key list (empty when at parity)."""
    problems: list[str] = []
    configs = [DiTConfig()]
    if include_action:
        configs.append(DiTConfig(action=ActionConfig(blocks=tuple(range(15)))))
    with torch.device("meta"):
        for cfg in configs:
            label = "dit+action" if cfg.action else "dit"
            problems += _diff(CausalWanDiT(cfg), dit_keys(cfg), label)
        vae_cfg = VAEConfig()
        problems += _diff(WanVAEDecoder(vae_cfg), vae_decoder_keys(vae_cfg), "vae")
        problems += _diff(WanVAEEncoder(vae_cfg), vae_encoder_keys(vae_cfg), "vae encoder")
    return problems
