"""A client's ``Control`` message as the model's ``Control``, and how controls combine.

A control message always carries an action (and axes, if any); its richer kinds (prompt,
camera pose, input frame) are optional, and one absent leaves the one in effect: ``merge``.
``from_message`` decodes and validates one message against the model's declared schema,
raising errors that name the field (INVALID_ARGUMENT for a bad value or an undeclared kind,
RESOURCE_EXHAUSTED for an input frame over the model's byte limit).
"""

from __future__ import annotations

import hashlib
import io
import math

import numpy as np
from PIL import Image, UnidentifiedImageError

from services.worker.models.base import Control, InputFrame, InputFrameSpec, WorldModel
from windflow.errors import InvalidControl, ResourceExhausted
from windflow.v1 import windflow_pb2 as pb

INPUT_FORMATS = (pb.FRAME_FORMAT_RGB, pb.FRAME_FORMAT_JPEG)


def input_max_bytes(spec: InputFrameSpec) -> int:
    """The largest ``InputFrame.data`` a model takes: a raw frame, with room for a JPEG
    of noise at quality 100 (which can exceed raw)."""
    return 2 * spec.width * spec.height * 3 + 4096


def frame_digest(rgb: np.ndarray) -> str:
    """sha256 (hex) naming a decoded input frame: of its shape and pixels, so the same
    picture sent as RGB or as JPEG decoding to the same pixels is one object."""
    h = hashlib.sha256(f"{rgb.shape[1]}x{rgb.shape[0]}:".encode())
    h.update(np.ascontiguousarray(rgb, dtype=np.uint8).tobytes())
    return h.hexdigest()


def input_frame(rgb: np.ndarray) -> InputFrame:
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    rgb.setflags(write=False)
    return InputFrame(rgb, frame_digest(rgb))


def decode_input(msg: pb.InputFrame, spec: InputFrameSpec, model_id: str) -> InputFrame:
    """Decode ``msg`` (raw RGB or JPEG) into the model's input size; errors name the field."""
    limit = input_max_bytes(spec)
    if len(msg.data) > limit:
        raise ResourceExhausted(
            f"control.frame.data: {len(msg.data)} bytes, over the {limit} model "
            f"{model_id!r} takes for a {spec.width}x{spec.height} frame"
        )
    if (msg.width, msg.height) != (spec.width, spec.height):
        raise InvalidControl(
            f"control.frame: {msg.width}x{msg.height}, model {model_id!r} takes "
            f"{spec.width}x{spec.height}"
        )
    fmt = msg.format or pb.FRAME_FORMAT_JPEG
    if fmt == pb.FRAME_FORMAT_RGB:
        want = spec.width * spec.height * 3
        if len(msg.data) != want:
            raise InvalidControl(
                f"control.frame.data: {len(msg.data)} bytes of RGB, a {spec.width}x"
                f"{spec.height} frame is {want}"
            )
        rgb = np.frombuffer(msg.data, np.uint8).reshape(spec.height, spec.width, 3)
        return input_frame(rgb)
    if fmt != pb.FRAME_FORMAT_JPEG:
        raise InvalidControl(f"control.frame.format: unknown format {msg.format}")
    try:
        with Image.open(io.BytesIO(msg.data)) as image:
            if image.format != "JPEG":
                raise InvalidControl(f"control.frame.data: a {image.format} image, not a JPEG")
            image.load()
            size = image.size
            rgb = np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidControl(f"control.frame.data: not a valid JPEG ({exc})") from exc
    if size != (spec.width, spec.height):
        raise InvalidControl(
            f"control.frame.data: the JPEG is {size[0]}x{size[1]}, model {model_id!r} "
            f"takes {spec.width}x{spec.height}"
        )
    return input_frame(rgb)


def from_message(msg: pb.Control, model: WorldModel) -> Control:
    """The model's control for ``msg`` (its unset kinds None), validated by the model."""
    info = model.info
    prompt = msg.prompt if msg.HasField("prompt") else None
    pose = tuple(msg.pose.values) if msg.HasField("pose") else None
    frame = None
    if msg.HasField("frame"):
        if info.input_frame is None:
            raise InvalidControl(f"control.frame: model {info.model_id!r} takes no input frames")
        frame = decode_input(msg.frame, info.input_frame, info.model_id)
    if pose is not None and any(not math.isfinite(v) for v in pose):
        names = info.pose.components if info.pose else ()
        bad = next(i for i, v in enumerate(pose) if not math.isfinite(v))
        name = names[bad] if bad < len(names) else str(bad)
        if info.pose is not None:
            raise InvalidControl(f"control.pose.{name} = {pose[bad]} is not a finite number")
    control = Control(msg.action, tuple(msg.axes), prompt, pose, frame)
    model.validate_control(control)
    return control


def merge(current: Control, new: Control) -> Control:
    """What is in effect after ``new`` applies over ``current``: its action and axes, and
    each richer kind it carries (the others stay)."""
    return Control(
        new.action,
        new.axes,
        current.prompt if new.prompt is None else new.prompt,
        current.pose if new.pose is None else new.pose,
        current.frame if new.frame is None else new.frame,
    )
