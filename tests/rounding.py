"""Error bounds the matmul tests share: one rounding to bf16 plus float32 summation error."""

from __future__ import annotations

import torch


def bf16_spacing(x: torch.Tensor) -> torch.Tensor:
    """Distance between consecutive bf16 values around |x| (8 significant bits)."""
    exponent = torch.floor(torch.log2(x.abs().clamp(min=2.0**-100)))
    return 2.0 ** (exponent - 7)


def summation_bound(k: int, abs_products: torch.Tensor) -> torch.Tensor:
    """The standard float32 dot-product bound k * 2^-24 * sum |x_i w_i| (it matters where terms cancel)."""
    return k * 2.0**-24 * abs_products


def within_one_rounding(got: torch.Tensor, exact: torch.Tensor, k: int, abs_products: torch.Tensor) -> bool:
    """|got - exact| <= half a bf16 spacing of exact + the summation bound, everywhere."""
    return bool(((got.double() - exact.double()).abs()
                 <= bf16_spacing(exact.double()) / 2 + summation_bound(k, abs_products.double()) + 1e-30).all())
