"""The hand-written CPU matmul (idefics/cpu/csrc/matmul.cpp) against two independent expectations: float32
arithmetic on the same bf16 inputs (every output within one bf16 rounding step of it, at shapes that exercise
each path: one row and many, partial panels of outputs, odd and chunked input widths, bias), and `F.linear`, the
reference's bf16 matmul (oneDNN), bit for bit. A packed bf16 layer uses it, keeps its state dict, and falls back
to oneDNN when it is switched off."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from idefics.cpu import kernels
from idefics.cpu.packing import PackedLinear
from tests.rounding import bf16_spacing, within_one_rounding

pytestmark = pytest.mark.skipif(not kernels.cpu_supported() or kernels.disabled(),
                                reason="CPU without AVX-512 BF16, or IDEFICS_CPU_KERNELS=0")


def test_kernel_builds_here():
    assert kernels.available()


def test_ops_run_on_torchs_threads():
    """The ops' `at::parallel_for` must use torch's threads: built without OpenMP it silently runs on one."""
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert kernels.parallel_threads() == threads
    finally:
        torch.set_num_threads(before)


# (33, 64, 25000) and (144, 130, 11008): x too large for one L2 group of rows (`kRowGroupBytes`), split into
# groups that do not divide M evenly (a 9B down projection crashed on an empty group once)
@pytest.mark.parametrize("m,n,k", [(1, 64, 64), (1, 3072, 1024), (1, 2, 96), (2, 130, 33), (5, 65, 200),
                                   (6, 128, 128), (7, 100, 1000), (13, 64, 8195), (128, 192, 257),
                                   (33, 64, 25000), (144, 130, 11008), (300, 64, 3000)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_within_one_rounding_of_float32_arithmetic(m, n, k, bias):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    w = torch.randn(n, k, generator=gen).bfloat16()
    x = torch.randn(m, k, generator=gen).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16() if bias else None
    exact = F.linear(x.float(), w.float(), None if b is None else b.float())
    got = kernels.linear(x, kernels.pack(w), b, n)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    # one rounding to bf16 plus float32 summation error (it matters where terms cancel, as AMX's tile order
    # shows: oneDNN errs the same)
    assert within_one_rounding(got.float(), exact, k, F.linear(x.float().abs(), w.float().abs()))


def test_linear_keeps_leading_dims_and_handles_empty_input():
    w = torch.randn(70, 48).bfloat16()
    packed = kernels.pack(w)
    x = torch.randn(2, 3, 48).bfloat16()
    out = kernels.linear(x, packed, None, 70)
    assert out.shape == (2, 3, 70)
    assert torch.equal(out.reshape(6, 70), kernels.linear(x.reshape(6, 48), packed, None, 70))
    assert kernels.linear(torch.empty(0, 48).bfloat16(), packed, None, 70).shape == (0, 70)
    strided = torch.randn(48, 5).bfloat16().t()  # non-contiguous rows
    assert torch.equal(kernels.linear(strided, packed, None, 70),
                       kernels.linear(strided.contiguous(), packed, None, 70))


@pytest.mark.parametrize("threads", [1, 2])
def test_bit_identical_to_f_linear(threads):
    """F.linear is what transformers calls: equal outputs make our bf16 model give the reference's tokens.
    On AMX, oneDNN's tile products beyond 32 rows depend on the row count and the thread count (a row's result
    changes with them, ~0.03% of outputs by one spacing), so there ours must equal ours computed in 32-row
    pieces and differ from F.linear only that rarely and little."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for m, k in [(1, 1024), (1, 2816), (1, 5632), (2, 2048), (5, 768), (8, 2816), (32, 2048), (64, 1536),
                     (128, 1024), (257, 768), (130, 3072)]:
            n = max(128, 4096 // m)
            gen = torch.Generator().manual_seed(m + k)
            w, x = torch.randn(n, k, generator=gen).bfloat16(), torch.randn(m, k, generator=gen).bfloat16()
            b = torch.randn(n, generator=gen).bfloat16()
            packed = kernels.pack(w)
            for bias in (None, b):
                got, expected = kernels.linear(x, packed, bias, n), F.linear(x, w, bias)
                if m <= 32 or not kernels.uses_amx():
                    assert torch.equal(got, expected), (m, k, bias is not None)
                    continue
                pieces = torch.cat([kernels.linear(x[r:r + 32], packed, bias, n) for r in range(0, m, 32)])
                assert torch.equal(got, pieces), (m, k, bias is not None)
                differ = got != expected  # where they do: by rounding, or float32 summation where terms cancel
                assert differ.float().mean() < 1e-3, (m, k, bias is not None)
                bound = bf16_spacing(expected.float()) + k * 2.0**-24 * F.linear(x.float().abs(), w.float().abs())
                assert bool(((got.float() - expected.float()).abs() <= bound).all())
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("m,n,k", [(1, 64, 64), (1, 200, 1025), (1, 70, 8195), (2, 130, 33), (7, 100, 1000),
                                   (13, 64, 2050), (144, 70, 11008)])
def test_int8_linear_within_one_rounding_of_exact(m, n, k):
    """int8 weights with float32 scales: y = scale * (x . q) (+ bias) within one bf16 rounding of the exact value
    (float64 here) plus float32 summation error (k ulps of the sum of |products|; matters where the bias cancels
    the product). One row takes the decoding path (float32 FMAs), several rows the widened bf16 tiles."""
    gen = torch.Generator().manual_seed(m * 31 + n + k)
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale, bias = torch.rand(n, generator=gen) / 50, torch.randn(n, generator=gen).bfloat16()
    x = torch.randn(m, k, generator=gen).bfloat16()
    packed = kernels.pack(q)
    assert packed.dtype == torch.int8 and torch.equal(kernels.unpack(packed, n, k), q)
    for b in (None, bias):
        exact = (x.double() @ q.double().T) * scale.double() + (0 if b is None else b.double())
        summation = k * 2.0**-24 * (x.double().abs() @ q.double().abs().T) * scale.double()
        got = kernels.linear(x, packed, b, n, scale=scale)
        assert bool(((got.double() - exact).abs() <= bf16_spacing(exact).double() + summation).all())
    with pytest.raises(RuntimeError, match="int8 weights need a scale"):
        kernels.linear(x, packed, None, n)


@pytest.mark.parametrize("m,n,k", [(1, 64, 64), (1, 3072, 1024), (1, 70, 11008), (3, 130, 33), (6, 64, 300),
                                   (128, 192, 257), (301, 70, 1024), (5, 64, 130000)])
def test_float32_linear_within_summation_error(m, n, k):
    """float32 weights: exact float32 products summed in chunks of 128 features, so the error stays within the
    classic bound for that order: (128 + k/128 + 2) ulps of the sum of |products|, checked against float64."""
    gen = torch.Generator().manual_seed(m + 7 * n + k)
    w, x, b = torch.randn(n, k, generator=gen), torch.randn(m, k, generator=gen), torch.randn(n, generator=gen)
    packed = kernels.pack(w)
    assert packed.dtype == torch.float32 and torch.equal(kernels.unpack(packed, n, k), w)
    exact = x.double() @ w.double().T + b.double()
    bound = (128 + k / 128 + 2) * 2.0**-24 * (x.double().abs() @ w.double().abs().T + b.double().abs())
    got = kernels.linear(x, packed, b, n)
    assert got.dtype == torch.float32 and bool(((got.double() - exact).abs() <= bound).all())


def test_int8_layer_uses_the_kernel_and_keeps_its_state_dict():
    from idefics.cpu.quantize import Int8Linear

    torch.manual_seed(0)
    weight = torch.randn(96, 200) / 16
    layer = Int8Linear.from_weight(weight)
    assert layer.packed and "kernel-packed" in repr(layer)
    state = layer.state_dict()
    assert state["weight"].shape == (96, 200) and state["weight"].dtype == torch.int8
    other = Int8Linear(200, 96)
    other.load_state_dict(state)
    x = torch.randn(3, 200).bfloat16()
    assert other.packed and torch.equal(other(x), layer(x))
    assert torch.equal(other.dequantized(), layer.dequantized())


@pytest.mark.parametrize("n,k", [(64, 64), (130, 33), (5, 4099)])
def test_pack_round_trips(n, k):
    w = torch.randn(n, k).bfloat16()
    packed = kernels.pack(w)
    assert packed.shape == (-(-n // 64), -(-k // 2), 64, 2)
    assert torch.equal(kernels.unpack(packed, n, k), w)


def test_bad_inputs_name_the_problem():
    packed = kernels.pack(torch.randn(64, 32).bfloat16())
    with pytest.raises(RuntimeError, match="input must be bfloat16"):
        kernels.linear(torch.randn(1, 32), packed, None, 64)
    with pytest.raises(RuntimeError, match="input has 30 features"):
        kernels.linear(torch.randn(1, 30).bfloat16(), packed, None, 64)
    with pytest.raises(RuntimeError, match="bias has 3 values for 64 outputs"):
        kernels.linear(torch.randn(1, 32).bfloat16(), packed, torch.zeros(3).bfloat16(), 64)
    with pytest.raises(RuntimeError, match="weight must be a 2-D bfloat16, int8 or float32"):
        kernels.pack(torch.randn(64, 32, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="input must be float32 on the CPU for Float weights"):
        kernels.linear(torch.randn(1, 32).bfloat16(), kernels.pack(torch.randn(64, 32)), None, 64)


def test_packed_bf16_layer_uses_the_kernel_and_keeps_its_state_dict():
    linear = nn.Linear(96, 80).bfloat16()
    packed = PackedLinear(linear.weight, linear.bias)
    assert not packed.weight.is_mkldnn and "kernel-packed" in repr(packed)
    assert torch.equal(packed.state_dict()["weight"], linear.weight)
    x = torch.randn(4, 96).bfloat16()
    with torch.no_grad():
        exact = F.linear(x.float(), linear.weight.float(), linear.bias.float())
        assert bool(((packed(x).float() - exact).abs() <= bf16_spacing(exact)).all())
        assert torch.equal(packed(x.float()), F.linear(x.float(), linear.weight.float(), linear.bias.float()))


def test_switched_off_bf16_layers_use_onednn():
    code = ("import torch; from idefics.cpu.packing import PackedLinear; from idefics.cpu import kernels; "
            "p = PackedLinear(torch.randn(8, 16).bfloat16(), None); "
            "print(kernels.available(), p.weight.is_mkldnn)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "IDEFICS_CPU_KERNELS": "0"})
    assert out.stdout.split() == ["False", "True"]
