"""The Wan2.1 VAE encoder: checkpoint keys, strict loading, shapes, causal streaming."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from services.worker.models.wan.config import VAEConfig, tiny
from services.worker.models.wan.keys import vae_decoder_keys, vae_encoder_keys, vae_keys
from services.worker.models.wan.vae import StreamCache, WanVAEDecoder
from services.worker.models.wan.vae_encoder import (
    WanVAEEncoder,
    build_vae_encoder,
    encoder_state,
    load_vae_encoder,
)
from windflow.errors import CheckpointError

TINY = VAEConfig(dim=8)
H, W = 64, 96  # tiny() RGB size -> 8x12 latents


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def enc() -> WanVAEEncoder:
    return build_vae_encoder(TINY, seed=0)


def _video(t: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, t, H, W, generator=gen) * 2 - 1


def _full_vae_state(seed: int = 1) -> dict[str, torch.Tensor]:
    """A whole Wan2.1_VAE.pth-shaped dict (encoder and decoder) at the tiny config."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) * 0.1 for k, s in vae_keys(TINY).items()}


def test_keys_and_shapes_match_wan_at_tiny_and_full_size() -> None:
    assert _shapes(WanVAEEncoder(TINY)) == vae_encoder_keys(TINY)
    full = VAEConfig()
    with torch.device("meta"):
        module = WanVAEEncoder(full)
    expected = vae_encoder_keys(full)
    assert _shapes(module) == expected
    assert len(expected) == 86  # + 108 decoder keys = 194
    assert expected["encoder.conv1.weight"] == (96, 3, 3, 3, 3)
    assert expected["encoder.downsamples.2.resample.1.weight"] == (96, 96, 3, 3)
    assert "encoder.downsamples.2.time_conv.weight" not in expected  # downsample2d
    assert expected["encoder.downsamples.8.time_conv.weight"] == (384, 384, 3, 1, 1)
    assert expected["conv1.weight"] == (32, 32, 1, 1, 1)
    # the two halves partition Wan2.1_VAE.pth
    assert set(expected).isdisjoint(vae_decoder_keys(full))
    assert set(expected) | set(vae_decoder_keys(full)) == set(vae_keys(full))


def test_strict_load_from_a_full_vae_dict_file_and_directory(tmp_path: Path) -> None:
    sd = _full_vae_state()
    loaded = load_vae_encoder(sd, TINY)
    own = loaded.state_dict()
    assert set(own) == set(encoder_state(sd)) == set(vae_encoder_keys(TINY))
    assert all(torch.equal(own[k], sd[k]) for k in own)
    torch.save(sd, tmp_path / "Wan2.1_VAE.pth")
    x = _video(1)
    ref = loaded.encode_frames(x, StreamCache())
    for source in (tmp_path / "Wan2.1_VAE.pth", tmp_path, str(tmp_path)):
        again = load_vae_encoder(source, TINY)
        assert torch.equal(again.encode_frames(x, StreamCache()), ref)
    half = load_vae_encoder(load_vae_encoder(sd, TINY, dtype=torch.bfloat16).state_dict(), TINY)
    assert half.conv1.weight.dtype == torch.float32  # bf16-rounded weights, read back


def test_strict_load_errors_name_the_key() -> None:
    sd = _full_vae_state()
    missing = {k: v for k, v in sd.items() if k != "encoder.downsamples.5.time_conv.bias"}
    with pytest.raises(CheckpointError, match=r"missing: encoder\.downsamples\.5\.time_conv\.bias"):
        load_vae_encoder(missing, TINY)
    extra = sd | {"encoder.downsamples.2.time_conv.weight": torch.zeros(8, 8, 3, 1, 1)}
    with pytest.raises(CheckpointError, match=r"unexpected: encoder\.downsamples\.2\.time_conv"):
        load_vae_encoder(extra, TINY)
    wrong = sd | {"conv1.weight": torch.zeros(16, 32, 1, 1, 1)}
    with pytest.raises(CheckpointError, match=r"shape: conv1\.weight: \(16, 32, 1, 1, 1\)"):
        load_vae_encoder(wrong, TINY)
    decoder_only = {k: v for k, v in sd.items() if not k.startswith(("encoder.", "conv1."))}
    with pytest.raises(CheckpointError, match=r"86 missing: conv1\.weight, conv1\.bias, encoder\."):
        load_vae_encoder(decoder_only, TINY)
    with pytest.raises(CheckpointError, match=r"shape: encoder\.conv1\.weight: \(8, 3"):
        load_vae_encoder(sd, VAEConfig(dim=16))  # a checkpoint of another width


@pytest.mark.parametrize("t", [1, 5, 9])
def test_output_shapes(enc: WanVAEEncoder, t: int) -> None:
    with torch.inference_mode():
        z = enc.encode_frames(_video(t), StreamCache())
    assert z.shape == (1, 16, 1 + (t - 1) // 4, H // 8, W // 8)
    assert z.dtype == torch.float32 and torch.isfinite(z).all()


def test_frame_counts_and_sizes_are_checked(enc: WanVAEEncoder) -> None:
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        enc.encode_frames(_video(4), StreamCache())
    cache = StreamCache()
    with torch.inference_mode():
        enc.encode_frames(_video(1), cache)
    with pytest.raises(ValueError, match="4k frames"):
        enc.encode_frames(_video(3), cache)
    with pytest.raises(ValueError, match="multiple of 8"):
        enc.encode_frames(torch.zeros(1, 3, 1, 60, 96), StreamCache())
    with pytest.raises(ValueError, match="uint8"):
        enc.encode_image(torch.zeros(H, W, 3))


def test_streaming_in_pieces_equals_encoding_at_once(enc: WanVAEEncoder) -> None:
    video = _video(13, seed=3)
    with torch.inference_mode():
        at_once = enc.encode_frames(video, StreamCache())
        for splits in ([1, 4, 4, 4], [5, 8], [9, 4]):
            cache, pieces, start = StreamCache(), [], 0
            for n in splits:
                pieces.append(enc.encode_frames(video[:, :, start : start + n], cache))
                start += n
            assert [p.shape[2] for p in pieces] == [1 + (splits[0] - 1) // 4] + [
                n // 4 for n in splits[1:]
            ]
            # Same arithmetic on differently shaped tensors: equal up to float rounding.
            torch.testing.assert_close(torch.cat(pieces, dim=2), at_once, atol=1e-5, rtol=1e-5)
    # Causal: a latent frame does not depend on later RGB frames.
    changed = video.clone()
    changed[:, :, 9:] = -changed[:, :, 9:]
    with torch.inference_mode():
        other = enc.encode_frames(changed, StreamCache())
    torch.testing.assert_close(other[:, :, :3], at_once[:, :, :3], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(other[:, :, 3], at_once[:, :, 3])


def test_encode_image_is_deterministic_first_frame_encoding(enc: WanVAEEncoder) -> None:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    a = enc.encode_image(frame)
    b = enc.encode_image(torch.from_numpy(frame))
    assert a.shape == (1, 16, 1, 8, 12) and torch.equal(a, b)
    x = torch.from_numpy(frame).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1
    with torch.inference_mode():
        torch.testing.assert_close(a, enc.encode_frames(x, StreamCache()), atol=0, rtol=0)


def test_latents_are_normalized_with_the_decoders_statistics(enc: WanVAEEncoder) -> None:
    x = _video(5, seed=4)
    with torch.inference_mode():
        raw = enc.moments(x, StreamCache())
        z = enc.encode_frames(x, StreamCache())
    assert raw.shape[1] == 32  # mu and log-variance
    std = torch.tensor(TINY.latent_std).view(1, -1, 1, 1, 1)
    mean = torch.tensor(TINY.latent_mean).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(z * std + mean, raw[:, :16], atol=1e-5, rtol=1e-5)


def test_round_trip_shape_at_random_weights(enc: WanVAEEncoder) -> None:
    cfg = tiny()
    torch.manual_seed(0)
    dec = WanVAEDecoder(cfg.vae).eval()
    with torch.inference_mode():
        z = enc.encode_frames(_video(5), StreamCache())
        cache = StreamCache()
        rgb = torch.cat([dec.decode_frame(z[:, :, i : i + 1], cache) for i in range(2)], dim=2)
    assert rgb.shape == (1, 3, 5, cfg.pipeline.height, cfg.pipeline.width)
    assert torch.isfinite(rgb).all()


def test_bfloat16_weights_still_return_float32_latents() -> None:
    enc = build_vae_encoder(TINY, seed=0, dtype=torch.bfloat16)
    z = enc.encode_image(np.full((H, W, 3), 128, dtype=np.uint8))
    ref = build_vae_encoder(TINY, seed=0).encode_image(np.full((H, W, 3), 128, dtype=np.uint8))
    assert z.dtype == torch.float32 and z.shape == ref.shape
    torch.testing.assert_close(z, ref, atol=0.1, rtol=0.05)
