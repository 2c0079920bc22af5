"""A decoder layer's and a gated cross-attention layer's decoding step as one C++ op each
(idefics/cpu/csrc/decoder_layer.cpp) give what the Python layers give, bit for bit: the layer output and the cache it
writes, for float32, bf16 and int8 weights, grouped-query heads, masks, rows that see no image and several rows; a
whole model decodes the same tokens and logits with them. Layers that are not packed for the CPU kernel, or that
need gradients, run the Python code."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import decode_with_logits
from torch import nn

import idefics
from idefics.cpu import kernels, ops, steps
from idefics.cpu.packing import pack_for_cpu
from idefics.cpu.quantize import FusedInt8Linear, Int8Linear, fuse_int8, replace_module
from idefics.cross_attention import GatedCrossAttentionLayer, image_mask_to_additive
from idefics.language_model import DecoderLayer
from idefics.layers import KVCache, RotaryEmbedding

pytestmark = pytest.mark.skipif(not kernels.fused_ops_available(),
                                reason="neither CPU extension here (no AVX-512 BF16 nor AVX2), or IDEFICS_CPU_KERNELS=0")


def packed_layer(dim: int, heads: int, kv_heads: int, hidden: int, dtype: torch.dtype, seed: int,
                 int8: bool = False) -> DecoderLayer:
    """A random layer packed as `idefics.load` packs it; `int8`: its projections quantized and fused as
    `quantize_model` does."""
    holder = nn.Module()  # pack_for_cpu packs the modules under `.model`
    holder.model = nn.ModuleList([DecoderLayer(dim, hidden, heads, kv_heads, 1e-6)])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in holder.named_parameters():
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen) if p.dim() == 1 else
                    0.05 * torch.randn(p.shape, generator=gen))
    holder = holder.to(dtype)
    if int8:
        for name, module in list(holder.named_modules()):
            if isinstance(module, nn.Linear):
                replace_module(holder, name, Int8Linear.from_weight(module.weight))
        return fuse_int8(holder).model[0]
    return pack_for_cpu(holder).model[0]


def python_step(layer: nn.Module, *args) -> torch.Tensor:
    """The layer's output from the Python code of its forward (the compiled steps switched off)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "decoder_layer_step", lambda *a: None)
        patch.setattr(ops, "gated_cross_attention_step", lambda *a: None)
        return layer(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "int8"])
@pytest.mark.parametrize("dim,heads,kv_heads,hidden,rows", [(256, 4, 4, 512, 1), (256, 8, 2, 384, 3),
                                                            (1024, 16, 16, 2816, 2)])
@pytest.mark.parametrize("masked", [False, True])
def test_step_bit_identical_to_the_python_layer(dtype, dim, heads, kv_heads, hidden, rows, masked):
    int8 = dtype == "int8"  # int8 weights, bf16 activations
    dtype = torch.bfloat16 if int8 else dtype
    layer = packed_layer(dim, heads, kv_heads, hidden, dtype, seed=dim + rows, int8=int8)
    assert int8 == isinstance(layer.self_attn.qkv_proj, FusedInt8Linear)
    head_dim, past = dim // heads, 11
    caches = [KVCache(3, rows, kv_heads, 20, head_dim, dtype, "cpu") for _ in range(2)]
    gen = torch.Generator().manual_seed(1)
    for cache in caches:
        cache.keys.copy_(torch.randn(cache.keys.shape, generator=torch.Generator().manual_seed(2)))
        cache.values.copy_(torch.randn(cache.values.shape, generator=torch.Generator().manual_seed(3)))
        cache.length = past
    x = torch.randn(rows, 1, dim, generator=gen).to(dtype)
    rope = RotaryEmbedding(head_dim)(torch.arange(rows)[:, None] + past, dtype)  # rows at different positions
    mask = None
    if masked:
        mask = torch.ones(rows, 1, 1, past + 1, dtype=torch.bool)
        mask[0, ..., :4] = False  # left padding of the first row
    calls = []
    real = kernels.decoder_layer_step
    with torch.inference_mode():
        kernels.decoder_layer_step = lambda *a: calls.append(1) or real(*a)
        try:
            fused = layer(x, rope, mask, caches[0], 2)
        finally:
            kernels.decoder_layer_step = real
        plain = python_step(layer, x, rope, mask, caches[1], 2)
    assert calls and torch.equal(fused, plain)
    assert torch.equal(caches[0].keys, caches[1].keys) and torch.equal(caches[0].values, caches[1].values)


def packed_cross_layer(dim: int, heads: int, hidden: int, image_dim: int, qk_norms: bool, dtype: torch.dtype | str,
                       seed: int) -> GatedCrossAttentionLayer:
    """A random gated cross-attention layer (non-zero gates) packed as `idefics.load` packs it, or int8."""
    holder = nn.Module()
    holder.model = nn.ModuleList([GatedCrossAttentionLayer(dim, hidden, image_dim, heads, qk_norms, 1e-6)])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in holder.named_parameters():
            p.copy_(0.5 + 0.1 * torch.randn(p.shape, generator=gen) if p.dim() == 1 else
                    0.05 * torch.randn(p.shape, generator=gen))
    holder = holder.to(torch.bfloat16 if dtype == "int8" else dtype)
    if dtype == "int8":
        for name, module in list(holder.named_modules()):
            if isinstance(module, nn.Linear):
                replace_module(holder, name, Int8Linear.from_weight(module.weight))
        return fuse_int8(holder).model[0]
    return pack_for_cpu(holder).model[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "int8"])
@pytest.mark.parametrize("qk_norms", [False, True])
@pytest.mark.parametrize("sees_images", ["all", "some", "none"])
def test_cross_attention_step_bit_identical_to_the_python_layer(dtype, qk_norms, sees_images):
    layer = packed_cross_layer(256, 4, 384, 96, qk_norms, dtype, seed=7)
    x_dtype = torch.bfloat16 if dtype == "int8" else dtype
    rows, images, latents = 3, 2, 5
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(rows, 1, 256, generator=gen).to(x_dtype)
    kv = mask = gate = None
    if sees_images != "none":
        with torch.inference_mode():
            kv = layer.cross_attn.project_images(torch.randn(rows, images * latents, 96, generator=gen).to(x_dtype))
        seen = torch.ones(rows, 1, images, dtype=torch.long)
        if sees_images == "some":
            seen[0, 0, 1] = 0  # row 0 sees its first image only, row 2 none
            seen[2] = 0
        mask, gate = image_mask_to_additive(seen, latents, x_dtype)
    calls = []
    real = kernels.gated_cross_attention_step
    with torch.inference_mode():
        kernels.gated_cross_attention_step = lambda *a: calls.append(1) or real(*a)
        try:
            fused = layer(x, kv, mask, gate)
        finally:
            kernels.gated_cross_attention_step = real
        plain = python_step(layer, x, kv, mask, gate)
    assert calls and torch.equal(fused, plain)
    assert not torch.equal(fused, x)  # the gates are open: the layer changed x


def test_unpacked_or_training_layers_run_python():
    layer = DecoderLayer(64, 128, 4, 4, 1e-6)  # plain nn.Linear projections
    cache = KVCache(1, 1, 4, 4, 16, torch.float32, "cpu")
    rope = RotaryEmbedding(16)(torch.zeros(1, 1, dtype=torch.long), torch.float32)
    x = torch.randn(1, 1, 64)
    with torch.inference_mode():
        assert steps.decoder_layer_step(layer, x, rope, None, cache, 0) is None
    packed = packed_layer(64, 4, 4, 128, torch.float32, seed=0)
    assert steps.decoder_layer_step(packed, x.requires_grad_(True), rope, None, cache, 0) is None  # gradients: no C++


@pytest.mark.parametrize("dtype,quantize", [("float32", None), ("bfloat16", None), ("bfloat16", "int8")])
def test_model_decodes_the_same_with_the_compiled_step(reference_checkpoint, images, dtype, quantize, monkeypatch):
    pipe = idefics.load(reference_checkpoint("small_9b")[0], dtype=dtype, quantize=quantize)
    inputs = pipe.processor([["User:", images[0], "Describe this image."], ["The quick brown fox", images[1]]])
    calls, cross_calls = [], []
    real, real_cross = kernels.decoder_layer_step, kernels.gated_cross_attention_step
    monkeypatch.setattr(kernels, "decoder_layer_step", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(kernels, "gated_cross_attention_step", lambda *a: cross_calls.append(1) or real_cross(*a))
    checks = []  # the weight checks run once per layer and generation (`steps.step_plan`), not every step
    real_check = steps.kernel_weights
    monkeypatch.setattr(steps, "kernel_weights", lambda *a: checks.append(1) or real_check(*a))
    tokens, logits = decode_with_logits(pipe.model, inputs, 6)
    assert len(calls) == 5 * pipe.model.config.num_hidden_layers  # every decoding step of every layer
    assert len(cross_calls) == 5 * len(pipe.model.model.gated_cross_attn_layers)
    assert len(checks) == pipe.model.config.num_hidden_layers + len(pipe.model.model.gated_cross_attn_layers)
    monkeypatch.setattr(ops, "decoder_layer_step", lambda *a: None)
    monkeypatch.setattr(ops, "gated_cross_attention_step", lambda *a: None)
    plain_tokens, plain_logits = decode_with_logits(pipe.model, inputs, 6)
    assert torch.equal(tokens, plain_tokens) and torch.equal(logits, plain_logits)
