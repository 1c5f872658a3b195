"""The built-in world model with its committed weights: determinism, batch invariance,
snapshots, bad input, and that it really learned the arena."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from services.worker.models.base import Control, SessionState
from services.worker.models.world import load_default, sim
from services.worker.models.world.model import (
    SNAPSHOT_MAGIC,
    WEIGHTS,
    BuiltinWorldModel,
    WorldState,
    load,
)
from services.worker.models.world.net import (
    WARP_OFFSETS,
    NetConfig,
    Prior,
    WorldNet,
    arg_max_color,
    moved,
)
from tests.fakes import FakeWorld
from windflow.errors import (
    CheckpointError,
    InvalidArgument,
    InvalidControl,
    SnapshotError,
    SnapshotVersionMismatch,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model() -> BuiltinWorldModel:
    return load_default()


def actions(n: int, salt: int = 0) -> list[Control]:
    return [Control((i // 3 + salt) % len(sim.ACTIONS)) for i in range(n)]


def run(model: BuiltinWorldModel, seed: int, controls: list[Control], steps: int = 2) -> np.ndarray:
    state = model.new_state(seed)
    return np.stack([model.step([state], [c], steps)[0] for c in controls])


def test_same_seed_same_actions_bit_identical_across_instances(model: BuiltinWorldModel) -> None:
    controls = actions(12)
    first = run(model, 5, controls)
    second = run(load(), 5, controls)
    assert first.dtype == np.uint8 and first.shape == (12, 64, 64, 3)
    assert np.array_equal(first, second)
    assert not np.array_equal(first, run(model, 6, controls))
    assert not np.array_equal(first, run(model, 5, actions(12, salt=2)))


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_batch_invariant(model: BuiltinWorldModel, steps: int) -> None:
    controls = actions(8)
    alone = run(model, 42, controls, steps)
    for size, position in ((8, 3), (5, 0), (2, 1), (16, 15)):
        states = [model.new_state(100 + i) for i in range(size)]
        states[position] = model.new_state(42)
        frames = []
        for t, c in enumerate(controls):
            batch = [Control((t + i) % 5) for i in range(size)]
            batch[position] = c
            frames.append(model.step(states, batch, steps)[position])
        assert np.array_equal(np.stack(frames), alone), (size, position)


def test_two_threads_give_the_same_frames_as_one(model: BuiltinWorldModel) -> None:
    controls = actions(6)
    assert np.array_equal(run(load(num_threads=2), 11, controls), run(model, 11, controls))


def advanced(model: BuiltinWorldModel, seed: int, controls: list[Control]) -> SessionState:
    """A session of ``seed`` stepped (batch of one, 2 steps) through ``controls``."""
    state = model.new_state(seed)
    for c in controls:
        model.step([state], [c], 2)
    return state


def test_snapshot_restore_in_a_fresh_instance_continues_bit_exactly(
    model: BuiltinWorldModel,
) -> None:
    controls = actions(14)
    reference = run(model, 9, controls)
    blob = model.snapshot(advanced(model, 9, controls[:6]))
    fresh = load()
    restored = fresh.restore(blob)
    assert restored.frame_index == 6 and restored.seed == 9
    rest = np.stack([fresh.step([restored], [c], 2)[0] for c in controls[6:]])
    assert np.array_equal(rest, reference[6:])
    assert fresh.snapshot(fresh.restore(blob)) == blob


def test_a_copy_is_independent_and_continues_bit_exactly(model: BuiltinWorldModel) -> None:
    controls = actions(14)
    reference = run(model, 9, controls)
    state = advanced(model, 9, controls[:6])
    kept = model.copy(state)
    before = model.snapshot(kept)
    # the original goes on (other controls: another future); the copy does not move
    for c in actions(5, salt=2):
        model.step([state], [c], 2)
    assert state.frame_index == 11 and kept.frame_index == 6
    assert model.snapshot(kept) == before
    # the copy goes on as the uninterrupted run did, and a copy of it as well
    again = model.copy(kept)
    rest = np.stack([model.step([kept, again], [c, c], 2) for c in controls[6:]])
    assert np.array_equal(rest[:, 0], reference[6:]) and np.array_equal(rest[:, 1], rest[:, 0])
    with pytest.raises(InvalidArgument):
        model.copy(FakeWorld().new_state(1))


def test_snapshot_restores_in_another_process(model: BuiltinWorldModel) -> None:
    controls = actions(10)
    reference = run(model, 13, controls)
    state = advanced(model, 13, controls[:4])
    script = (
        "import sys, numpy as np\n"
        "from services.worker.models.base import Control\n"
        "from services.worker.models.world import load_default\n"
        "m = load_default()\n"
        "s = m.restore(sys.stdin.buffer.read())\n"
        f"acts = {[c.action for c in controls[4:]]}\n"
        "f = np.stack([m.step([s], [Control(a)], 2)[0] for a in acts])\n"
        "sys.stdout.buffer.write(f.tobytes())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        input=model.snapshot(state),
        capture_output=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == reference[4:].tobytes()


def test_bad_controls_and_steps_are_refused_before_any_state_changes(
    model: BuiltinWorldModel,
) -> None:
    state = model.new_state(1)
    before = model.snapshot(state)
    with pytest.raises(InvalidControl, match="outside the action space"):
        model.step([state], [Control(len(sim.ACTIONS))], 2)
    with pytest.raises(InvalidControl):
        model.step([state], [Control(-1)], 2)
    with pytest.raises(InvalidArgument, match="steps"):
        model.step([state], [Control(0)], 5)
    assert model.snapshot(state) == before


def test_bad_snapshots_raise_typed_errors(model: BuiltinWorldModel) -> None:
    state = model.new_state(2)
    model.step([state], [Control(1)], 2)
    blob = model.snapshot(state)
    corrupted = bytearray(blob)
    corrupted[len(blob) // 2] ^= 0xFF
    with pytest.raises(SnapshotError, match="corrupted"):
        model.restore(bytes(corrupted))
    with pytest.raises(SnapshotError):
        model.restore(blob[: len(blob) // 3])
    with pytest.raises(SnapshotError):
        model.restore(blob[:-1])
    with pytest.raises(SnapshotError, match="not a windflow-world snapshot"):
        model.restore(b"\x00" * 64)
    with pytest.raises(SnapshotError):
        model.restore(b"")
    with pytest.raises(SnapshotError):
        model.restore(FakeWorld().snapshot(FakeWorld().new_state(1)))
    # a well-formed snapshot of another version of the model
    head_len = struct.unpack_from("<I", blob, len(SNAPSHOT_MAGIC))[0]
    start = len(SNAPSHOT_MAGIC) + 4
    header = json.loads(blob[start : start + head_len])
    header["model_version"] = "0.9+other"
    head = json.dumps(header, sort_keys=True).encode()
    payload = SNAPSHOT_MAGIC + struct.pack("<I", len(head)) + head + blob[start + head_len : -32]
    foreign = payload + hashlib.sha256(payload).digest()
    with pytest.raises(SnapshotVersionMismatch, match=r"0\.9\+other"):
        model.restore(foreign)
    # a checksummed snapshot whose header is garbage
    payload = SNAPSHOT_MAGIC + struct.pack("<I", 3) + b"{x]" + blob[start + head_len : -32]
    with pytest.raises(SnapshotError, match="unreadable"):
        model.restore(payload + hashlib.sha256(payload).digest())


def test_it_learned_the_arena(model: BuiltinWorldModel) -> None:
    """Short rollouts on held-out worlds: true actions beat copying the last frame and beat
    the wrong actions (the full evaluation is tools/eval_world_model.py)."""
    seeds = [7_000_000 + i for i in range(8)]
    frames, acts = sim.generate_episodes(seeds, 8, policy_seed=99, warm_start=True)
    wrong = (acts + 2) % len(sim.ACTIONS)

    def rollout(a: np.ndarray) -> np.ndarray:
        states = [model.new_state(s) for s in seeds]
        return np.stack(
            [model.step(states, [Control(int(x)) for x in a[:, t]], 2) for t in range(8)], 1
        )

    def mse(pred: np.ndarray) -> float:
        return float(np.mean((pred / 255.0 - frames[:, 1:] / 255.0) ** 2))

    true, other = mse(rollout(acts)), mse(rollout(wrong))
    copy = mse(np.repeat(frames[:, :1], 8, axis=1))
    assert true < copy
    assert true < other


def test_one_step_prediction_beats_copying_the_last_frame(model: BuiltinWorldModel) -> None:
    """Teacher-forced (true context frames): the model does learn the dynamics."""
    seeds = tuple(7_000_000 + i for i in range(8))
    frames, acts = sim.generate_episodes(list(seeds), 6, policy_seed=99, warm_start=True)
    states = [model.new_state(s) for s in seeds]
    preds = []
    for t in range(6):
        preds.append(model.step(states, [Control(int(a)) for a in acts[:, t]], 2))
        for i, state in enumerate(states):
            model.observe(state, frames[i, t + 1])
    pred = np.stack(preds, 1) / 255.0
    truth, last = frames[:, 1:] / 255.0, frames[:, :-1] / 255.0
    assert np.mean((pred - truth) ** 2) < 0.25 * np.mean((last - truth) ** 2)  # >= 6 dB


def test_weights_and_model_card_are_committed(model: BuiltinWorldModel) -> None:
    assert WEIGHTS.stat().st_size <= 20 * 1024 * 1024
    card = json.loads(WEIGHTS.with_name("model_card.json").read_text())
    assert card["training"]["data_frames"] >= 50_000
    # the card describes these very weights
    assert card["version"] == card["eval"]["model_version"] == model.info.version
    assert len(card["eval"]["rollout_psnr_true"]) == 32


def test_options_threads_and_batch_shape_errors(model: BuiltinWorldModel) -> None:
    with pytest.raises(InvalidArgument, match="options"):
        load_default(windw=3)
    with pytest.raises(InvalidArgument, match="window"):
        load_default(window=9)
    short = load_default(window=2, num_threads=1)
    assert short.info.extra["window"] == 2 and short.info.version == model.info.version
    state = short.new_state(3)
    threads = torch.get_num_threads()
    assert short.step([state], [Control(1)], 1).shape == (1, 64, 64, 3)
    assert torch.get_num_threads() == threads  # the model restores the process setting
    with pytest.raises(SnapshotVersionMismatch, match="window"):
        model.restore(short.snapshot(state))
    with pytest.raises(InvalidArgument, match="window"):
        model.step([state], [Control(1)], 1)
    other = model.new_state(4)
    with pytest.raises(InvalidArgument, match="twice"):
        model.step([other, other], [Control(1), Control(1)], 1)
    with pytest.raises(InvalidArgument, match="one control per session"):
        model.step([other], [], 1)
    assert model.step([], [], 2).shape == (0, 64, 64, 3)
    assert other.frame_index == 0


def test_observe_replaces_the_context_frame(model: BuiltinWorldModel) -> None:
    world = sim.WorldSim([77])
    a, b = model.new_state(77), model.new_state(77)
    model.step([a], [Control(4)], 2)
    model.step([b], [Control(4)], 2)
    truth = world.step([4])[0]
    model.observe(b, truth)
    assert np.array_equal(b.prev, truth)
    assert not np.array_equal(model.step([a], [Control(4)], 2), model.step([b], [Control(4)], 2))
    with pytest.raises(InvalidArgument, match="uint8"):
        model.observe(a, truth.astype(np.float32))


def _train_tiny(tmp_path: Path, name: str, *extra: str) -> Path:
    out = tmp_path / f"{name}.safetensors"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train_world_model.py"), "--steps", "2",
         "--worlds", "4", "--length", "12", "--batch", "2", "--frames", "3", "--dim", "32",
         "--depth", "1", "--threads", "1", "--self-forcing", "1.0", "--no-eval",
         "--out", str(out), "--card", str(tmp_path / f"{name}.json"), *extra],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out


def test_training_script_is_reproducible_and_its_weights_load(tmp_path: Path) -> None:
    first, second = _train_tiny(tmp_path, "a"), _train_tiny(tmp_path, "b")
    small = load(first)
    assert small.info.version == load(second).info.version  # a digest of every tensor
    assert small.cfg.dim == 32
    state = small.new_state(1)
    assert small.step([state], [Control(1)], 1).shape == (1, 64, 64, 3)
    assert json.loads((tmp_path / "a.json").read_text())["training"]["steps"] == 2


def test_training_saves_the_moving_average_of_the_weights_by_default(tmp_path: Path) -> None:
    """The recipe saves an EMA of the weights (``--ema``, default 0.998); ``--ema 0`` the
    last weights. After 2 steps the average has barely left the initial weights."""
    averaged, last = _train_tiny(tmp_path, "avg"), _train_tiny(tmp_path, "last", "--ema", "0")
    assert json.loads((tmp_path / "avg.json").read_text())["training"]["ema"] == 0.998
    assert json.loads((tmp_path / "last.json").read_text())["training"]["ema"] == 0.0
    init = _train_tiny(tmp_path, "init", "--steps", "0", "--ema", "0")
    tensors = [load_file(str(p)) for p in (averaged, last, init)]
    moved_avg = sum(float((tensors[0][k] - tensors[2][k]).abs().sum()) for k in tensors[2])
    moved_last = sum(float((tensors[1][k] - tensors[2][k]).abs().sum()) for k in tensors[2])
    assert 0 < moved_avg < 0.01 * moved_last


def test_a_three_frame_pixel_decoder_sees_the_frame_before_and_keeps_the_contracts(
    tmp_path: Path,
) -> None:
    """``--local-frames 3``: the pixel decoder also sees the frame before the last two
    (where a ball goes after a bounce's pause); the session state carries it, snapshots
    too, and batching stays bit-exact."""
    small = load(_train_tiny(tmp_path, "three", "--local-frames", "3"))
    assert small.cfg.local_frames == 3
    net = small.net
    before, prev = sim.start_frames(5)
    idx = [small._color_index(prev[None]), small._color_index(before[None])]
    with torch.no_grad():
        same = net.local_features([*idx, idx[1]])
        moved = net.local_features([*idx, torch.roll(idx[1], 3, dims=2)])
    assert not torch.equal(same, moved)  # the third frame is an input
    restored = _batched_and_restored(small)
    assert np.array_equal(restored.earlier, run(small, 3, actions(8)[:2], 2)[-1])


def _batched_and_restored(small: BuiltinWorldModel) -> WorldState:
    """Asserts that world 3 stepped in the middle of a batch of 3 makes the frames it makes
    alone, and that its snapshot at frame 4, restored, goes on bit-identically; returns
    the restored state (as restored)."""
    controls = actions(8)
    alone = run(small, 3, controls, 2)
    states = [small.new_state(s) for s in (7, 3, 9)]
    snap = b""
    for t, c in enumerate(controls):
        batch = [Control((t + 1) % 5), c, Control((t + 2) % 5)]
        assert np.array_equal(small.step(states, batch, 2)[1], alone[t])
        if t == 3:
            snap = small.snapshot(states[1])
    restored = small.restore(snap)
    kept = small.copy(restored)
    rest = np.stack([small.step([restored], [c], 2)[0] for c in controls[4:]])
    assert np.array_equal(rest, alone[4:])
    return kept


def test_a_warp_head_copies_by_offset_and_keeps_the_contracts(tmp_path: Path) -> None:
    """``--warp 1``: a pixel's colour logit also gathers the offsets that would copy that
    colour from the last frame. An object moved by an offset's logit alone is drawn whole
    at its new place; batching and snapshots stay bit-exact."""
    small = load(_train_tiny(tmp_path, "warp", "--warp", "1", "--motion", "2"))
    assert (small.cfg.warp, small.cfg.motion) == (1, 2)
    _batched_and_restored(small)
    net, cfg = small.net, small.cfg
    prev_idx = small._color_index(sim.start_frames(5)[1][None])
    prior = Prior(moved(prev_idx), None)
    assert prior.base.shape == (1, len(WARP_OFFSETS), 64 * 64)
    # every pixel takes offset (0, 2) (content moves 2 px right): the frame shifts right
    right = WARP_OFFSETS.index((0, 2))
    with torch.no_grad():
        net.logits.weight.zero_()
        net.logits.bias.zero_()
        net.logits.bias[cfg.colors + right] = 50.0
        x = torch.zeros(1, cfg.tokens, cfg.dim)
        local = torch.zeros(1, cfg.local, 64 * 64)
        shifted = arg_max_color(net.output(x, local, prior))[0]
    expected = torch.zeros_like(prev_idx[0])
    expected[:, 2:] = prev_idx[0, :, :-2]
    assert torch.equal(shifted, expected)
    with pytest.raises(ValueError, match="motion_match"):
        net.prior(prev_idx)  # motion 2 needs the last two frames' match


@pytest.mark.parametrize(("collide", "rigid"), [("0", "0"), ("1", "0"), ("1", "1")])
def test_serving_decodes_the_pixels_in_play_as_the_dense_decoder_and_keeps_the_rest(
    tmp_path: Path, collide: str, rigid: str
) -> None:
    """A warp model's serving path (``plan`` + ``decode``) decodes only the pixels some
    offset could bring another colour to; there it picks what the dense ``output`` picks
    (``frame_of``), everywhere else the last frame's colour stays (with and without
    ``collide``, per pixel or object by object)."""
    small = load(
        _train_tiny(tmp_path, "sparse", "--motion", "2", "--collide", collide, "--rigid", rigid)
    )
    assert small.cfg.rigid == int(rigid)
    if collide == "1":
        _batched_and_restored(small)
        with torch.no_grad():  # a trained gain is tiny after 2 steps: make it count here
            cast(torch.nn.Parameter, small.net.collide_gain).fill_(3.0)
    net, b = small.net, 6
    pairs = [sim.start_frames(s) for s in range(b)]
    prev_idx = small._color_index(np.stack([p[1] for p in pairs]))
    before_idx = small._color_index(np.stack([p[0] for p in pairs]))
    torch.manual_seed(0)
    with torch.inference_mode():
        match = net.motion_match(prev_idx, before_idx)
        hits = net.collisions(prev_idx) if net.cfg.collide else None
        local = net.local_features([prev_idx, before_idx], match, hits)
        prior = net.prior(prev_idx, match, hits)
        x = torch.randn(b, net.cfg.tokens, net.cfg.dim)
        dense = net.frame_of(net.output(x, local, prior), prev_idx).view(b, -1)
        history = [prev_idx, before_idx]
        counts = net.motion_counts(prev_idx, before_idx)
        plan = net.plan(history, counts)
        sparse = net.decode(x, plan).view(b, -1)
        scores = net.scores(x, plan)
        plans = [net.plan([h[i : i + 1] for h in history], counts[i : i + 1]) for i in range(b)]
        alone = [net.decode(x[i : i + 1], plans[i]) for i in range(b)]
        alone_scores = [net.scores(x[i : i + 1], plans[i]) for i in range(b)]
    in_play = torch.zeros(b * 64 * 64, dtype=torch.bool)
    in_play[plan.sel] = True
    in_play = in_play.view(b, -1)
    assert 0.05 < float(in_play.float().mean()) < 0.5  # object edges, not the whole frame
    assert torch.equal(sparse[in_play], dense[in_play])
    assert torch.equal(sparse[~in_play], prev_idx.view(b, -1)[~in_play])
    n = 64 * 64
    for i in range(b):  # a session's pixels do not depend on the others decoded with it
        assert torch.equal(alone[i].view(-1), sparse[i])
        mine = ((plan.sel >= i * n) & (plan.sel < (i + 1) * n)).nonzero().squeeze(1)
        # to the bit: every column through the same kernels whatever its position
        assert torch.equal(scores[:, mine], alone_scores[i][:, : mine.shape[0]])


def test_motion_match_scores_the_offset_that_explains_the_last_move() -> None:
    """``NetConfig.motion``: for each warp offset, the share of a pixel's 5x5 window that
    the frame before, moved by the offset, explains in the last frame."""
    net = WorldNet(NetConfig(dim=32, depth=1, warp=1, motion=1))
    frame = sim.start_frames(11)[0].astype(np.int64)
    palette = sim.PALETTE.astype(np.int64)
    before = torch.from_numpy(((frame[..., None, :] - palette) ** 2).sum(-1).argmin(-1))[None]
    diagonal = WARP_OFFSETS.index((1, 1))
    last = moved(before)[:, diagonal].view(1, 64, 64)
    match = net.motion_match(last, before).view(1, len(WARP_OFFSETS), 64, 64)
    inner = match[0, :, 3:-3, 3:-3]
    assert bool((inner[diagonal] == 1.0).all())  # the true move explains every window
    others = [o for o in range(len(WARP_OFFSETS)) if o != diagonal]
    assert all(float(inner[o].min()) < 1.0 for o in others)  # no other offset does


def test_only_pixels_near_things_that_move_are_in_play() -> None:
    """The serving decoder decodes a pixel only if a warp offset brings it another colour
    and a thing that moves (``sim.MOVING``) is at it or among what the offsets bring: an
    obstacle's edge with nothing moving within 2 px keeps its colour undecoded."""
    net = WorldNet(NetConfig(dim=32, depth=1, warp=1))
    last = torch.zeros(1, 64, 64, dtype=torch.long)
    last[0, 10:20, 10:20] = 1  # an obstacle
    last[0, 40:48, 40:48] = 3  # a ball, far from it
    last[0, 20:28, 20:28] = 4  # another, diagonally touching the obstacle's corner
    in_play = torch.zeros(64 * 64, dtype=torch.bool)
    in_play[net.plan([last, last], None).sel] = True
    in_play = in_play.view(64, 64)
    assert not bool(in_play[8:22, 8:12].any())  # the obstacle's left side: nothing near
    # the ball: its edge and the 2 px around it, not its inside
    assert bool(in_play[38:42, 40:48].all()) and bool(in_play[46:50, 40:48].all())
    assert not bool(in_play[42:46, 42:46].any())
    assert bool(in_play[19, 19]) and bool(in_play[19, 20])  # its corner, near the ball


def test_collisions_see_whether_an_object_can_move_along_its_whole_side() -> None:
    """``NetConfig.collide``: for each warp offset, whether all of a colour moved by it runs
    into another colour or the arena's edge, seen at the colour's own pixels and at the
    pixels the offset would bring it to, however far they are from where it runs in."""
    net = WorldNet(NetConfig(dim=32, depth=1, warp=1, collide=1))
    ball, wall = 3, 1
    last = torch.zeros(1, 64, 64, dtype=torch.long)
    last[0, 20:28, 0:8] = ball  # touching the left edge
    last[0, 27:40, 9:12] = wall  # one free column to its right, overlapping its last row
    o = len(WARP_OFFSETS)
    hits = net.collisions(last).view(1, 2, o, 64, 64)
    own, incoming = hits[0, 1], hits[0, 0]

    def at(offset: tuple[int, int]) -> int:
        return WARP_OFFSETS.index(offset)

    inside = own[:, 20:28, 0:8]
    assert bool((inside[at((0, -1))] == 1).all())  # the edge, even 7 px away from it
    assert bool((inside[at((0, 1))] == 0).all())  # one free column
    assert bool((inside[at((0, 2))] == 1).all())  # two: the wall, at its last row only
    assert bool((inside[at((1, 0))] == 0).all()) and bool((inside[at((0, 0))] == 0).all())
    assert bool((inside[at((1, 1))] == 0).all())  # diagonal: the column, then free rows
    assert int(own[:, 40:, 20:].sum()) == 0  # the background runs into nothing
    # what offset (0, 2) would bring to x = 9..10 is the ball, which cannot go there
    assert int(incoming[at((0, 2)), 22, 9]) == 1
    assert int(incoming[at((0, 1)), 22, 8]) == 0
    # serving reads them at the pixels in play only, and gets the same flags there: an
    # obstacle touching the arena's top edge far from anything that moves still counts
    # as blocked upwards where a ball near its other side puts it in play
    last[0, 0:10, 30:40] = 1
    last[0, 11:19, 31:39] = 4
    sel = net.plan([last, last], None).sel
    assert not bool((sel < 2 * 64).any())  # the edge rows are not in play
    small = last.to(torch.uint8)
    served = net._collide(
        net.leaving(small), sel // 4096, moved(small)[0][:, sel], last.view(-1)[sel]
    )
    assert torch.equal(served, net.collisions(last)[0][:, sel])
    obstacle_bottom = (sel == 9 * 64 + 35).nonzero().squeeze(1)
    assert int(served[o + at((-1, 0)), obstacle_bottom]) == 1  # its top is the edge
    with pytest.raises(ValueError, match="collisions"):
        net.prior(last)
    with pytest.raises(ValueError, match="needs warp 1"):
        WorldNet(NetConfig(dim=32, depth=1, warp=0, collide=1))


def _box(frame: torch.Tensor, color: int, y: int, x: int, size: int) -> None:
    frame[y : y + size, x : x + size] = color


def _preferring(frame: torch.Tensor) -> torch.Tensor:
    """Decoder scores (1, colors, H, W) that put 0.8 on each pixel's colour in ``frame``."""
    scores = torch.full((1, len(sim.PALETTE), 64, 64), 0.05)
    return scores.scatter_(1, frame.view(1, 1, 64, 64), 0.8)


def test_rigid_decoding_moves_each_object_whole() -> None:
    """``NetConfig.rigid``: each thing that moves takes the one offset under which the
    decoder's scores make the likeliest frame, and moves whole, where each pixel's own
    arg-max would tear it (a few pixels of the agent left behind) or fade it (a ball whose
    pixels all lean towards the background a little)."""
    net = WorldNet(NetConfig(dim=32, depth=1, warp=1, rigid=1))
    agent, ball, other = 2, 3, 4
    last = torch.zeros(64, 64, dtype=torch.long)
    _box(last, 1, 50, 5, 10)  # an obstacle
    _box(last, agent, 10, 10, 12)
    _box(last, ball, 40, 40, 8)
    _box(last, other, 20, 40, 8)
    want = torch.zeros(64, 64, dtype=torch.long)
    _box(want, 1, 50, 5, 10)
    _box(want, agent, 10, 12, 12)  # right by 2
    _box(want, ball, 41, 41, 8)  # down and right by 1
    _box(want, other, 20, 40, 8)  # still
    scores = _preferring(want)
    scores[0, :, 10:14, 22:24] = _preferring(torch.zeros(64, 64, dtype=torch.long))[0, :, :4, :2]
    scores[0, 0, 20:28, 40:48], scores[0, other, 20:28, 40:48] = 0.6, 0.3
    own = arg_max_color(scores)[0]
    assert not bool((own == other).any())  # per pixel: the ball is gone...
    assert int((own[10:22, 12:24] == agent).sum()) == 144 - 8  # ...and the agent torn
    assert torch.equal(net.frame_of(scores, last[None])[0], want)  # whole, all of them
    with pytest.raises(ValueError, match="needs warp 1"):
        WorldNet(NetConfig(dim=32, depth=1, warp=0, rigid=1))


def test_rigid_decoding_never_runs_an_object_into_anything() -> None:
    """``NetConfig.rigid``: an object moves only by an offset that keeps it in the arena and
    off everything there, in the order the arena moves them (the agent, then each ball):
    a ball may follow another into the place it has just left, not into one it is still in;
    nothing leaves the arena; a pair of batched sessions choose independently. So every
    object keeps every one of its pixels."""
    net = WorldNet(NetConfig(dim=32, depth=1, warp=1, rigid=1))
    agent, ball, other = 2, 3, 4
    last = torch.zeros(2, 64, 64, dtype=torch.long)
    _box(last[0], agent, 30, 0, 12)  # against the left edge
    _box(last[0], ball, 10, 20, 8)
    _box(last[0], other, 10, 28, 8)  # touching the ball's right side
    _box(last[1], agent, 40, 40, 12)
    _box(last[1], ball, 10, 20, 8)
    _box(last[1], other, 10, 28, 8)
    # preferred: the agent 2 px left (out of the arena), both balls 1 px right (the first
    # into the second's place, which it has not left yet); in session 1, both balls left
    left = torch.zeros(2, 64, 64, dtype=torch.long)
    left[0, 30:42, 0:10] = agent  # 2 px left: its first two columns past the edge, gone
    _box(left[0], ball, 10, 21, 8)
    _box(left[0], other, 10, 29, 8)
    _box(left[1], agent, 40, 40, 12)
    _box(left[1], ball, 10, 19, 8)
    _box(left[1], other, 10, 27, 8)
    scores = torch.cat([_preferring(left[0]), _preferring(left[1])])
    got = net.frame_of(scores, last)
    want = last.clone()
    want[0, 10:18, 28:36], want[0, 10:18, 29:37] = 0, other  # the ball stays, the other goes
    want[1, 10:18, 19:27], want[1, 10:18, 27:35] = ball, other  # the other follows the ball
    want[1, 10:18, 35] = 0
    assert torch.equal(got, want)  # and the agent stays: moving left, it would leave
    for color, size in ((agent, 144), (ball, 64), (other, 64)):
        assert ((got == color).sum((1, 2)) == size).all()
    assert torch.equal(net.frame_of(scores[1:], last[1:]), got[1:])  # alone, the same


def test_the_first_pass_masks_as_a_clean_pass_then_a_denoising_pass_would() -> None:
    """A step's first transformer pass runs the last frame's clean block and the first
    denoising block together; their key ages are those of the two passes it replaces
    (the noisy block sees the cache as rolled: its oldest frame gone, the clean block at
    age 1)."""
    model = load_default()
    t = model.cfg.tokens
    valid = torch.tensor([[False, False, True, True], [True, True, True, True]])
    age = model._first_pass_ages(valid)  # per (query block, key block)
    # keys: slots 0..3 (oldest first), clean, noisy
    assert age[0].tolist() == [[-1, -1, 2, 1, 0, -1], [-1, -1, 3, 2, 1, 0]]
    assert age[1].tolist() == [[4, 3, 2, 1, 0, -1], [-1, 4, 3, 2, 1, 0]]
    # the bias by block, expanded to tokens, is the bias of the ages by token
    block = model.net.layers[0]
    by_token = age.repeat_interleave(t, 1).repeat_interleave(t, 2)
    with torch.no_grad():
        block.age_bias.copy_(torch.randn(block.age_bias.shape))
        assert torch.equal(block.age_bias_of(age, t), block.age_bias_of(by_token))


def test_weights_that_do_not_fit_raise_checkpoint_error(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(WEIGHTS))
    tensors.pop(next(iter(tensors)))
    with safe_open(str(WEIGHTS), "pt") as f:
        meta = f.metadata()
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(CheckpointError, match="missing"):
        load(bad)
    with pytest.raises(CheckpointError, match="no weights"):
        load(tmp_path / "absent.safetensors")
    odd = tmp_path / "odd.safetensors"
    config = {**json.loads(meta["config"]), "local_frames": 4}
    save_file(load_file(str(WEIGHTS)), str(odd), metadata={**meta, "config": json.dumps(config)})
    with pytest.raises(CheckpointError, match="local_frames"):
        load(odd)


def test_the_decoding_is_part_of_the_model_version(
    model: BuiltinWorldModel, tmp_path: Path
) -> None:
    """The same tensors decoded per pixel instead of object by object make other frames:
    another model version, whose snapshots the committed model refuses."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(WEIGHTS), "pt") as f:
        meta = f.metadata()
    config = json.loads(meta["config"])
    assert config["rigid"] == 1  # the committed weights decode object by object
    per_pixel = tmp_path / "per_pixel.safetensors"
    meta = {**meta, "config": json.dumps({**config, "rigid": 0})}
    save_file(load_file(str(WEIGHTS)), str(per_pixel), metadata=meta)
    other = load(per_pixel)
    assert other.info.version != model.info.version
    with pytest.raises(SnapshotVersionMismatch):
        model.restore(other.snapshot(other.new_state(3)))


def test_what_moves_is_never_lost(model: BuiltinWorldModel) -> None:
    """Object permanence: in long rollouts of held-out worlds under random actions, every
    frame draws the agent and both balls whole (each with every pixel it has), whatever
    the model makes of where they went. (Decoded per pixel, the weights before these lost
    every ball of 32 such worlds within 100 steps.)"""
    seeds = [7_100_000 + i for i in range(8)]
    _, acts = sim.generate_episodes(seeds, 80, policy_seed=5, warm_start=True)
    states = [model.new_state(s) for s in seeds]
    sizes = {2: sim.AGENT_SIZE**2, 3: sim.BALL_SIZE**2, 4: sim.BALL_SIZE**2}
    for t in range(acts.shape[1]):
        frames = model.step(states, [Control(int(a)) for a in acts[:, t]], 1 + t % 4)
        for color, size in sizes.items():
            drawn = (frames == sim.PALETTE[color]).all(-1).sum((1, 2))
            assert (drawn == size).all(), (t, color, drawn)


def test_sessions_start_from_two_frames_and_make_palette_images(model: BuiltinWorldModel) -> None:
    """A session's context is the world's first two frames (one still frame cannot show
    the balls' velocities), and every frame made is an image in the arena's palette."""
    before, first = sim.start_frames(21)
    state = model.new_state(21)
    assert np.array_equal(state.before, before) and np.array_equal(state.prev, first)
    frames, _ = sim.generate_episodes([21], 1, policy_seed=5, warm_start=True)
    assert np.array_equal(frames[0, 0], first)
    made = np.stack([model.step([state], [c], 2)[0] for c in actions(6)])
    palette = {tuple(c) for c in sim.PALETTE}
    assert {tuple(p) for p in made.reshape(-1, 3)} <= palette
    again = model.state_from(before, first, 21)
    assert np.array_equal(np.stack([model.step([again], [c], 2)[0] for c in actions(6)]), made)


def test_an_observed_frame_off_the_palette_is_read_by_nearest_colour(
    model: BuiltinWorldModel,
) -> None:
    a, b = model.new_state(8), model.new_state(8)
    tinted = np.clip(a.prev.astype(np.int16) + 9, 0, 255).astype(np.uint8)  # a camera's view
    model.observe(b, tinted)
    # the pixel decoder reads the same colours; the tokens see the tint itself
    assert model.step([b], [Control(1)], 1).shape == (1, 64, 64, 3)
    assert torch.equal(model._color_index(tinted[None]), model._color_index(a.prev[None]))
