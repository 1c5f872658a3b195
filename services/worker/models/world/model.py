"""The built-in world model behind the ``WorldModel`` contract.

Session state: the KV cache of the last ``window`` frames (per layer), which cache slots
hold a frame yet, the last frame made (uint8; its keys and values enter the cache at the
start of the next step), the session's own noise generator, its frame index and seed.

A step, batched over sessions: (1) the last frame's clean pass fills the cache; (2) K
denoising passes from pure noise: each predicts the clean frame, which is re-noised to the
next time of the schedule with fresh noise from the session's generator; (3) the last
prediction, rounded to uint8, is the frame. K is the quality ladder: 1..4.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from services.worker.models.base import Control, ModelInfo, SessionState, WorldModel
from services.worker.models.world import sim
from services.worker.models.world.net import NetConfig, WorldNet
from windflow.errors import (
    CheckpointError,
    InvalidArgument,
    SnapshotError,
    SnapshotVersionMismatch,
)

MODEL_ID = "windflow-world"
SNAPSHOT_MAGIC = b"WFWSNAP1"
_HEADER = struct.Struct("<8sI")  # magic, header length


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
    ) -> None:
        self.seed = seed
        self.frame_index = frame_index
        self.kv = kv  # (L, 2, W, T, D) float32
        self.valid = valid  # (W,) bool, oldest slot first
        self.prev = prev  # (H, W, 3) uint8: the last frame, not yet in the cache
        self.rng = rng


class BuiltinWorldModel(WorldModel):
    def __init__(self, net: WorldNet, version: str) -> None:
        self.net = net.eval()
        cfg = net.cfg
        self.cfg = cfg
        self.info = ModelInfo(
            model_id=MODEL_ID,
            version=version,
            description=(
                "Built-in action-conditioned world model: a block-causal transformer with "
                f"a {cfg.window}-frame KV cache and a 1-4 step flow-matching head, trained "
                "on the repo's own 2-D arena"
            ),
            width=cfg.width,
            height=cfg.height,
            fps=24.0,
            actions=sim.ACTIONS,
            steps=(1, 2, 3, 4),
            default_steps=2,
            max_batch=16,
            extra={"sample_bytes": cfg.depth * 2 * cfg.window * cfg.tokens * cfg.dim * 4},
        )
        # age of each cache slot as seen by the next frame: oldest = window, newest = 1
        w = cfg.window
        self._slot_age = torch.arange(w, 0, -1)

    # ---- sessions ----

    def new_state(self, seed: int) -> WorldState:
        """A fresh arena from ``seed``: its first frame is the context the model starts from."""
        cfg = self.cfg
        first = sim.WorldSim([seed]).render()[0]
        return WorldState(
            seed=seed,
            frame_index=0,
            kv=torch.zeros(cfg.depth, 2, cfg.window, cfg.tokens, cfg.dim),
            valid=torch.zeros(cfg.window, dtype=torch.bool),
            prev=first,
            rng=np.random.default_rng([seed, 0x5EED]),
        )

    def _states(self, states: Sequence[SessionState]) -> list[WorldState]:
        out = []
        for s in states:
            if not isinstance(s, WorldState):
                raise InvalidArgument(f"not a {MODEL_ID} session state: {type(s).__name__}")
            out.append(s)
        return out

    @torch.inference_mode()
    def step(
        self, states: Sequence[SessionState], controls: Sequence[Control], steps: int
    ) -> np.ndarray:
        if steps not in self.info.steps:
            raise InvalidArgument(f"steps must be one of {self.info.steps}, got {steps}")
        if len(states) != len(controls):
            raise InvalidArgument("one control per session state")
        for control in controls:
            self.validate_control(control)
        ws = self._states(states)
        net, cfg = self.net, self.cfg
        b, t, w = len(ws), cfg.tokens, cfg.window
        kv = torch.stack([s.kv for s in ws])  # (B, L, 2, W, T, D)
        valid = torch.stack([s.valid for s in ws])  # (B, W)
        prev = torch.from_numpy(np.stack([s.prev for s in ws])).float() / 127.5 - 1.0
        actions = torch.tensor([c.action for c in controls], dtype=torch.long)

        # ages of [cache slots..., own block] for the T queries of a block, per session
        slot_age = torch.where(valid, self._slot_age, torch.full_like(self._slot_age, -1))
        key_age = torch.cat(
            [slot_age.repeat_interleave(t, 1), torch.zeros(b, t, dtype=torch.long)], 1
        )
        age = key_age.unsqueeze(1).expand(b, t, (w + 1) * t)

        # (1) the last frame's clean pass: its keys and values enter the cache
        z = net.clean_tokens(prev)
        new_kv = []
        for i, block in enumerate(net.layers):
            q, k, v = block.project(z)
            keys = torch.cat([kv[:, i, 0].reshape(b, w * t, -1), k], 1)
            values = torch.cat([kv[:, i, 1].reshape(b, w * t, -1), v], 1)
            z = block.attend(z, q, keys, values, age)
            new_kv.append(torch.stack([k, v], 1))  # (B, 2, T, D)
        kv = torch.cat([kv[:, :, :, 1:], torch.stack(new_kv, 1).unsqueeze(3)], 3)
        valid = torch.cat([valid[:, 1:], torch.ones(b, 1, dtype=torch.bool)], 1)
        slot_age = torch.where(valid, self._slot_age, torch.full_like(self._slot_age, -1))
        key_age = torch.cat(
            [slot_age.repeat_interleave(t, 1), torch.zeros(b, t, dtype=torch.long)], 1
        )
        age = key_age.unsqueeze(1).expand(b, t, (w + 1) * t)
        cache_k = [kv[:, i, 0].reshape(b, w * t, -1) for i in range(cfg.depth)]
        cache_v = [kv[:, i, 1].reshape(b, w * t, -1) for i in range(cfg.depth)]

        # (2) K denoising passes
        shape = (cfg.height, cfg.width, 3)
        x = self._noise(ws, shape)
        times = schedule(steps)
        x0 = x
        for n, time in enumerate(times):
            z = net.noisy_tokens(x, prev, torch.full((b,), time), actions)
            for i, block in enumerate(net.layers):
                q, k, v = block.project(z)
                keys = torch.cat([cache_k[i], k], 1)
                values = torch.cat([cache_v[i], v], 1)
                z = block.attend(z, q, keys, values, age)
            x0 = net.output(z).clamp(-1.0, 1.0)
            if n + 1 < len(times):
                nxt = times[n + 1]
                x = (1.0 - nxt) * x0 + nxt * self._noise(ws, shape)

        # (3) the frame, and the new session states
        frames = ((x0 + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        for j, s in enumerate(ws):
            s.kv = kv[j].clone()
            s.valid = valid[j].clone()
            s.prev = frames[j].copy()
            s.frame_index += 1
        return frames

    @staticmethod
    def _noise(ws: list[WorldState], shape: tuple[int, int, int]) -> torch.Tensor:
        return torch.from_numpy(
            np.stack([s.rng.standard_normal(shape, dtype=np.float32) for s in ws])
        )

    # ---- snapshots ----

    def snapshot(self, state: SessionState) -> bytes:
        (s,) = self._states([state])
        header = {
            "model_id": MODEL_ID,
            "model_version": self.info.version,
            "seed": s.seed,
            "frame_index": s.frame_index,
            "rng": s.rng.bit_generator.state,
            "kv_shape": list(s.kv.shape),
        }
        head = json.dumps(header, sort_keys=True).encode()
        body = (
            s.kv.contiguous().numpy().tobytes()
            + s.valid.numpy().astype(np.uint8).tobytes()
            + s.prev.tobytes()
        )
        payload = _HEADER.pack(SNAPSHOT_MAGIC, len(head)) + head + body
        return payload + hashlib.sha256(payload).digest()

    def restore(self, data: bytes) -> WorldState:
        if len(data) < _HEADER.size + 32 or not data.startswith(SNAPSHOT_MAGIC):
            raise SnapshotError("not a windflow-world snapshot (bad magic or too short)")
        payload, digest = data[:-32], data[-32:]
        if hashlib.sha256(payload).digest() != digest:
            raise SnapshotError("windflow-world snapshot is corrupted (checksum mismatch)")
        _, head_len = _HEADER.unpack_from(payload)
        try:
            header = json.loads(payload[_HEADER.size : _HEADER.size + head_len])
        except ValueError as exc:
            raise SnapshotError(f"windflow-world snapshot header is unreadable: {exc}") from exc
        if header.get("model_id") != MODEL_ID or header.get("model_version") != self.info.version:
            raise SnapshotVersionMismatch(
                f"snapshot of {header.get('model_id')} {header.get('model_version')} cannot be "
                f"restored by {MODEL_ID} {self.info.version}"
            )
        cfg = self.cfg
        kv_shape = (cfg.depth, 2, cfg.window, cfg.tokens, cfg.dim)
        if tuple(header["kv_shape"]) != kv_shape:
            raise SnapshotError(f"snapshot KV cache shape {header['kv_shape']} != {kv_shape}")
        body = payload[_HEADER.size + head_len :]
        n_kv = int(np.prod(kv_shape)) * 4
        n_prev = cfg.height * cfg.width * 3
        if len(body) != n_kv + cfg.window + n_prev:
            raise SnapshotError("windflow-world snapshot is truncated")
        kv = torch.from_numpy(np.frombuffer(body[:n_kv], dtype=np.float32).reshape(kv_shape).copy())
        valid = torch.from_numpy(
            np.frombuffer(body[n_kv : n_kv + cfg.window], np.uint8).astype(bool)
        )
        prev = (
            np.frombuffer(body[n_kv + cfg.window :], np.uint8)
            .reshape(cfg.height, cfg.width, 3)
            .copy()
        )
        rng = np.random.default_rng()
        rng.bit_generator.state = header["rng"]
        return WorldState(int(header["seed"]), int(header["frame_index"]), kv, valid, prev, rng)


# ---- weights ----

WEIGHTS = Path(__file__).parent / "weights" / f"{MODEL_ID}.safetensors"


def save_weights(net: WorldNet, path: Path, meta: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"config": json.dumps(net.cfg.to_dict()), **(meta or {})}
    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    save_file(tensors, str(path), metadata=metadata)


def load(path: Path = WEIGHTS) -> BuiltinWorldModel:
    if not path.exists():
        raise CheckpointError(f"no weights at {path}; train them with tools/train_world_model.py")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    try:
        cfg = NetConfig(**json.loads(meta["config"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: no usable config in the weights' metadata ({exc})") from exc
    net = WorldNet(cfg)
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
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return BuiltinWorldModel(net, f"1.0+{digest}")
