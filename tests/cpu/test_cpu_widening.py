"""bf16 on CPUs without bf16 arithmetic (AVX2 only): the "widened" layout of `packing.PackedLinear` (plain bf16
weights, float32 arithmetic; float32 weights stay plain there too) and its few-row kernel `csrc/avx2.cpp`, against float64 products of the same bf16
values (every output within one bf16 rounding plus float32 summation error), ATen's bf16 path (the reference's
matmul there), and the plain model (same greedy tokens). The layout is forced with monkeypatch where the CPU
has better paths, so the Python side runs on every machine; the kernel tests need an AVX2 CPU without AVX-512
BF16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import idefics
from idefics.checkpoint import load_model, save_model
from idefics.cpu import kernels, packing
from idefics.cpu.packing import FusedLinear, FusedPart, PackedLinear, PackedOutput, pack_for_cpu
from idefics.cpu.quantize import CpuLayout, Int8Linear
from tests.rounding import summation_bound, within_one_rounding

needs_kernel = pytest.mark.skipif(not kernels.widening_available(),
                                  reason="needs an AVX2 CPU without AVX-512 BF16 (and IDEFICS_CPU_KERNELS on)")


def product_within_one_rounding(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    exact = x.double() @ w.double().T + (0 if b is None else b.double())
    assert within_one_rounding(got, exact, x.shape[-1], x.double().abs() @ w.double().abs().T)


@needs_kernel
@pytest.mark.parametrize("m,n,k", [(1, 1, 16), (1, 4096, 1024), (1, 3, 7), (2, 37, 1029), (8, 130, 96),
                                   (16, 65, 11008), (1, 5, 130000)])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_within_one_rounding(m, n, k, bias):
    gen = torch.Generator().manual_seed(m * 7 + n + k)
    w = torch.randn(n, k, generator=gen).bfloat16()
    x = torch.randn(m, k, generator=gen).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16() if bias else None
    got = kernels.widening_linear(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    product_within_one_rounding(got, x, w, b)
    as_float = kernels.widening_linear(x.float(), w, b)  # float32 x: no output rounding
    assert as_float.dtype == torch.float32
    exact = x.double() @ w.double().T + (0 if b is None else b.double())
    assert ((as_float.double() - exact).abs() <= summation_bound(k, x.double().abs() @ w.double().abs().T) + 1e-30).all()


@needs_kernel
@pytest.mark.parametrize("m,n,k", [(1, 4096, 1024), (3, 37, 1029), (16, 65, 11008), (1, 3, 7), (17, 33, 200),
                                   (130, 64, 96)])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_float32_weights_within_summation_error(m, n, k, bias):
    """float32 weights ("plain" layout): the row kernel up to 16 rows, oneDNN's GEMM beyond, both within float32
    summation error of the float64 product; a packed model's float32 linears take this path here."""
    gen = torch.Generator().manual_seed(m + 3 * n + k)
    w, x = torch.randn(n, k, generator=gen), torch.randn(m, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    got = kernels.widening_linear(x, w, b)
    exact = x.double() @ w.double().T + (0 if b is None else b.double())
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert ((got.double() - exact).abs() <= summation_bound(k, x.double().abs() @ w.double().abs().T) + 1e-30).all()
    assert packing.layout(torch.float32) == "plain"
    assert torch.equal(PackedLinear(w, b)(x), got)


@needs_kernel
# 17+ rows: float32 GEMM on the weight widened block by block (k 16384: blocks of 64 outputs, so two here)
@pytest.mark.parametrize("m,n,k", [(1, 4096, 1024), (3, 37, 1029), (16, 64, 11008), (1, 3, 7), (40, 70, 1024),
                                   (17, 100, 16384)])
def test_kernel_int8_weights_within_one_rounding(m, n, k):
    gen = torch.Generator().manual_seed(m + n + k)
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scales, x = torch.rand(n, generator=gen) / 100, torch.randn(m, k, generator=gen).bfloat16()
    got = kernels.widening_linear(x, q, None, scales)
    exact = (x.double() @ q.double().T) * scales.double()
    # x 2: the scale's multiplication adds a rounding of its own to the summation error
    assert got.dtype == torch.bfloat16
    assert within_one_rounding(got, exact, k, 2 * (x.double().abs() @ q.double().abs().T) * scales.double())
    layer = Int8Linear.from_rows(q, scales)  # the quantized layer takes this path here
    assert torch.equal(layer(x), got)


@needs_kernel
@pytest.mark.parametrize("n", [300, 301])  # bf16 rows are read in pairs per thread: 301 leaves one out
def test_kernel_bits_do_not_depend_on_threads_or_batch(n):
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(n, 2050, generator=gen).bfloat16(), torch.randn(3, 5, 2050, generator=gen).bfloat16()
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(kernels.widening_linear(x, w, None))
    finally:
        torch.set_num_threads(before)
    assert runs[0].shape == (3, 5, n) and torch.equal(runs[0], runs[1])
    assert torch.equal(kernels.widening_linear(x[1, 2:3], w, None), runs[0][1, 2:3])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8])
def test_kernel_rows_of_a_batch_equal_one_row_products(dtype):
    """Batched decoding: rows of x share each widened weight in blocks (3 rows per pair of weight rows, 6 for the
    odd one out); every row count up to the few-row limit gives each row the bits of its own product."""
    gen = torch.Generator().manual_seed(1)
    n, k = 131, 1040
    w = (torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8) if dtype == torch.int8
         else torch.randn(n, k, generator=gen).to(dtype))
    scale = torch.rand(n, generator=gen) / 50 if dtype == torch.int8 else None
    x = torch.randn(packing.WIDENED_FEW_ROWS, k, generator=gen).bfloat16()
    single = torch.cat([kernels.widening_linear(x[i:i + 1], w, None, scale) for i in range(len(x))])
    for rows in range(2, len(x) + 1):
        assert torch.equal(kernels.widening_linear(x[:rows], w, None, scale), single[:rows]), rows


@needs_kernel
def test_kernel_names_bad_input():
    w = torch.zeros(4, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="input has 9 features, weight 8"):
        kernels.widening_linear(torch.zeros(1, 9, dtype=torch.bfloat16), w, None)
    with pytest.raises(RuntimeError, match="weight must be bfloat16, float32 or int8"):
        kernels.widening_linear(torch.zeros(1, 8), w.double(), None)
    with pytest.raises(RuntimeError, match="int8 weights need their per-output scales"):
        kernels.widening_linear(torch.zeros(1, 8), w.to(torch.int8), None)
    with pytest.raises(RuntimeError, match="bias has 3 values for 4 outputs"):
        kernels.widening_linear(torch.zeros(1, 8, dtype=torch.bfloat16), w, torch.zeros(3))
    with pytest.raises(RuntimeError, match="int8 weights take no bias"):
        kernels.widening_linear(torch.zeros(1, 8), w.to(torch.int8), torch.zeros(4), torch.ones(4))


@pytest.fixture(scope="module")
def folder(reference_checkpoint):
    return reference_checkpoint("small_9b")[0]


@pytest.fixture
def widened(monkeypatch):
    """Make this machine choose the widened layout for bf16 (as an AVX2 CPU does)."""
    monkeypatch.setattr(kernels, "available", lambda: False)
    monkeypatch.setattr(kernels, "onednn_has_bf16", lambda: False)
    assert packing.layout(torch.bfloat16) == "widened"


@pytest.mark.parametrize("rows", [1, 3, packing.WIDENED_FEW_ROWS, packing.WIDENED_FEW_ROWS + 1, 130])
@pytest.mark.parametrize("bias", [False, True])
def test_widened_linear_within_one_rounding_of_aten(widened, rows, bias):
    gen = torch.Generator().manual_seed(rows)
    w, x = torch.randn(80, 300, generator=gen).bfloat16(), torch.randn(rows, 300, generator=gen).bfloat16()
    b = torch.randn(80, generator=gen).bfloat16() if bias else None
    layer = PackedLinear(w, b)
    assert layer.weight.dim() == 2 and "widened" in repr(layer)
    got = layer(x)
    product_within_one_rounding(got, x, w, b)
    aten = F.linear(x, w, b)  # the reference's bf16 product: float32 sums too, its own order
    assert (got.float() - aten.float()).abs().max() <= 2 * (aten.float().abs().max() * 2.0**-7)
    assert torch.equal(layer.state_dict()["weight"], w)


def test_widened_model_keeps_greedy_tokens_and_state_dict(widened, folder, images, tmp_path):
    plain = load_model(folder, dtype="bfloat16")
    for model in (load_model(folder, dtype="bfloat16", convert=CpuLayout(pack=True)),
                  pack_for_cpu(load_model(folder, dtype="bfloat16"))):
        assert isinstance(model.lm_head, PackedOutput) and model.lm_head.weight.dim() == 2
        layer = model.model.layers[0]
        assert isinstance(layer.self_attn.qkv_proj, FusedLinear) and isinstance(layer.self_attn.q_proj, FusedPart)
        a, b = plain.state_dict(), model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pipe = idefics.load(folder, dtype="bfloat16")
    assert pipe.model.model.layers[0].mlp.down_proj.weight.dim() == 2
    prompts = [["User:", images[0], "Describe this image."], ["The quick brown fox", images[1]]]
    inputs = pipe.processor(prompts)
    with torch.no_grad():
        got = pipe.model(inputs["input_ids"], inputs["attention_mask"], **pipe.model.prefill_inputs(inputs)).logits
        want = plain(inputs["input_ids"], inputs["attention_mask"], **plain.prefill_inputs(inputs)).logits
    torch.testing.assert_close(got.float(), want.float(), atol=0.1, rtol=0.05)
    fast = [g.token_ids for g in pipe.generate_detailed(prompts, max_new_tokens=6, stop_token_ids=[])]
    pipe.model = plain
    slow = [g.token_ids for g in pipe.generate_detailed(prompts, max_new_tokens=6, stop_token_ids=[])]
    assert fast == slow
    save_model(load_model(folder, dtype="bfloat16", convert=CpuLayout(pack=True)), tmp_path / "saved")
    reloaded = load_model(tmp_path / "saved", dtype="bfloat16").state_dict()
    assert all(torch.equal(t, plain.state_dict()[k]) for k, t in reloaded.items())


def test_widened_matmul_and_patch_convolution_within_one_rounding(widened):
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 64, 96, generator=gen).bfloat16(), torch.randn(4, 96, 321, generator=gen).bfloat16()
    got = packing.matmul(a, b)
    assert got.dtype == torch.bfloat16
    assert within_one_rounding(got, a.double() @ b.double(), 96, a.double().abs() @ b.double().abs())
    conv = torch.nn.Conv2d(3, 32, 14, stride=14).bfloat16()
    pixels = torch.randn(2, 3, 56, 56, generator=gen).bfloat16()
    got = packing.conv2d(conv, pixels)
    exact = F.conv2d(pixels.double(), conv.weight.double(), conv.bias.double(), stride=14)
    assert got.dtype == torch.bfloat16 and got.shape == exact.shape
    assert (got.double() - exact).abs().max() <= exact.abs().max() * 2.0**-7
    assert torch.equal(packing.conv2d(conv.float(), pixels.float()), conv.float()(pixels.float()))  # not widened
