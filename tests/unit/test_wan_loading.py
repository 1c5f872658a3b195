"""Checkpoint naming, wrappers, LoRA merge and strict loading of the causal Wan family."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from services.worker.models.base import Control
from services.worker.models.wan.config import DiTConfig, VAEConfig
from services.worker.models.wan.factory import load_checkpoint, load_tiny
from services.worker.models.wan.keys import dit_keys, vae_encoder_keys, vae_keys
from services.worker.models.wan.parity import full_size_key_parity
from services.worker.models.wan.text import random_text_embedding, save_text_embedding
from windflow.errors import CheckpointError

TINY_VAE = VAEConfig(dim=8)


def test_full_size_modules_match_wan_naming() -> None:
    assert full_size_key_parity() == []


def test_full_size_key_list() -> None:
    keys = dit_keys(DiTConfig())
    assert len(keys) == 825
    assert 1.40e9 < sum(math.prod(s) for s in keys.values()) < 1.43e9
    assert keys["patch_embedding.weight"] == (1536, 16, 1, 2, 2)
    assert keys["text_embedding.0.weight"] == (1536, 4096)
    assert keys["text_embedding.2.weight"] == (1536, 1536)
    assert keys["time_embedding.0.weight"] == (1536, 256)
    assert keys["time_projection.1.weight"] == (9216, 1536)
    assert keys["blocks.29.self_attn.norm_q.weight"] == (1536,)
    assert keys["blocks.0.cross_attn.k.weight"] == (1536, 1536)
    assert keys["blocks.0.norm3.bias"] == (1536,)
    assert keys["blocks.0.ffn.0.weight"] == (8960, 1536)
    assert keys["blocks.0.ffn.2.weight"] == (1536, 8960)
    assert keys["blocks.0.modulation"] == (1, 6, 1536)
    assert keys["head.head.weight"] == (64, 1536)
    assert keys["head.modulation"] == (1, 2, 1536)
    assert not any(k.startswith("img_emb") for k in keys)  # T2V has no image embedding
    vae = vae_keys(VAEConfig())
    assert vae["conv1.weight"] == (32, 32, 1, 1, 1)
    assert vae["conv2.weight"] == (16, 16, 1, 1, 1)
    assert vae["decoder.conv1.weight"] == (384, 16, 3, 3, 3)
    assert vae["decoder.middle.1.to_qkv.weight"] == (1152, 384, 1, 1)
    assert vae["decoder.upsamples.3.time_conv.weight"] == (768, 384, 3, 1, 1)
    assert vae["decoder.upsamples.4.residual.2.weight"] == (384, 192, 3, 3, 3)
    assert vae["decoder.upsamples.11.resample.1.weight"] == (96, 192, 3, 3)
    assert vae["decoder.head.2.weight"] == (3, 96, 3, 3, 3)
    assert vae["encoder.downsamples.5.time_conv.weight"] == (192, 192, 3, 1, 1)
    assert vae["encoder.head.2.weight"] == (32, 384, 3, 3, 3)
    assert 1.25e8 < sum(math.prod(s) for s in vae.values()) < 1.29e8


@pytest.fixture(scope="module")
def source():
    """A tiny model and its weights as Wan checkpoint dicts."""
    model = load_tiny(seed=0)
    dit = {k: v.clone() for k, v in model.pipeline.dit.state_dict().items()}
    gen = torch.Generator().manual_seed(9)
    vae = {k: v.clone() for k, v in model.pipeline.vae.state_dict().items()}
    for k, shape in vae_encoder_keys(TINY_VAE).items():
        vae[k] = torch.randn(shape, generator=gen)
    state = model.new_state(3)
    frames = np.concatenate([model.step([state], [Control()], 4) for _ in range(10)])
    return dit, vae, frames


def _write_dir(tmp: Path, dit: dict, vae: dict, dit_name: str = "diffusion_pytorch_model") -> Path:
    if dit:
        save_file(dit, str(tmp / f"{dit_name}.safetensors"))
    torch.save(vae, tmp / "Wan2.1_VAE.pth")
    save_text_embedding(tmp / "prompt.safetensors", random_text_embedding(0, 8, 48))
    return tmp


def _frames(model) -> np.ndarray:
    state = model.new_state(3)
    return np.concatenate([model.step([state], [Control()], 4) for _ in range(10)])


def _load(path: Path, **kw):
    return load_checkpoint(path=str(path), size="tiny", device="cpu", **kw)


def test_plain_wan_directory_round_trip(tmp_path, source) -> None:
    dit, vae, frames = source
    model = _load(_write_dir(tmp_path, dit, vae))
    assert np.array_equal(_frames(model), frames)


def test_sharded_safetensors(tmp_path, source) -> None:
    dit, vae, frames = source
    keys = sorted(dit)
    half = len(keys) // 2
    save_file({k: dit[k] for k in keys[:half]},
              str(tmp_path / "diffusion_pytorch_model-00001-of-00002.safetensors"))  # fmt: skip
    save_file({k: dit[k] for k in keys[half:]},
              str(tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors"))  # fmt: skip
    model = _load(_write_dir(tmp_path, {}, vae))
    assert np.array_equal(_frames(model), frames)


@pytest.mark.parametrize("wrapper", ["generator", "generator_ema", "both"])
def test_self_forcing_wrapped_generator(tmp_path, source, wrapper) -> None:
    dit, vae, frames = source
    decoy = {k: torch.zeros_like(v) for k, v in dit.items()}
    root = _write_dir(tmp_path, decoy, vae)  # the directory's DiT must be ignored
    wrapped = {f"model.{k}": v for k, v in dit.items()}
    if wrapper == "both":
        ckpt = {"generator_ema": wrapped, "generator": {f"model.{k}": v for k, v in decoy.items()}}
    else:
        ckpt = {wrapper: wrapped}
    torch.save(ckpt, tmp_path / "self_forcing_dmd.pt")
    model = _load(root, generator=str(tmp_path / "self_forcing_dmd.pt"))
    assert np.array_equal(_frames(model), frames)
    if wrapper == "both":
        non_ema = _load(root, generator=str(tmp_path / "self_forcing_dmd.pt"), use_ema=False)
        w = non_ema.pipeline.dit.state_dict()["blocks.0.self_attn.q.weight"]
        assert torch.count_nonzero(w) == 0


def test_lora_is_merged_at_load(tmp_path, source) -> None:
    dit, vae, _ = source
    root = _write_dir(tmp_path, dit, vae)
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(4, 64, generator=gen), torch.randn(64, 4, generator=gen)
    lora = {
        "base_model.model.blocks.1.ffn.0.lora_A.default.weight": torch.randn(8, 64, generator=gen),
        "base_model.model.blocks.1.ffn.0.lora_B.default.weight": torch.randn(128, 8, generator=gen),
        "base_model.model.blocks.0.self_attn.q.lora_A.default.weight": a,
        "base_model.model.blocks.0.self_attn.q.lora_B.default.weight": b,
    }
    torch.save({"generator_lora": lora}, tmp_path / "lora.pt")
    model = _load(root, lora=str(tmp_path / "lora.pt"), lora_alpha=8.0)
    got = model.pipeline.dit.state_dict()["blocks.0.self_attn.q.weight"]
    torch.testing.assert_close(got, dit["blocks.0.self_attn.q.weight"] + 2.0 * (b @ a))
    bad = {"blocks.0.self_attn.nope.lora_A.weight": a, "blocks.0.self_attn.nope.lora_B.weight": b}
    save_file(bad, str(tmp_path / "bad_lora.safetensors"))
    with pytest.raises(CheckpointError, match=r"nope\.weight"):
        _load(root, lora=str(tmp_path / "bad_lora.safetensors"))


def test_strict_loading_names_mismatches(tmp_path, source) -> None:
    dit, vae, _ = source
    missing = {k: v for k, v in dit.items() if k != "blocks.1.cross_attn.norm_k.weight"}
    with pytest.raises(CheckpointError, match=r"1 missing: blocks\.1\.cross_attn\.norm_k\.weight"):
        _load(_write_dir(tmp_path, missing, vae))
    extra = {**dit, "img_emb.proj.0.weight": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"unexpected: img_emb\.proj\.0\.weight"):
        _load(_write_dir(tmp_path, extra, vae))
    wrong = {**dit, "head.modulation": torch.zeros(1, 3, 64)}
    with pytest.raises(CheckpointError, match=r"head\.modulation: \(1, 3, 64\) != \(1, 2, 64\)"):
        _load(_write_dir(tmp_path, wrong, vae))
    no_encoder = {k: v for k, v in vae.items() if not k.startswith("encoder.conv1")}
    with pytest.raises(CheckpointError, match=r"VAE checkpoint .* missing: encoder\.conv1"):
        _load(_write_dir(tmp_path, dit, no_encoder))
    with pytest.raises(CheckpointError, match="does not exist"):
        _load(_write_dir(tmp_path, dit, vae), generator=str(tmp_path / "absent.pt"))


def test_prompt_file_is_checked(tmp_path, source) -> None:
    dit, vae, _ = source
    root = _write_dir(tmp_path, dit, vae)
    save_file({"context": torch.zeros(4, 47)}, str(tmp_path / "bad_prompt.safetensors"))
    with pytest.raises(CheckpointError, match=r"\(4, 47\)"):
        _load(root, text_embedding=str(tmp_path / "bad_prompt.safetensors"))


def test_tiny_key_spec_matches_module(source) -> None:
    dit, vae, _ = source
    from services.worker.models.wan.config import tiny

    cfg = tiny()
    assert {k: tuple(v.shape) for k, v in dit.items()} == dit_keys(cfg.dit)
    assert {k: tuple(v.shape) for k, v in vae.items()} == vae_keys(TINY_VAE)
