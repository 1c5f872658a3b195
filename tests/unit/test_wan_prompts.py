"""Prompt switches (with LongLive's KV re-cache) and camera poses in the causal Wan family."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from services.worker.models.base import POSE_VELOCITY, Control, PoseSpec, PromptSpec
from services.worker.models.wan.adapter import SNAPSHOT_FORMAT, WanSession, _read_metadata
from services.worker.models.wan.config import VAEConfig
from services.worker.models.wan.factory import load_checkpoint, load_tiny
from services.worker.models.wan.keys import vae_encoder_keys
from services.worker.models.wan.text import random_text_embedding, save_text_embedding
from windflow.errors import CheckpointError, InvalidArgument, InvalidControl

pytestmark = pytest.mark.usefixtures("torch_one_thread")

A, B = "a red car on the road", "blue sky at night"
NONE = Control()
# Chunks are made at frames 0, 9 and 21: A is sent at frame 4 and applies from 9, B is sent
# at frame 16 and applies from 21.
SEQ = [NONE] * 4 + [Control(prompt=A)] * 12 + [Control(prompt=B)] * 6
STEPS = 2


def _run(model, controls, state=None, seed: int = 5) -> tuple[np.ndarray, WanSession]:
    state = model.new_state(seed) if state is None else state
    frames = [model.step([state], [c], STEPS)[0] for c in controls]
    return np.stack(frames), state


@pytest.fixture(scope="module")
def model():
    return load_tiny(seed=0)


@pytest.fixture(scope="module")
def mg():
    return load_tiny(seed=0, action=True)


@pytest.fixture(scope="module")
def reference(model) -> np.ndarray:
    return _run(model, SEQ)[0]


def test_tiny_models_declare_prompts_and_poses(model, mg) -> None:
    for m in (model, mg):
        assert m.info.prompt == PromptSpec(max_chars=256, default="")
        assert m.info.extra["prompt_switch"] == "chunk boundary"
        assert m.info.extra["recache_frames"] == 6
        assert m.info.extra["text_encoder"] == "umt5-tiny:random:0"
    assert model.info.pose is None
    assert mg.info.pose == PoseSpec(
        kind=POSE_VELOCITY, components=("pitch", "yaw"), low=(-0.25, -0.25), high=(0.25, 0.25)
    )
    assert load_tiny(seed=0, recache_frames=0).info.extra["recache_frames"] == 0
    # the recache count is bounded by what the cache holds (window 9 - chunk 3 = 6 frames)
    assert load_tiny(seed=0, recache_frames=50).pipeline.recache_frames == 6


def test_switch_applies_from_the_next_chunk_boundary(model, reference) -> None:
    plain, _ = _run(model, [NONE] * 22)
    assert np.array_equal(reference[:9], plain[:9])  # A was sent at 4: nothing changes before 9
    assert all(not np.array_equal(a, b) for a, b in zip(reference[9:], plain[9:], strict=True))
    only_a, state = _run(model, SEQ[:16] + [Control(prompt=A)] * 6)
    assert state.stream.prompt == A
    assert np.array_equal(only_a[:21], reference[:21])  # B was sent at 16, applies from 21
    assert not np.array_equal(only_a[21], reference[21])
    # the declared default prompt ("") is the default itself: no switch
    same, state = _run(model, [Control(prompt="")] * 10)
    assert state.stream.prompt is None and np.array_equal(same, plain[:10])


def test_the_session_keeps_its_prompt(model) -> None:
    _, state = _run(model, SEQ[:9])
    assert state.stream.prompt is None  # A is pending until the chunk boundary
    model.step([state], [Control(prompt=A)], STEPS)
    assert state.stream.prompt == A
    # back to the default at the next boundary (12 frames later)
    _, state = _run(model, [NONE] * 12, state)
    assert state.stream.prompt is None


def test_recache_on_and_off_differ_after_the_switch(model, reference) -> None:
    off = load_tiny(seed=0, recache_frames=0)
    frames, state = _run(off, SEQ)
    assert state.stream.clean is None  # nothing kept without recache
    assert np.array_equal(frames[:9], reference[:9])
    assert all(not np.array_equal(a, b) for a, b in zip(frames[9:], reference[9:], strict=True))


def test_recache_under_the_same_prompt_rebuilds_the_cache_exactly(model, mg) -> None:
    """Before the window rolls, re-caching every frame under the prompt they were made
    with redoes exactly the passes that made them: the cache comes back bit-identical."""
    for m, control in ((model, NONE), (mg, Control(action=1, axes=(0.3, -0.2)))):
        _, state = _run(m, [control] * 10)  # two chunks: 6 latent frames, all in the cache
        st = state.stream
        assert st.latent_frames == 6 and st.clean is not None and st.clean.shape[2] == 6
        before = [t.clone() for t in st.kv.keys + st.kv.values]
        with torch.inference_mode():
            m.pipeline._recache(st, m.pipeline.context_kv)
        assert all(
            torch.equal(a, b) for a, b in zip(before, st.kv.keys + st.kv.values, strict=True)
        )
        assert st.kv.n_written == 6 * m.pipeline.tokens_per_frame


def test_recache_after_the_window_rolled_rewrites_only_the_ring(model) -> None:
    _, state = _run(model, [NONE] * 22)  # three chunks: 9 frames, the ring holds 6..8
    st, tpf = state.stream, model.pipeline.tokens_per_frame
    sink = st.kv.sink
    before = [k.clone() for k in st.kv.keys]
    n_written = st.kv.n_written
    with torch.inference_mode():
        model.pipeline.switch_prompt(st, A)
    assert st.prompt == A and st.kv.n_written == n_written == 9 * tpf
    for layer, (old, new) in enumerate(zip(before, st.kv.keys, strict=True)):
        assert torch.equal(old[:, :sink], new[:, :sink])  # sink frames keep their entries
        for frame in range(3):  # each ring frame was recomputed
            sl = slice(sink + frame * tpf, sink + (frame + 1) * tpf)
            # the first block's keys come before any cross-attention: the prompt does not
            # reach them (the clean pass at the same positions gives the same keys)
            assert torch.equal(old[:, sl], new[:, sl]) == (layer == 0)


def test_prompt_kv_and_encoder_caches(model) -> None:
    enc = model.pipeline.encoder
    text = "a prompt seen twice"
    misses = enc.misses
    first = model.pipeline.context_for(text)
    assert model.pipeline.context_for(text) is first
    assert enc.misses == misses + 1
    model.pipeline._prompt_kv.clear()  # the DiT's k/v evicted: the encoding is reused
    hits = enc.hits
    again = model.pipeline.context_for(text)
    assert enc.hits == hits + 1 and enc.misses == misses + 1
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))


@pytest.mark.parametrize("at", [5, 12, 17])
def test_snapshot_and_copy_with_switches_are_deterministic(model, reference, at) -> None:
    """5: A sent, its chunk not made yet; 12: mid-chunk after A's switch; 17: B sent."""
    head, state = _run(model, SEQ[:at])
    blob = model.snapshot(state)
    kept = model.copy(state)
    meta = _read_metadata(blob)
    assert meta["format"] == SNAPSHOT_FORMAT == "windflow.wan.session/2"
    assert json.loads(meta["state"])["prompt"] == (None if at == 5 else A)
    tail, _ = _run(model, SEQ[at:], state)
    assert np.array_equal(np.concatenate([head, tail]), reference)
    copied, _ = _run(model, SEQ[at:], kept)
    assert np.array_equal(copied, reference[at:])
    if at == 12:  # in a fresh instance (empty prompt caches) too
        fresh = load_tiny(seed=0)
        restored = fresh.restore(blob)
        assert restored.stream.prompt == A and restored.stream.clean is not None
        assert np.array_equal(_run(fresh, SEQ[at:], restored)[0], reference[at:])
    else:
        assert np.array_equal(_run(model, SEQ[at:], model.restore(blob))[0], reference[at:])


def test_matrix_game_switch_survives_snapshot(mg) -> None:
    go = Control(action=1, axes=(0.5, 0.0))
    seq = [go] * 4 + [Control(action=1, axes=(0.5, 0.0), prompt=A)] * 6
    expected, _ = _run(mg, seq)
    plain, _ = _run(mg, [go] * 10)
    assert np.array_equal(expected[:9], plain[:9]) and not np.array_equal(expected[9], plain[9])
    _, state = _run(mg, seq[:5])
    restored = mg.restore(mg.snapshot(state))
    assert np.array_equal(_run(mg, seq[5:], restored)[0], expected[5:])


def test_pose_drives_the_mouse(mg) -> None:
    vec = mg._action_vector
    # a pose at +-range and axes at +-1 give the same mouse, +-mouse_scale
    by_pose = vec(Control(action=1, pose=(0.25, -0.125)))
    by_axes = vec(Control(action=1, axes=(1.0, -0.5)))
    assert torch.allclose(by_pose, by_axes)
    assert torch.allclose(by_pose[4:], torch.tensor([0.1, -0.05]))
    # a pose takes precedence over the axes
    both = vec(Control(action=1, axes=(-1.0, 1.0), pose=(0.25, -0.125)))
    assert torch.equal(both, by_pose)
    still, _ = _run(mg, [Control(action=1, pose=(0.0, 0.0))] * 9)
    turning, _ = _run(mg, [Control(action=1, pose=(0.2, -0.2))] * 9)
    assert not np.array_equal(still, turning)
    plain, _ = _run(mg, [Control(action=1)] * 9)
    assert np.array_equal(still, plain)  # a zero pose is no mouse motion


def test_invalid_rich_controls(model, mg) -> None:
    for bad in ((0.3, 0.0), (0.0, -0.26), (float("nan"), 0.0), (0.1,), (0.1, 0.1, 0.1)):
        with pytest.raises(InvalidControl, match=r"control\.pose"):
            mg.validate_control(Control(action=1, pose=bad))
    mg.validate_control(Control(action=1, pose=(0.25, -0.25)))
    with pytest.raises(InvalidControl, match="takes no camera pose"):
        model.validate_control(Control(pose=(0.0, 0.0)))
    with pytest.raises(InvalidControl, match="257 characters"):
        model.validate_control(Control(prompt="x" * 257))
    state = mg.new_state(0)
    with pytest.raises(InvalidControl):
        mg.step([state], [Control(action=1, pose=(1.0, 0.0))], STEPS)
    assert state.frame_index == 0 and state.stream.chunks == 0


# -- load_checkpoint with a umT5 file and a tokenizer ---------------------------------


def _tokenizer_json(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for i, word in enumerate("a red car on the road blue sky at night".split()):
        vocab[word] = 3 + i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory, model) -> Path:
    """The tiny model's DiT, VAE, umT5 and default prompt as Wan-style files."""
    root = tmp_path_factory.mktemp("wan")
    pipe = model.pipeline
    save_file({k: v.clone() for k, v in pipe.dit.state_dict().items()},
              str(root / "diffusion_pytorch_model.safetensors"))  # fmt: skip
    vae = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    gen = torch.Generator().manual_seed(9)
    for k, shape in vae_encoder_keys(VAEConfig(dim=8)).items():
        vae[k] = torch.randn(shape, generator=gen)
    torch.save(vae, root / "Wan2.1_VAE.pth")
    save_text_embedding(root / "prompt.safetensors", random_text_embedding(0, 8, 48))
    assert pipe.encoder is not None
    torch.save(dict(pipe.encoder.model.state_dict()), root / "models_t5_umt5-xxl-enc-bf16.pth")
    _tokenizer_json(root / "tokenizer.json")
    return root


def _load(root: Path, **kw):
    return load_checkpoint(path=str(root), size="tiny", device="cpu", **kw)


def test_checkpoint_without_t5_takes_no_prompt(wan_dir) -> None:
    fixed = _load(wan_dir)
    assert fixed.info.prompt is None and fixed.pipeline.encoder is None
    assert fixed.info.extra["prompt_switch"] == "fixed"
    with pytest.raises(InvalidControl, match="takes no prompt"):
        fixed.step([fixed.new_state(0)], [Control(prompt=A)], STEPS)
    with pytest.raises(InvalidArgument, match="need t5="):
        _load(wan_dir, tokenizer=str(wan_dir))


def test_checkpoint_with_t5_switches_like_the_tiny_model(wan_dir, reference) -> None:
    t5 = str(wan_dir / "models_t5_umt5-xxl-enc-bf16.pth")
    # the byte tokenizer (tiny size, no tokenizer=) and the prompt file as the default:
    # the same model as load_tiny(seed=0), so the same frames
    same = _load(wan_dir, t5=t5, text_embedding=str(wan_dir / "prompt.safetensors"))
    assert same.info.prompt == PromptSpec(max_chars=2048, default="")
    assert np.array_equal(_run(same, SEQ)[0], reference)
    # umT5's tokenizer.json tokenizes differently: other frames once A applies
    tok = _load(wan_dir, t5=t5, tokenizer=str(wan_dir), default_prompt="blue sky")
    assert tok.info.prompt == PromptSpec(max_chars=2048, default="blue sky")
    assert tok.pipeline.encoder is not None
    assert tok.pipeline.encoder.tokenize(A) == [3, 4, 5, 6, 7, 8, 1]
    frames, state = _run(tok, SEQ[:10])
    assert state.stream.prompt == A
    assert not np.array_equal(frames[9], reference[9])
    bad = {k: v for k, v in same.pipeline.encoder.model.state_dict().items()}
    bad["blocks.1.attn.k.weight"] = torch.zeros(48, 47)
    torch.save(bad, wan_dir / "bad_t5.pth")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn\.k\.weight: \(48, 47\)"):
        _load(wan_dir, t5=str(wan_dir / "bad_t5.pth"))
