"""Conversions between model descriptions and protos, and session-spec validation."""

from __future__ import annotations

from services.worker.controls import INPUT_FORMATS, input_max_bytes
from services.worker.models.base import POSE_ABSOLUTE, POSE_VELOCITY, ModelInfo
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
        controls=control_schema(info),
    )


_POSE_KINDS = {POSE_ABSOLUTE: pb.POSE_KIND_ABSOLUTE, POSE_VELOCITY: pb.POSE_KIND_VELOCITY}


def control_schema(info: ModelInfo) -> pb.ControlSpec:
    """Every kind of control ``info`` declares, typed (``ModelInfo.controls``)."""
    schema = pb.ControlSpec(
        actions=list(info.actions),
        axes=[pb.AxisSpec(name=name, min=-1.0, max=1.0) for name in info.axes],
    )
    if info.prompt is not None:
        schema.prompt.max_chars = info.prompt.max_chars
        schema.prompt.default_prompt = info.prompt.default
    if info.pose is not None:
        schema.pose.kind = _POSE_KINDS[info.pose.kind]
        schema.pose.components.extend(
            pb.AxisSpec(name=n, min=lo, max=hi)
            for n, lo, hi in zip(info.pose.components, info.pose.low, info.pose.high, strict=True)
        )
    if info.input_frame is not None:
        spec = info.input_frame
        schema.input_frame.width = spec.width
        schema.input_frame.height = spec.height
        schema.input_frame.fps = spec.fps
        schema.input_frame.formats.extend(INPUT_FORMATS)
        schema.input_frame.queue = spec.queue
        schema.input_frame.policy = pb.INPUT_POLICY_NEWEST
        schema.input_frame.max_bytes = input_max_bytes(spec)
    return schema


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
