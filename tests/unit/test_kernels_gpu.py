"""Each CuPy kernel against its torch reference on a GPU, with timings (skipped on CPU)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch

from kernels import reference as ref
from kernels.registry import cupy_available, cupy_ops

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cupy_available(), reason="needs a CUDA GPU visible to CuPy"),
]

DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2e-2, 2e-2)]


def _time(fn: Callable[[], object], reps: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e6


def _report(name: str, fast: Callable[[], object], slow: Callable[[], object]) -> None:
    print(f"{name}: cupy {_time(fast):.1f} us, torch {_time(slow):.1f} us")


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
def test_sampler_update(dtype: torch.dtype, atol: float, rtol: float) -> None:
    ops = cupy_ops()
    x, v, n = (torch.randn(1, 16, 3, 60, 104, device="cuda", dtype=dtype) for _ in range(3))
    for noise, sn in ((n, 0.625), (None, 0.0)):
        got = ops.sampler_update(x, v, 0.9375, sn, noise)
        want = ref.sampler_update(x, v, 0.9375, sn, noise)
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    _report("sampler_update", lambda: ops.sampler_update(x, v, 0.9, 0.6, n),
            lambda: ref.sampler_update(x, v, 0.9, 0.6, n))  # fmt: skip


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
def test_adaln_modulate(dtype: torch.dtype, atol: float, rtol: float) -> None:
    ops = cupy_ops()
    x = torch.randn(1, 3, 1560, 1536, device="cuda", dtype=dtype)
    shift, scale = (torch.randn(1, 3, 1536, device="cuda") for _ in range(2))
    got = ops.adaln_modulate(x, shift, scale, 1e-6)
    want = ref.adaln_modulate(x, shift, scale, 1e-6)
    torch.testing.assert_close(got, want, atol=max(atol, 1e-4), rtol=rtol)
    _report("adaln_modulate", lambda: ops.adaln_modulate(x, shift, scale),
            lambda: ref.adaln_modulate(x, shift, scale))  # fmt: skip


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
def test_rope_apply(dtype: torch.dtype, atol: float, rtol: float) -> None:
    ops = cupy_ops()
    grid = (3, 30, 52)
    x = torch.randn(1, 3 * 30 * 52, 12, 128, device="cuda", dtype=dtype)
    tables = ref.rope_tables(128, 117, *grid, device="cuda")
    got = ops.rope_apply(x, tables, *grid)
    want = ref.rope_apply(x, tables, *grid)
    torch.testing.assert_close(got, want, atol=max(atol, 1e-5), rtol=rtol)
    _report("rope_apply", lambda: ops.rope_apply(x, tables, *grid),
            lambda: ref.rope_apply(x, tables, *grid))  # fmt: skip


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPES)
def test_kv_ring_write(dtype: torch.dtype, atol: float, rtol: float) -> None:
    ops = cupy_ops()
    tpf = 1560
    sink, ring = 3 * tpf, 6 * tpf
    caches = [torch.randn(1, sink + ring, 12, 128, device="cuda", dtype=dtype) for _ in range(2)]
    mine = [c.clone() for c in caches]
    for written in (0, 3 * tpf, 12 * tpf, 17 * tpf):  # fill, sinks done, wrapped, mid-ring
        k, v = (torch.randn(1, 3 * tpf, 12, 128, device="cuda", dtype=dtype) for _ in range(2))
        ops.kv_ring_write(mine[0], mine[1], k, v, sink, ring, written)
        ref.kv_ring_write(caches[0], caches[1], k, v, sink, ring, written)
        assert torch.equal(mine[0], caches[0]) and torch.equal(mine[1], caches[1])
    _report("kv_ring_write", lambda: ops.kv_ring_write(mine[0], mine[1], k, v, sink, ring, 5 * tpf),
            lambda: ref.kv_ring_write(caches[0], caches[1], k, v, sink, ring, 5 * tpf))  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_tail(dtype: torch.dtype) -> None:
    ops = cupy_ops()
    rgb = (torch.randn(4, 3, 480, 832, device="cuda") * 0.8).to(dtype)
    u8 = ops.decode_to_uint8(rgb)
    assert torch.equal(u8, ref.decode_to_uint8(rgb))
    assert torch.equal(ops.rgb_to_yuv420(u8), ref.rgb_to_yuv420(u8))
    _report("decode_to_uint8", lambda: ops.decode_to_uint8(rgb),
            lambda: ref.decode_to_uint8(rgb))  # fmt: skip
    _report("rgb_to_yuv420", lambda: ops.rgb_to_yuv420(u8), lambda: ref.rgb_to_yuv420(u8))


def test_registry_picks_cupy_and_pipeline_matches_torch() -> None:
    import numpy as np

    from kernels.registry import KernelRegistry
    from services.worker.models.base import Control
    from services.worker.models.wan.factory import load_tiny

    assert KernelRegistry().backend_for("cuda") == "cupy"
    fast = load_tiny(seed=0, device="cuda")
    slow = load_tiny(seed=0, device="cuda", kernels="torch")
    assert fast.info.extra["kernels"] == "cupy" and slow.info.extra["kernels"] == "torch"
    a, b = fast.new_state(1), slow.new_state(1)
    fa = np.concatenate([fast.step([a], [Control()], 4) for _ in range(12)]).astype(int)
    fb = np.concatenate([slow.step([b], [Control()], 4) for _ in range(12)]).astype(int)
    assert np.abs(fa - fb).mean() < 2.0  # same pipeline, float rounding differences only
    again = fast.new_state(1)
    fc = np.concatenate([fast.step([again], [Control()], 4) for _ in range(12)]).astype(int)
    assert np.array_equal(fa, fc)  # deterministic on the GPU too
