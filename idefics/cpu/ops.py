"""The CPU fast path as the model layers see it: the only module of `idefics.cpu` they import. Each op stands in
for a piece of a layer's own code on this CPU; those that may not apply return None, and the layer then runs its
Python code. Behind them: the compiled extension (`kernels`), the packed and fused linears (`packing`) and the
compiled decoding steps (`steps`).

- `rms_norm(x, weight, eps)`: `layers.RMSNorm` in one op, bit for bit; or None.
- `decode_attention(q, k, v, mask)`: attention of one query per row over the KV cache as it lies (float32
  arithmetic); or None.
- `rotary_into_cache(q, k, v, rope, keys, values, layer, start)`: rotary embedding of q and k plus the KV-cache
  write in one op, bit for bit; the rotated q, or None.
- `decoder_layer_step(layer, x, rope, mask, cache, index)`, `gated_cross_attention_step(layer, x, kv, mask, gate,
  plans)`: one decoding step of a whole layer as one C++ op, bit for bit; or None.
- `fused_output(x, *linears)`, `run_together(x, *linears)`: the outputs of sibling projections fused into one
  matmul (`packing.fuse_for_cpu`, `quantize.fuse_int8`).
- `matmul(a, b)`, `conv2d(conv, x)`: `a @ b` and `conv(x)`, in float32 for bf16 where the CPU has no bf16
  arithmetic."""

from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .packing import conv2d, fused_of, matmul
from .steps import decoder_layer_step, gated_cross_attention_step

__all__ = ["conv2d", "decode_attention", "decoder_layer_step", "fused_output", "gated_cross_attention_step",
           "matmul", "rms_norm", "rotary_into_cache", "run_together"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """`layers.RMSNorm` (x normed, times `weight`) in one op instead of ~10, the same bits; None where it does not
    apply (fewer than 8 features: ATen sums those another way; or not `kernels.applies`)."""
    if x.shape[-1] >= 8 and kernels.applies(x, weight):
        return kernels.rms_norm(x, weight, eps)
    return None


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
                     ) -> torch.Tensor | None:
    """Attention of one query per row, q [B, H, 1, d], reading k/v [B, G, L, d] as they lie (strided views of the KV
    cache) in float32 (`kernels.decode_attention`); None where the kernel does not take these (more than one query,
    mixed dtypes, `kernels.decode_attention_takes`, or not `kernels.applies`)."""
    if (q.shape[-2] == 1 and kernels.decode_attention_takes(q.shape[-1], mask) and v.shape[-1] == q.shape[-1]
            and q.dtype == k.dtype == v.dtype and kernels.applies(q, k, v)):
        return kernels.decode_attention(q, k, v, mask)
    return None


def rotary_into_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                      keys: torch.Tensor, values: torch.Tensor, layer: int, start: int) -> torch.Tensor | None:
    """q, k, v [B, T, heads * head_dim] → rotated q [B, heads, T, head_dim], with k rotated and k, v written to
    positions start.. of `layer` in the position-major `keys`/`values`, as `layers.apply_rotary` and
    `KVCache.update` do it (`kernels.rotary_into_cache`); None (nothing written) where that op does not apply."""
    if not (kernels.applies(q, k, v, *rope, keys) and q.dtype == k.dtype == v.dtype == rope[0].dtype == keys.dtype
            and keys.is_contiguous() and values.is_contiguous() and q.shape[1] > 0):
        return None
    return kernels.rotary_into_cache(q, k, v, *rope, keys, values, layer, start)


def fused_output(x: torch.Tensor, *linears: nn.Module) -> torch.Tensor | None:
    """The outputs of `linears` side by side from one matmul when they are the parts of one fused layer; else
    None."""
    fused = fused_of(*linears)
    return None if fused is None else fused(x)


def run_together(x: torch.Tensor, *linears: nn.Module) -> tuple[torch.Tensor, ...]:
    """The outputs of `linears` on the same input: one matmul when they are one fused layer, else one call each."""
    out = fused_output(x, *linears)
    if out is not None:
        return out.split([m.out_features for m in linears], dim=-1)
    return tuple(linear(x) for linear in linears)
