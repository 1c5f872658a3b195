"""The tiny causal Wan through the WorldModel interface: streaming, determinism, snapshots."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.worker.models.base import Control
from services.worker.models.registry import load_model
from services.worker.models.wan.config import VAEConfig, tiny
from services.worker.models.wan.factory import load_tiny
from services.worker.models.wan.sampler import Schedule, shifted_sigma
from services.worker.models.wan.vae import StreamCache, WanVAEDecoder
from windflow.errors import (
    InvalidArgument,
    InvalidControl,
    SnapshotError,
    SnapshotVersionMismatch,
)

NONE = Control()


def _stream(model, state, n: int, control: Control = NONE, steps: int = 4) -> np.ndarray:
    return np.concatenate([model.step([state], [control], steps) for _ in range(n)])


@pytest.fixture(scope="module")
def model():
    return load_tiny(seed=0)


def test_streams_frames_across_chunks(model) -> None:
    state = model.new_state(7)
    frames = _stream(model, state, 14)  # first chunk: 9 frames, then a second chunk
    assert frames.shape == (14, 64, 96, 3) and frames.dtype == np.uint8
    assert state.frame_index == 14
    assert state.stream.chunks == 2 and state.stream.latent_frames == 6
    assert frames.std() > 5  # not a constant image
    assert len({f.tobytes() for f in frames}) == 14  # every frame differs


def test_same_seed_same_frames_across_instances(model) -> None:
    a = _stream(model, model.new_state(3), 10, steps=2)
    other = load_tiny(seed=0)
    b = _stream(other, other.new_state(3), 10, steps=2)
    assert np.array_equal(a, b)
    c = _stream(model, model.new_state(4), 10, steps=2)
    assert not np.array_equal(a, c)


def test_batched_equals_alone(model) -> None:
    s1, s2 = model.new_state(1), model.new_state(2)
    alone = _stream(model, model.new_state(1), 3)
    batched = np.stack([model.step([s1, s2], [NONE, NONE], 4) for _ in range(3)])
    assert np.array_equal(batched[:, 0], alone)


def test_snapshot_restore_continues_bit_identically(model) -> None:
    state = model.new_state(11)
    _stream(model, state, 5)  # mid-chunk: buffered RGB, pending latents, warm caches
    blob = model.snapshot(state)
    expected = _stream(model, state, 10)  # crosses the next chunk boundary
    fresh = load_tiny(seed=0)
    restored = fresh.restore(blob)
    assert restored.frame_index == 5
    assert np.array_equal(_stream(fresh, restored, 10), expected)


def test_a_copy_is_independent_and_continues_bit_identically(model) -> None:
    state = model.new_state(11)
    _stream(model, state, 5)  # mid-chunk: buffered RGB, pending latents, warm caches
    kept = model.copy(state)
    expected = _stream(model, state, 10)  # crosses the next chunk boundary
    # stepping the original left the copy where it was: it makes the same 10 frames
    assert kept.frame_index == 5
    assert np.array_equal(_stream(model, kept, 10), expected)


def test_snapshot_errors(model) -> None:
    state = model.new_state(0)
    model.step([state], [NONE], 1)
    blob = model.snapshot(state)
    with pytest.raises(SnapshotError):
        model.restore(b"not a snapshot")
    with pytest.raises(SnapshotError):
        model.restore(blob[: len(blob) // 2])
    with pytest.raises(SnapshotVersionMismatch):
        load_tiny(seed=1).restore(blob)


def test_invalid_inputs(model) -> None:
    state = model.new_state(0)
    with pytest.raises(InvalidControl):
        model.step([state], [Control(action=1)], 4)
    with pytest.raises(InvalidControl):
        model.step([state], [Control(axes=(0.1, 0.2))], 4)
    with pytest.raises(InvalidArgument):
        model.step([state], [NONE], 5)
    assert state.frame_index == 0


def test_matrix_game_actions_steer_the_next_chunk() -> None:
    mg = load_model("matrix-game-2-tiny")
    assert mg.info.actions[1] == "forward" and mg.info.axes == ("pitch", "yaw")
    a, b = mg.new_state(5), mg.new_state(5)
    fwd, right = Control(action=1, axes=(0.0, 0.0)), Control(action=4, axes=(0.5, -0.5))
    first_a = _stream(mg, a, 9, fwd)
    first_b = _stream(mg, b, 9, right)
    assert not np.array_equal(first_a, first_b)
    with pytest.raises(InvalidControl):
        mg.step([a], [Control(action=1, axes=(2.0, 0.0))], 4)
    blob = mg.snapshot(a)
    expected = _stream(mg, a, 4, right)
    assert np.array_equal(_stream(mg, mg.restore(blob), 4, right), expected)


def test_registry_entries() -> None:
    assert load_model("wan-causal-tiny").info.model_id == "wan-causal-tiny"
    with pytest.raises(InvalidArgument, match="path="):
        load_model("wan2.1-causal")
    with pytest.raises(InvalidArgument, match="unknown Wan options"):
        load_model("wan-causal-tiny", hieght=64)


def test_schedule_shift() -> None:
    sched = Schedule.from_timesteps((1000, 750, 500, 250), 5.0)
    assert sched.sigmas == pytest.approx((1.0, 0.9375, 2.5 / 3.0, 0.625))
    assert sched.truncated(2).sigmas == sched.sigmas[:2]
    assert sched.next_sigma(3) == 0.0
    assert shifted_sigma(0.0, 5.0) == 0.0
    with pytest.raises(ValueError):
        Schedule.from_timesteps((250, 500), 5.0)


def test_kv_window_rolls_and_keeps_sinks(model) -> None:
    state = model.new_state(2)
    _stream(model, state, 1)
    kv = state.stream.kv
    sink = [k[:, : kv.sink].clone() for k in kv.keys]
    _stream(model, state, 9 + 12 * 3)  # four more chunks: the 3-frame ring wraps
    assert kv.n_written == 5 * 3 * 24 and kv.valid == kv.capacity == 6 * 24
    for before, k in zip(sink, kv.keys, strict=True):
        assert torch.equal(before, k[:, : kv.sink])


def test_streaming_vae_equals_multi_frame_decode() -> None:
    cfg = VAEConfig(dim=8)
    torch.manual_seed(0)
    vae = WanVAEDecoder(cfg).eval()
    z = torch.randn(1, 16, 4, 4, 6)
    with torch.inference_mode():
        one_by_one = StreamCache()
        frames = [vae.decode_frame(z[:, :, i : i + 1], one_by_one) for i in range(4)]
        assert [f.shape[2] for f in frames] == [1, 4, 4, 4]
        together = StreamCache()
        head = vae.decode_frame(z[:, :, :1], together)
        together.cursor = 0
        std = torch.tensor(cfg.latent_std).view(1, -1, 1, 1, 1)
        mean = torch.tensor(cfg.latent_mean).view(1, -1, 1, 1, 1)
        rest_z = z[:, :, 1:] * std + mean
        rest = vae.decoder.stream(vae.conv2(rest_z), together)
    assert torch.equal(head, frames[0])
    assert rest.shape == (1, 3, 12, 32, 48)
    torch.testing.assert_close(rest, torch.cat(frames[1:], dim=2), atol=1e-5, rtol=1e-4)


def test_tiny_config_is_the_same_architecture() -> None:
    cfg = tiny()
    assert cfg.dit.patch_size == (1, 2, 2) and cfg.dit.num_layers == 2 and cfg.dit.dim == 64
    assert cfg.tokens_per_frame() == 24 and cfg.cache_frames() == 6
