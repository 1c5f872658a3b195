#!/usr/bin/env python
"""GPU benchmark of the causal Wan pipeline and its kernels (run on an H100 / H200).

    .venv/bin/python tools/bench_wan_gpu.py --frames 120 --out wan_gpu.json

1. Each CuPy kernel against its torch reference at 1.3B / 480x832 shapes: max error and
   time per call (CUDA events), CuPy vs torch eager.
2. The full 1.3B causal pipeline with random weights, bfloat16, 480x832, 3 latent frames
   per chunk, 4 steps (1000/750/500/250, shift 5), window 12 frames with 3 sink frames:
   first-frame latency and sustained fps, once with the CuPy kernels, once with torch's.

Prints one JSON object (also written to --out) with the device name; copy the numbers into
docs/wan.md. Needs nothing from the network.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernels import reference as ref  # noqa: E402
from kernels.registry import cupy_available, cupy_ops  # noqa: E402
from services.worker.models.wan.bench import stream  # noqa: E402
from services.worker.models.wan.config import wan21_t2v_1p3b  # noqa: E402
from services.worker.models.wan.factory import build_random  # noqa: E402


def cuda_time_us(fn: Callable[[], object], reps: int = 100) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e3


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def kernel_report() -> list[dict[str, object]]:
    ops = cupy_ops()
    dev = "cuda"
    bf = torch.bfloat16
    out: list[dict[str, object]] = []

    def add(name: str, err: float, fast: Callable[[], object], slow: Callable[[], object]) -> None:
        c, t = cuda_time_us(fast), cuda_time_us(slow)
        out.append({"kernel": name, "max_abs_err": err, "cupy_us": round(c, 2),
                    "torch_us": round(t, 2), "speedup": round(t / c, 2)})  # fmt: skip

    x, v, n = (torch.randn(1, 16, 3, 60, 104, device=dev) for _ in range(3))
    add("sampler_update", max_err(ops.sampler_update(x, v, 0.9, 0.6, n),
                                  ref.sampler_update(x, v, 0.9, 0.6, n)),
        lambda: ops.sampler_update(x, v, 0.9, 0.6, n),
        lambda: ref.sampler_update(x, v, 0.9, 0.6, n))  # fmt: skip

    h = torch.randn(1, 3, 1560, 1536, device=dev)
    sh, sc = (torch.randn(1, 3, 1536, device=dev) for _ in range(2))
    add("adaln_modulate", max_err(ops.adaln_modulate(h, sh, sc), ref.adaln_modulate(h, sh, sc)),
        lambda: ops.adaln_modulate(h, sh, sc), lambda: ref.adaln_modulate(h, sh, sc))  # fmt: skip

    grid = (3, 30, 52)
    q = torch.randn(1, 4680, 12, 128, device=dev, dtype=bf)
    tabs = ref.rope_tables(128, 120, *grid, device=dev)
    add("rope_apply", max_err(ops.rope_apply(q, tabs, *grid), ref.rope_apply(q, tabs, *grid)),
        lambda: ops.rope_apply(q, tabs, *grid), lambda: ref.rope_apply(q, tabs, *grid))  # fmt: skip

    ck, cv = (torch.zeros(1, 9 * 1560, 12, 128, device=dev, dtype=bf) for _ in range(2))
    k2, v2 = ck.clone(), cv.clone()
    nk, nv = (torch.randn(1, 4680, 12, 128, device=dev, dtype=bf) for _ in range(2))
    ops.kv_ring_write(ck, cv, nk, nv, 4680, 9360, 14040)
    ref.kv_ring_write(k2, v2, nk, nv, 4680, 9360, 14040)
    add("kv_ring_write", max(max_err(ck, k2), max_err(cv, v2)),
        lambda: ops.kv_ring_write(ck, cv, nk, nv, 4680, 9360, 14040),
        lambda: ref.kv_ring_write(k2, v2, nk, nv, 4680, 9360, 14040))  # fmt: skip

    rgb = (torch.randn(4, 3, 480, 832, device=dev) * 0.7).to(bf)
    u8 = ops.decode_to_uint8(rgb)
    add("decode_to_uint8", max_err(u8, ref.decode_to_uint8(rgb)),
        lambda: ops.decode_to_uint8(rgb), lambda: ref.decode_to_uint8(rgb))  # fmt: skip
    add("rgb_to_yuv420", max_err(ops.rgb_to_yuv420(u8), ref.rgb_to_yuv420(u8)),
        lambda: ops.rgb_to_yuv420(u8), lambda: ref.rgb_to_yuv420(u8))  # fmt: skip
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not (torch.cuda.is_available() and cupy_available()):
        print("error: needs a CUDA GPU visible to torch and CuPy", file=sys.stderr)
        return 2
    torch.set_grad_enabled(False)
    report: dict[str, object] = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
    }
    if not args.skip_kernels:
        report["kernels"] = kernel_report()
    cfg = wan21_t2v_1p3b(dtype="bfloat16")  # 480x832, chunk 3, 1000/750/500/250, window 12+3
    runs = []
    for backend in ("cupy", "torch"):
        model = build_random(cfg, device="cuda", kernels=backend)
        stream(model, 13, args.steps)  # warm-up: first chunk, allocator, cuBLAS/SDPA setup
        result = stream(model, args.frames, args.steps, seed=1)
        runs.append({"kernels": backend, **result.as_dict()})
        del model
        torch.cuda.empty_cache()
    report["pipeline"] = runs
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
