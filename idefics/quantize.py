"""Weight-only quantization of the language decoder and the gated cross-attention blocks.

Decoding is memory-bound: every new token reads each decoder weight once, so fewer bytes per weight means
proportionally faster steps (and IDEFICS-9B fits in 12 GB). Activations stay in floating point; only the
weights are stored in integers and expanded inside the matmul kernel.

* `int8`: per-output-channel symmetric scales (w ≈ q * scale, q in [-127, 127]); matmul by
  `torch._weight_int8pack_mm`, which dequantizes in registers.
* `int4`: groups of 128 input channels, asymmetric (w ≈ q * scale + min, q in [0, 15]), packed two per byte
  for `torch._weight_int4pack_mm_for_cpu`. Coarser: check the quality numbers the benchmark prints.

The vision encoder, perceiver, embeddings and output layer stay in floating point: they are read once per
prompt (vision, perceiver) or are small next to the decoder, and the output layer decides the token.
`quantize_model` converts a loaded model in place; `checkpoint.load_model(..., quantize=)` converts each weight
as it is read, so the full-precision decoder is never in memory at once."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("int8", "int4")
# Parameter-name prefixes of the quantized parts: IDEFICS decoder + cross-attention, Idefics2's Mistral decoder.
TARGET_PREFIXES = ("model.layers.", "model.gated_cross_attn_layers.", "model.text_model.layers.")
INT4_GROUP = 128


def check_mode(mode: str | None) -> str | None:
    if mode in (None, "none", "no", ""):
        return None
    if mode not in MODES:
        raise ValueError(f"unknown quantize mode {mode!r}; choose one of {', '.join(MODES)} (or none)")
    return mode


def kernel_dtype(x: torch.Tensor) -> torch.dtype:
    """The CPU int8/int4 kernels are fast with bf16 activations and slow with float32 ones (measured ~10x on
    AVX-512): float32 inputs go through the kernel in bf16, whose 8-bit mantissa is finer than the weights'."""
    return torch.bfloat16 if x.device.type == "cpu" and x.dtype == torch.float32 else x.dtype


class Int8Linear(nn.Module):
    """y = x @ (q * scales[:, None]).T with q int8 [out, in] and float32 per-row `scales` [out]."""

    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, rows: int = 1024) -> "Int8Linear":
        """Quantized `rows` output channels at a time, so the float32 temporaries stay small (9B layers are
        11008 x 4096: converting whole would add ~0.7 GB of temporaries to the peak)."""
        n, k = weight.shape
        module = cls(k, n, device="meta")
        q = torch.empty(n, k, dtype=torch.int8, device=weight.device)
        scales = torch.empty(n, dtype=torch.float32, device=weight.device)
        for start in range(0, n, rows):
            w = weight[start:start + rows].detach().float()
            s = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)
            q[start:start + rows] = torch.round(w / s[:, None]).clamp(-127, 127)
            scales[start:start + rows] = s
        module.weight, module.scales = q, scales
        return module

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        flat = x.reshape(-1, shape[-1]).to(kernel_dtype(x))
        if flat.device.type == "cpu":
            out = torch._weight_int8pack_mm(flat.contiguous(), self.weight, self.scales.to(flat.dtype))
        else:  # other devices: dequantize on the fly
            out = F.linear(flat, self.weight.to(flat.dtype)) * self.scales.to(flat.dtype)
        return out.to(dtype).view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int4Linear(nn.Module):
    """Groups of `group` input channels share a bf16 scale and offset: w ≈ (q - 8) * scale + zero, where
    zero = min + 8 * scale (the layout `_weight_int4pack_mm_for_cpu` expects)."""

    def __init__(self, in_features: int, out_features: int, group: int = INT4_GROUP,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.empty(in_features // group, out_features, 2,
                                                             dtype=torch.bfloat16, device=device))

    @staticmethod
    def supports(weight_shape: torch.Size | list[int], group: int = INT4_GROUP) -> bool:
        out_features, in_features = weight_shape
        return in_features % group == 0 and out_features % 16 == 0

    @classmethod
    def from_weight(cls, weight: torch.Tensor, group: int = INT4_GROUP) -> "Int4Linear":
        w = weight.detach().float()
        n, k = w.shape
        grouped = w.view(n, k // group, group)
        low, high = grouped.amin(-1), grouped.amax(-1)
        scales = ((high - low) / 15).clamp(min=1e-10)
        q = torch.round((grouped - low[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
        module = cls(k, n, group, device="meta")
        module.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        zeros = low + 8 * scales
        module.scales_and_zeros = torch.stack([scales, zeros], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        flat = x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous()
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight, self.group, self.scales_and_zeros)
        return out.to(dtype).view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4, group={self.group}"


class PackedLinear(nn.Module):
    """A float Linear whose weight is reordered once into oneDNN's blocked layout, for CPU inference.

    Plain `F.linear` re-arranges the weight on every call for bf16 and goes through MKL for float32, which
    runs its slower generic path on this (AMD, AVX-512) CPU; the prepacked oneDNN kernel was measured 1.4-1.7x
    faster for decoding (matrix-vector) and ~2x for float32 prefill (matrix-matrix). Same arithmetic: bf16
    results are identical, float32 ones differ by rounding only. The state dict holds the plain weight
    (unpacked on save, repacked on load), so checkpoints and `state_dict()` are unchanged; no autograd."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(self.pack(weight), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @staticmethod
    def pack(weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)

    @staticmethod
    def supports(linear: nn.Module) -> bool:
        w = getattr(linear, "weight", None)
        return (type(linear) is nn.Linear and w is not None and w.device.type == "cpu" and not w.is_meta
                and w.dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype:  # mixed-dtype callers get the plain path
            return F.linear(x, self.weight.to_dense().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        destination[prefix + "weight"] = self.weight.to_dense()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        if prefix + "weight" in state_dict:
            self.weight = nn.Parameter(self.pack(state_dict[prefix + "weight"].to(self.weight.dtype)),
                                       requires_grad=False)
        elif strict:
            missing_keys.append(prefix + "weight")
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                bias = state_dict[prefix + "bias"].detach()
                self.bias = nn.Parameter(bias.to(self.weight.dtype), requires_grad=False)
            elif strict:
                missing_keys.append(prefix + "bias")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"oneDNN-packed {str(self.weight.dtype).removeprefix('torch.')}")


class PackedOutput(PackedLinear):
    """IDEFICS' decoupled output layer (`layers.DecoupledLinear`) with its vocabulary weight packed: logits are
    [vocabulary logits, `additional_fc` logits]. Same state-dict keys (`weight`, `additional_fc.weight`)."""

    def __init__(self, weight: torch.Tensor, additional_fc: nn.Module | None) -> None:
        super().__init__(weight, None)
        self.additional_fc = additional_fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        return logits if self.additional_fc is None else torch.cat([logits, self.additional_fc(x)], dim=-1)


class FusedLinear(PackedLinear):
    """Several bias-free packed linears that read the same input (q/k/v, gate/up), run as one matmul whose
    output is their outputs side by side: one kernel call and one pass over a longer weight instead of several
    (measured 8% faster matrix-vector products on this machine). Each output row is computed as before, so
    results are unchanged. The original layers stay in the module tree as `FusedPart`s that own the state-dict
    keys: this module saves and loads nothing itself."""

    def __init__(self, weights: list[torch.Tensor]) -> None:
        super().__init__(torch.cat(weights), None)
        self.sizes = [w.shape[0] for w in weights]
        self.starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        pass

    def _load_from_state_dict(self, *args) -> None:
        pass

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fused {self.sizes}"


class FusedPart(nn.Module):
    """Rows [start, start + out_features) of a `FusedLinear`: keeps the original layer's name and state-dict key
    (`weight`) and, called alone, gives that layer's output."""

    def __init__(self, fused: FusedLinear, start: int, rows: int) -> None:
        super().__init__()
        self.__dict__["fused"] = fused  # not a submodule: the parent owns it (and its parameters) once
        self.start, self.out_features, self.in_features = start, rows, fused.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)[..., self.start:self.start + self.out_features]

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        destination[prefix + "weight"] = self.fused.weight.to_dense()[self.start:self.start + self.out_features]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        if prefix + "weight" not in state_dict:
            if strict:
                missing_keys.append(prefix + "weight")
            return
        dense = self.fused.weight.to_dense()
        dense[self.start:self.start + self.out_features] = state_dict[prefix + "weight"]
        self.fused.weight = nn.Parameter(PackedLinear.pack(dense), requires_grad=False)

    def extra_repr(self) -> str:
        return f"rows {self.start}:{self.start + self.out_features} of the fused layer"


# Sibling linears that read the same input, by the attribute names the decoder blocks use.
FUSABLE = (("q_proj", "k_proj", "v_proj", "qkv_proj"), ("gate_proj", "up_proj", "gate_up_proj"))


def fusable_groups(model: nn.Module):
    """(qualified name, module, part names, fused name) of every self-attention and SwiGLU block."""
    from .language_model import SelfAttention
    from .layers import SwiGLU

    for name, module in model.named_modules():
        if isinstance(module, (SelfAttention, SwiGLU)):
            for *names, fused_name in FUSABLE:
                yield name, module, names, fused_name


def install_fused(module: nn.Module, names: list[str], fused_name: str, weights: list[torch.Tensor]) -> None:
    fused = FusedLinear(weights)
    setattr(module, fused_name, fused)
    for name, start, size in zip(names, fused.starts, fused.sizes):
        setattr(module, name, FusedPart(fused, start, size))


@torch.no_grad()
def fuse_for_cpu(model: nn.Module) -> nn.Module:
    """In place: every block whose `q_proj, k_proj, v_proj` (self-attention) or `gate_proj, up_proj` (SwiGLU)
    are packed and bias-free gets one `FusedLinear` (`qkv_proj` / `gate_up_proj`) and `FusedPart`s in their
    place. Cross-attention, whose keys and values read the image latents, has no such triple."""
    for _, module, names, fused_name in fusable_groups(model):
        parts = [getattr(module, n, None) for n in names]
        if all(type(p) is PackedLinear and p.bias is None for p in parts):
            install_fused(module, names, fused_name, [p.weight.to_dense() for p in parts])
    return model


@torch.no_grad()
def pack_for_cpu(model: nn.Module) -> nn.Module:
    """Replace every float Linear of `model.model` (vision, perceiver, decoder, cross-attention) by a
    `PackedLinear`, and IDEFICS' output layer by a `PackedOutput` unless it shares the embedding, in place;
    then fuse sibling projections (`fuse_for_cpu`). For inference on CPU; modules on other devices are left
    alone."""
    from .layers import DecoupledLinear

    inner = getattr(model, "model", model)
    for name, module in list(inner.named_modules()):
        if PackedLinear.supports(module):
            parent, _, leaf = name.rpartition(".")
            setattr(inner.get_submodule(parent), leaf, PackedLinear(module.weight, module.bias))
    head = getattr(model, "lm_head", None)
    embed = getattr(inner, "embed_tokens", None)
    if (type(head) is DecoupledLinear and head.weight is not getattr(embed, "weight", None)
            and head.weight.device.type == "cpu" and head.weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available()):
        model.lm_head = PackedOutput(head.weight, head.additional_fc)
    return fuse_for_cpu(model)


def weight_converters(model: nn.Module, quantize: str | None, pack: bool, dtype: torch.dtype) -> dict:
    """For loading (checkpoint.load_model): weight name → (module name, build(weight) → replacement module).
    Quantized targets first; with `pack`, every other Linear of `model.model` and an untied IDEFICS output
    layer become packed layers, sibling projections fused ones (`fuse_for_cpu`; their builders install the
    fused layer with the group's last weight and return None). Biases arrive afterwards through the state dict
    (a meta placeholder marks that the layer has one)."""
    from .layers import DecoupledLinear

    mode = check_mode(quantize)
    out = {}
    if mode is not None:
        for name in target_linears(model):
            out[f"{name}.weight"] = (name, lambda w, m=mode: quantize_weight(w, m))
    if not pack or dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return out
    quantized = set(out)
    inner = getattr(model, "model", None)
    for name, module in (inner.named_modules() if inner is not None else ()):
        key = f"model.{name}.weight"
        if type(module) is nn.Linear and key not in out:
            has_bias = module.bias is not None
            out[key] = (f"model.{name}", lambda w, b=has_bias: PackedLinear(
                w, torch.empty(w.shape[0], dtype=w.dtype, device="meta") if b else None))
    for name, module, names, fused_name in fusable_groups(model):
        keys = [f"{name}.{n}.weight" for n in names]
        parts = [getattr(module, n, None) for n in names]
        if all(type(p) is nn.Linear and p.bias is None for p in parts) and not quantized.intersection(keys):
            collect = FusedCollector(module, names, fused_name)
            for n, key in zip(names, keys):
                out[key] = (f"{name}.{n}", lambda w, n=n, c=collect: c(n, w))
    head = getattr(model, "lm_head", None)
    if type(head) is DecoupledLinear and not getattr(model.config, "tie_word_embeddings", False):
        out["lm_head.weight"] = ("lm_head", lambda w, fc=head.additional_fc: PackedOutput(w, fc))
    return out


class FusedCollector:
    """Gathers the weights of one fusable group as they are read and installs the fused layer with the last
    one (the checkpoint's float weights are never packed twice). Returns None: nothing to replace per weight."""

    def __init__(self, module: nn.Module, names: list[str], fused_name: str) -> None:
        self.module, self.names, self.fused_name, self.pending = module, names, fused_name, {}

    def __call__(self, name: str, weight: torch.Tensor) -> None:
        self.pending[name] = weight
        if len(self.pending) == len(self.names):
            install_fused(self.module, self.names, self.fused_name, [self.pending.pop(n) for n in self.names])


def quantize_weight(weight: torch.Tensor, mode: str) -> nn.Module:
    """A quantized replacement for a bias-free Linear with this weight ([out, in]). int4 falls back to int8 for
    shapes the packed kernel does not take."""
    if mode == "int4" and Int4Linear.supports(weight.shape):
        return Int4Linear.from_weight(weight)
    return Int8Linear.from_weight(weight)


def is_target(name: str, module: nn.Module) -> bool:
    linear = isinstance(module, nn.Linear) or type(module) is PackedLinear
    return linear and module.bias is None and name.startswith(TARGET_PREFIXES)


def plain_weight(module: nn.Module) -> torch.Tensor:
    return module.weight.to_dense() if module.weight.is_mkldnn else module.weight


def target_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name → Linear for every layer `quantize_model` converts."""
    return {name: m for name, m in model.named_modules() if is_target(name, m)}


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name), leaf, new)


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str | None) -> nn.Module:
    """Replace the decoder and cross-attention Linear layers with int8/int4 weight-only layers, in place
    (one layer at a time, so the peak is one layer's float weight above the result). Returns the model."""
    mode = check_mode(mode)
    if mode is None:
        return model
    for name, linear in target_linears(model).items():
        replace_module(model, name, quantize_weight(plain_weight(linear), mode))
    model.quantization = mode
    return model


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers (what the weights occupy in memory)."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())
