"""Why the worker runs its models in model hosts, measured: the model step beside a thread
that runs Python (as the worker's event loop does), in this process and in a model host;
and what a model host costs per call.

    .venv/bin/python tools/bench_model_host.py [--model windflow-world] [--steps 2] [--json]

For batch 1 and 8, median ms per ``step_and_encode``:
  alone           the model in this process, nothing else running;
  beside python   the same while another thread of this process runs Python in bursts
                  (0.3 ms of every 1.3 ms, about what an event loop serving frames does);
  host            the model in a model host, called from here;
  host beside     the same, with the Python thread running here.
And a host's round trip for an empty request after idle gaps of 1, 5 and 35 ms (35: a 24
fps session's gap between frames), and what keeping a session's state costs in a host at
batch 8 (each session's state captured after the step, as the worker does for its
in-memory snapshots and checkpoints): a copy kept in the host (``Capture.COPY``) against
snapshot bytes sent back (``Capture.SNAPSHOT``), ms per capture over the plain call.
Ratios are taken within one run (the machine is shared). docs/runtime.md, "Model hosts",
records a run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Callable

import torch

from services.worker import stepping
from services.worker.model_host import ModelHost
from services.worker.models.base import Control, WorldModel
from services.worker.models.registry import load_model
from windflow.common.malloc import keep_freed_memory

BURST_S = 0.0003
PAUSE_S = 0.001


class PythonBursts:
    """A thread that runs pure Python for BURST_S, then sleeps PAUSE_S, until stopped."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            end = time.perf_counter() + BURST_S
            x = 0
            while time.perf_counter() < end:
                x += 1
            time.sleep(PAUSE_S)

    def __enter__(self) -> PythonBursts:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def batch_call(
    model: WorldModel, batch: int, steps: int, capture: stepping.Capture = stepping.Capture.NONE
) -> Callable[[], object]:
    states = [model.new_state(seed) for seed in range(batch)]
    encodings = [stepping.native_encoding(model)] * batch
    controls = [Control()] * batch
    mask = [capture] * batch
    return lambda: stepping.step_and_encode(model, states, controls, steps, encodings, mask)


def capture_costs(host: ModelHost, args: argparse.Namespace) -> dict[str, float]:
    """Extra ms per captured session state: each kind's call against the plain one, the
    three interleaved round by round so that the machine's drift hits all alike."""
    kinds = {
        "none": stepping.Capture.NONE,
        "copy": stepping.Capture.COPY,
        "snapshot": stepping.Capture.SNAPSHOT,
    }
    calls = {name: batch_call(host, 8, args.steps, kind) for name, kind in kinds.items()}
    times: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(args.repeats):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - t0) * 1000.0)
    plain = statistics.median(times["none"])
    return {name: (statistics.median(times[name]) - plain) / 8 for name in ("copy", "snapshot")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="windflow-world")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    keep_freed_memory()
    local = load_model(args.model)
    host = ModelHost(args.model)
    out: dict[str, object] = {"model": args.model, "steps": args.steps}
    try:
        for batch in (1, 8):
            here = batch_call(local, batch, args.steps)
            there = batch_call(host, batch, args.steps)
            row = {"alone": median_ms(here, args.repeats)}
            with PythonBursts():
                row["beside_python"] = median_ms(here, args.repeats)
            row["host"] = median_ms(there, args.repeats)
            with PythonBursts():
                row["host_beside_python"] = median_ms(there, args.repeats)
            out[f"batch_{batch}_ms"] = row
            print(
                f"batch {batch}: alone {row['alone']:.2f} ms, beside python "
                f"{row['beside_python']:.2f} ({row['beside_python'] / row['alone']:.2f}x), "
                f"host {row['host']:.2f} ({row['host'] / row['alone']:.2f}x), host beside "
                f"python {row['host_beside_python']:.2f} "
                f"({row['host_beside_python'] / row['alone']:.2f}x)",
                flush=True,
            )
        rtt = {}
        for gap_ms in (1, 5, 35):
            times = []
            for _ in range(args.repeats):
                time.sleep(gap_ms / 1000.0)
                t0 = time.perf_counter()
                host.live_states()
                times.append((time.perf_counter() - t0) * 1e6)
            rtt[str(gap_ms)] = statistics.median(times)
        out["host_round_trip_us_after_idle_ms"] = rtt
        print(
            "host round trip after idle "
            + ", ".join(f"{k} ms: {v:.0f} us" for k, v in rtt.items()),
            flush=True,
        )
        out["capture_ms_each_batch_8"] = captures = capture_costs(host, args)
        print(
            "host, batch 8, per session captured: "
            + ", ".join(f"{k} {v:.3f} ms" for k, v in captures.items()),
            flush=True,
        )
    finally:
        host.close()
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
