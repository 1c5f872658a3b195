"""The built-in world model behind the ``WorldModel`` contract.

Session state: the KV cache of the last ``window`` frames (per layer), which cache slots
hold a frame yet, the last frame made (uint8; its keys and values enter the cache at the
start of the next step), the one before it (the motion input of the denoiser) and the one
before that (a 3-frame pixel decoder's), the session's own noise generator, its frame
index and seed.

A step, batched over sessions: K denoising passes from pure noise, the first one sharing
its transformer pass with the last frame's clean block (whose keys and values then enter
the cache): each predicts the frame's palette colours, whose arg-max image is re-noised
to the next time of the schedule with the noise that prediction implies (DDIM; the only
random draw is the starting noise, from the session's generator); the last pass's arg-max
colours are the frame (with ``NetConfig.rigid``, the committed weights: the frame in which
each thing that moves is moved whole by its likeliest offset, ``net.rigid_colors``). K is
the quality ladder: 1..4.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import load_file

from services.worker.models.base import Control, ModelInfo, SessionState, WorldModel
from services.worker.models.framing import (
    check_step,
    pack_snapshot,
    read_snapshot,
    torch_threads,
    weights_digest,
)
from services.worker.models.world import sim
from services.worker.models.world.net import NetConfig, WorldNet, arg_max_color
from windflow.errors import (
    CheckpointError,
    InvalidArgument,
    SnapshotError,
    SnapshotVersionMismatch,
)

MODEL_ID = "windflow-world"
SNAPSHOT_MAGIC = b"WFWSNAP1"
SNAPSHOT_FORMAT = 2  # bump when the layout after the header changes


def schedule(steps: int) -> list[float]:
    """Denoising times for ``steps`` steps: 1, then evenly down (1; 1, .5; 1, .67, .33; ...)."""
    return [1.0 - k / steps for k in range(steps)]


class WorldState(SessionState):
    def __init__(
        self,
        seed: int,
        frame_index: int,
        kv: torch.Tensor,
        valid: torch.Tensor,
        prev: np.ndarray,
        rng: np.random.Generator,
        before: np.ndarray | None = None,
        earlier: np.ndarray | None = None,
    ) -> None:
        self.seed = seed
        self.frame_index = frame_index
        self.kv = kv  # (L, 2, W, T, D) float32
        self.valid = valid  # (W,) bool, oldest slot first
        self.prev = prev  # (H, W, 3) uint8: the last frame, not yet in the cache
        self.before = prev if before is None else before  # the frame before it
        # the frame before that; a session that knows two frames repeats the older one
        self.earlier = self.before if earlier is None else earlier
        self.rng = rng


def _generator_at(state: Mapping[str, Any]) -> np.random.Generator:
    """A noise generator in ``state`` (a ``bit_generator.state``), as a session's copy or
    restored snapshot goes on drawing exactly where the original was."""
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return rng


class BuiltinWorldModel(WorldModel):
    """The ``WorldModel`` over a trained ``WorldNet``.

    ``window``: past frames in the KV cache, 1..the trained window (default: the trained
    one). ``num_threads``: torch intra-op threads used inside ``step`` (set on entry and
    restored on exit; None leaves the process setting alone). Frames are bit-identical for
    a fixed ``num_threads`` on one machine class; the default of 1 is what the speed and
    determinism figures are measured with.
    """

    def __init__(
        self,
        net: WorldNet,
        version: str,
        *,
        window: int | None = None,
        num_threads: int | None = 1,
        frozen: bool = True,
    ) -> None:
        self.net = net
        if frozen:  # False: the training script's rollouts over a net it goes on training
            net.eval()
            for p in net.parameters():
                p.requires_grad_(False)
        cfg = net.cfg
        self.cfg = cfg
        w = cfg.window if window is None else int(window)
        if not 1 <= w <= cfg.window:
            raise InvalidArgument(f"window must be in 1..{cfg.window} (trained), got {window}")
        if num_threads is not None and num_threads < 1:
            raise InvalidArgument(f"num_threads must be >= 1 or None, got {num_threads}")
        self.window = w
        self.num_threads = num_threads
        self.info = ModelInfo(
            model_id=MODEL_ID,
            version=version,
            description=(
                "Built-in action-conditioned world model: a block-causal transformer with "
                f"a {w}-frame KV cache, a pixel decoder and a 1-4 step sampler, trained "
                "on the repo's own 2-D arena" + (", its objects decoded whole" if cfg.rigid else "")
            ),
            width=cfg.width,
            height=cfg.height,
            fps=24.0,
            actions=sim.ACTIONS,
            steps=(1, 2, 3, 4),
            default_steps=2,
            max_batch=16,
            extra={
                "window": w,
                "state_bytes": cfg.depth * 2 * w * cfg.tokens * cfg.dim * 4,
                # what one session adds to a batched step (its stacked cache dominates): the
                # engine caps the batch at --memory-budget-mb / this
                "sample_bytes": cfg.depth * 2 * w * cfg.tokens * cfg.dim * 4,
            },
        )
        self._palette = sim.PALETTE
        # age of each cache slot as seen by the next frame: oldest = window, newest = 1
        self._slot_age = torch.arange(w, 0, -1)

    # ---- sessions ----

    def new_state(self, seed: int) -> WorldState:
        """A fresh arena from ``seed``: its first two frames (``sim.start_frames``) are the
        context the model starts from."""
        cfg = self.cfg
        before, first = sim.start_frames(seed)
        return WorldState(
            seed=seed,
            frame_index=0,
            kv=torch.zeros(cfg.depth, 2, self.window, cfg.tokens, cfg.dim),
            valid=torch.zeros(self.window, dtype=torch.bool),
            prev=first,
            rng=np.random.default_rng([seed, 0x5EED]),
            before=before,  # the frame before it is unknown: ``earlier`` repeats this one
        )

    def state_from(self, before: np.ndarray, frame: np.ndarray, seed: int) -> WorldState:
        """A session that starts from two given frames (uint8 (H, W, 3)) and an empty
        cache, its noise drawn from ``seed``."""
        state = self.new_state(seed)
        self.observe(state, before)
        state.before = state.earlier = state.prev
        self.observe(state, frame)
        return state

    def observe(self, state: SessionState, frame: np.ndarray) -> None:
        """Make ``frame`` (uint8 (H, W, 3)) the session's current frame in place of the one
        it imagined: the next step conditions on it (teacher forcing, or a real camera)."""
        (s,) = self._states([state])
        shape = (self.cfg.height, self.cfg.width, 3)
        if frame.shape != shape or frame.dtype != np.uint8:
            raise InvalidArgument(
                f"observe takes a uint8 frame shaped {shape}, got {frame.dtype} {frame.shape}"
            )
        s.prev = np.ascontiguousarray(frame).copy()

    def _states(self, states: Sequence[SessionState]) -> list[WorldState]:
        out = []
        for s in states:
            if not isinstance(s, WorldState):
                raise InvalidArgument(f"not a {MODEL_ID} session state: {type(s).__name__}")
            if s.kv.shape[2] != self.window:
                raise InvalidArgument(
                    f"session state has a {s.kv.shape[2]}-frame window, this model {self.window}"
                )
            out.append(s)
        return out

    def step(
        self, states: Sequence[SessionState], controls: Sequence[Control], steps: int
    ) -> np.ndarray:
        check_step(self, states, controls, steps)
        ws = self._states(states)
        if not ws:
            return np.zeros((0, self.cfg.height, self.cfg.width, 3), dtype=np.uint8)
        with torch_threads(self.num_threads), torch.inference_mode():
            return self._step(ws, controls, steps)

    def _step(self, ws: list[WorldState], controls: Sequence[Control], steps: int) -> np.ndarray:
        net, cfg = self.net, self.cfg
        b, t, w = len(ws), cfg.tokens, self.window
        kv = torch.stack([s.kv for s in ws])  # (B, L, 2, W, T, D)
        valid = torch.stack([s.valid for s in ws])  # (B, W)
        prev_u8 = np.stack([s.prev for s in ws])
        before_u8 = np.stack([s.before for s in ws])
        prev = torch.from_numpy(prev_u8).float() / 127.5 - 1.0
        before = torch.from_numpy(before_u8).float() / 127.5 - 1.0
        actions = torch.tensor([c.action for c in controls], dtype=torch.long)

        shape = (cfg.height, cfg.width, 3)
        x = self._noise(ws, shape)
        times = schedule(steps)
        prev_idx = self._color_index(prev_u8)
        history = [prev_idx, self._color_index(before_u8)]
        if cfg.local_frames > 2:
            history.append(self._color_index(np.stack([s.earlier for s in ws])))
        # a warp decoder decodes only the pixels in play (``WorldNet.plan``); the palette
        # decoder every pixel (its frames would change: it was trained to paint anywhere)
        plan = prior = None
        if cfg.warp:
            counts = net.motion_counts(history[0], history[1]) if cfg.motion else None
            plan = net.plan(history, counts, actions)
        else:
            match = net.motion_match(history[0], history[1]) if cfg.motion else None
            local = net.local_features(history, match, actions=actions)
            prior = net.prior(prev_idx, match)
        palette = cast(torch.Tensor, net.palette)

        def decode(z: torch.Tensor, last: bool) -> torch.Tensor:
            # with rigid: the last pass decodes the frame object by object; the others
            # each pixel's arg-max (only a clean-frame estimate to re-noise, and one that
            # shows the next pass where the first was unsure: better rollouts at every
            # K > 1 than re-noising whole objects, item 28 of docs/world_model.md)
            if plan is not None:
                return net.decode(z, plan, whole=last)
            assert prior is not None
            return arg_max_color(net.output(z, local, prior))

        context = net.noisy_context(prev, before, actions)

        # (1) one transformer pass over the last frame's clean block and the first
        # denoising pass's block: the clean block sees the cache and itself (its keys and
        # values then enter the cache), the noisy block the cache less its oldest frame,
        # the clean block and itself, as after the cache has rolled. One pass of 2T
        # tokens instead of two of T: fewer, larger kernel calls.
        age = self._first_pass_ages(valid)
        z = torch.cat(
            [net.clean_tokens(prev), net.noisy_tokens(x, torch.full((b,), times[0]), context)], 1
        )
        new_kv = []
        for i, block in enumerate(net.layers):
            q, k, v = block.project(z)
            keys = torch.cat([kv[:, i, 0].reshape(b, w * t, -1), k], 1)
            values = torch.cat([kv[:, i, 1].reshape(b, w * t, -1), v], 1)
            z = block.attend(z, q, keys, values, block.age_bias_of(age, t))
            new_kv.append(torch.stack([k[:, :t], v[:, :t]], 1))  # (B, 2, T, D)
        colors = decode(z[:, t:], len(times) == 1)
        kv = torch.cat([kv[:, :, :, 1:], torch.stack(new_kv, 1).unsqueeze(3)], 3)
        valid = torch.cat([valid[:, 1:], torch.ones(b, 1, dtype=torch.bool)], 1)

        # (2) the other K - 1 denoising passes, over the rolled cache; per layer, the
        # passes' keys and values: the cache, then each pass's own block written in place;
        # and the attention's bias by age (the same for every pass)
        if len(times) > 1:
            slot_age = torch.where(valid, self._slot_age, torch.full_like(self._slot_age, -1))
            # per block: the cache's slots, then the pass's own block (age 0)
            age = torch.cat([slot_age, torch.zeros(b, 1, dtype=torch.long)], 1).unsqueeze(1)
            pass_keys: list[torch.Tensor] = []
            pass_values: list[torch.Tensor] = []
            for i in range(cfg.depth):
                for buf, j in ((pass_keys, 0), (pass_values, 1)):
                    buf.append(torch.empty(b, (w + 1) * t, cfg.dim))
                    buf[-1][:, : w * t] = kv[:, i, j].reshape(b, w * t, -1)
            bias = [block.age_bias_of(age, t) for block in net.layers]
        for n in range(1, len(times)):
            x0 = palette[colors]  # a palette image, like the frames it learned
            # deterministic (DDIM) update: keep the noise the prediction implies
            time, nxt = times[n - 1], times[n]
            x = (1.0 - nxt) * x0 + nxt * ((x - (1.0 - time) * x0) / time)
            z = net.noisy_tokens(x, torch.full((b,), nxt), context)
            for i, block in enumerate(net.layers):
                q, k, v = block.project(z)
                pass_keys[i][:, w * t :] = k
                pass_values[i][:, w * t :] = v
                z = block.attend(z, q, pass_keys[i], pass_values[i], bias[i])
            colors = decode(z, n == len(times) - 1)

        # (3) the frame (the arg-max colours of the last pass), and the new session states
        frames = self._palette[colors.numpy()]
        for j, s in enumerate(ws):
            s.kv = kv[j]  # a view of the batch's new cache (the next step stacks it anew)
            s.valid = valid[j].clone()
            s.earlier = s.before
            s.before = s.prev
            s.prev = frames[j].copy()
            s.frame_index += 1
        return frames

    def _first_pass_ages(self, valid: torch.Tensor) -> torch.Tensor:
        """(B, 2, W + 2) key ages, block by block, of the first pass's queries ([clean block |
        noisy block]) over [cache slots (oldest first) | clean block | noisy block], -1
        masked, from the cache's slot validity (B, W) before it rolls."""
        b = valid.shape[0]
        slot = torch.where(valid, self._slot_age, torch.full_like(self._slot_age, -1))
        never = torch.full((b, 1), -1, dtype=torch.long)
        # clean: slots at ages W..1, itself 0, not the noisy block
        clean = torch.cat([slot, torch.zeros(b, 1, dtype=torch.long), never], 1)
        # noisy: the oldest slot has left the window, the others one frame older, the
        # clean block 1, itself 0
        rolled = torch.where(slot[:, 1:] >= 0, slot[:, 1:] + 1, slot[:, 1:])
        noisy = torch.cat([never, rolled, torch.ones_like(never), torch.zeros_like(never)], 1)
        return torch.stack([clean, noisy], 1)

    def _color_index(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 frames (B, H, W, 3) -> their nearest palette colours' indices (B, H, W):
        through the red channel for palette images (every frame the model makes), else
        (an observed frame) by the net's own nearest-colour rule."""
        idx = _RED_TO_INDEX[frames[..., 0]]
        if np.array_equal(sim.PALETTE[idx], frames):
            return torch.from_numpy(idx)
        return self.net.color_index(torch.from_numpy(frames).float() / 127.5 - 1.0)

    @staticmethod
    def _noise(ws: list[WorldState], shape: tuple[int, int, int]) -> torch.Tensor:
        return torch.from_numpy(
            np.stack([s.rng.standard_normal(shape, dtype=np.float32) for s in ws])
        )

    # ---- snapshots ----

    def snapshot(self, state: SessionState) -> bytes:
        """``WFWSNAP1`` | header length (u32 LE) | JSON header | KV cache (float32) | slot
        validity (u8) | last frame (u8) | the frame before it (u8) | the one before that
        (u8) | SHA-256 of everything before it. No pickle."""
        (s,) = self._states([state])
        header = {
            "format": SNAPSHOT_FORMAT,
            "model_id": MODEL_ID,
            "model_version": self.info.version,
            "seed": s.seed,
            "frame_index": s.frame_index,
            "window": self.window,
            "rng": s.rng.bit_generator.state,
            "kv_shape": list(s.kv.shape),
        }
        body = (
            s.kv.contiguous().numpy().tobytes()
            + s.valid.numpy().astype(np.uint8).tobytes()
            + s.prev.tobytes()
            + s.before.tobytes()
            + s.earlier.tobytes()
        )
        return pack_snapshot(SNAPSHOT_MAGIC, header, body)

    def copy(self, state: SessionState) -> WorldState:
        """A clone of every part of the state (no hashing, no bytes: ~0.05 ms against
        ~0.2 ms for ``snapshot``)."""
        (s,) = self._states([state])
        return WorldState(
            s.seed,
            s.frame_index,
            s.kv.clone(),
            s.valid.clone(),
            s.prev.copy(),
            _generator_at(s.rng.bit_generator.state),
            s.before.copy(),
            s.earlier.copy(),
        )

    def restore(self, data: bytes) -> WorldState:
        header, body = read_snapshot(data, SNAPSHOT_MAGIC, MODEL_ID)
        if header.get("model_id") != MODEL_ID or header.get("model_version") != self.info.version:
            raise SnapshotVersionMismatch(
                f"snapshot of {header.get('model_id')} {header.get('model_version')} cannot be "
                f"restored by {MODEL_ID} {self.info.version}"
            )
        if header.get("format") != SNAPSHOT_FORMAT:
            raise SnapshotVersionMismatch(
                f"snapshot format {header.get('format')}, this build reads {SNAPSHOT_FORMAT}"
            )
        if header.get("window") != self.window:
            raise SnapshotVersionMismatch(
                f"snapshot made with a {header.get('window')}-frame window; this model "
                f"instance uses {self.window} (load it with window={header.get('window')})"
            )
        cfg = self.cfg
        kv_shape = (cfg.depth, 2, self.window, cfg.tokens, cfg.dim)
        try:
            if tuple(header["kv_shape"]) != kv_shape:
                raise SnapshotError(f"snapshot KV cache shape {header['kv_shape']} != {kv_shape}")
            seed, frame_index = int(header["seed"]), int(header["frame_index"])
            rng = _generator_at(header["rng"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"windflow-world snapshot header is malformed: {exc!r}") from exc
        n_kv = int(np.prod(kv_shape)) * 4
        n_prev = cfg.height * cfg.width * 3
        if len(body) != n_kv + self.window + 3 * n_prev:
            raise SnapshotError(
                f"windflow-world snapshot body is {len(body)} bytes, expected "
                f"{n_kv + self.window + 3 * n_prev}"
            )
        kv = torch.from_numpy(np.frombuffer(body[:n_kv], dtype=np.float32).reshape(kv_shape).copy())
        valid = torch.from_numpy(
            np.frombuffer(body[n_kv : n_kv + self.window], np.uint8).astype(bool)
        )
        shape = (cfg.height, cfg.width, 3)
        start = n_kv + self.window
        prev, before, earlier = (
            np.frombuffer(body[start + i * n_prev : start + (i + 1) * n_prev], np.uint8)
            .reshape(shape)
            .copy()
            for i in range(3)
        )
        return WorldState(seed, frame_index, kv, valid, prev, rng, before, earlier)


# The arena's colours differ in their red channel: a frame made of palette colours maps
# to colour indices through the red channel alone.
_RED_TO_INDEX = np.abs(
    np.arange(256)[:, None] - sim.PALETTE[:, 0].astype(np.int64)[None, :]
).argmin(1)


# ---- weights ----

WEIGHTS = Path(__file__).parent / "weights" / f"{MODEL_ID}.safetensors"


def load(
    path: Path = WEIGHTS, *, window: int | None = None, num_threads: int | None = 1
) -> BuiltinWorldModel:
    """A model over the weights at ``path``; raises ``CheckpointError`` if they do not fit."""
    if not path.exists():
        raise CheckpointError(f"no weights at {path}; train them with tools/train_world_model.py")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    try:
        cfg = NetConfig(**json.loads(meta["config"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: no usable config in the weights' metadata ({exc})") from exc
    try:
        net = WorldNet(cfg)
    except ValueError as exc:
        raise CheckpointError(f"{path}: the weights' config does not build ({exc})") from exc
    tensors = load_file(str(path))
    expected = net.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{path} does not fit the network: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, shape mismatches {shapes[:5]}"
        )
    net.load_state_dict(tensors)
    version = f"1.0+{weights_digest(tensors, cfg)}"
    return BuiltinWorldModel(net, version, window=window, num_threads=num_threads)
