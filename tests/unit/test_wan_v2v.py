"""Video to video in the causal Wan family: a chunk restyles the input frame in effect."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from services.worker.controls import input_frame
from services.worker.models.base import Control, InputFrame, InputFrameSpec
from services.worker.models.wan.adapter import WanSession
from services.worker.models.wan.factory import load_checkpoint, load_tiny
from services.worker.models.wan.text import random_text_embedding, save_text_embedding
from windflow.errors import CheckpointError, InvalidArgument, InvalidControl

pytestmark = pytest.mark.usefixtures("torch_one_thread")

STEPS = 2
NONE = Control()
PROMPT = "a red car on the road"


def _frame(seed: int, shape: tuple[int, int, int] = (64, 96, 3)) -> InputFrame:
    return input_frame(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


X, Y = _frame(1), _frame(2)
# Chunks are made at frames 0, 9 and 21: X is sent at frame 4 and applies from 9, Y is sent
# at frame 16 and applies from 21.
SEQ = [NONE] * 4 + [Control(frame=X)] * 12 + [Control(frame=Y)] * 6


def _run(model, controls, state=None, seed: int = 5) -> tuple[np.ndarray, WanSession]:
    state = model.new_state(seed) if state is None else state
    frames = [model.step([state], [c], STEPS)[0] for c in controls]
    return np.stack(frames), state


def _differ(a: np.ndarray, b: np.ndarray) -> bool:
    """Every frame differs."""
    return all(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def model():
    return load_tiny(seed=0)


@pytest.fixture(scope="module")
def plain():
    """The same model without a VAE encoder: text to video only."""
    return load_tiny(seed=0, v2v=False)


@pytest.fixture(scope="module")
def reference(model) -> np.ndarray:
    return _run(model, SEQ)[0]


@pytest.fixture(scope="module")
def t2v(plain) -> np.ndarray:
    return _run(plain, [NONE] * len(SEQ))[0]


def test_tiny_models_declare_input_frames(model, plain) -> None:
    mg = load_tiny(seed=0, action=True)
    sigmas = model.pipeline.schedule.sigmas
    for m in (model, mg):
        assert m.info.input_frame == InputFrameSpec(width=96, height=64, fps=16.0, queue=2)
        assert m.info.extra["v2v"] == {
            "strength": 0.5,
            "steps": 2,
            "start_sigma": sigmas[2],
            "per": "chunk",
        }
        assert m.pipeline.vae_encoder is not None
    assert plain.info.input_frame is None and plain.info.extra["v2v"] is None
    assert plain.pipeline.vae_encoder is None and plain.version != model.version
    assert load_tiny(seed=0, v2v="false").info.input_frame is None  # as a config file says
    # the fraction of the schedule's 4 steps run, rounded, at least one
    for strength, steps in ((0.01, 1), (0.25, 1), (0.3, 1), (0.75, 3), (1.0, 4), (1, 4)):
        pipe = load_tiny(seed=0, v2v_strength=strength).pipeline
        assert pipe.v2v_steps == steps and pipe.v2v_start == 4 - steps
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(InvalidArgument, match="v2v_strength"):
            load_tiny(seed=0, v2v_strength=bad)
    with pytest.raises(InvalidArgument, match="v2v"):
        load_tiny(seed=0, v2v="maybe")


def test_the_v2v_schedule_is_the_tail_of_the_schedule(model) -> None:
    pipe = model.pipeline
    sigmas = pipe.schedule.sigmas
    assert pipe.v2v_schedule(4).sigmas == sigmas[2:4]
    assert pipe.v2v_schedule(2).sigmas == sigmas[2:4]
    assert pipe.v2v_schedule(1).sigmas == sigmas[2:3]  # fewer steps: x0 predicted earlier
    with pytest.raises(ValueError, match="steps"):
        pipe.v2v_schedule(5)


def test_no_input_is_text_to_video_bit_for_bit(model, t2v) -> None:
    frames, _ = _run(model, [NONE] * len(SEQ))
    assert np.array_equal(frames, t2v)
    mg, mg_plain = load_tiny(seed=0, action=True), load_tiny(seed=0, action=True, v2v=False)
    seq = [Control(action=1, axes=(0.5, -0.2))] * 10
    assert np.array_equal(_run(mg, seq)[0], _run(mg_plain, seq)[0])


def test_frames_follow_the_input_from_the_next_chunk(model, reference, t2v) -> None:
    assert np.array_equal(reference[:9], t2v[:9])  # X was sent at 4: nothing changes before 9
    assert _differ(reference[9:], t2v[9:])
    other, _ = _run(model, SEQ[:4] + [Control(frame=Y)] * 18)
    assert np.array_equal(other[:9], reference[:9]) and _differ(other[9:], reference[9:])
    held, _ = _run(model, SEQ[:16] + [Control(frame=X)] * 6)
    assert np.array_equal(held[:21], reference[:21])  # Y was sent at 16, applies from 21
    assert _differ(held[21:], reference[21:])
    # the same input frames again (equal pixels, a new object): the same frames
    again, _ = _run(model, [NONE] * 4 + [Control(frame=_frame(1))] * 7)
    assert np.array_equal(again, reference[:11])
    # an input from frame 0 restyles the first chunk too
    first, _ = _run(model, [Control(frame=X)] * 9)
    assert _differ(first, t2v[:9])


def test_a_chunk_starts_from_the_noised_input(model) -> None:
    """At strength 1 the start sigma is 1: the input's latent gets weight 0, so the frames
    are the text-to-video ones whatever the input (the schedule's start is honoured)."""
    full = load_tiny(seed=0, v2v_strength=1.0)
    assert full.info.extra["v2v"]["start_sigma"] == 1.0
    seq = [Control(frame=X)] * 10
    assert np.array_equal(_run(full, seq)[0], _run(full, [NONE] * 10)[0])
    # another strength starts elsewhere on the schedule: other frames
    low = load_tiny(seed=0, v2v_strength=0.25)
    a, b = _run(low, seq)[0], _run(model, seq)[0]
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("at", [5, 12, 17])
def test_snapshot_and_copy_with_inputs_are_deterministic(model, reference, at) -> None:
    """5: X sent, its chunk not made yet; 12: mid-chunk made from X; 17: Y sent."""
    head, state = _run(model, SEQ[:at])
    blob = model.snapshot(state)
    kept = model.copy(state)
    tail, _ = _run(model, SEQ[at:], state)
    assert np.array_equal(np.concatenate([head, tail]), reference)
    assert np.array_equal(_run(model, SEQ[at:], kept)[0], reference[at:])
    assert np.array_equal(_run(model, SEQ[at:], model.restore(blob))[0], reference[at:])
    if at == 5:  # in a fresh instance (nothing encoded yet) too
        fresh = load_tiny(seed=0)
        assert np.array_equal(_run(fresh, SEQ[at:], fresh.restore(blob))[0], reference[at:])


def test_v2v_uses_the_sessions_prompt(model, reference) -> None:
    seq = SEQ[:4] + [Control(frame=X, prompt=PROMPT)] * 12
    frames, state = _run(model, seq)
    assert state.stream.prompt == PROMPT
    assert np.array_equal(frames[:9], reference[:9]) and _differ(frames[9:], reference[9:16])
    _, state = _run(model, seq[:12])
    copied = model.copy(state)
    assert np.array_equal(_run(model, seq[12:], copied)[0], frames[12:])


def test_matrix_game_actions_with_input_frames() -> None:
    mg = load_tiny(seed=0, action=True)
    go = Control(action=1, axes=(0.5, 0.0))
    seq = [go] * 4 + [Control(action=1, axes=(0.5, 0.0), frame=X)] * 10
    frames, _ = _run(mg, seq)
    still, _ = _run(mg, [Control(frame=X)] * 14)
    plain, _ = _run(mg, [go] * 14)
    assert np.array_equal(frames[:9], plain[:9]) and _differ(frames[9:], plain[9:])
    assert _differ(frames[9:], still[9:])  # the action still steers a restyled chunk
    _, state = _run(mg, seq[:6])
    restored = mg.restore(mg.snapshot(state))
    assert np.array_equal(_run(mg, seq[6:], restored)[0], frames[6:])


def test_a_wrong_frame_is_refused(model, plain) -> None:
    for shape in ((96, 64, 3), (64, 96, 4), (32, 48, 3)):
        with pytest.raises(InvalidControl, match=r"control\.frame"):
            model.validate_control(Control(frame=_frame(3, shape)))
    floats = InputFrame(np.zeros((64, 96, 3), np.float32), "f" * 64)
    with pytest.raises(InvalidControl, match="uint8"):
        model.validate_control(Control(frame=floats))
    model.validate_control(Control(frame=X))
    state = model.new_state(0)
    with pytest.raises(InvalidControl):
        model.step([state], [Control(frame=_frame(3, (32, 48, 3)))], STEPS)
    assert state.frame_index == 0 and state.stream.chunks == 0
    with pytest.raises(InvalidControl, match="takes no input frames"):
        plain.validate_control(Control(frame=X))


def test_a_held_frame_is_encoded_once(model) -> None:
    pipe = model.pipeline
    pipe._inputs.clear()
    hits, misses = pipe.input_hits, pipe.input_misses
    _run(model, [Control(frame=X)] * 10)  # two chunks, one frame held
    assert (pipe.input_misses - misses, pipe.input_hits - hits) == (1, 1)
    # named by digest: the same picture in another object is a hit too
    assert pipe.encode_input(_frame(1)) is pipe.encode_input(X)
    assert pipe.input_misses - misses == 1
    # an LRU of input_cache encodings
    for seed in range(10, 10 + pipe.input_cache):
        pipe.encode_input(_frame(seed))
    assert len(pipe._inputs) == pipe.input_cache and X.digest not in pipe._inputs


# -- load_checkpoint: the encoder from the same Wan2.1_VAE.pth -------------------------


def _wan_dir(root: Path, model, encoder: dict[str, torch.Tensor]) -> Path:
    pipe = model.pipeline
    save_file({k: v.clone() for k, v in pipe.dit.state_dict().items()},
              str(root / "diffusion_pytorch_model.safetensors"))  # fmt: skip
    vae = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    vae.update(encoder)
    torch.save(vae, root / "Wan2.1_VAE.pth")
    save_text_embedding(root / "prompt.safetensors", random_text_embedding(0, 8, 48))
    return root


def test_checkpoint_loads_the_encoder_from_the_vae_file(tmp_path, model, reference) -> None:
    assert model.pipeline.vae_encoder is not None
    encoder = {k: v.clone() for k, v in model.pipeline.vae_encoder.state_dict().items()}
    root = _wan_dir(tmp_path, model, encoder)
    loaded = load_checkpoint(path=str(root), size="tiny", device="cpu")
    assert loaded.info.input_frame == model.info.input_frame
    assert loaded.info.extra["v2v"] == model.info.extra["v2v"]
    # the tiny model's weights, prompt embedding and encoder: the same frames from inputs
    assert np.array_equal(_run(loaded, SEQ)[0], reference)
    off = load_checkpoint(path=str(root), size="tiny", device="cpu", v2v=False)
    assert off.info.input_frame is None and off.pipeline.vae_encoder is None
    bad = dict(encoder)
    bad["encoder.head.2.weight"] = bad["encoder.head.2.weight"][:, :-1]
    _wan_dir(tmp_path, model, bad)
    with pytest.raises(CheckpointError, match=r"encoder\.head\.2\.weight"):
        load_checkpoint(path=str(root), size="tiny", device="cpu")
