"""The single-query attention kernel (idefics/cpu/csrc/attention.cpp) against float32
`scaled_dot_product_attention` on the same inputs: float32 outputs equal to float32 rounding, bf16 outputs within
one bf16 rounding step; with masks (boolean, additive), grouped-query heads and strided views of the
position-major KV cache. Decoding uses it; the logits of a decoding step stay those of the SDPA path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.helpers import decode_with_logits

import idefics
from idefics.cpu import kernels, ops
from idefics.layers import KVCache, attention

pytestmark = pytest.mark.skipif(not kernels.fused_ops_available(),
                                reason="neither CPU extension here (no AVX-512 BF16 nor AVX2), or IDEFICS_CPU_KERNELS=0")


def sdpa32(q, k, v, mask):
    if mask is not None and mask.is_floating_point():
        mask = mask.float()
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                          enable_gqa=k.shape[1] != q.shape[1])


def cache_views(b, kv, length, d, dtype, gen):
    """k, v as a decoding layer sees them: [B, kv, L, d] strided views of a position-major cache."""
    cache = KVCache(2, b, kv, length + 5, d, dtype, "cpu")
    cache.keys.copy_(torch.randn(cache.keys.shape, generator=gen))
    cache.values.copy_(torch.randn(cache.values.shape, generator=gen))
    return cache.layer(1, length)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,h,kv,length,d", [(1, 16, 16, 150, 64), (2, 8, 2, 33, 128), (3, 4, 4, 1, 16),
                                             (1, 32, 8, 517, 128), (2, 16, 16, 64, 96)])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "broadcast"])
def test_matches_float32_sdpa(dtype, b, h, kv, length, d, mask_kind):
    gen = torch.Generator().manual_seed(b * 1000 + h * 10 + length)
    q = (2 * torch.randn(b, h, 1, d, generator=gen)).to(dtype)
    k, v = cache_views(b, kv, length, d, dtype, gen)
    visible = torch.rand(b, 1, 1, length, generator=gen) > 0.4
    visible[..., -1] = True  # a query always sees itself
    mask = {"none": None, "bool": visible, "broadcast": visible[:1],
            "additive": torch.where(visible, 0.0, torch.finfo(dtype).min).to(dtype)}[mask_kind]
    out, want = kernels.decode_attention(q, k, v, mask), sdpa32(q, k, v, mask)
    assert out.shape == (b, h, 1, d) and out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, want, rtol=1e-5, atol=4e-6)  # ~30 float32 ulps of |v| ~ 1
    else:  # one bf16 rounding of (nearly) the same float32 value
        exponent = torch.floor(torch.log2(want.abs().clamp(min=2.0**-100)))
        assert bool(((out.float() - want).abs() <= 2.0 ** (exponent - 7) * 1.01).all())


@pytest.mark.parametrize("b,h,kv", [(1, 16, 16), (3, 8, 2), (5, 4, 1), (2, 6, 3)])
def test_same_bits_on_any_number_of_threads(b, h, kv):
    """Threads split the (row, kv head) pairs, mid-row too: every head's arithmetic stays the same."""
    gen = torch.Generator().manual_seed(b * 100 + kv)
    q = torch.randn(b, h, 1, 32, generator=gen).bfloat16()
    k, v = cache_views(b, kv, 70, 32, torch.bfloat16, gen)
    visible = torch.rand(b, 1, 1, 70, generator=gen) > 0.3
    before, outs = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(kernels.decode_attention(q, k, v, visible))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[1].float(), sdpa32(q, k, v, visible), rtol=1e-2, atol=1e-2)


def test_attention_uses_the_kernel_for_single_queries_only(monkeypatch):
    calls = []
    real = kernels.decode_attention
    monkeypatch.setattr(kernels, "decode_attention", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(0)
    k, v = cache_views(1, 4, 20, 32, torch.bfloat16, gen)
    with torch.inference_mode():
        attention(torch.randn(1, 4, 1, 32).bfloat16(), k, v)
        assert len(calls) == 1
        attention(torch.randn(1, 4, 3, 32).bfloat16(), k, v)  # prefill: SDPA
        attention(torch.randn(1, 4, 1, 32).bfloat16(), k, v, torch.ones(1, 4, 1, 20, dtype=torch.bool))  # per head
        assert len(calls) == 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decoding_steps_match_the_sdpa_path(reference_checkpoint, images, dtype, monkeypatch):
    """A whole model decoding a padded batch with images: the kernel's steps give the SDPA path's tokens, and its
    logits to float32 rounding (float32) or to bf16 rounding propagated through the layers (bf16)."""
    pipe = idefics.load(reference_checkpoint("small_9b")[0], dtype=dtype)
    inputs = pipe.processor([["User:", images[0], "Describe this image."], ["The quick brown fox", images[1]]])
    calls = []
    real = kernels.decode_attention
    monkeypatch.setattr(kernels, "decode_attention", lambda *a: calls.append(1) or real(*a))
    # the layers' Python code (the C++ steps call the kernel from C++; tests/cpu/test_decoder_layer.py pins them to it)
    monkeypatch.setattr(ops, "decoder_layer_step", lambda *a: None)
    monkeypatch.setattr(ops, "gated_cross_attention_step", lambda *a: None)
    tokens, logits = decode_with_logits(pipe.model, inputs, 6)
    layer_count = pipe.model.config.num_hidden_layers + len(pipe.model.model.gated_cross_attn_layers)
    assert len(calls) == 5 * layer_count  # self- and cross-attention of every step
    monkeypatch.setattr(ops, "decode_attention", lambda *a: None)
    plain_tokens, plain_logits = decode_with_logits(pipe.model, inputs, 6)
    assert len(calls) == 5 * layer_count  # none more
    assert torch.equal(tokens, plain_tokens)
    tolerance = 1e-5 if dtype == "float32" else 0.05
    torch.testing.assert_close(logits[:, 1:], plain_logits[:, 1:], rtol=tolerance, atol=tolerance)  # the steps


def test_bad_inputs_name_the_problem():
    q = torch.randn(1, 4, 1, 32)
    k = torch.randn(1, 4, 10, 32)
    with pytest.raises(RuntimeError, match="mask must be \\[B or 1, 1, 1, 10\\]"):
        kernels.decode_attention(q, k, k, torch.ones(1, 1, 1, 9, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="q, k, v must be Float"):
        kernels.decode_attention(q, k.bfloat16(), k, None)
    with pytest.raises(RuntimeError, match="d a multiple of 16"):
        kernels.decode_attention(torch.randn(1, 4, 1, 8), torch.randn(1, 3, 10, 8), torch.randn(1, 3, 10, 8), None)
