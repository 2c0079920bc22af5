"""The fused CPU ops of idefics/cpu/csrc/norm_rope.cpp against the eager code they replace, bit for bit: RMSNorm
(`F.rms_norm` on float32, ATen's summation order) and rotary embeddings written into the KV cache
(`apply_rotary` then `KVCache.update`). Layers use them only for inference; with gradients they keep the eager
ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from idefics.cpu import kernels
from idefics.layers import KVCache, RMSNorm, RotaryEmbedding, apply_rotary

pytestmark = pytest.mark.skipif(not kernels.fused_ops_available(),
                                reason="neither CPU extension here (no AVX-512 BF16 nor AVX2), or IDEFICS_CPU_KERNELS=0")


def eager_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    y = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        y = y.to(weight.dtype)
    return weight * y


@pytest.mark.parametrize("d", [8, 17, 64, 96, 100, 1024, 1280, 3000, 4096, 11008, 70000])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_bit_identical_to_eager(d, x_dtype, w_dtype):
    gen = torch.Generator().manual_seed(d)
    # rows of very different scales: the cascade of partial sums matters most there
    x = (torch.randn(9, d, generator=gen) * torch.logspace(-3, 2, 9)[:, None]).to(x_dtype)
    w = (1 + 0.1 * torch.randn(d, generator=gen)).to(w_dtype)
    for eps in (1e-6, 1e-5):
        out, want = kernels.rms_norm(x, w, eps), eager_rms_norm(x, w, eps)
        assert out.dtype == want.dtype and torch.equal(out, want), (d, eps)


@pytest.mark.parametrize("threads", [1, 2])
def test_rms_norm_module_uses_the_op_for_inference_only(threads, monkeypatch):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        norm = RMSNorm(1024).to(torch.bfloat16)
        norm.weight.data.normal_(1, 0.1)
        x = torch.randn(3, 130, 1024).bfloat16()
        calls = []
        real = kernels.rms_norm
        monkeypatch.setattr(kernels, "rms_norm", lambda *a: calls.append(1) or real(*a))
        with torch.inference_mode():
            fused = norm(x)
        assert calls and torch.equal(fused, eager_rms_norm(x, norm.weight, norm.eps))
        calls.clear()
        x.requires_grad_(True)
        norm(x).float().sum().backward()  # training: the eager ops, with a gradient
        assert not calls and x.grad is not None and norm.weight.grad is not None
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,t,h,kv,d", [(1, 1, 16, 16, 64), (2, 7, 4, 2, 32), (3, 5, 8, 8, 128),
                                        (1, 130, 16, 4, 96), (2, 1, 32, 32, 128)])
def test_rotary_into_cache_bit_identical_to_eager(dtype, b, t, h, kv, d):
    gen = torch.Generator().manual_seed(b * 100 + t + h + d)
    start = 3
    positions = torch.arange(start, start + t)[None] + torch.arange(b)[:, None]  # rows at different positions
    cos, sin = RotaryEmbedding(d)(positions, dtype)
    qkv = (3 * torch.randn(b, t, (h + 2 * kv) * d, generator=gen)).to(dtype)
    q, k, v = qkv.split([h * d, kv * d, kv * d], -1)  # strided views, as the fused projection gives them
    fused, eager = (KVCache(3, b, kv, start + t + 2, d, dtype, "cpu") for _ in range(2))
    fused.length = eager.length = start
    got = fused.rotate_and_update(1, q, k, v, (cos, sin))
    heads = [p.view(b, t, -1, d).transpose(1, 2) for p in (q, k, v)]
    want = (apply_rotary(heads[0], cos, sin), *eager.update(1, apply_rotary(heads[1], cos, sin), heads[2]))
    for a, e in zip(got, want):
        assert a.shape == e.shape and torch.equal(a, e)
    assert torch.equal(fused.keys, eager.keys) and torch.equal(fused.values, eager.values)


def test_rotary_into_cache_bad_inputs_name_the_problem():
    cache = KVCache(2, 1, 4, 8, 16, torch.float32, "cpu")
    q = torch.randn(1, 1, 64)
    cos, sin = RotaryEmbedding(16)(torch.tensor([[0]]), torch.float32)
    cache.length = 8
    with pytest.raises(ValueError, match="KV cache is full: 9 positions needed, 8 allocated"):
        cache.rotate_and_update(0, q, q, q, (cos, sin))
    with pytest.raises(RuntimeError, match="positions 7..8 of layer 2"):
        kernels.rotary_into_cache(q, q, q, cos, sin, cache.keys, cache.values, 2, 7)
    with pytest.raises(RuntimeError, match="every tensor must be Float"):
        kernels.rotary_into_cache(q, q, q.bfloat16(), cos, sin, cache.keys, cache.values, 0, 0)
    with pytest.raises(RuntimeError, match="weight of shape \\[3\\] for 64 features"):
        kernels.rms_norm(q, torch.ones(3), 1e-6)
