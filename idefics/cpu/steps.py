"""The compiled decoding steps: one position per row of a whole layer as one C++ op (`kernels.decoder_layer_step`,
`kernels.gated_cross_attention_step`, `csrc/decoder_layer.cpp`), the operations of the layer's Python `forward` in
the same order, so the same bits, without their Python overhead. Each function here gives the layer's output, or
None where its step does not apply (the layer then runs its Python code): the step takes CPU inference with fused,
CPU-packed projections (`packing.pack_for_cpu`; int8: `quantize.fuse_int8`) and the shapes of the single-query
attention kernel. The checks that decide it run once per layer per generation (`step_plan`)."""

from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .packing import fused_of

# The layers are named in the docstrings, not imported: the model imports this package (through `ops`), never the
# other way round.


def decoder_layer_step(layer: nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                       mask: torch.Tensor | None, cache, index: int) -> torch.Tensor | None:
    """A decoding step of `layer` (`language_model.DecoderLayer`, number `index` in `cache`) as one C++ op, writing
    the new position into the cache; None where the step does not apply."""
    plan = step_plan(cache.step_plans, layer, x, lambda: _decoder_layer_arguments(layer, x, rope, cache))
    if plan is None or not (kernels.decode_attention_takes(layer.self_attn.head_dim, mask)
                            and cache.keys.is_contiguous() and cache.values.is_contiguous()):
        return None
    head, scales = plan
    start, _ = cache.positions(1)
    return kernels.decoder_layer_step(x, *head, *rope, cache.keys, cache.values, index, start, mask, scales)


def _decoder_layer_arguments(layer: nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                             cache):
    """`kernels.decoder_layer_step`'s arguments before the rotary tables, and the int8 scales; None: no C++ step."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv, gate_up = fused_of(attn.q_proj, attn.k_proj, attn.v_proj), fused_of(mlp.gate_proj, mlp.up_proj)
    if qkv is None or gate_up is None:
        return None
    norm, post_norm = layer.input_layernorm, layer.post_attention_layernorm
    packed = kernel_weights(x, (qkv, attn.o_proj, gate_up, mlp.down_proj), norm, post_norm, *rope, cache.keys)
    if packed is None:
        return None
    weights, scales = packed
    return (norm.weight, post_norm.weight, norm.eps, *weights, attn.heads, attn.kv_heads,
            mlp.down_proj.in_features), scales


def gated_cross_attention_step(layer: nn.Module, x: torch.Tensor,
                               kv: tuple[torch.Tensor, torch.Tensor] | None, mask: torch.Tensor | None,
                               gate: torch.Tensor | None, plans: dict | None = None) -> torch.Tensor | None:
    """One position per row of `layer` (`cross_attention.GatedCrossAttentionLayer`) as one C++ op; None where the
    step does not apply. `plans`: a generation's `KVCache.step_plans`. The step has neither the word path
    (`alpha_word`) nor `dense_needs_image`: such layers always run their Python code."""
    if layer.dense_needs_image or hasattr(layer, "alpha_word"):
        return None
    attn = layer.cross_attn
    plan = step_plan(plans, (layer, kv is None), x, lambda: _gated_cross_attention_arguments(layer, x, kv))
    if plan is None or (kv is not None and not (gate is not None
                                                and kernels.decode_attention_takes(attn.head_dim, mask))):
        return None
    head, tail = plan
    k, v = kv if kv is not None else (None, None)
    return kernels.gated_cross_attention_step(x, *head, k, v, mask, gate, *tail)


def _gated_cross_attention_arguments(layer: nn.Module, x: torch.Tensor,
                                     kv: tuple[torch.Tensor, torch.Tensor] | None):
    """`kernels.gated_cross_attention_step`'s arguments before the image keys and after the gate (alphas, int8
    scales); None: no C++ step."""
    attn, mlp = layer.cross_attn, layer.mlp
    gate_up = fused_of(mlp.gate_proj, mlp.up_proj)
    q_norm = attn.q_layer_norm if attn.qk_norms else None
    others = [layer.alpha_cross_attn, layer.alpha_dense] + ([q_norm.weight] if q_norm is not None else [])
    if kv is not None:
        others += kv
    linears = (attn.q_proj, attn.o_proj, gate_up, mlp.down_proj)
    packed = None if gate_up is None else kernel_weights(x, linears, layer.input_layernorm,
                                                         layer.post_attention_layernorm, *others)
    if packed is None or (kv is not None and attn.head_dim < 8):
        return None
    weights, scales = packed
    head = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight, layer.input_layernorm.eps, *weights,
            attn.heads, mlp.down_proj.in_features, None if q_norm is None else q_norm.weight,
            0.0 if q_norm is None else q_norm.eps)
    return head, (layer.alpha_cross_attn, layer.alpha_dense, scales)


def kernel_weights(x: torch.Tensor, linears: tuple[nn.Module, ...], input_norm: nn.Module, post_norm: nn.Module,
                   *others: torch.Tensor) -> tuple[list[torch.Tensor], tuple[torch.Tensor | None, ...]] | None:
    """The weights and int8 scales of a layer's `linears` as its C++ decoding step takes them, or None when the
    step does not apply: the linears all in x's dtype without bias (`packing`), or all int8 (`quantize.Int8Linear`,
    `FusedInt8Linear`) with x in bf16, each stored as the step's products take it (`kernels.takes_step_weight`);
    the two norms (one eps, at least 8 features) and `others` in x's dtype; the kernels available for all of it."""
    weights = [getattr(m, "weight", None) for m in linears]
    scales = tuple(getattr(m, "scales", None) for m in linears)
    int8 = scales[0] is not None
    weight_dtype = torch.int8 if int8 else x.dtype
    tensors = (input_norm.weight, post_norm.weight, *others)
    if (all(w is not None and w.dtype == weight_dtype and kernels.takes_step_weight(w) for w in weights)
            and all(getattr(m, "bias", None) is None and (s is not None) == int8 for m, s in zip(linears, scales))
            and (not int8 or x.dtype == torch.bfloat16)
            and input_norm.eps == post_norm.eps and x.shape[-1] >= 8 and all(t.dtype == x.dtype for t in tensors)
            and kernels.applies(x, *tensors, *(w for w in weights if w.is_floating_point()))):
        return weights, scales
    return None


def step_plan(plans: dict | None, layer: object, x: torch.Tensor, make):
    """`make()` (a layer's static C++-step arguments, or None where the step does not apply), found once per
    layer in `plans` (a generation's `KVCache.step_plans`) and reused for its other steps: weights and dtypes do
    not change while a generation runs, and the checks cost ~25 us of Python per layer and step (~4% of a
    463M bf16 step). Without `plans` (a single-position call outside generation), or with gradients on (whether
    the step applies then depends on each call's tensors), `make()` runs every time."""
    if plans is None or torch.is_grad_enabled():
        return make()
    key = (layer, x.dtype)
    if key not in plans:
        plans[key] = make()
    return plans[key]
