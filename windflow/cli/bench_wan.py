"""``windflow bench wan``: stream frames from the causal Wan pipeline and report fps.

``--tiny`` uses the toy configuration (any machine); without it the full 1.3B runs with
random weights at 480x832 (needs a CUDA GPU). The last stdout line with ``--json`` is one
JSON object with at least "frames", "fps" and "key_parity" (the full-size key check).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser("wan", help="causal Wan streaming fps")
    parser.add_argument("--tiny", action="store_true", help="toy configuration (CPU is fine)")
    parser.add_argument("--frames", type=int, default=24, help="frames to stream (default 24)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default all)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument(
        "--kernels", choices=("auto", "torch", "cupy"), default="auto", help="kernel backend"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from services.worker.models.wan.bench import stream
    from services.worker.models.wan.config import wan21_t2v_1p3b
    from services.worker.models.wan.factory import build_random, load_tiny
    from services.worker.models.wan.parity import full_size_key_parity

    if args.frames < 12:
        print("error: --frames must be at least 12 (one chunk)", file=sys.stderr)
        return 2
    torch.set_grad_enabled(False)
    if args.tiny:
        model = load_tiny(seed=0, device=args.device or "cpu", kernels=args.kernels)
    else:
        if not torch.cuda.is_available():
            print("error: the full 1.3B benchmark needs a CUDA GPU; use --tiny", file=sys.stderr)
            return 2
        model = build_random(
            wan21_t2v_1p3b(dtype="bfloat16"), device=args.device or "cuda", kernels=args.kernels
        )
    result = stream(model, args.frames, args.steps)
    problems = full_size_key_parity()
    report = {
        "model": model.info.model_id,
        **result.as_dict(),
        "device": str(model.pipeline.device),
        "device_name": (
            torch.cuda.get_device_name(model.pipeline.device)
            if model.pipeline.device.type == "cuda"
            else "cpu"
        ),
        "kernels": model.pipeline.ops.backend,
        "key_parity": not problems,
    }
    for p in problems[:10]:
        print(f"key parity: {p}", file=sys.stderr)
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"{report['model']}: {result.frames} frames {result.height}x{result.width}, "
            f"{result.fps:.2f} fps sustained, first frame {result.first_frame_s * 1e3:.0f} ms, "
            f"key parity {'ok' if not problems else 'FAILED'}"
        )
    return 0 if not problems else 1
