"""The CPU fast paths give the plain path's outputs: packed linears (this project's kernel where the CPU has
AVX-512 BF16, else oneDNN; bf16 bit-identical, float32 to rounding), float32 attention for single-query bf16
steps, and cached decoding equal to full forwards with both. State dicts of packed models are unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import idefics
from idefics.checkpoint import load_model, save_model
from idefics.cpu.ops import run_together
from idefics.cpu.packing import FusedLinear, FusedPart, PackedLinear, PackedOutput, layout, pack_for_cpu
from idefics.cpu.quantize import CpuLayout
from idefics.layers import DecoupledLinear, attention

needs_bf16_packing = pytest.mark.skipif(layout(torch.bfloat16) == "widened", reason="bf16 is widened to float32 "
                                        "on this CPU: within a rounding, not bit for bit (tests/cpu/test_cpu_widening.py)")


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16_packing)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_linear(dtype, bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 80, bias=bias).to(dtype)
    packed = PackedLinear(linear.weight, linear.bias)
    for shape in [(1, 96), (3, 5, 96), (130, 96)]:
        x = torch.randn(shape).to(dtype)
        with torch.no_grad():
            expected, got = linear(x), packed(x)
        if dtype == torch.bfloat16:
            assert torch.equal(got, expected)
        else:
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    state = packed.state_dict()
    assert set(state) == set(linear.state_dict()) and torch.equal(state["weight"], linear.weight)
    other = PackedLinear(torch.zeros(80, 96, dtype=dtype), torch.zeros(80, dtype=dtype) if bias else None)
    other.load_state_dict(linear.state_dict())
    assert torch.equal(other.state_dict()["weight"], linear.weight)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16_packing)])
def test_fused_linears_give_each_part_and_keep_its_state_dict(dtype):
    torch.manual_seed(0)
    plain = [nn.Linear(96, n, bias=False).to(dtype) for n in (64, 32, 32)]
    fused = FusedLinear([m.weight for m in plain])
    parts = [FusedPart(fused, start, size) for start, size in zip(fused.starts, fused.sizes)]
    x = torch.randn(3, 5, 96).to(dtype)
    with torch.no_grad():
        together = run_together(x, *parts)
        for linear, part, out in zip(plain, parts, together):
            expected = linear(x)
            for got in (out, part(x)):  # together, or one part alone
                if dtype == torch.bfloat16:
                    assert torch.equal(got, expected)
                else:
                    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        # out of order: one call each, still each layer's own output
        swapped = run_together(x, parts[1], parts[0])
        assert swapped[0].shape[-1] == 32 and torch.equal(swapped[1], together[0])
    assert fused.state_dict() == {}
    for linear, part in zip(plain, parts):
        assert torch.equal(part.state_dict()["weight"], linear.weight)
    new = torch.randn(32, 96).to(dtype)
    parts[2].load_state_dict({"weight": new})
    assert torch.equal(parts[2].state_dict()["weight"], new) and torch.equal(parts[0].state_dict()["weight"],
                                                                             plain[0].weight)
    with pytest.raises(RuntimeError, match="weight"):
        parts[1].load_state_dict({})


def test_quantizing_a_fused_model_unfuses_first(folder):
    """The float fused layers are split, each part quantized; where a compiled decoding step takes them (either CPU
    extension), the int8 siblings are fused again (`FusedInt8Linear`), keeping each part's keys and values."""
    from idefics.cpu.quantize import FusedInt8Linear, Int8Linear, fuses_int8, quantize_model

    model = quantize_model(load_model(folder, convert=CpuLayout(pack=True)), "int8")
    attn = model.model.layers[0].self_attn
    assert not any(isinstance(m, FusedLinear) for m in model.modules())
    if fuses_int8():
        assert isinstance(attn.qkv_proj, FusedInt8Linear) and isinstance(attn.q_proj, FusedPart)
    else:
        assert isinstance(attn.q_proj, Int8Linear) and not hasattr(attn, "qkv_proj")
    fused, plain = model.state_dict(), quantize_model(load_model(folder), "int8").state_dict()
    assert fused.keys() == plain.keys() and "model.layers.0.self_attn.q_proj.scales" in fused
    assert all(torch.equal(fused[key], plain[key]) for key in fused)


def test_attention_single_query_bf16_runs_in_float32():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 1, 16).bfloat16()
    k, v = torch.randn(2, 4, 30, 16).bfloat16(), torch.randn(2, 4, 30, 16).bfloat16()
    mask = torch.zeros(2, 1, 1, 30, dtype=torch.bfloat16)
    mask[0, ..., :5] = torch.finfo(torch.bfloat16).min
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask.double())
    fast = attention(q, k, v, mask)
    assert fast.dtype == torch.bfloat16
    assert torch.equal(fast, F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                            attn_mask=mask.float()).bfloat16())
    assert (fast.double() - exact).abs().max() <= (F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask).double() - exact).abs().max() + 1e-2
    q3 = torch.randn(2, 4, 3, 16).bfloat16()  # several queries: the plain kernel
    assert torch.equal(attention(q3, k, v), F.scaled_dot_product_attention(q3, k, v))


@pytest.fixture(scope="module")
def folder(reference_checkpoint):
    return reference_checkpoint("small_9b")[0]


def batch(pipe, images):
    return pipe.processor([["User:", images[0], "Describe this image."], ["The quick brown fox", images[1]],
                           ["text only"]])


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=needs_bf16_packing)])
def test_packed_model_matches_plain_model(folder, images, dtype):
    plain = load_model(folder, dtype=dtype)
    packed = pack_for_cpu(load_model(folder, dtype=dtype))
    assert isinstance(packed.lm_head, PackedOutput) and type(plain.lm_head) is DecoupledLinear
    assert not any(type(m) is nn.Linear for m in packed.model.modules())
    pipe = idefics.load(folder, dtype=dtype)
    inputs = batch(pipe, images)
    with torch.no_grad():
        a = plain(**plain.prefill_inputs(inputs), input_ids=inputs["input_ids"],
                  attention_mask=inputs["attention_mask"]).logits
        b = packed(**packed.prefill_inputs(inputs), input_ids=inputs["input_ids"],
                   attention_mask=inputs["attention_mask"]).logits
    if dtype == "bfloat16":
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    sa, sb = plain.state_dict(), packed.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_packing_while_loading_equals_packing_after(folder, images):
    streamed = load_model(folder, convert=CpuLayout(pack=True))
    after = pack_for_cpu(load_model(folder))
    assert type(streamed.lm_head) is PackedOutput
    kinds = lambda m: [type(x).__name__ for x in m.modules()]  # noqa: E731
    assert kinds(streamed) == kinds(after)
    a, b = streamed.state_dict(), after.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # biases included (vision)
    pipe = idefics.load(folder)
    inputs = batch(pipe, images)
    with torch.no_grad():
        la = streamed(inputs["input_ids"], inputs["attention_mask"], **streamed.prefill_inputs(inputs)).logits
        lb = after(inputs["input_ids"], inputs["attention_mask"], **after.prefill_inputs(inputs)).logits
    assert torch.equal(la, lb)


def test_load_packs_and_save_round_trips(folder, images, tmp_path):
    pipe = idefics.load(folder)
    layer = pipe.model.model.layers[0]
    assert isinstance(layer.self_attn.o_proj, PackedLinear) and isinstance(layer.mlp.down_proj, PackedLinear)
    assert isinstance(layer.self_attn.qkv_proj, FusedLinear) and isinstance(layer.mlp.gate_up_proj, FusedLinear)
    save_model(pipe.model, tmp_path / "saved")
    reloaded = load_model(tmp_path / "saved")
    original = load_model(folder).state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cached_decoding_equals_full_forward_on_fast_path(folder, images, dtype):
    pipe = idefics.load(folder, dtype=dtype)
    pipe.image_cache = None
    inputs = batch(pipe, images)
    steps = 5
    new = torch.tensor([g.token_ids for g in pipe.generate_detailed(
        [["User:", images[0], "Describe this image."], ["The quick brown fox", images[1]], ["text only"]],
        max_new_tokens=steps, stop_token_ids=[])])
    ids = torch.cat([inputs["input_ids"], new], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(new)], 1)
    image_mask = torch.cat([inputs["image_attention_mask"],
                            inputs["image_attention_mask"][:, -1:].expand(-1, steps, -1)], 1)
    with torch.no_grad():
        full = pipe.model(ids, mask, inputs["pixel_values"].to(pipe.model.dtype), image_mask).logits
    prefix = inputs["input_ids"].shape[1]
    assert torch.equal(full[:, prefix - 1:-1].argmax(-1), new)
