"""CPU tests of the kernel layer: reference semantics, backend selection, NVRTC compile."""

from __future__ import annotations

import json

import pytest
import torch

from kernels import reference as ref
from kernels.compile import compile_all, compile_source
from kernels.registry import KernelRegistry
from kernels.sources import SOURCES, KernelSource
from windflow.cli import main as cli_main


def test_sampler_update_is_x0_renoised() -> None:
    g = torch.Generator().manual_seed(0)
    x, v, n = (torch.randn(2, 16, 3, 4, 6, generator=g) for _ in range(3))
    x0 = x - 0.9375 * v
    torch.testing.assert_close(ref.sampler_update(x, v, 0.9375, 0.0, None), x0)
    out = ref.sampler_update(x, v, 0.9375, 0.625, n)
    torch.testing.assert_close(out, 0.375 * x0 + 0.625 * n)
    # Exact when the model predicts the true flow: x_t = (1-s) x0 + s n, v = n - x0.
    clean = torch.randn(8, generator=g)
    noise = torch.randn(8, generator=g)
    xt = 0.25 * clean + 0.75 * noise
    torch.testing.assert_close(ref.sampler_update(xt, noise - clean, 0.75, 0.0, None), clean)


def test_adaln_modulate_normalizes_then_modulates() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 5, 32, generator=g) * 3 + 1
    zero = torch.zeros(1, 2, 32)
    y = ref.adaln_modulate(x, zero, zero)
    torch.testing.assert_close(y.mean(-1), torch.zeros(1, 2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(1, 2, 5), atol=1e-3, rtol=0)
    shift = torch.randn(1, 2, 32, generator=g)
    scale = torch.randn(1, 2, 32, generator=g)
    out = ref.adaln_modulate(x, shift, scale)
    torch.testing.assert_close(out, y * (1 + scale[:, :, None]) + shift[:, :, None])


def test_rope_split_matches_wan() -> None:
    assert ref.rope_split(128) == (22, 21, 21)  # 44/42/42 of the head dim
    assert ref.rope_split(16) == (4, 2, 2)


def test_rope_is_a_relative_rotation() -> None:
    g = torch.Generator().manual_seed(2)
    d, grid = 16, (3, 2, 2)
    q = torch.randn(1, 12, 2, d, generator=g)
    k = torch.randn(1, 12, 2, d, generator=g)
    at0 = ref.rope_tables(d, 0, *grid)
    at7 = ref.rope_tables(d, 7, *grid)
    # Norm-preserving, identity at position 0 of every axis.
    r = ref.rope_apply(q, at0, *grid)
    torch.testing.assert_close(r.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(r[:, 0], q[:, 0])
    assert not torch.allclose(r[:, 1], q[:, 1])
    # Scores depend only on the frame offset difference.
    s0 = (ref.rope_apply(q, at0, *grid) * ref.rope_apply(k, at0, *grid)).sum(-1)
    s7 = (ref.rope_apply(q, at7, *grid) * ref.rope_apply(k, at7, *grid)).sum(-1)
    torch.testing.assert_close(s0, s7, atol=1e-4, rtol=1e-4)


def test_kv_ring_write_keeps_sinks_and_rolls() -> None:
    sink, ring = 2, 4
    ck = torch.zeros(1, sink + ring, 1, 1)
    cv = torch.zeros_like(ck)
    written = 0
    for chunk in range(4):  # 4 chunks of 2 tokens: values are the global token index
        new = torch.arange(written, written + 2, dtype=torch.float32).view(1, 2, 1, 1)
        ref.kv_ring_write(ck, cv, new, -new, sink, ring, written)
        written += 2
        assert chunk >= 0
    # Tokens 0,1 are sinks; the ring holds the last 4 (4..7) at slots 2 + (g - 2) % 4.
    assert ck.flatten().tolist() == [0, 1, 6, 7, 4, 5]
    assert cv.flatten().tolist() == [0, -1, -6, -7, -4, -5]
    with pytest.raises(ValueError):
        ref.kv_ring_write(ck, cv, torch.zeros(1, 5, 1, 1), torch.zeros(1, 5, 1, 1), 2, 4, 8)


def test_decode_tail_and_yuv() -> None:
    rgb = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0, 0.5]).view(1, 3, 1, 2)
    u8 = ref.decode_to_uint8(rgb)
    assert u8.shape == (1, 1, 2, 3) and u8.dtype == torch.uint8
    assert u8.flatten().tolist() == [0, 128, 255, 0, 255, 191]  # pixel-major RGB
    colors = {(255, 255, 255): (235, 128, 128), (0, 0, 0): (16, 128, 128),
              (255, 0, 0): (82, 90, 240)}  # fmt: skip
    for (r, g, b), (y, u, v) in colors.items():
        img = torch.tensor([r, g, b], dtype=torch.uint8).expand(1, 2, 4, 3).contiguous()
        yuv = ref.rgb_to_yuv420(img)
        assert yuv.shape == (1, 12)
        assert yuv[0, :8].tolist() == [y] * 8
        assert yuv[0, 8:].tolist() == [u, u, v, v]


def test_registry_picks_torch_without_cuda() -> None:
    reg = KernelRegistry()
    assert reg.backend_for("cpu") == "torch"
    assert reg.ops("cpu").sampler_update is ref.sampler_update
    assert KernelRegistry(prefer="torch").backend_for("cuda") == "torch"
    with pytest.raises(ValueError):
        KernelRegistry(prefer="cupy").backend_for("cpu")
    if not torch.cuda.is_available():
        assert reg.backend_for("cuda") == "torch"


def test_every_kernel_compiles_to_sm90_cubin(tmp_path) -> None:
    results = compile_all("sm_90", tmp_path)
    assert [r.name for r in results] == [s.name for s in SOURCES]
    for r in results:
        assert r.ok, r.log
        assert (tmp_path / f"{r.name}.sm_90.cubin").read_bytes()[:4] == b"\x7fELF"


def test_broken_kernel_fails_loudly(monkeypatch, capsys, tmp_path) -> None:
    bad = tmp_path / "bad.cu"
    bad.write_text('extern "C" __global__ void oops(float* x) { x[0] = undefined_name; }\n')
    monkeypatch.setattr("kernels.sources.CUDA_DIR", tmp_path)
    (tmp_path / "prelude.cu").write_text("")
    from kernels import sources

    sources.full_source.cache_clear()
    try:
        src = KernelSource("bad", "bad.cu", ("oops",))
        result = compile_source(src, "sm_90")
        assert not result.ok and "undefined_name" in result.log
        missing = compile_source(KernelSource("bad", "bad.cu", ("oops", "absent")), "sm_90")
        assert not missing.ok
        monkeypatch.setattr("kernels.compile.SOURCES", (src,))
        assert cli_main(["kernels", "compile", "--arch", "sm_90"]) == 1
        assert "bad.cu failed" in capsys.readouterr().err
    finally:
        sources.full_source.cache_clear()


def test_cli_compile_json(capsys) -> None:
    assert cli_main(["kernels", "compile", "--arch", "sm_90", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["ok"] and len(report["kernels"]) == len(SOURCES)
