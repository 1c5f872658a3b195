"""Conversions between model descriptions and protos, and session-spec validation."""

from __future__ import annotations

from services.worker.models.base import ModelInfo
from windflow.errors import InvalidArgument
from windflow.v1 import windflow_pb2 as pb

MAX_OUTPUT_SIDE = 4096
MAX_FPS = 120.0


def model_info_to_proto(info: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        model_id=info.model_id,
        version=info.version,
        description=info.description,
        width=info.width,
        height=info.height,
        fps=info.fps,
        actions=list(info.actions),
        axes=list(info.axes),
        steps=list(info.steps),
        default_steps=info.default_steps,
    )


def resolve_spec(spec: pb.SessionSpec, model: pb.ModelInfo) -> pb.SessionSpec:
    """Fill defaults from the model and validate; InvalidArgument says what is wrong."""
    out = pb.SessionSpec()
    out.CopyFrom(spec)
    if out.fps == 0:
        out.fps = model.fps
    if not (0 < out.fps <= MAX_FPS) or out.fps != out.fps:
        raise InvalidArgument(f"fps {spec.fps} is outside (0, {MAX_FPS}]")
    if out.steps == 0:
        out.steps = model.default_steps
    if out.steps not in model.steps:
        raise InvalidArgument(
            f"steps {spec.steps} is not on the ladder of model {model.model_id!r}: "
            f"{', '.join(map(str, model.steps))}"
        )
    if out.format == pb.FRAME_FORMAT_UNSPECIFIED:
        out.format = pb.FRAME_FORMAT_JPEG
    if out.format not in (pb.FRAME_FORMAT_RGB, pb.FRAME_FORMAT_JPEG):
        raise InvalidArgument(f"unknown frame format {spec.format}")
    if out.width == 0 and out.height == 0:
        out.width, out.height = model.width, model.height
    elif out.width == 0 or out.height == 0:
        raise InvalidArgument("give both width and height, or neither")
    if not (model.width <= out.width <= MAX_OUTPUT_SIDE) or not (
        model.height <= out.height <= MAX_OUTPUT_SIDE
    ):
        raise InvalidArgument(
            f"output size {out.width}x{out.height} must be between the native "
            f"{model.width}x{model.height} and {MAX_OUTPUT_SIDE}x{MAX_OUTPUT_SIDE}"
        )
    if out.jpeg_quality == 0:
        out.jpeg_quality = 85
    if not 1 <= out.jpeg_quality <= 100:
        raise InvalidArgument(f"jpeg_quality {spec.jpeg_quality} is outside 1..100")
    if out.session_class == pb.SESSION_CLASS_UNSPECIFIED:
        out.session_class = pb.SESSION_CLASS_INTERACTIVE
    if out.session_class not in (pb.SESSION_CLASS_INTERACTIVE, pb.SESSION_CLASS_LOCKSTEP):
        raise InvalidArgument(f"unknown session class {spec.session_class}")
    if out.session_class == pb.SESSION_CLASS_LOCKSTEP:
        # no deadlines to trade quality for; and every frame a control asked for is kept
        # (the client paces the session: it holds generation back by not reading)
        out.quality.mode = pb.QualityPolicy.MODE_FIXED
        if out.output_policy == pb.OUTPUT_POLICY_UNSPECIFIED:
            out.output_policy = pb.OUTPUT_POLICY_PAUSE
    if out.output_policy == pb.OUTPUT_POLICY_UNSPECIFIED:
        out.output_policy = pb.OUTPUT_POLICY_DROP_OLDEST
    if out.output_policy not in (pb.OUTPUT_POLICY_DROP_OLDEST, pb.OUTPUT_POLICY_PAUSE):
        raise InvalidArgument(f"unknown output policy {spec.output_policy}")
    return out
