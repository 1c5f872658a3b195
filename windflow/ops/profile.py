"""Model profiles: what a model costs where it runs, measured, versioned, on disk.

``measure()`` times a model the way a worker runs it (by default in a model host, a
process of its own, through ``stepping.step_and_encode``: the call the worker's
calibration times): batched step + encoding at every rung of the step ladder and batch
sizes 1, 2, 4, 8, 16 (up to the model's max batch), each timed ``repeats`` times with the
rounds interleaved so that a busy moment of the machine lands on all of them; the
encoding of one frame by format and output size; the memory one session holds. It is
written as ``profiles/<model>@<worker class>.json`` with the machine, the commit and the
model's version; the planner refuses a profile whose model version is not the one it
plans for (``check_version``).

Figures, per (steps, batch): ``batch_ms`` (wall time of the call: step, encoding of the
batch at the model's native size as JPEG q85, the hand back from the host): samples and
their min / p50 / p90 / mean; ``step_ms`` (the model step alone, p50). ``encode_ms`` per
frame by ``<format>@<width>x<height>``, with the encoded size. ``memory``: the bytes of one
session's state (its tensors and arrays), of its snapshot, the copies a worker keeps of it
by default (its in-memory ring, ``journal.ring_for``) and the host's resident memory
(``model_rss_bytes``) and its growth per session.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.worker.costs import StepCosts
from windflow.errors import FailedPrecondition
from windflow.ops.yamlio import SpecError

PROFILE_FORMAT = 1
BATCHES = (1, 2, 4, 8, 16)
SIZE_FACTORS = (1, 2, 4)
"""Output sizes timed for encoding: the native size and 2x, 4x (upscaled, as a session
asking for a larger size gets)."""
FORMATS = ("jpeg", "rgb")
DEFAULT_REPEATS = 48
PROFILE_DIR = Path("profiles")


class ProfileVersionMismatch(FailedPrecondition):
    """A profile measured on another version of the model."""


def encode_key(fmt: str, width: int, height: int) -> str:
    return f"{fmt}@{width}x{height}"


def _quantile(sorted_values: list[float] | tuple[float, ...], q: float) -> float:
    if not sorted_values:
        return math.nan
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(samples: Iterable[float]) -> dict[str, Any]:
    values = sorted(samples)
    return {
        "min": round(values[0], 4),
        "p50": round(_quantile(values, 0.5), 4),
        "p90": round(_quantile(values, 0.9), 4),
        "mean": round(statistics.fmean(values), 4),
        "max": round(values[-1], 4),
        "samples": [round(v, 4) for v in values],
    }


@dataclass(frozen=True, slots=True)
class Profile:
    """A loaded profile: one model version on one worker class."""

    model_id: str
    model_version: str
    worker_class: str
    width: int
    height: int
    fps: float
    steps: tuple[int, ...]
    default_steps: int
    max_batch: int
    batch_samples: dict[int, dict[int, tuple[float, ...]]]
    """steps -> batch -> sorted samples of the batch's wall time (ms)."""
    batch_mean: dict[int, dict[int, float]]
    encode_ms: dict[str, float]
    encode_bytes: dict[str, int]
    memory: dict[str, int]
    machine: dict[str, Any] = field(default_factory=dict)
    revision: dict[str, Any] | None = None
    measured_at: str = ""
    source: str = ""
    path: Path | None = None

    @property
    def native_key(self) -> str:
        return encode_key("jpeg", self.width, self.height)

    def output_key(self, fmt: str, width: int, height: int) -> str:
        return encode_key(fmt, width or self.width, height or self.height)

    def encode_delta_ms(self, fmt: str, width: int, height: int) -> float:
        """Per frame: encoding at this format and size minus what ``batch_ms`` holds
        (JPEG at the native size). Raises ``SpecError`` when the size was not measured."""
        key = self.output_key(fmt, width, height)
        if key not in self.encode_ms:
            known = ", ".join(sorted(self.encode_ms))
            raise SpecError(
                f"profile {self.path or self.model_id} has no encoding figure for {key} "
                f"(measured: {known}); profile that size or ask for a measured one"
            )
        return self.encode_ms[key] - self.encode_ms[self.native_key]

    def costs(
        self, fmt: str = "jpeg", width: int = 0, height: int = 0, *, statistic: str = "mean"
    ) -> StepCosts:
        """A ``StepCosts`` (the worker's cost model) seeded with this profile's batch
        times, adjusted to the output format and size: what a worker's calibration would
        know, so that plan and admission agree. ``statistic``: mean, p50, p90, min, max."""
        delta = self.encode_delta_ms(fmt, width, height)
        costs = StepCosts()
        for steps, by_batch in self.batch_samples.items():
            for batch, samples in by_batch.items():
                if statistic == "mean":
                    base = self.batch_mean[steps][batch]
                elif statistic == "min":
                    base = samples[0]
                elif statistic == "max":
                    base = samples[-1]
                else:
                    base = _quantile(samples, float(statistic.lstrip("p")) / 100.0)
                costs.observe(self.model_id, steps, batch, max(0.0, base + batch * delta))
        return costs

    def session_bytes(self, fmt: str = "jpeg", width: int = 0, height: int = 0) -> int:
        """Memory one session holds on a worker: its state (or what the host grew by per
        session, if more), the copies of its in-memory ring, and its buffered frames."""
        mem = self.memory
        state = max(mem.get("state_bytes", 0), mem.get("rss_per_session_bytes", 0))
        ring = mem.get("ring_copies", 0) * mem.get("state_bytes", 0)
        frame = self.encode_bytes.get(self.output_key(fmt, width, height), 0)
        return state + ring + mem.get("buffered_frames", 0) * frame


def check_version(profile: Profile, version: str) -> None:
    """Refuse a profile measured on another version of the model, naming both."""
    if profile.model_version != version:
        raise ProfileVersionMismatch(
            f"profile {profile.path or ''} is of {profile.model_id} version "
            f"{profile.model_version}, but the model here is version {version}: its figures "
            f"do not apply; re-run `windflow profile --model {profile.model_id}` on a "
            f"{profile.worker_class} machine"
        )


def profile_path(directory: Path, model_id: str, worker_class: str) -> Path:
    return directory / f"{model_id}@{worker_class}.json"


def load_profile(path: Path) -> Profile:
    try:
        record = json.loads(path.read_text())
    except OSError as exc:
        raise SpecError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path} line {exc.lineno}: not valid JSON: {exc.msg}") from None

    def need(obj: Any, key: str, where: str) -> Any:
        if not isinstance(obj, dict) or key not in obj:
            raise SpecError(f"{path}: {where}{key}: missing (required)")
        return obj[key]

    if need(record, "format", "") != PROFILE_FORMAT:
        raise SpecError(
            f"{path}: format: {record.get('format')!r} is not a profile format this "
            f"windflow reads ({PROFILE_FORMAT})"
        )
    model = need(record, "model", "")
    try:
        batch_samples: dict[int, dict[int, tuple[float, ...]]] = {}
        batch_mean: dict[int, dict[int, float]] = {}
        for steps, by_batch in need(record, "batch_ms", "").items():
            for batch, fig in by_batch.items():
                samples = tuple(sorted(float(v) for v in need(fig, "samples", "batch_ms.")))
                if not samples:
                    raise SpecError(f"{path}: batch_ms.{steps}.{batch}.samples: empty")
                batch_samples.setdefault(int(steps), {})[int(batch)] = samples
                batch_mean.setdefault(int(steps), {})[int(batch)] = float(
                    fig.get("mean", statistics.fmean(samples))
                )
        encode = need(record, "encode_ms", "")
        profile = Profile(
            model_id=str(need(model, "id", "model.")),
            model_version=str(need(model, "version", "model.")),
            worker_class=str(need(record, "worker_class", "")),
            width=int(need(model, "width", "model.")),
            height=int(need(model, "height", "model.")),
            fps=float(need(model, "fps", "model.")),
            steps=tuple(int(s) for s in need(model, "steps", "model.")),
            default_steps=int(need(model, "default_steps", "model.")),
            max_batch=int(need(model, "max_batch", "model.")),
            batch_samples=batch_samples,
            batch_mean=batch_mean,
            encode_ms={k: float(v["p50"]) for k, v in encode.items()},
            encode_bytes={k: int(v.get("bytes", 0)) for k, v in encode.items()},
            memory={k: int(v) for k, v in need(record, "memory", "").items() if v is not None},
            machine=dict(record.get("machine") or {}),
            revision=record.get("revision"),
            measured_at=str(record.get("measured_at", "")),
            source=str(record.get("source", "")),
            path=path,
        )
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        raise SpecError(f"{path}: malformed profile ({exc})") from None
    if not profile.batch_samples:
        raise SpecError(f"{path}: batch_ms: no figures")
    if profile.native_key not in profile.encode_ms:
        raise SpecError(f"{path}: encode_ms: no figure for {profile.native_key}")
    return profile


def find_profiles(directory: Path) -> dict[tuple[str, str], Profile]:
    """Every ``<model>@<class>.json`` in ``directory``, by (model, worker class)."""
    found: dict[tuple[str, str], Profile] = {}
    if not directory.is_dir():
        return found
    for path in sorted(directory.glob("*@*.json")):
        profile = load_profile(path)
        expected = f"{profile.model_id}@{profile.worker_class}.json"
        if path.name != expected:
            raise SpecError(
                f"{path}: holds a profile of {profile.model_id} on {profile.worker_class}; "
                f"its name must be {expected}"
            )
        found[(profile.model_id, profile.worker_class)] = profile
    return found


# ---- measuring ----


def default_worker_class() -> str:
    """``h100`` / ``h200`` (or ``gpu-<name>``) on a GPU, else ``cpu-<cores>core``."""
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            for known in ("H200", "H100", "A100", "L40S", "L4"):
                if known in name:
                    return known.lower()
            return "gpu-" + "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return f"cpu-{os.cpu_count() or 1}core"


def _state_bytes(state: Any) -> int:
    """Bytes of a session state's tensors and arrays (walked one level deep)."""
    import numpy as np
    import torch

    names = getattr(state, "__slots__", None) or list(vars(state))
    total = 0
    for name in names:
        value = getattr(state, name, None)
        for v in value.values() if isinstance(value, dict) else (value,):
            if isinstance(v, torch.Tensor):
                total += v.element_size() * v.nelement()
            elif isinstance(v, np.ndarray):
                total += int(v.nbytes)
    return total


def _rss_bytes(pid: int) -> int | None:
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def _worker_default(name: str) -> Any:
    """A worker's default setting (services/worker/config.py)."""
    from services.worker.config import WorkerConfig

    return getattr(WorkerConfig(etcd="-", nats="-", worker_id="profile"), name)


def measure(
    model_id: str,
    *,
    worker_class: str,
    repeats: int = DEFAULT_REPEATS,
    batches: tuple[int, ...] = BATCHES,
    in_process: bool = False,
    step_threads: int = 1,
    options: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Measure ``model_id`` here; the profile's record (JSON-ready)."""
    import numpy as np
    import torch

    from services.worker.journal import ring_for
    from services.worker.model_host import ModelHost
    from services.worker.models.base import Control, WorldModel
    from services.worker.models.registry import load_model
    from services.worker.stepping import Capture, Encoding, step_and_encode
    from windflow.cli import bench_results
    from windflow.common.frames import encode_frame
    from windflow.common.malloc import keep_freed_memory
    from windflow.v1 import windflow_pb2 as pb

    started = dt.datetime.now(dt.UTC)
    machine = bench_results.machine()
    torch.set_num_threads(step_threads)
    torch.set_grad_enabled(False)
    keep_freed_memory()
    opts = dict(options or {})
    progress(f"loading {model_id}")
    local = load_model(model_id, **opts)
    info = local.info
    host: ModelHost | None = None
    model: WorldModel = local
    rss_base: int | None = None
    if not in_process:
        host = ModelHost(model_id, threads=step_threads, options=opts)
        model = host
        if host.info.version != info.version:
            raise FailedPrecondition(
                f"the model host loaded {model_id} {host.info.version}, this process {info.version}"
            )
    try:
        sizes = [b for b in batches if b <= info.max_batch]
        states = [model.new_state(i) for i in range(max(sizes))]
        native = Encoding(pb.FRAME_FORMAT_JPEG, info.width, info.height, 85)
        rng = random.Random(0)
        walls: dict[tuple[int, int], list[float]] = {}
        steps_only: dict[tuple[int, int], list[float]] = {}
        progress(
            f"timing {len(info.steps)} rungs x batches {sizes} x {repeats} "
            f"({'in process' if in_process else 'in a model host'})"
        )
        for round_ in range(repeats + 1):  # round 0 warms up (and fills the caches)
            for steps in info.steps:
                for b in sizes:
                    controls = [Control(action=rng.randrange(len(info.actions))) for _ in range(b)]
                    t0 = time.perf_counter()
                    done = step_and_encode(
                        model, states[:b], controls, steps, [native] * b, [Capture.NONE] * b
                    )
                    wall = (time.perf_counter() - t0) * 1000.0
                    if round_:
                        walls.setdefault((steps, b), []).append(wall)
                        steps_only.setdefault((steps, b), []).append(done.model_ms)
        progress("timing encodings")
        frame = local.step([local.new_state(0)], [Control()], info.default_steps)[0]  # a real frame
        encode: dict[str, dict[str, Any]] = {}
        for fmt in FORMATS:
            code = pb.FRAME_FORMAT_JPEG if fmt == "jpeg" else pb.FRAME_FORMAT_RGB
            for factor in SIZE_FACTORS:
                w, h = info.width * factor, info.height * factor
                times, size = [], 0
                for _ in range(max(30, repeats)):
                    t0 = time.perf_counter()
                    size = len(encode_frame(frame, code, w, h, 85))
                    times.append((time.perf_counter() - t0) * 1000.0)
                fig = summarize(times)
                del fig["samples"]
                encode[encode_key(fmt, w, h)] = {**fig, "bytes": size}
        progress("measuring memory")
        sample = local.new_state(0)
        local.step([sample], [Control()], info.default_steps)
        state_bytes = _state_bytes(sample)
        ring_every, ring_copies = ring_for(
            int(_worker_default("memory_snapshot_every")),
            int(_worker_default("memory_snapshots")),
            int(float(_worker_default("memory_snapshot_mb")) * 2**20),
            int(info.extra.get("state_bytes", 0)),
        )
        rss_per_session: int | None = None
        if host is not None:
            rss_base = _rss_bytes(host.process.pid)
            extra = [host.new_state(1000 + i) for i in range(32)]
            for i in range(0, len(extra), max(sizes)):
                chunk = extra[i : i + max(sizes)]
                step_and_encode(
                    host,
                    chunk,
                    [Control()] * len(chunk),
                    info.default_steps,
                    [native] * len(chunk),
                    [Capture.NONE] * len(chunk),
                )
            grown = _rss_bytes(host.process.pid)
            if rss_base is not None and grown is not None:
                rss_per_session = max(0, grown - rss_base) // len(extra)
            del extra
        memory = {
            "state_bytes": state_bytes,
            "declared_state_bytes": int(info.extra.get("state_bytes", 0)),
            "declared_sample_bytes": int(info.extra.get("sample_bytes", 0)),
            "snapshot_bytes": len(local.snapshot(sample)),
            "ring_copies": ring_copies,
            "ring_every_frames": ring_every,
            "buffered_frames": int(_worker_default("window")) + int(_worker_default("out_queue")),
            "model_rss_bytes": rss_base,
            "rss_per_session_bytes": rss_per_session,
        }
    finally:
        if host is not None:
            host.close()
    batch_ms: dict[str, dict[str, Any]] = {}
    step_ms: dict[str, dict[str, float]] = {}
    for (steps, b), samples in sorted(walls.items()):
        batch_ms.setdefault(str(steps), {})[str(b)] = summarize(samples)
        step_ms.setdefault(str(steps), {})[str(b)] = round(
            float(np.median(steps_only[(steps, b)])), 4
        )
    return {
        "format": PROFILE_FORMAT,
        "model": {
            "id": model_id,
            "version": info.version,
            "width": info.width,
            "height": info.height,
            "fps": info.fps,
            "steps": list(info.steps),
            "default_steps": info.default_steps,
            "max_batch": info.max_batch,
        },
        "worker_class": worker_class,
        "where": "in process" if in_process else "model host",
        "step_threads": step_threads,
        "source": "measured: windflow profile",
        "measured_at": started.isoformat(timespec="seconds"),
        "duration_s": round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1),
        "repeats": repeats,
        "machine": machine,
        "revision": bench_results.revision(),
        "batch_ms": batch_ms,
        "step_ms": step_ms,
        "encode_ms": encode,
        "memory": memory,
    }


def write(record: dict[str, Any], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = profile_path(directory, record["model"]["id"], record["worker_class"])
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path
