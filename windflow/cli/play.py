"""``windflow play``: open a session, stream controls, receive frames, write a video.

Frame latency is measured from a frame's deadline (when the worker was due to make it) to
its arrival at this client: model step, encoding, queueing and two gRPC hops; a frame whose
control came early may start, and arrive, before its deadline. Control-to-frame latency
runs from sending a control to the arrival of the first frame it shaped; each control is
sampled just before its frame is due (``Session.just_in_time``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.worker.models.registry import DEFAULT_MODEL
from windflow.errors import Unauthenticated, WindflowError
from windflow.sdk import Client, ReceivedFrame
from windflow.sdk.client import make_control


@dataclass(slots=True)
class PlaySummary:
    frames: int
    fps: float
    latency_ms_p50: float
    latency_ms_p99: float
    control_to_frame_ms_p50: float
    dropped: int
    refused_controls: int
    prompts_sent: int
    input_frames_sent: int
    input_dropped: int
    session_id: str
    worker_id: str
    model_id: str
    width: int
    height: int
    out: str | None

    def table(self) -> str:
        rows = [
            ("frames", f"{self.frames}"),
            ("achieved fps", f"{self.fps:.1f}"),
            ("frame latency p50", f"{self.latency_ms_p50:.1f} ms"),
            ("frame latency p99", f"{self.latency_ms_p99:.1f} ms"),
            ("control-to-frame p50", f"{self.control_to_frame_ms_p50:.1f} ms"),
            ("dropped frames", f"{self.dropped}"),
            ("refused controls", f"{self.refused_controls}"),
            ("prompts sent", f"{self.prompts_sent}"),
            ("input frames sent / dropped", f"{self.input_frames_sent} / {self.input_dropped}"),
            ("model", self.model_id),
            ("worker", self.worker_id),
            ("output", f"{self.width}x{self.height} -> {self.out or '(not written)'}"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class ActionSource:
    """Actions per frame: a sticky random policy, or a file with one action per line."""

    def __init__(self, spec: str, actions: list[str], seed: int) -> None:
        self._names = actions
        self._rng = random.Random(seed)
        self._script: list[int] | None = None
        self._current = 0
        if spec != "random":
            lines = [ln.strip() for ln in Path(spec).read_text().splitlines()]
            self._script = [self._parse(ln) for ln in lines if ln and not ln.startswith("#")]
            if not self._script:
                raise SystemExit(f"{spec}: no actions in file")

    def _parse(self, token: str) -> int:
        if token.isdigit():
            return int(token)
        if token in self._names:
            return self._names.index(token)
        raise SystemExit(f"unknown action {token!r}; actions: {', '.join(self._names)}")

    def action(self, frame_index: int) -> int:
        if self._script is not None:
            return self._script[frame_index % len(self._script)]
        if self._rng.random() < 0.15:  # sticky: hold an action for ~7 frames on average
            self._current = self._rng.randrange(len(self._names))
        return self._current


class InputSource:
    """Frames in for a model that takes them: a video file (looped) or a camera
    (``camera`` or a V4L2 device such as ``/dev/video0``), decoded with PyAV and resized to
    the model's input size."""

    def __init__(self, spec: str, width: int, height: int) -> None:
        import av

        self._spec = spec
        self._size = (width, height)
        device = "/dev/video0" if spec == "camera" else spec
        live = spec == "camera" or spec.startswith("/dev/video")
        try:
            self._container = av.open(device, format="v4l2" if live else None)
        except (av.error.FFmpegError, OSError) as exc:
            raise SystemExit(f"--input {spec}: cannot open ({exc})") from exc
        self._live = live
        self._frames = self._decode()

    def _decode(self) -> Any:
        return self._container.decode(video=0)

    def next(self) -> np.ndarray:
        from PIL import Image

        try:
            frame = next(self._frames)
        except StopIteration:
            if self._live:
                raise SystemExit(f"--input {self._spec}: the camera stopped") from None
            self._container.seek(0)
            self._frames = self._decode()
            try:
                frame = next(self._frames)
            except StopIteration:
                raise SystemExit(f"--input {self._spec}: no video frames") from None
        image = frame.to_image().convert("RGB").resize(self._size, Image.Resampling.BILINEAR)
        return np.asarray(image)

    def close(self) -> None:
        self._container.close()


def parse_prompts(first: str | None, switches: list[str]) -> dict[int, str]:
    """``--prompt`` (frame 0) and ``--prompt-at FRAME:TEXT`` as {frame: prompt}."""
    out: dict[int, str] = {}
    if first is not None:
        out[0] = first
    for item in switches:
        frame, sep, text = item.partition(":")
        if not sep or not frame.strip().isdigit():
            raise SystemExit(f"--prompt-at {item!r}: expected FRAME:TEXT, e.g. 48:a snowy forest")
        out[int(frame)] = text
    return out


class VideoWriter:
    """H.264 MP4 through PyAV; frames are written as they arrive."""

    def __init__(self, path: str, fps: float, width: int, height: int) -> None:
        import av

        self._av = av
        self._container = av.open(path, mode="w")
        stream = self._container.add_stream("libx264", rate=round(fps))
        stream.width = width + width % 2
        stream.height = height + height % 2
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "20"}
        self._stream = stream

    def write(self, rgb: np.ndarray) -> None:
        if rgb.shape[0] % 2 or rgb.shape[1] % 2:
            rgb = np.pad(rgb, ((0, rgb.shape[0] % 2), (0, rgb.shape[1] % 2), (0, 0)), "edge")
        frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def close(self) -> None:
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()


async def play(
    gateway: str,
    *,
    model: str | None = None,
    frames: int = 120,
    fps: float = 0.0,
    actions: str = "random",
    out: str | None = None,
    seed: int = 0,
    size: tuple[int, int] = (0, 0),
    fmt: str = "jpeg",
    token: str | None = None,
    prompts: dict[int, str] | None = None,
    input_spec: str | None = None,
) -> PlaySummary:
    """``token``: the session token (default: $WINDFLOW_TOKEN); ``prompts``: {frame: text}
    (a prompt switch at each); ``input_spec``: frames in (``InputSource``)."""
    async with Client(gateway, token=token) as client:
        models = await client.list_models()
        if not models:
            raise SystemExit("the gateway serves no models (no live worker)")
        served = {m.model_id: m for m in models}
        model_id = model or (DEFAULT_MODEL if DEFAULT_MODEL in served else models[0].model_id)
        if model_id not in served:
            raise SystemExit(f"model {model_id!r} is not served; served: {', '.join(served)}")
        schema = served[model_id].controls
        prompts = dict(prompts or {})
        if prompts and not schema.HasField("prompt"):
            raise SystemExit(f"model {model_id!r} takes no prompt")
        if input_spec and not schema.HasField("input_frame"):
            raise SystemExit(f"model {model_id!r} takes no input frames")
        inputs = (
            InputSource(input_spec, schema.input_frame.width, schema.input_frame.height)
            if input_spec
            else None
        )
        info = await client.create_session(
            model_id, seed=seed, fps=fps, format=fmt, width=size[0], height=size[1]
        )
        source = ActionSource(actions, list(info.model.actions), seed)
        writer = VideoWriter(out, info.spec.fps, info.spec.width, info.spec.height) if out else None
        latencies: list[float] = []
        control_latencies: list[float] = []
        received: list[ReceivedFrame] = []
        sent_prompts = sent_inputs = 0
        switches = sorted(prompts.items())

        def control(index: int) -> dict[str, Any]:
            """The control for frame ``index`` (``Session.send`` arguments): its action,
            the newest prompt switch due by then, and the next input frame."""
            nonlocal sent_prompts, sent_inputs
            prompt = None
            while switches and switches[0][0] <= index:
                prompt = switches.pop(0)[1]
            frame = inputs.next() if inputs is not None else None
            sent_prompts += prompt is not None
            sent_inputs += frame is not None
            return {"action": source.action(index), "prompt": prompt, "frame": frame}

        live = await client.attach(info, controls=[make_control(0, **control(0))])
        try:
            first_us = 0
            async for frame in live.frames(limit=frames):
                if not first_us:
                    first_us = frame.received_us
                received.append(frame)
                latencies.append(frame.latency_ms)
                c2f = frame.control_to_frame_ms
                if c2f is not None:
                    control_latencies.append(c2f)
                if writer is not None:  # first: encoding blocks the loop for a while
                    writer.write(frame.rgb())
                # the next control is sampled just before its frame is due (as games do)
                nxt = await live.just_in_time()
                await live.send(frame_index=nxt, **control(nxt))
        finally:
            await live.aclose()
            if writer is not None:
                writer.close()
            if inputs is not None:
                inputs.close()
            await client.close_session(info.session_id)
    span_s = (received[-1].received_us - first_us) / 1e6 if len(received) > 1 else 0.0
    indices = [f.index for f in received]
    gaps = sum(b - a - 1 for a, b in itertools.pairwise(indices) if b > a + 1)
    dropped = max(gaps, int(received[-1].frame.dropped_total) if received else 0)
    return PlaySummary(
        frames=len(received),
        fps=(len(received) - 1) / span_s if span_s > 0 else 0.0,
        latency_ms_p50=_percentile(latencies, 50),
        latency_ms_p99=_percentile(latencies, 99),
        control_to_frame_ms_p50=_percentile(control_latencies, 50),
        dropped=dropped,
        refused_controls=len(live.errors),
        prompts_sent=sent_prompts,
        input_frames_sent=sent_inputs,
        input_dropped=int(received[-1].frame.input_dropped_total) if received else 0,
        session_id=info.session_id,
        worker_id=info.worker_id,
        model_id=model_id,
        width=info.spec.width,
        height=info.spec.height,
        out=out,
    )


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = text.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError("size must look like 256x256") from None


def add_play_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help=f"model id (default: {DEFAULT_MODEL}, else the first served)"
    )
    parser.add_argument("--frames", type=int, default=120, help="frames to receive")
    parser.add_argument("--fps", type=float, default=0.0, help="session fps (default: native)")
    parser.add_argument("--actions", default="random", help="'random' or a file of actions")
    parser.add_argument("--out", default=None, help="write the frames to this .mp4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=_size, default=(256, 256), help="output WxH")
    parser.add_argument("--format", choices=("jpeg", "rgb"), default="jpeg")
    parser.add_argument("--json", action="store_true", help="last stdout line: JSON summary")
    parser.add_argument("--prompt", default=None, help="the prompt from frame 0 (text models)")
    parser.add_argument(
        "--prompt-at",
        action="append",
        default=[],
        metavar="FRAME:TEXT",
        help="switch to TEXT at FRAME (repeatable)",
    )
    parser.add_argument(
        "--input",
        default=None,
        metavar="VIDEO_OR_CAMERA",
        help="frames in (video-to-video models): a video file, looped, or 'camera'/'/dev/videoN'",
    )


def print_summary(summary: PlaySummary, as_json: bool) -> None:
    print(summary.table(), flush=True)
    if as_json:
        print(json.dumps(asdict(summary)), flush=True)


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser("play", help="play a session")
    parser.add_argument(
        "--gateway",
        required=True,
        help="gateway host:port, or several comma-separated (the stream resumes through "
        "the next when its gateway goes away)",
    )
    add_play_arguments(parser)
    parser.set_defaults(func=_main)


async def play_from_args(
    gateway: str, args: argparse.Namespace, token: str | None = None
) -> PlaySummary:
    """``play`` with the options ``add_play_arguments`` declared."""
    return await play(
        gateway,
        token=token,
        model=args.model,
        frames=args.frames,
        fps=args.fps,
        actions=args.actions,
        out=args.out,
        seed=args.seed,
        size=args.size,
        fmt=args.format,
        prompts=parse_prompts(args.prompt, args.prompt_at),
        input_spec=args.input,
    )


def _main(args: argparse.Namespace) -> int:
    try:
        summary = asyncio.run(play_from_args(args.gateway, args))
    except WindflowError as err:
        hint = (
            " (windflow up wrote a token: export WINDFLOW_TOKEN=$(cat <state dir>/token))"
            if isinstance(err, Unauthenticated)
            else ""
        )
        print(f"windflow play: {err.code}: {err.message}{hint}", file=sys.stderr)
        return 1
    print_summary(summary, args.json)
    return 0
