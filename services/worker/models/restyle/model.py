"""The restyle model behind the ``WorldModel`` contract: video in, restyled video out.

Session state: the input frame in effect (the seed's test pattern until the first frame
arrives, then the newest frame received), its digest (None for the test pattern), the
last frame made (the temporal term's previous output; black before the first), the frame
index and the seed. No random draws: a session's frames follow from its seed, its input
frames and its styles.

A step, batched over sessions: each session's input frame (the control's, else the one
in effect) through its style's network (``net.Server.fresh``: one session at a time on
fixed shapes), then the gated blend with the session's last frame, rounded to uint8.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from services.worker.models.base import (
    Control,
    InputFrameSpec,
    ModelInfo,
    SessionState,
    WorldModel,
)
from services.worker.models.framing import (
    check_step,
    pack_snapshot,
    read_snapshot,
    torch_threads,
    weights_digest,
)
from services.worker.models.restyle.net import RestyleConfig, RestyleNet, Server
from services.worker.models.restyle.styles import STYLES, seed_pattern
from windflow.errors import (
    CheckpointError,
    InvalidArgument,
    SnapshotError,
    SnapshotVersionMismatch,
)

MODEL_ID = "windflow-restyle"
FPS = 24.0
INPUT_QUEUE = 2
SNAPSHOT_MAGIC = b"WFRSNAP1"
SNAPSHOT_FORMAT = 1  # bump when the layout after the header changes


class RestyleState(SessionState):
    def __init__(
        self,
        seed: int,
        frame_index: int,
        frame: np.ndarray,
        digest: str | None,
        prev: np.ndarray,
    ) -> None:
        self.seed = seed
        self.frame_index = frame_index
        self.frame = frame  # (H, W, 3) uint8: the input frame in effect
        self.digest = digest  # its digest; None while it is the seed's test pattern
        self.prev = prev  # (H, W, 3) uint8: the last frame made (black before the first)


class RestyleModel(WorldModel):
    """The ``WorldModel`` over a trained ``RestyleNet``.

    ``num_threads``: torch intra-op threads inside ``step`` (set on entry, restored on
    exit; None leaves the process setting alone; default 1, what the figures are measured
    with). The products run one session at a time on fixed shapes and everything else is
    elementwise, so frames are bit-identical whatever the batch, on one machine class.
    """

    def __init__(
        self, net: RestyleNet, version: str, *, num_threads: int | None = 1, frozen: bool = True
    ) -> None:
        if num_threads is not None and num_threads < 1:
            raise InvalidArgument(f"num_threads must be >= 1 or None, got {num_threads}")
        if frozen:  # False: the training script's evaluations of a net it goes on training
            net.eval()
            for p in net.parameters():
                p.requires_grad_(False)
        self.net = net
        self.cfg = cfg = net.cfg
        if cfg.styles != len(STYLES):
            raise InvalidArgument(f"the network has {cfg.styles} styles, the model {len(STYLES)}")
        self.num_threads = num_threads
        self._server = Server(net)
        frame_bytes = cfg.height * cfg.width * 3
        self.info = ModelInfo(
            model_id=MODEL_ID,
            version=version,
            description=(
                "Built-in video-to-video model: restyles a live stream (64x64 RGB in and out, "
                "24 fps) in one of five styles picked by the action, with a learned temporal "
                "blend over its last frame; a small CNN per style trained on the repo's own "
                "synthetic videos"
            ),
            width=cfg.width,
            height=cfg.height,
            fps=FPS,
            actions=STYLES,
            steps=(1,),
            default_steps=1,
            max_batch=16,
            extra={
                "family": "video-to-video",
                # before a session's first input frame: its seed's test pattern, restyled
                "before_input": "test pattern",
                "state_bytes": 2 * frame_bytes,
                # a session in a batched step: its buffers (input, hidden, output, float32)
                "sample_bytes": 4 * (3 + cfg.hidden) * self._server.length
                + 4 * 12 * cfg.height * cfg.width,
            },
            input_frame=InputFrameSpec(
                width=cfg.width, height=cfg.height, fps=FPS, queue=INPUT_QUEUE
            ),
        )

    # ---- sessions ----

    def new_state(self, seed: int) -> RestyleState:
        cfg = self.cfg
        return RestyleState(
            seed=seed,
            frame_index=0,
            frame=seed_pattern(seed, cfg.height, cfg.width),
            digest=None,
            prev=np.zeros((cfg.height, cfg.width, 3), dtype=np.uint8),
        )

    def _states(self, states: Sequence[SessionState]) -> list[RestyleState]:
        shape = (self.cfg.height, self.cfg.width, 3)
        out = []
        for s in states:
            if not isinstance(s, RestyleState):
                raise InvalidArgument(f"not a {MODEL_ID} session state: {type(s).__name__}")
            if s.frame.shape != shape:
                raise InvalidArgument(
                    f"session state frames are {s.frame.shape}, this model {shape}"
                )
            out.append(s)
        return out

    def step(
        self, states: Sequence[SessionState], controls: Sequence[Control], steps: int
    ) -> np.ndarray:
        check_step(self, states, controls, steps)
        rs = self._states(states)
        if not rs:
            return np.zeros((0, self.cfg.height, self.cfg.width, 3), dtype=np.uint8)
        inputs = [
            s.frame if c.frame is None else c.frame.rgb for s, c in zip(rs, controls, strict=True)
        ]
        styles = [c.action for c in controls]
        with torch_threads(self.num_threads), torch.inference_mode():
            x = _to_float(np.stack(inputs))
            prev = _to_float(np.stack([s.prev for s in rs]))
            out = self._server.blend(self._server.fresh(x, styles), prev, styles)
            frames = (out * 255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        for j, (s, c) in enumerate(zip(rs, controls, strict=True)):
            if c.frame is not None and c.frame.digest != s.digest:
                s.frame = np.array(c.frame.rgb, dtype=np.uint8, copy=True)
                s.digest = c.frame.digest
            s.prev = frames[j].copy()
            s.frame_index += 1
        return frames

    # ---- snapshots ----

    def snapshot(self, state: SessionState) -> bytes:
        """``WFRSNAP1`` | header length (u32 LE) | JSON header | input frame in effect (u8)
        | last frame made (u8) | SHA-256 of everything before it. No pickle."""
        (s,) = self._states([state])
        header = {
            "format": SNAPSHOT_FORMAT,
            "model_id": MODEL_ID,
            "model_version": self.info.version,
            "seed": s.seed,
            "frame_index": s.frame_index,
            "height": self.cfg.height,
            "width": self.cfg.width,
            "input_digest": s.digest,
        }
        body = np.ascontiguousarray(s.frame).tobytes() + np.ascontiguousarray(s.prev).tobytes()
        return pack_snapshot(SNAPSHOT_MAGIC, header, body)

    def copy(self, state: SessionState) -> RestyleState:
        (s,) = self._states([state])
        return RestyleState(s.seed, s.frame_index, s.frame.copy(), s.digest, s.prev.copy())

    def restore(self, data: bytes) -> RestyleState:
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
        cfg = self.cfg
        try:
            if (header["height"], header["width"]) != (cfg.height, cfg.width):
                raise SnapshotError(
                    f"snapshot frames are {header['width']}x{header['height']}, this model's "
                    f"{cfg.width}x{cfg.height}"
                )
            seed, frame_index = int(header["seed"]), int(header["frame_index"])
            digest = header["input_digest"]
            if digest is not None and not isinstance(digest, str):
                raise SnapshotError(f"snapshot input digest is a {type(digest).__name__}")
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"{MODEL_ID} snapshot header is malformed: {exc!r}") from exc
        n = cfg.height * cfg.width * 3
        if len(body) != 2 * n:
            raise SnapshotError(f"{MODEL_ID} snapshot body is {len(body)} bytes, expected {2 * n}")
        shape = (cfg.height, cfg.width, 3)
        frame = np.frombuffer(body[:n], np.uint8).reshape(shape).copy()
        prev = np.frombuffer(body[n:], np.uint8).reshape(shape).copy()
        return RestyleState(seed, frame_index, frame, digest, prev)


def _to_float(frames: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [0, 1] (elementwise: exact)."""
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float().mul_(1.0 / 255.0)


# ---- weights ----

WEIGHTS = Path(__file__).parent / "weights" / f"{MODEL_ID}.safetensors"
MODEL_CARD = WEIGHTS.parent / "model_card.json"


def from_net(net: RestyleNet, *, num_threads: int | None = 1) -> RestyleModel:
    """A model over ``net``'s weights as they are now (the training script's evaluations;
    the net is left trainable)."""
    tensors = {k: v.detach().clone() for k, v in net.state_dict().items()}
    version = f"1.0+{weights_digest(tensors, net.cfg)}"
    return RestyleModel(net, version, num_threads=num_threads, frozen=False)


def load(path: Path = WEIGHTS, *, num_threads: int | None = 1) -> RestyleModel:
    """A model over the weights at ``path``; raises ``CheckpointError`` if they do not fit."""
    if not path.exists():
        raise CheckpointError(f"no weights at {path}; train them with tools/train_restyle.py")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    try:
        cfg = RestyleConfig(**json.loads(meta["config"]))
        net = RestyleNet(cfg)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: no usable config in the weights' metadata ({exc})") from exc
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
    return RestyleModel(net, f"1.0+{weights_digest(tensors, cfg)}", num_threads=num_threads)
