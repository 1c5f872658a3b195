"""The CUDA sources of Windflow's RawKernels and the entry points each one defines.

Every source is a ``.cu`` file under ``kernels/cuda/``; ``prelude.cu`` is prepended so a
source compiles with NVRTC alone (no CUDA toolkit headers), on a GPU or without one.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

CUDA_DIR = Path(__file__).resolve().parent / "cuda"


@dataclass(frozen=True, slots=True)
class KernelSource:
    """One ``.cu`` file and the ``extern "C"`` kernels it must define."""

    name: str
    filename: str
    entries: tuple[str, ...]

    def text(self) -> str:
        return full_source(self.filename)


SOURCES: tuple[KernelSource, ...] = (
    KernelSource(
        "sampler_update", "sampler_update.cu", ("sampler_update_f32", "sampler_update_bf16")
    ),
    KernelSource(
        "adaln_modulate", "adaln_modulate.cu", ("adaln_modulate_f32", "adaln_modulate_bf16")
    ),
    KernelSource("rope_apply", "rope_apply.cu", ("rope_apply_f32", "rope_apply_bf16")),
    KernelSource("kv_ring_write", "kv_ring_write.cu", ("kv_ring_write_f32", "kv_ring_write_bf16")),
    KernelSource(
        "decode_tail",
        "decode_tail.cu",
        ("decode_to_uint8_f32", "decode_to_uint8_bf16", "rgb_to_yuv420"),
    ),
)


def source_by_name(name: str) -> KernelSource:
    for src in SOURCES:
        if src.name == name:
            return src
    raise KeyError(f"no kernel source named {name!r}")


@cache
def full_source(filename: str) -> str:
    common = (CUDA_DIR / "prelude.cu").read_text()
    body = (CUDA_DIR / filename).read_text()
    return f'{common}\n#line 1 "{filename}"\n{body}'
