"""Ahead-of-time compile of every RawKernel source to a cubin with NVRTC.

Needs only the NVRTC library (the ``nvidia-cuda-nvrtc-cu12`` wheel), not a GPU or driver,
so CI proves each kernel compiles for the target architecture.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from kernels.sources import SOURCES, KernelSource


@dataclass(frozen=True, slots=True)
class CompileResult:
    name: str
    filename: str
    ok: bool
    cubin_bytes: int
    seconds: float
    missing_entries: tuple[str, ...]
    log: str

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "file": self.filename,
            "ok": self.ok,
            "cubin_bytes": self.cubin_bytes,
            "seconds": round(self.seconds, 4),
            "missing_entries": list(self.missing_entries),
            "log": self.log,
        }


class NvrtcUnavailable(RuntimeError):
    """NVRTC cannot be loaded (install the nvidia-cuda-nvrtc wheel)."""


def _nvrtc() -> object:
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # ImportError or a missing libnvrtc.so
        raise NvrtcUnavailable(f"NVRTC is not available: {exc}") from exc
    return nvrtc


def compile_source(src: KernelSource, arch: str, out_dir: Path | None = None) -> CompileResult:
    """Compile one source for ``arch`` (e.g. ``sm_90``); write ``<name>.<arch>.cubin``."""
    nvrtc = _nvrtc()
    start = time.perf_counter()
    prog = nvrtc.createProgram(src.text(), src.filename, [], [])  # type: ignore[attr-defined]
    try:
        try:
            nvrtc.compileProgram(prog, [f"-arch={arch}", "--std=c++17"])  # type: ignore[attr-defined]
        except Exception as exc:
            log = nvrtc.getProgramLog(prog)  # type: ignore[attr-defined]
            return CompileResult(
                src.name, src.filename, False, 0, time.perf_counter() - start, src.entries,
                f"{exc}\n{log}".strip(),
            )  # fmt: skip
        cubin: bytes = nvrtc.getCUBIN(prog)  # type: ignore[attr-defined]
        log = nvrtc.getProgramLog(prog).strip()  # type: ignore[attr-defined]
    finally:
        nvrtc.destroyProgram(prog)  # type: ignore[attr-defined]
    seconds = time.perf_counter() - start
    # extern "C" entries keep their names in the ELF symbol table.
    missing = tuple(e for e in src.entries if e.encode() + b"\x00" not in cubin)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{src.name}.{arch}.cubin").write_bytes(cubin)
    ok = cubin[:4] == b"\x7fELF" and not missing
    return CompileResult(src.name, src.filename, ok, len(cubin), seconds, missing, log)


def compile_all(arch: str, out_dir: Path | None = None) -> list[CompileResult]:
    return [compile_source(src, arch, out_dir) for src in SOURCES]
