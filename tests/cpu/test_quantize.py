"""Weight-only int8/int4 quantization: kernels equal their dequantized weights, quantized models stay close to
the float model, quantizing while loading equals quantizing after, and the cached decode path still equals
the full forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import idefics
from idefics.checkpoint import load_model
from idefics.cli import build_parser
from idefics.cpu.ops import run_together
from idefics.cpu.packing import FusedPart, unfuse
from idefics.cpu.quantize import (CpuLayout, FusedInt8Linear, Int4Linear, Int8Linear, fuse_int8, fuses_int8,
                                  quantize_model, quantize_rows, quantized_bytes, target_linears)
from idefics.layers import SwiGLU


def int4_dequantized(module: Int4Linear, weight: torch.Tensor) -> torch.Tensor:
    """The weight the int4 kernel should be using, rebuilt from the same rounding rule."""
    n, k = weight.shape
    g = module.group
    grouped = weight.float().view(n, k // g, g)
    low = grouped.amin(-1)
    scales = ((grouped.amax(-1) - low) / 15).clamp(min=1e-10)
    q = torch.round((grouped - low[..., None]) / scales[..., None]).clamp(0, 15)
    sz = module.scales_and_zeros.float()  # [K/G, N, 2]
    return ((q - 8) * sz[..., 0].T[..., None] + sz[..., 1].T[..., None]).view(n, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_equals_dequantized_weight(dtype):
    torch.manual_seed(0)
    weight = torch.randn(96, 256) / 16
    layer = Int8Linear.from_weight(weight)
    assert layer.weight.dtype == torch.int8 and layer.weight.abs().max() == 127
    x = torch.randn(2, 3, 256).to(dtype)
    out = layer(x)
    assert out.shape == (2, 3, 96) and out.dtype == dtype
    expected = x.to(torch.bfloat16).float() @ layer.dequantized().T  # the kernel runs on bf16 activations
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=1e-2)
    # per-row rounding error is at most half a step
    assert ((layer.dequantized() - weight).abs() <= layer.scales[:, None] / 2 + 1e-7).all()


def test_fused_int8_gives_each_part_and_keeps_its_state_dict():
    """q/k/v (or gate/up) int8 layers stacked in one: each part's output bit for bit (rows are quantized and
    computed on their own), each part's `weight`/`scales` keys, loading into one part, and unfusing back."""
    torch.manual_seed(3)
    weights = [torch.randn(n, 128) / 8 for n in (64, 32, 32)]
    alone = [Int8Linear.from_weight(w) for w in weights]
    holder = nn.Module()
    holder.block = SwiGLU(128, 64)  # a fusable block: gate_proj, up_proj
    holder.block.gate_proj, holder.block.up_proj = alone[0], Int8Linear.from_weight(weights[0][:64])
    fused = FusedInt8Linear([quantize_rows(w) for w in weights])
    parts = [FusedPart(fused, start, size) for start, size in zip(fused.starts, fused.sizes)]
    x = torch.randn(2, 5, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        for layer, part, out in zip(alone, parts, run_together(x, *parts)):
            assert torch.equal(out, layer(x)) and torch.equal(part(x), layer(x))
    for layer, part in zip(alone, parts):
        assert part.state_dict().keys() == {"weight", "scales"}
        assert all(torch.equal(part.state_dict()[k], layer.state_dict()[k]) for k in ("weight", "scales"))
    parts[1].load_state_dict(alone[2].state_dict())
    assert torch.equal(parts[1](x), alone[2](x)) and torch.equal(parts[0](x), alone[0](x))
    with pytest.raises(RuntimeError, match="scales"):
        parts[2].load_state_dict({"weight": alone[2].state_dict()["weight"]})
    if fuses_int8():  # fuse_int8 fuses only where a compiled decoding step takes fused int8 weights
        before = {k: v.clone() for k, v in holder.state_dict().items()}
        fuse_int8(holder)
        assert isinstance(holder.block.gate_up_proj, FusedInt8Linear)
        unfuse(holder)
        assert type(holder.block.gate_proj) is Int8Linear and not hasattr(holder.block, "gate_up_proj")
        assert all(torch.equal(v, before[k]) for k, v in holder.state_dict().items())


def test_int4_kernel_equals_dequantized_weight():
    torch.manual_seed(1)
    weight = torch.randn(64, 256) / 16
    layer = Int4Linear.from_weight(weight)
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    expected = x.float() @ int4_dequantized(layer, weight).T
    torch.testing.assert_close(layer(x).float(), expected, atol=3e-2, rtol=1e-2)
    assert not Int4Linear.supports((64, 100)) and Int4Linear.supports((64, 128))


@pytest.fixture(scope="module")
def folder(reference_checkpoint):
    return reference_checkpoint("small_9b")[0]


def logits_of(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits.float()


@pytest.mark.parametrize("mode,tolerance", [("int8", 0.05), ("int4", 0.5)])
def test_quantized_model_is_close_to_float_model(folder, images, mode, tolerance):
    pipe = idefics.load(folder, dtype="bfloat16")
    inputs = pipe.processor([["User:", images[0], "Describe this image."], ["The quick brown fox", images[1]]])
    reference = logits_of(pipe.model, inputs)
    before = quantized_bytes(pipe.model)
    names = set(target_linears(pipe.model))
    quantize_model(pipe.model, mode)
    assert names and not target_linears(pipe.model)
    assert quantized_bytes(pipe.model) < before
    assert isinstance(pipe.model.lm_head, nn.Module) and pipe.model.model.vision_model is not None
    assert not isinstance(pipe.model.model.layers[0].self_attn.q_proj, nn.Linear)
    quantized = logits_of(pipe.model, inputs)
    spread = reference.std()
    assert (quantized - reference).abs().max() < tolerance * reference.abs().max() + 3 * spread * tolerance
    agreement = (quantized.argmax(-1) == reference.argmax(-1)).float().mean()
    assert agreement > (0.9 if mode == "int8" else 0.5)


def test_quantize_while_loading_equals_quantize_after(folder, images):
    streamed = load_model(folder, dtype="bfloat16", convert=CpuLayout("int8", pack=True))  # as idefics.load loads
    after = quantize_model(load_model(folder, dtype="bfloat16"), "int8")
    assert streamed.quantization == "int8"
    fused = fuses_int8()  # int8 q/k/v and gate/up fused while loading, as quantize_model fuses them
    assert isinstance(getattr(streamed.model.layers[0].self_attn, "qkv_proj", None), FusedInt8Linear) == fused
    assert isinstance(getattr(streamed.model.layers[0].mlp, "gate_up_proj", None), FusedInt8Linear) == fused
    a, b = streamed.state_dict(), after.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_quantized_incremental_decoding_equals_full_forward(folder, images):
    pipe = idefics.load(folder, quantize="int8")
    prompt = ["User:", images[0], "Describe this image.\nAssistant:"]
    inputs = pipe.processor(prompt)
    steps = 4
    new = torch.tensor([pipe.generate_detailed(prompt, max_new_tokens=steps, stop_token_ids=[])[0].token_ids])
    ids = torch.cat([inputs["input_ids"], new], 1)
    image_mask = torch.cat([inputs["image_attention_mask"],
                            inputs["image_attention_mask"][:, -1:].expand(-1, steps, -1)], 1)
    full = logits_of(pipe.model, dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      pixel_values=inputs["pixel_values"], image_attention_mask=image_mask))
    assert torch.equal(full[0, inputs["input_ids"].shape[1] - 1:-1].argmax(-1), new[0])


def test_load_and_cli_accept_quantize(folder):
    args = build_parser().parse_args(["generate", "--quantize", "int4", "hi"])
    assert args.quantize == "int4"
    with pytest.raises(ValueError, match="quantize mode"):
        load_model(folder, convert=CpuLayout("int3"))
    pipe = idefics.load(folder, quantize="int4")
    assert pipe.model.quantization == "int4"
    assert isinstance(pipe.generate(["The quick brown fox"], max_new_tokens=3), list)
