"""``windflow kernels``: list the CuPy RawKernels and compile them ahead of time.

``windflow kernels compile --arch sm_90`` compiles every source to a cubin with NVRTC (no
GPU needed) and exits non-zero, naming the failures, if any source or entry point fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser("kernels", help="CUDA kernels (CuPy)")
    ksub = parser.add_subparsers(dest="kernels_command", required=True)

    comp = ksub.add_parser("compile", help="compile every RawKernel to a cubin with NVRTC")
    comp.add_argument("--arch", default="sm_90", help="target architecture (default sm_90)")
    comp.add_argument("--out", type=Path, default=None, help="write the cubins here")
    comp.add_argument("--json", action="store_true", help="print one JSON object")
    comp.set_defaults(func=_compile)

    lst = ksub.add_parser("list", help="list kernel sources, entries and the active backend")
    lst.set_defaults(func=_list)


def _compile(args: argparse.Namespace) -> int:
    from kernels.compile import NvrtcUnavailable, compile_all

    try:
        results = compile_all(args.arch, args.out)
    except NvrtcUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = [r for r in results if not r.ok]
    if args.json:
        print(
            json.dumps(
                {"arch": args.arch, "ok": not failed, "kernels": [r.as_dict() for r in results]}
            )
        )
    else:
        for r in results:
            status = "ok" if r.ok else "FAILED"
            print(f"{status:6} {r.name:16} {r.cubin_bytes:8d} B  {r.seconds * 1e3:7.1f} ms")
    for r in failed:
        missing = f" (missing entries: {', '.join(r.missing_entries)})" if r.missing_entries else ""
        print(f"error: {r.filename} failed for {args.arch}{missing}\n{r.log}", file=sys.stderr)
    return 1 if failed else 0


def _list(args: argparse.Namespace) -> int:
    from kernels.registry import DEFAULT_REGISTRY, KERNEL_NAMES
    from kernels.sources import SOURCES

    backend = DEFAULT_REGISTRY.backend_for("cuda")
    print(f"backend on cuda: {backend}; ops: {', '.join(KERNEL_NAMES)}")
    for src in SOURCES:
        print(f"{src.name:16} {src.filename:20} {', '.join(src.entries)}")
    return 0
