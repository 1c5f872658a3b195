"""Controls beyond actions: decoding and validating each kind against the model's schema,
how they combine, and the bound on waiting input frames (newest wins)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from services.worker.actor import SessionActor
from services.worker.controls import from_message, input_max_bytes, merge
from services.worker.models.base import Control
from tests.fakes import FakeRich, FakeWorld
from windflow.common.specs import model_info_to_proto
from windflow.errors import InvalidControl, ResourceExhausted
from windflow.sdk.client import input_frame, make_control
from windflow.v1 import windflow_pb2 as pb

RNG = np.random.default_rng(0)


def picture(w: int = 8, h: int = 8) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def control(**kinds: object) -> pb.Control:
    return make_control(0, **kinds)  # type: ignore[arg-type]


def refused(msg: pb.Control, model: object = None) -> str:
    with pytest.raises(InvalidControl) as err:
        from_message(msg, model or FakeRich())  # type: ignore[arg-type]
    return str(err.value)


def test_the_schema_declares_every_kind_typed() -> None:
    schema = model_info_to_proto(FakeRich().info).controls
    assert list(schema.actions) == ["noop", "go"]
    assert [(a.name, a.min, a.max) for a in schema.axes] == [("x", -1.0, 1.0)]
    assert schema.prompt.max_chars == 32 and schema.prompt.default_prompt == "plain"
    assert schema.pose.kind == pb.POSE_KIND_VELOCITY
    assert [(c.name, c.min, c.max) for c in schema.pose.components] == [
        ("pitch", -0.5, 0.5),
        ("yaw", -0.5, 0.5),
    ]
    frame = schema.input_frame
    assert (frame.width, frame.height, frame.queue, frame.policy) == (8, 8, 2, 1)
    assert frame.max_bytes == input_max_bytes(FakeRich().info.input_frame)  # type: ignore[arg-type]
    plain = model_info_to_proto(FakeWorld().info).controls
    assert not plain.HasField("prompt") and not plain.HasField("pose")
    assert not plain.HasField("input_frame")


def test_each_kind_decodes() -> None:
    rgb = picture()
    c = from_message(
        control(prompt="a red fox", pose=(0.1, -0.2), frame=input_frame(rgb, pb.FRAME_FORMAT_RGB)),
        FakeRich(),
    )
    assert c.prompt == "a red fox"
    assert c.pose == pytest.approx((0.1, -0.2))
    assert c.frame is not None and np.array_equal(c.frame.rgb, rgb)
    jpeg = from_message(control(frame=input_frame(rgb)), FakeRich())
    assert jpeg.frame is not None and jpeg.frame.rgb.shape == (8, 8, 3)
    # named by its pixels: the same picture is one digest whichever way it came
    again = from_message(
        control(frame=input_frame(jpeg.frame.rgb.copy(), pb.FRAME_FORMAT_RGB)), FakeRich()
    )
    assert again.frame == jpeg.frame
    assert from_message(control(), FakeRich()) == Control()


def test_bad_prompts_poses_and_kinds_are_refused_naming_the_field() -> None:
    assert "control.prompt" in refused(control(prompt="x" * 33))
    assert "control.prompt" in refused(control(prompt="a fox"), FakeWorld())
    assert "control.pose.yaw" in refused(control(pose=(0.0, float("nan"))))
    assert "control.pose.pitch" in refused(control(pose=(0.9, 0.0)))
    assert "control.pose" in refused(control(pose=(0.1,)))
    assert "control.pose" in refused(control(pose=(0.1, 0.1)), FakeWorld())
    assert "control.frame" in refused(control(frame=input_frame(picture())), FakeWorld())


def test_bad_frames_are_refused_naming_the_field() -> None:
    assert "control.frame" in refused(control(frame=input_frame(picture(16, 8))))
    corrupt = input_frame(picture())
    corrupt.data = corrupt.data[:20] + b"\x00" * 40
    assert "not a valid JPEG" in refused(control(frame=corrupt))
    short = input_frame(picture(), pb.FRAME_FORMAT_RGB)
    short.data = short.data[:-3]
    assert "control.frame.data" in refused(control(frame=short))
    png = io.BytesIO()
    Image.fromarray(picture()).save(png, format="PNG")
    as_png = pb.InputFrame(data=png.getvalue(), format=pb.FRAME_FORMAT_JPEG, width=8, height=8)
    assert "not a JPEG" in refused(control(frame=as_png))
    lying = input_frame(picture(16, 16))
    lying.width = lying.height = 8  # a 16x16 JPEG said to be 8x8
    assert "16x16" in refused(control(frame=lying))
    huge = pb.InputFrame(data=b"\xff" * 10_000, format=pb.FRAME_FORMAT_JPEG, width=8, height=8)
    with pytest.raises(ResourceExhausted, match=r"control\.frame\.data"):
        from_message(control(frame=huge), FakeRich())


def test_a_control_changes_what_it_carries_and_leaves_the_rest() -> None:
    base = from_message(control(prompt="fox", pose=(0.1, 0.1)), FakeRich())
    later = merge(base, Control(action=1))
    assert (later.action, later.prompt, later.pose) == (1, "fox", base.pose)
    switched = merge(later, Control(prompt="owl"))
    assert (switched.action, switched.prompt) == (0, "owl")


def rich_actor() -> SessionActor:
    model = FakeRich()
    return SessionActor(
        "s",
        pb.SessionSpec(model_id="fake-rich", fps=24, steps=2),
        model,
        model.new_state(1),
        epoch=1,
        window=4,
        out_queue=4,
        max_pending_controls=64,
        now=0.0,
    )


def test_a_prompt_stays_in_effect_across_action_controls() -> None:
    a = rich_actor()
    a.add_control(make_control(0, 1, prompt="fox"))
    a.add_control(make_control(2, 0))
    seen = []
    for _ in range(3):
        seen.append((a.take_control().control.action, a.current.prompt))
        a.begin_step()
        a.end_step()
    assert seen == [(1, "fox"), (1, "fox"), (0, "fox")]


def test_input_frames_past_the_queue_drop_the_oldest_and_are_counted() -> None:
    a = rich_actor()
    frames = [picture() for _ in range(5)]
    for i, rgb in enumerate(frames):  # five frames in, stamped for frames 0..4; queue 2
        a.add_control(make_control(i, 1, frame=input_frame(rgb, pb.FRAME_FORMAT_RGB)))
    assert a.input_dropped == 3
    used = []
    for _ in range(5):
        used.append(a.take_control().control.frame)
        a.begin_step()
        a.end_step()
    # the three oldest never apply (their actions did); the newest two do, each in turn
    assert [f is not None and np.array_equal(f.rgb, frames[3]) for f in used] == [
        False,
        False,
        False,
        True,
        False,
    ]
    assert used[4] is not None and np.array_equal(used[4].rgb, frames[4])
    assert used[:3] == [None, None, None] and a.current.action == 1


def test_frames_stamped_for_one_frame_leave_only_the_newest() -> None:
    a = rich_actor()
    frames = [picture() for _ in range(2)]
    for rgb in frames:
        a.add_control(make_control(0, 0, frame=input_frame(rgb, pb.FRAME_FORMAT_RGB)))
    taken = a.take_control().control.frame
    assert taken is not None and np.array_equal(taken.rgb, frames[1])
    assert a.input_dropped == 1
