"""``windflow render``: a control script rendered offline into an MP4, as fast as the mesh
makes the frames.

The session is a lockstep one (docs/simulation.md): no clock, a frame as soon as its
control is in. The script gives (frame index, action) pairs; an action holds until the
next pair (frames before the first pair get action 0, noop for the built-in model). One
pair a line, either form, in any mix:

    # comments and blank lines are skipped
    {"frame": 0, "action": "right"}           JSON lines ("axes": [..] for a model with axes)
    frame,action                              CSV (this header line is optional)
    48,up                                     an action by name or by index

Frame indices must increase strictly. ``--frames N`` renders frames 0..N-1 (default: up to
the last pair's frame). A bad line is an error naming the file and the line. The video
plays at the session's fps (``--fps``, default the model's native). Ends with one JSON line
on stdout: ``frames``, ``seconds`` (from the attach to the last frame), ``fps`` (frames /
seconds), ``session_id``, ``out``, ``model``, ``seed``, ``width``, ``height``.

``--gateway`` (and ``--token`` or $WINDFLOW_TOKEN) renders on a running mesh; ``--up`` (or
no ``--gateway``) starts a stack of its own for the run (one worker, as ``windflow demo``
does) and stops it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from windflow.cli.play import VideoWriter
from windflow.errors import WindflowError

LOOKAHEAD = 64
"""Controls sent ahead of the last frame received (a session holds at most 256)."""
STALL_S = 30.0
"""How long the render waits for one frame before it gives up."""


class ScriptError(ValueError):
    """A control script that cannot be read: names the file and the line."""


@dataclass(frozen=True, slots=True)
class Entry:
    frame: int
    action: str | int
    axes: tuple[float, ...]
    line: int


def parse_script(path: str | Path) -> list[Entry]:
    """The script's (frame, action[, axes]) entries, names unresolved; ScriptError names
    the line of the first problem."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ScriptError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    entries: list[Entry] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        if line.startswith("{"):
            entry = _json_entry(line, number, where)
        else:
            cells = [c.strip() for c in next(csv.reader([line]))]
            if [c.lower() for c in cells[:2]] == ["frame", "action"] and not entries:
                continue  # the header
            entry = _csv_entry(cells, number, where)
        if entries and entry.frame <= entries[-1].frame:
            raise ScriptError(
                f"{where}: frame {entry.frame} does not come after frame {entries[-1].frame} "
                f"(line {entries[-1].line}): frame indices must increase"
            )
        entries.append(entry)
    if not entries:
        raise ScriptError(f"{path}: no controls in it")
    return entries


def _frame(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ScriptError(f"{where}: the frame index must be an integer, got {value!r}")
    try:
        frame = int(value)
    except ValueError:
        raise ScriptError(f"{where}: the frame index must be an integer, got {value!r}") from None
    if frame < 0:
        raise ScriptError(f"{where}: the frame index must be >= 0, got {frame}")
    return frame


def _action(value: Any, where: str) -> str | int:
    if isinstance(value, bool) or not isinstance(value, int | str) or value == "":
        raise ScriptError(f"{where}: the action must be a name or an index, got {value!r}")
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return value


def _json_entry(line: str, number: int, where: str) -> Entry:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ScriptError(f"{where}: not valid JSON: {exc.msg}") from None
    if not isinstance(item, dict) or "frame" not in item or "action" not in item:
        raise ScriptError(f'{where}: a JSON line needs "frame" and "action"')
    unknown = set(item) - {"frame", "action", "axes"}
    if unknown:
        raise ScriptError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    axes = item.get("axes", [])
    if not isinstance(axes, list) or not all(
        isinstance(a, int | float) and not isinstance(a, bool) for a in axes
    ):
        raise ScriptError(f'{where}: "axes" must be a list of numbers')
    return Entry(
        _frame(item["frame"], where),
        _action(item["action"], where),
        tuple(float(a) for a in axes),
        number,
    )


def _csv_entry(cells: list[str], number: int, where: str) -> Entry:
    if len(cells) != 2:
        raise ScriptError(f"{where}: a CSV line is frame,action; got {len(cells)} field(s)")
    return Entry(_frame(cells[0], where), _action(cells[1], where), (), number)


def resolve(
    entries: list[Entry], actions: list[str], n_axes: int, source: str
) -> list[tuple[int, int, tuple[float, ...]]]:
    """(frame, action index, axes) for each entry, checked against the model's spaces."""
    out = []
    for entry in entries:
        where = f"{source}:{entry.line}"
        if isinstance(entry.action, int):
            if not 0 <= entry.action < len(actions):
                raise ScriptError(
                    f"{where}: action {entry.action} is outside 0..{len(actions) - 1} "
                    f"({', '.join(actions)})"
                )
            index = entry.action
        elif entry.action in actions:
            index = actions.index(entry.action)
        else:
            raise ScriptError(
                f"{where}: unknown action {entry.action!r}; actions: {', '.join(actions)}"
            )
        if entry.axes and len(entry.axes) != n_axes:
            raise ScriptError(f"{where}: the model takes {n_axes} axes, got {len(entry.axes)}")
        if any(not -1.0 <= a <= 1.0 for a in entry.axes):
            raise ScriptError(f"{where}: axes must be in [-1, 1]")
        out.append((entry.frame, index, entry.axes))
    return out


def per_frame(
    controls: list[tuple[int, int, tuple[float, ...]]], frames: int
) -> list[tuple[int, tuple[float, ...]]]:
    """The control of each of frames 0..frames-1 (each pair holds until the next)."""
    out: list[tuple[int, tuple[float, ...]]] = []
    current: tuple[int, tuple[float, ...]] = (0, ())
    at = 0
    for k in range(frames):
        while at < len(controls) and controls[at][0] <= k:
            current = (controls[at][1], controls[at][2])
            at += 1
        out.append(current)
    return out


async def render(
    gateway: str,
    entries: list[Entry],
    *,
    source: str,
    out: str,
    model: str = "windflow-world",
    seed: int = 0,
    frames: int = 0,
    fps: float = 0.0,
    width: int = 0,
    height: int = 0,
    steps: int = 0,
    token: str | None = None,
) -> dict[str, Any]:
    """Render the script through ``gateway``; returns the summary."""
    from windflow.sdk import Client

    async with Client(gateway, token=token) as client:
        models = {m.model_id: m for m in await client.list_models()}
        if model not in models:
            served = ", ".join(models) or "none"
            raise ScriptError(f"the mesh serves no model {model!r} (served: {served})")
        info = models[model]
        controls = resolve(entries, list(info.actions), len(info.axes), source)
        total = frames or controls[-1][0] + 1
        script = per_frame(controls, total)
        session = await client.create_session(
            model,
            seed=seed,
            fps=fps,
            steps=steps,
            format="rgb",
            width=width,
            height=height,
            session_class="lockstep",
        )
        spec = session.spec
        writer = VideoWriter(out, spec.fps, spec.width, spec.height)
        started = time.perf_counter()
        live = await client.attach(session)
        made = 0
        try:
            sent = 0

            async def send_until(limit: int) -> int:
                nonlocal sent
                while sent < min(limit, total):
                    action, axes = script[sent]
                    await live.send(action=action, axes=axes, frame_index=sent)
                    sent += 1
                return sent

            await send_until(LOOKAHEAD)
            stream = live.frames(limit=total)
            while made < total:
                try:
                    frame = await asyncio.wait_for(anext(stream), STALL_S)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    why = live.errors[0].message if live.errors else "no reason given"
                    raise WindflowError(
                        f"no frame {made} of session {session.session_id} in {STALL_S:g} s ({why})"
                    ) from None
                writer.write(frame.rgb())
                made += 1
                if made % 240 == 0:
                    print(f"windflow render: {made}/{total} frames", file=sys.stderr, flush=True)
                await send_until(made + LOOKAHEAD)
        finally:
            seconds = time.perf_counter() - started
            await live.aclose()
            writer.close()
            with contextlib.suppress(WindflowError):
                await client.close_session(session.session_id)
    return {
        "frames": made,
        "seconds": round(seconds, 3),
        "fps": round(made / seconds, 1) if seconds > 0 else 0.0,
        "session_id": session.session_id,
        "out": out,
        "model": model,
        "seed": seed,
        "width": spec.width,
        "height": spec.height,
    }


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "render",
        help="render a control script into an MP4 (offline, lockstep)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--controls", required=True, help="the control script (see above)")
    parser.add_argument("--out", required=True, help="the .mp4 to write")
    parser.add_argument("--gateway", default=None, help="gateway host:port (several: a,b)")
    parser.add_argument("--token", default=None, help="session token (default $WINDFLOW_TOKEN)")
    parser.add_argument("--up", action="store_true", help="start a stack of its own")
    parser.add_argument("--model", default="windflow-world")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=0, help="frames (default: the script's)")
    parser.add_argument("--fps", type=float, default=0.0, help="the video's fps (default native)")
    parser.add_argument("--width", type=int, default=0, help="output width (0: native)")
    parser.add_argument("--height", type=int, default=0, help="output height (0: native)")
    parser.add_argument("--steps", type=int, default=0, help="denoising steps (0: default)")
    parser.set_defaults(func=_main)


async def _with_stack(args: argparse.Namespace, entries: list[Entry], state_dir: Path) -> Any:
    from windflow.infra import Stack, StackConfig

    config = StackConfig(
        state_dir=state_dir, workers=1, bridge=False, worker_args=("--models", args.model)
    )
    async with Stack(config) as stack:
        print(f"windflow render: stack ready, gateway {stack.gateway_address}", file=sys.stderr)
        return await _render(args, entries, stack.gateway_address, stack.token)


async def _render(
    args: argparse.Namespace, entries: list[Entry], gateway: str, token: str | None
) -> dict[str, Any]:
    return await render(
        gateway,
        entries,
        source=args.controls,
        out=args.out,
        model=args.model,
        seed=args.seed,
        frames=args.frames,
        fps=args.fps,
        width=args.width,
        height=args.height,
        steps=args.steps,
        token=token,
    )


def _main(args: argparse.Namespace) -> int:
    from windflow.infra import StackFailed

    if args.frames < 0:
        print("windflow render: --frames must be >= 0", file=sys.stderr)
        return 2
    state_dir: Path | None = None
    try:
        entries = parse_script(args.controls)  # (a bad script fails before any stack)
        if args.up or not args.gateway:
            state_dir = Path(tempfile.mkdtemp(prefix="windflow-render-"))
            summary = asyncio.run(_with_stack(args, entries, state_dir))
        else:
            summary = asyncio.run(_render(args, entries, args.gateway, args.token))
    except ScriptError as exc:
        print(f"windflow render: {exc}", file=sys.stderr)
        return 2
    except WindflowError as exc:
        print(f"windflow render: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except StackFailed as exc:
        logs = f"; logs in {state_dir / 'logs'}" if state_dir else ""
        print(f"windflow render: the stack failed: {exc}{logs}", file=sys.stderr)
        return 1
    if state_dir is not None:
        shutil.rmtree(state_dir, ignore_errors=True)
    print(json.dumps(summary), flush=True)
    return 0
