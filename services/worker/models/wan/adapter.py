"""``WanWorldModel``: the causal Wan family behind the worker's ``WorldModel`` contract.

The pipeline produces frames in chunks (3 latent frames = 9 RGB frames for the first chunk,
12 afterwards) but ``step`` returns one frame per call: frames are buffered per session and
a new chunk is generated on the call that finds the buffer empty. Consequences:

* Latency: that call pays a whole chunk's denoising plus one latent frame's decode; the
  calls in between only pay a VAE decode every 4 frames (and nothing otherwise).
* Control: a control takes effect at the next chunk boundary, so up to 12 frames (0.75 s at
  16 fps) after it was sent. Matrix-Game actions are held for the whole chunk.
* Prompts (models with a text encoder declare ``ModelInfo.prompt``): the prompt in effect
  at a chunk boundary is the one the chunk is made with; a switch re-caches the session's
  recent frames under the new prompt first (``WanPipeline.switch_prompt``). A prompt equal
  to ``PromptSpec.default`` is the default prompt itself.
* Camera pose (models whose action modules take a mouse of >= 2 values declare
  ``ModelInfo.pose``, a per-frame pitch/yaw velocity): a pose in effect drives the mouse
  instead of the axes; see ``_action_vector``.
* Input frames (models with a VAE encoder declare ``ModelInfo.input_frame``; video to
  video, ``WanPipeline.generate_chunk``): the input frame in effect at a chunk boundary is
  the one the whole chunk restyles, so an input frame, like a prompt, takes effect at the
  next boundary. A session keeps nothing of it: the runtime re-sends the frame in effect
  with every control, and encodings are cached by digest in the pipeline (shared).

Sessions are stepped one at a time, so a session's frames never depend on its batch-mates
(the contract's determinism), at the cost of no cross-session batching on a GPU.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from services.worker.models.base import (
    POSE_VELOCITY,
    Control,
    InputFrameSpec,
    ModelInfo,
    PoseSpec,
    PromptSpec,
    SessionState,
    WorldModel,
)
from services.worker.models.wan.config import WanConfig
from services.worker.models.wan.kv_cache import KVCache
from services.worker.models.wan.pipeline import StreamState, WanPipeline
from services.worker.models.wan.vae import StreamCache
from windflow.errors import InvalidArgument, SnapshotError, SnapshotVersionMismatch

# /2: the session's prompt (state JSON) and its kept clean latents / action windows
SNAPSHOT_FORMAT = "windflow.wan.session/2"

# Matrix-Game keyboard combos over (W, S, A, D); mouse comes from the two axes (or a pose).
MG_ACTIONS: tuple[tuple[str, tuple[int, int, int, int]], ...] = (
    ("none", (0, 0, 0, 0)),
    ("forward", (1, 0, 0, 0)),
    ("back", (0, 1, 0, 0)),
    ("left", (0, 0, 1, 0)),
    ("right", (0, 0, 0, 1)),
    ("forward_left", (1, 0, 1, 0)),
    ("forward_right", (1, 0, 0, 1)),
    ("back_left", (0, 1, 1, 0)),
    ("back_right", (0, 1, 0, 1)),
)
MG_AXES: tuple[str, str] = ("pitch", "yaw")
# Per-frame camera rotation bound of a pose, radians (exact in float32, as poses travel).
POSE_RANGE = 0.25


class WanSession(SessionState):
    def __init__(self, seed: int, stream: StreamState, frame_index: int = 0) -> None:
        self.seed = seed
        self.frame_index = frame_index
        self.stream = stream


def config_fingerprint(cfg: WanConfig, weights_id: str) -> str:
    blob = json.dumps([asdict(cfg), weights_id], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class WanWorldModel(WorldModel):
    def __init__(
        self,
        model_id: str,
        pipeline: WanPipeline,
        weights_id: str,
        description: str,
        mouse_scale: float = 0.1,
        prompt: PromptSpec | None = None,
        pose_range: float = POSE_RANGE,
    ) -> None:
        """``prompt``: what the model declares about prompts; needs a pipeline with a text
        encoder (without one the prompt is fixed and the model takes none)."""
        cfg = pipeline.cfg
        self.pipeline = pipeline
        self.mouse_scale = mouse_scale
        self.pose_range = pose_range
        if prompt is not None and pipeline.encoder is None:
            raise ValueError("a prompt spec needs a pipeline with a text encoder")
        self.version = config_fingerprint(cfg, weights_id)
        act = cfg.dit.action
        if act is not None and act.keyboard_dim < 4:
            raise ValueError("Matrix-Game actions need a keyboard_dim of at least 4 (W,S,A,D)")
        if not pose_range > 0:
            raise ValueError(f"pose_range must be positive, got {pose_range}")
        pose = None
        if act is not None and act.mouse_dim >= 2:
            r = pose_range
            pose = PoseSpec(kind=POSE_VELOCITY, components=MG_AXES, low=(-r, -r), high=(r, r))
        n_steps = len(cfg.pipeline.timesteps)
        encoder = pipeline.encoder
        v2v = pipeline.vae_encoder is not None
        input_frame = None
        if v2v:
            p = cfg.pipeline
            input_frame = InputFrameSpec(width=p.width, height=p.height, fps=p.fps, queue=2)
        self.info = ModelInfo(
            model_id=model_id,
            version=self.version,
            description=description,
            width=cfg.pipeline.width,
            height=cfg.pipeline.height,
            fps=cfg.pipeline.fps,
            actions=tuple(n for n, _ in MG_ACTIONS) if act else ("none",),
            axes=MG_AXES if act else (),
            steps=tuple(range(1, n_steps + 1)),
            default_steps=n_steps,
            max_batch=8,
            extra={
                "family": "wan2.1-causal",
                "frames_per_chunk": cfg.pipeline.frames_per_chunk,
                "rgb_frames_per_chunk": cfg.pipeline.frames_per_chunk * cfg.vae.temporal_factor,
                "window_frames": cfg.pipeline.window_frames,
                "sink_frames": cfg.pipeline.sink_frames,
                "kernels": pipeline.ops.backend,
                "text_encoder": encoder.name if encoder is not None else "precomputed",
                # where a prompt switch takes effect ("fixed": the model takes none), and
                # how many recent latent frames a switch re-caches at most
                "prompt_switch": "chunk boundary" if prompt is not None else "fixed",
                "recache_frames": pipeline.recache_frames,
                # video to video (None: the model takes no input frames): the schedule
                # steps a chunk made from an input frame runs and the sigma it starts at;
                # the newest input frame at a chunk boundary restyles the whole chunk
                "v2v": {
                    "strength": cfg.pipeline.v2v_strength,
                    "steps": pipeline.v2v_steps,
                    "start_sigma": pipeline.schedule.sigmas[pipeline.v2v_start],
                    "per": "chunk",
                }
                if v2v
                else None,
                "device": str(pipeline.device),
                # a session's KV cache (keys and values of every block; the VAE's stream
                # cache and the buffered frames add little): what a copy of it costs
                "state_bytes": 2
                * cfg.dit.num_layers
                * cfg.cache_frames()
                * pipeline.tokens_per_frame
                * cfg.dit.num_heads
                * cfg.dit.head_dim
                * pipeline.dit.patch_embedding.weight.element_size(),
            },
            prompt=prompt,
            pose=pose,
            input_frame=input_frame,
        )

    # -- contract --------------------------------------------------------------------

    def new_state(self, seed: int) -> WanSession:
        return WanSession(seed, self.pipeline.new_state(seed))

    def step(
        self, states: Sequence[SessionState], controls: Sequence[Control], steps: int
    ) -> np.ndarray:
        if len(states) != len(controls):
            raise InvalidArgument(f"{len(states)} states but {len(controls)} controls")
        if steps not in self.info.steps:
            raise InvalidArgument(
                f"steps={steps} is not on the ladder {self.info.steps} of {self.info.model_id}"
            )
        for c in controls:
            self.validate_control(c)
        sessions = [self._session(s) for s in states]
        frames = []
        for sess, control in zip(sessions, controls, strict=True):
            frame = self.pipeline.next_frame(
                sess.stream,
                steps,
                self._action_vector(control),
                self._prompt(control),
                control.frame,
            )
            sess.frame_index += 1
            frames.append(frame)
        if not frames:
            return np.zeros((0, self.info.height, self.info.width, 3), np.uint8)
        return np.stack(frames)

    def _session(self, state: SessionState) -> WanSession:
        if not isinstance(state, WanSession):
            raise InvalidArgument(
                f"state {type(state).__name__} is not a {self.info.model_id} state"
            )
        return state

    def _prompt(self, control: Control) -> str | None:
        """The prompt in effect as the pipeline names it: None for the default."""
        spec = self.info.prompt
        if spec is None or control.prompt is None or control.prompt == spec.default:
            return None
        return control.prompt

    def _action_vector(self, control: Control) -> torch.Tensor | None:
        """Keyboard from ``control.action``; mouse (pitch, yaw) from ``control.pose`` when
        one is in effect, else from ``control.axes``. A pose takes precedence over the
        axes when both are present. Axes at +-1 and a pose at +-``pose_range`` give the
        same mouse value, +-``mouse_scale``."""
        act = self.pipeline.cfg.dit.action
        if act is None:
            return None
        vec = torch.zeros(act.keyboard_dim + act.mouse_dim)
        vec[:4] = torch.tensor(MG_ACTIONS[control.action][1], dtype=torch.float32)
        if control.pose is not None and self.info.pose is not None:
            mouse = [float(v) / self.pose_range for v in control.pose]
        else:
            mouse = [float(v) for v in control.axes]
        for i, value in enumerate(mouse[: act.mouse_dim]):
            vec[act.keyboard_dim + i] = value * self.mouse_scale
        return vec

    # -- snapshots -------------------------------------------------------------------

    def snapshot(self, state: SessionState) -> bytes:
        sess = self._session(state)
        st = sess.stream
        tensors: dict[str, torch.Tensor] = {}
        n = st.kv.valid
        for i, (k, v) in enumerate(zip(st.kv.keys, st.kv.values, strict=True)):
            tensors[f"kv.k.{i}"] = k[:, :n].contiguous().cpu()
            tensors[f"kv.v.{i}"] = v[:, :n].contiguous().cpu()
        vae_present = []
        for i, slot in enumerate(st.vae.slots):
            vae_present.append(slot is not None)
            if slot is not None:
                tensors[f"vae.{i}"] = slot.contiguous().cpu()
        if st.pending is not None:
            tensors["pending"] = st.pending.contiguous().cpu()
        if st.rgb:
            tensors["rgb"] = torch.from_numpy(np.stack(st.rgb))
        if st.actions is not None:
            tensors["actions"] = st.actions.contiguous().cpu()
        if st.clean is not None:
            tensors["clean"] = st.clean.contiguous().cpu()
        if st.clean_actions is not None:
            tensors["clean_actions"] = st.clean_actions.contiguous().cpu()
        meta = {
            "format": SNAPSHOT_FORMAT,
            "model_id": self.info.model_id,
            "model_version": self.version,
            "state": json.dumps(
                {
                    "seed": sess.seed,
                    "frame_index": sess.frame_index,
                    "latent_frames": st.latent_frames,
                    "chunks": st.chunks,
                    "n_written": st.kv.n_written,
                    "vae_present": vae_present,
                    "prompt": st.prompt,
                }
            ),
        }
        return st_save(tensors, metadata=meta)

    def copy(self, state: SessionState) -> WanSession:
        """A clone where the state lives (on the GPU for a GPU pipeline): KV cache, VAE
        stream cache, pending latents, buffered frames, actions, prompt and kept clean
        latents, with no trip through host memory or bytes (``snapshot`` + ``restore``
        would make two)."""
        sess = self._session(state)
        st = sess.stream
        kv = KVCache(
            keys=[k.clone() for k in st.kv.keys],
            values=[v.clone() for v in st.kv.values],
            sink=st.kv.sink,
            ring=st.kv.ring,
            n_written=st.kv.n_written,
        )
        stream = StreamState(
            seed=st.seed,
            kv=kv,
            vae=StreamCache(slots=[None if s is None else s.clone() for s in st.vae.slots]),
            latent_frames=st.latent_frames,
            chunks=st.chunks,
            pending=None if st.pending is None else st.pending.clone(),
            rgb=[frame.copy() for frame in st.rgb],
            actions=None if st.actions is None else st.actions.clone(),
            prompt=st.prompt,
            clean=None if st.clean is None else st.clean.clone(),
            clean_actions=None if st.clean_actions is None else st.clean_actions.clone(),
        )
        return WanSession(sess.seed, stream, sess.frame_index)

    def restore(self, data: bytes) -> WanSession:
        try:
            tensors = st_load(data)
            meta = _read_metadata(data)
            if meta.get("format") != SNAPSHOT_FORMAT:
                raise SnapshotError(f"not a Wan session snapshot (format {meta.get('format')!r})")
            state = json.loads(meta["state"])
        except SnapshotError:
            raise
        except Exception as exc:
            raise SnapshotError(f"snapshot bytes are not a valid Wan session: {exc}") from exc
        if meta.get("model_id") != self.info.model_id or meta.get("model_version") != self.version:
            raise SnapshotVersionMismatch(
                f"snapshot of {meta.get('model_id')}@{meta.get('model_version')} cannot be "
                f"restored into {self.info.model_id}@{self.version}"
            )
        try:
            return self._rebuild(state, tensors)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise SnapshotError(f"snapshot is inconsistent: {exc}") from exc

    def _rebuild(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> WanSession:
        dev = self.pipeline.device
        kv: KVCache = self.pipeline.empty_cache()
        kv.n_written = int(state["n_written"])
        n = kv.valid
        for i in range(len(kv.keys)):
            kv.keys[i][:, :n] = tensors[f"kv.k.{i}"].to(dev)
            kv.values[i][:, :n] = tensors[f"kv.v.{i}"].to(dev)
        slots: list[torch.Tensor | None] = [
            tensors[f"vae.{i}"].to(dev) if present else None
            for i, present in enumerate(state["vae_present"])
        ]
        stream = StreamState(
            seed=int(state["seed"]),
            kv=kv,
            vae=StreamCache(slots=slots),
            latent_frames=int(state["latent_frames"]),
            chunks=int(state["chunks"]),
            pending=tensors["pending"].to(dev) if "pending" in tensors else None,
            rgb=list(tensors["rgb"].numpy()) if "rgb" in tensors else [],
            actions=tensors.get("actions"),
            prompt=_snapshot_prompt(state.get("prompt")),
            clean=tensors["clean"].to(dev) if "clean" in tensors else None,
            clean_actions=tensors["clean_actions"].to(dev) if "clean_actions" in tensors else None,
        )
        return WanSession(stream.seed, stream, int(state["frame_index"]))


def _snapshot_prompt(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"prompt is {type(value).__name__}, not a string")
    return value


def _read_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (header: u64 length, then JSON)."""
    if len(data) < 8:
        raise SnapshotError("snapshot is truncated")
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        raise SnapshotError("snapshot has no metadata")
    return meta
