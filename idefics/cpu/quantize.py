"""Weight-only quantization of the language decoder and the gated cross-attention blocks.

Decoding is memory-bound: every new token reads each decoder weight once, so fewer bytes per weight means
proportionally faster steps (and IDEFICS-9B fits in 12 GB). Activations stay in floating point; only the
weights are stored in integers and expanded inside the matmul kernel.

* `int8`: per-output-channel symmetric scales (w ≈ q * scale, q in [-127, 127]); matmul by this project's CPU
  kernel where the CPU has AVX-512 BF16 (`kernels`), else `torch._weight_int8pack_mm`; both dequantize in
  registers.
* `int4`: groups of 128 input channels, asymmetric (w ≈ q * scale + min, q in [0, 15]), packed two per byte
  for `torch._weight_int4pack_mm_for_cpu`. Coarser: check the quality numbers the benchmark prints.

The vision encoder, perceiver, embeddings and output layer stay in floating point: they are read once per
prompt (vision, perceiver) or are small next to the decoder, and the output layer decides the token.
`quantize_model` converts a loaded model in place; `checkpoint.load_model(..., convert=CpuLayout(quantize))`
converts each weight as it is read, so the full-precision decoder is never in memory at once."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from ..family import family_of
from .packing import (FusedCollector, FusedRows, PackedLinear, fusable_groups, install_fused,
                      pack_converters, unfuse)

MODES = ("int8", "int4")
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
    """y = x @ (q * scales[:, None]).T with q int8 [out, in] and float32 per-row `scales` [out].

    On CPUs with this project's kernel (`kernels`), q is stored in the kernel's panel layout and the matmul
    runs there: decoding reads the int8 weights ~1.8x faster than `torch._weight_int8pack_mm` and prefill is
    ~3x faster (bf16 activations, float32 sums and scales). On AVX2 CPUs q stays plain and the AVX2 extension
    runs it (`kernels.widening_linear`: few rows ~2x torch's kernel, many rows float32 GEMM on q widened block
    by block, ~2x too). The state dict always holds the plain [out, in] q."""

    def __init__(self, in_features: int, out_features: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> "Int8Linear":
        return cls.from_rows(*quantize_rows(weight))

    @classmethod
    def from_rows(cls, q: torch.Tensor, scales: torch.Tensor) -> "Int8Linear":
        """The layer of int8 rows q [out, in] with their float32 `scales` [out]."""
        module = cls(q.shape[1], q.shape[0], device="meta")
        module.weight, module.scales = module.layout(q), scales
        return module

    @staticmethod
    def layout(q: torch.Tensor) -> torch.Tensor:
        """q as this module stores it: the kernel's panels on a CPU that has the kernel, else as is."""
        return kernels.pack(q) if q.device.type == "cpu" and kernels.available() else q

    @property
    def packed(self) -> bool:
        return self.weight.dim() == 4

    def int8_weight(self) -> torch.Tensor:
        """q as [out, in]."""
        return kernels.unpack(self.weight, self.out_features, self.in_features) if self.packed else self.weight

    def dequantized(self) -> torch.Tensor:
        return self.int8_weight().float() * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        flat = x.reshape(-1, shape[-1]).to(kernel_dtype(x))
        if self.packed:
            out = kernels.linear(flat.to(torch.bfloat16), self.weight, None, self.out_features, self.scales)
        elif flat.device.type == "cpu" and kernels.widening_available():  # AVX2: ~2x the kernel below
            out = kernels.widening_linear(flat, self.weight, None, self.scales)
        elif flat.device.type == "cpu":
            out = torch._weight_int8pack_mm(flat.contiguous(), self.weight, self.scales.to(flat.dtype))
        else:  # other devices: dequantize on the fly
            out = F.linear(flat, self.weight.to(flat.dtype)) * self.scales.to(flat.dtype)
        return out.to(dtype).view(*shape[:-1], self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        destination[prefix + "weight"] = self.int8_weight()
        destination[prefix + "scales"] = self.scales

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        missing = [prefix + name for name in ("weight", "scales") if prefix + name not in state_dict]
        if missing:
            if strict:
                missing_keys.extend(missing)
            return
        self.weight = self.layout(state_dict[prefix + "weight"].to(torch.int8))
        self.scales = state_dict[prefix + "scales"].float()

    def extra_repr(self) -> str:
        kernel = ", kernel-packed" if self.packed else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8{kernel}"


def quantize_rows(weight: torch.Tensor, rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float weight → (q int8 [out, in], scales float32 [out]), each row on its own (so quantizing
    stacked weights equals stacking their quantizations). `rows` output channels at a time, so the float32
    temporaries stay small (9B layers are 11008 x 4096: converting whole would add ~0.7 GB to the peak)."""
    n, k = weight.shape
    q = torch.empty(n, k, dtype=torch.int8, device=weight.device)
    scales = torch.empty(n, dtype=torch.float32, device=weight.device)
    for start in range(0, n, rows):
        w = weight[start:start + rows].detach().float()
        s = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)
        q[start:start + rows] = torch.round(w / s[:, None]).clamp(-127, 127)
        scales[start:start + rows] = s
    return q, scales


class FusedInt8Linear(FusedRows, Int8Linear):
    """Sibling int8 layers that read the same input (q/k/v, gate/up) as one, like `packing.FusedLinear`: their
    rows stacked (each output row is computed as before, so results are unchanged), one kernel call per step,
    and the decoder layer's C++ step (`steps.decoder_layer_step`) applies. Built from (q, scales) per part;
    the parts (`packing.FusedPart`) own the state-dict keys (`weight`, `scales`)."""

    part_keys = ("weight", "scales")

    def __init__(self, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        q = torch.cat([p[0] for p in parts])
        super().__init__(q.shape[1], q.shape[0], device="meta")
        self.weight, self.scales = self.layout(q), torch.cat([p[1] for p in parts])
        self.set_parts([p[0].shape[0] for p in parts])

    def part_state(self, start: int, rows: int) -> dict[str, torch.Tensor]:
        return {"weight": self.int8_weight()[start:start + rows], "scales": self.scales[start:start + rows]}

    def load_part(self, start: int, rows: int, state: dict[str, torch.Tensor]) -> None:
        q = self.int8_weight().clone()
        q[start:start + rows] = state["weight"]
        self.weight = self.layout(q)
        self.scales[start:start + rows] = state["scales"]

    @staticmethod
    def unfused_part(state: dict[str, torch.Tensor]) -> Int8Linear:
        return Int8Linear.from_rows(state["weight"], state["scales"].clone())


def fuses_int8() -> bool:
    """int8 siblings are fused here: a compiled decoding step takes their fused weight (`kernels`: the main
    kernel's panels, or the plain rows on the AVX2 extension)."""
    return kernels.available() or kernels.widening_available()


def fuse_int8(model: nn.Module) -> nn.Module:
    """In place: every q/k/v or gate/up group whose layers are all CPU `Int8Linear`s becomes one `FusedInt8Linear`
    (`qkv_proj` / `gate_up_proj`) with `FusedPart`s in their place, where `fuses_int8`."""
    if not fuses_int8():
        return model
    for _, module, names, fused_name in fusable_groups(model):
        parts = [getattr(module, n, None) for n in names]
        if all(type(p) is Int8Linear and p.weight.device.type == "cpu" for p in parts):
            install_fused(module, names, fused_name, FusedInt8Linear([(p.int8_weight(), p.scales) for p in parts]))
    return model


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


@dataclass(frozen=True)
class CpuLayout:
    """What `checkpoint.load_model(..., convert=CpuLayout(...))` turns weights into while streaming them in:
    weight-only quantization of the decoder and cross-attention (`quantize`: "int8" | "int4") and/or the other
    linears packed in oneDNN's layout (`pack`: CPU, float32/bfloat16 only; elsewhere it does nothing)."""

    quantize: str | None = None
    pack: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "quantize", check_mode(self.quantize))

    def converters(self, model: nn.Module, dtype: torch.dtype, device: torch.device | str) -> dict:
        """Weight name → (module name, build(weight) → module or None), as `weight_converters`."""
        pack = self.pack and torch.device(device).type == "cpu" and dtype in (torch.float32, torch.bfloat16)
        if self.quantize is None and not pack:
            return {}
        return weight_converters(model, self.quantize, pack, dtype)


def weight_converters(model: nn.Module, quantize: str | None, pack: bool, dtype: torch.dtype) -> dict:
    """For loading (checkpoint.load_model): weight name → (module name, build(weight) → replacement module or
    None). Quantized targets first; with `pack`, the other linears become packed or fused CPU layers
    (`packing.pack_converters`)."""
    mode = check_mode(quantize)
    out = {}
    if mode is not None:
        for name in target_linears(model):
            out[f"{name}.weight"] = (name, lambda w, m=mode: quantize_weight(w, m))
    if mode == "int8" and pack and fuses_int8():  # int8 siblings fused, as `fuse_int8` does
        for name, module, names, fused_name in fusable_groups(model):
            keys = [f"{name}.{n}.weight" for n in names]
            if all(key in out for key in keys):
                collect = FusedCollector(module, names, fused_name, build=FusedInt8Linear, prepare=quantize_rows)
                for n, key in zip(names, keys):
                    out[key] = (f"{name}.{n}", lambda w, n=n, c=collect: c(n, w))
    if pack:
        out.update(pack_converters(model, dtype, skip=set(out)))
    return out


def quantize_weight(weight: torch.Tensor, mode: str) -> nn.Module:
    """A quantized replacement for a bias-free Linear with this weight ([out, in]). int4 falls back to int8 for
    shapes the packed kernel does not take."""
    if mode == "int4" and Int4Linear.supports(weight.shape):
        return Int4Linear.from_weight(weight)
    return Int8Linear.from_weight(weight)


def is_target(name: str, module: nn.Module, prefixes: tuple[str, ...]) -> bool:
    linear = isinstance(module, nn.Linear) or type(module) is PackedLinear
    return linear and module.bias is None and name.startswith(prefixes)


def plain_weight(module: nn.Module) -> torch.Tensor:
    return module.dense_weight() if isinstance(module, PackedLinear) else module.weight


def target_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name → Linear for every layer `quantize_model` converts: the bias-free linears of the parts its
    family quantizes (`ModelFamily.quantized`)."""
    prefixes = family_of(model.config).quantized
    return {name: m for name, m in model.named_modules() if is_target(name, m, prefixes)}


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
    unfuse(model)  # fused projections back to one packed layer each, so each can be quantized
    for name, linear in target_linears(model).items():
        replace_module(model, name, quantize_weight(plain_weight(linear), mode))
    fuse_int8(model)
    model.quantization = mode
    return model


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers (what the weights occupy in memory)."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())
