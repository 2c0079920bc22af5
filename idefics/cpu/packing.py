"""CPU inference layouts: linear weights reordered once for a fast kernel (`PackedLinear`: this project's
kernel where the CPU has AVX-512 BF16, `kernels.py`, else oneDNN's blocked format), and sibling projections
that read the same input fused into one matmul (`FusedLinear`). Both keep the model's state dict unchanged, so a
packed model saves and loads like a plain one. `checkpoint.load_model(..., convert=CpuLayout(pack=True))` builds
them while the weights stream in (`quantize.weight_converters`); `pack_for_cpu` converts a loaded model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels


def layout(dtype: torch.dtype) -> str | None:
    """How `PackedLinear` stores CPU weights of `dtype` here: "kernel" (this project's panels, AVX-512 BF16),
    "onednn" (oneDNN's blocked layout; it packs bf16 only on CPUs with AVX-512 BW/VL/DQ or AVX-NE-CONVERT),
    "widened" (bf16 on other CPUs, e.g. AVX2 laptops: the plain weight, computed in float32), "plain" (float32 on
    the AVX2 extension: the plain weight, its row kernel for decoding, ATen's float32 GEMM for prompts), or None."""
    if dtype not in (torch.float32, torch.bfloat16):
        return None
    if kernels.available():
        return "kernel"
    onednn = torch.backends.mkldnn.is_available()
    if dtype == torch.float32:
        return "plain" if kernels.widening_available() else "onednn" if onednn else None
    return "onednn" if onednn and kernels.onednn_has_bf16() else "widened"


def packable(dtype: torch.dtype) -> bool:
    return layout(dtype) is not None


def widens(t: torch.Tensor) -> bool:
    """t is a bf16 CPU tensor on a CPU without bf16 arithmetic ("widened" layout): its products are faster in
    float32 there (ATen's bf16 batched matmul ran 46x, its bf16 convolution ~6x slower than float32's)."""
    return t.dtype == torch.bfloat16 and t.is_cpu and layout(torch.bfloat16) == "widened"


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b; for `widens` tensors in float32, rounded once to bf16 (ATen's bf16 path sums in float32 too)."""
    return (a.float() @ b.float()).to(a.dtype) if widens(a) else a @ b


def conv2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) (a vision patch embedding); for `widens` weights in float32, rounded once to bf16."""
    if not widens(conv.weight):
        return conv(x)
    bias = None if conv.bias is None else conv.bias.float()
    out = F.conv2d(x.float(), conv.weight.float(), bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return out.to(conv.weight.dtype)


# Up to this many rows, "widened" products run on ATen's bf16 matrix-vector path where the AVX2 extension is
# missing (it decides the same split itself); beyond, widening the whole weight once and a float32 GEMM is faster
# (with `matmul` below: a 463M bf16 prefill 8.75 s -> 2.2-3.0 s on a 2-core AVX2 machine, where ATen's bf16 GEMM
# ran at 14 GFLOP/s).
WIDENED_FEW_ROWS = 16


class PackedLinear(nn.Module):
    """A float Linear whose weight is reordered once for a fast CPU kernel, for inference.

    Where the CPU has AVX-512 BF16, this project's kernel (`kernels`): decoding reads bf16 weights up to ~20%
    and float32 weights ~40% faster than oneDNN, prefill runs about as fast; bf16 results equal oneDNN's bit for
    bit, float32 ones differ by rounding only. On CPUs without bf16 arithmetic in either (AVX2 only), bf16 weights
    stay plain and are computed in float32 ("widened": `layout`), within a rounding of ATen's bf16 results.
    Otherwise oneDNN's blocked layout: plain
    `F.linear` re-arranges the weight on every call for bf16 and goes through MKL for float32, which runs its
    slower generic path on AMD AVX-512 CPUs, where the prepacked oneDNN kernel runs 1.4-1.7x faster for
    decoding and ~2x for float32 prefill. The state dict holds the plain weight (unpacked on save, repacked on
    load), so checkpoints and `state_dict()` are unchanged; no autograd."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(self.pack(weight), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @staticmethod
    def pack(weight: torch.Tensor) -> torch.Tensor:
        weight = weight.detach()
        kind = layout(weight.dtype)
        if kind is None:
            raise ValueError(f"cannot pack a {weight.dtype} weight on this CPU (see packing.layout); keep the nn.Linear")
        if kind == "kernel":
            return kernels.pack(weight)
        if kind in ("widened", "plain"):
            return weight.contiguous()
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)

    def dense_weight(self) -> torch.Tensor:
        """The plain [out, in] weight."""
        if self.weight.is_mkldnn:
            return self.weight.to_dense()
        if self.weight.dim() == 2:  # widened or plain
            return self.weight
        return kernels.unpack(self.weight, self.out_features, self.in_features)

    @staticmethod
    def supports(linear: nn.Module) -> bool:
        w = getattr(linear, "weight", None)
        return (type(linear) is nn.Linear and w is not None and w.device.type == "cpu" and not w.is_meta
                and packable(w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias  # (one lookup each: a decoding step runs ~80 of these)
        if x.dtype != weight.dtype:  # mixed-dtype callers get the plain path
            return F.linear(x, self.dense_weight().to(x.dtype), None if bias is None else bias.to(x.dtype))
        if weight.is_mkldnn:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        if weight.dim() == 2:
            return widened_linear(x, weight, bias)
        return kernels.linear(x, weight, bias, self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        destination[prefix + "weight"] = self.dense_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        if prefix + "weight" in state_dict:
            self.weight = nn.Parameter(self.pack(state_dict[prefix + "weight"].to(self.dtype)), requires_grad=False)
        elif strict:
            missing_keys.append(prefix + "weight")
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                bias = state_dict[prefix + "bias"].detach()
                self.bias = nn.Parameter(bias.to(self.dtype), requires_grad=False)
            elif strict:
                missing_keys.append(prefix + "bias")

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def extra_repr(self) -> str:
        kernel = ("oneDNN-packed" if self.weight.is_mkldnn else "kernel-packed" if self.weight.dim() != 2
                  else "widened to float32" if self.dtype == torch.bfloat16 else "plain (AVX2 kernel)")
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{kernel} {str(self.dtype).removeprefix('torch.')}")


def widened_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T (+ b) for a plain bf16 weight in float32 arithmetic, rounded once to bf16 (the "widened" layout), or
    for a plain float32 one ("plain": only where the AVX2 extension is)."""
    if kernels.widening_available():  # as below, few rows on its own row kernel (csrc/avx2.cpp)
        return kernels.widening_linear(x, weight, bias)
    if x.numel() <= WIDENED_FEW_ROWS * weight.shape[1]:
        return F.linear(x, weight, bias)  # ATen's bf16 matrix-vector path: float32 sums as well
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


class PackedOutput(PackedLinear):
    """IDEFICS' decoupled output layer (`layers.DecoupledLinear`) with its vocabulary weight packed: logits are
    [vocabulary logits, `additional_fc` logits]. Same state-dict keys (`weight`, `additional_fc.weight`)."""

    def __init__(self, weight: torch.Tensor, additional_fc: nn.Module | None) -> None:
        super().__init__(weight, None)
        self.additional_fc = additional_fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        return logits if self.additional_fc is None else torch.cat([logits, self.additional_fc(x)], dim=-1)


class FusedRows:
    """What the fused layers (`FusedLinear`, `quantize.FusedInt8Linear`) share: the row ranges of their parts, and
    no state-dict entries of their own. The parts (`FusedPart`) own the original keys: each saves and loads its
    rows through `part_keys` / `part_state` / `load_part`, and `unfused_part(state)` rebuilds it as a layer alone."""

    part_keys: tuple[str, ...] = ("weight",)

    def set_parts(self, sizes: list[int]) -> None:
        self.sizes = list(sizes)
        self.starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        pass

    def _load_from_state_dict(self, *args) -> None:
        pass

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fused {self.sizes}"


class FusedLinear(FusedRows, PackedLinear):
    """Several bias-free packed linears that read the same input (q/k/v, gate/up), run as one matmul whose
    output is their outputs side by side: one kernel call and one pass over a longer weight instead of several
    (about 8% faster matrix-vector products). Each output row is computed as before, so
    results are unchanged. The original layers stay in the module tree as `FusedPart`s that own the state-dict
    keys: this module saves and loads nothing itself."""

    def __init__(self, weights: list[torch.Tensor]) -> None:
        super().__init__(torch.cat(weights), None)
        self.set_parts([w.shape[0] for w in weights])

    def part_state(self, start: int, rows: int) -> dict[str, torch.Tensor]:
        return {"weight": self.dense_weight()[start:start + rows]}

    def load_part(self, start: int, rows: int, state: dict[str, torch.Tensor]) -> None:
        dense = self.dense_weight()
        dense[start:start + rows] = state["weight"]
        self.weight = nn.Parameter(self.pack(dense), requires_grad=False)

    @staticmethod
    def unfused_part(state: dict[str, torch.Tensor]) -> PackedLinear:
        return PackedLinear(state["weight"], None)


class FusedPart(nn.Module):
    """Rows [start, start + out_features) of a fused layer (`FusedLinear`, `quantize.FusedInt8Linear`): keeps the
    original layer's name and state-dict keys (`weight`, and `scales` for int8) and, called alone, gives that
    layer's output."""

    def __init__(self, fused: nn.Module, start: int, rows: int) -> None:
        super().__init__()
        self.__dict__["fused"] = fused  # not a submodule: the parent owns it (and its parameters) once
        self.start, self.out_features, self.in_features = start, rows, fused.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)[..., self.start:self.start + self.out_features]

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        for key, tensor in self.fused.part_state(self.start, self.out_features).items():
            destination[prefix + key] = tensor

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        missing = [prefix + key for key in self.fused.part_keys if prefix + key not in state_dict]
        if missing:
            if strict:
                missing_keys.extend(missing)
            return
        state = {key: state_dict[prefix + key] for key in self.fused.part_keys}
        self.fused.load_part(self.start, self.out_features, state)

    def extra_repr(self) -> str:
        return f"rows {self.start}:{self.start + self.out_features} of the fused layer"


def fused_of(*linears: nn.Module) -> nn.Module | None:
    """The fused layer (`FusedLinear`, `quantize.FusedInt8Linear`) whose parts are `linears`, in order; None when
    they are not."""
    fused = getattr(linears[0], "fused", None)
    if fused is not None and all(getattr(m, "fused", None) is fused for m in linears) \
            and [m.start for m in linears] == fused.starts:
        return fused
    return None


def fusable_groups(model: nn.Module):
    """(qualified name, module, part names, fused name) of every block that declares sibling linears reading the
    same input (`FUSED = {fused name: part names}` on its class: self-attention's q/k/v, SwiGLU's gate/up)."""
    for name, module in model.named_modules():
        for fused_name, names in getattr(type(module), "FUSED", {}).items():
            yield name, module, list(names), fused_name


def install_fused(module: nn.Module, names: list[str], fused_name: str, fused: nn.Module) -> None:
    """`fused` (with `starts` and `sizes`: `FusedLinear`, `quantize.FusedInt8Linear`) as `module.<fused_name>`,
    and a `FusedPart` of it under each of `names`."""
    setattr(module, fused_name, fused)
    for name, start, size in zip(names, fused.starts, fused.sizes):
        setattr(module, name, FusedPart(fused, start, size))


@torch.no_grad()
def fuse_for_cpu(model: nn.Module) -> nn.Module:
    """In place: every block whose `q_proj, k_proj, v_proj` (self-attention) or `gate_proj, up_proj` (SwiGLU)
    are bias-free CPU float linears (plain or packed) gets one `FusedLinear` (`qkv_proj` / `gate_up_proj`) and
    `FusedPart`s in their place. Cross-attention, whose keys and values read the image latents, has no such
    triple."""
    def fusable(p: nn.Module | None) -> bool:
        return p is not None and p.bias is None and (type(p) is PackedLinear or PackedLinear.supports(p))

    for _, module, names, fused_name in fusable_groups(model):
        parts = [getattr(module, n, None) for n in names]
        if all(fusable(p) for p in parts):
            weights = [p.dense_weight() if type(p) is PackedLinear else p.weight for p in parts]
            install_fused(module, names, fused_name, FusedLinear(weights))
    return model


@torch.no_grad()
def unfuse(model: nn.Module) -> nn.Module:
    """Undo `fuse_for_cpu` (and `quantize.fuse_int8`) in place: each `FusedPart` becomes a layer of its own rows
    again (`PackedLinear`, or `quantize.Int8Linear`)."""
    for _, module, names, fused_name in fusable_groups(model):
        fused = getattr(module, fused_name, None)
        if isinstance(fused, FusedRows):
            for name in names:
                setattr(module, name, fused.unfused_part(getattr(module, name).state_dict()))
            delattr(module, fused_name)
    return model


@torch.no_grad()
def pack_for_cpu(model: nn.Module) -> nn.Module:
    """In place: fuse sibling projections (`fuse_for_cpu`), then replace every other float Linear of
    `model.model` (vision, perceiver, decoder, cross-attention) by a `PackedLinear`, and the output layer
    (`packed_output`) unless it shares the embedding. For inference on CPU; modules on other devices are left
    alone."""
    fuse_for_cpu(model)  # from the plain weights: each is packed once
    inner = getattr(model, "model", model)
    for name, module in list(inner.named_modules()):
        if PackedLinear.supports(module):
            parent, _, leaf = name.rpartition(".")
            setattr(inner.get_submodule(parent), leaf, PackedLinear(module.weight, module.bias))
    head, build = getattr(model, "lm_head", None), packed_output(model)
    embed = getattr(inner, "embed_tokens", None)
    if (build is not None and head.weight is not getattr(embed, "weight", None)
            and head.weight.device.type == "cpu" and packable(head.weight.dtype)):
        model.lm_head = build(head.weight)
    return model


def packed_output(model: nn.Module):
    """weight → packed output layer for `model.lm_head`, or None: IDEFICS' `DecoupledLinear` becomes a
    `PackedOutput`, a plain bias-free Linear (Idefics2's) a `PackedLinear`; one tied to the embedding stays as it is
    (packing would store the weight twice)."""
    head = getattr(model, "lm_head", None)
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return None
    if head is not None and hasattr(head, "additional_fc"):  # a decoupled output layer (new tokens beside)
        return lambda w, fc=head.additional_fc: PackedOutput(w, fc)
    if type(head) is nn.Linear and head.bias is None:
        return lambda w: PackedLinear(w, None)
    return None


def pack_converters(model: nn.Module, dtype: torch.dtype, skip: set[str] = frozenset()) -> dict:
    """For loading: weight name → (module name, build(weight) → module or None) for every Linear of `model.model`
    not in `skip` (packed), its sibling projections (fused: their builders collect the group and install the
    fused layer with its last weight, returning None) and an untied output layer (`packed_output`). Biases arrive
    afterwards through the state dict (a meta placeholder marks that the layer has one)."""
    if not packable(dtype):
        return {}
    out = {}
    inner = getattr(model, "model", None)
    for name, module in (inner.named_modules() if inner is not None else ()):
        key = f"model.{name}.weight"
        if type(module) is nn.Linear and key not in skip:
            has_bias = module.bias is not None
            out[key] = (f"model.{name}", lambda w, b=has_bias: PackedLinear(
                w, torch.empty(w.shape[0], dtype=w.dtype, device="meta") if b else None))
    for name, module, names, fused_name in fusable_groups(model):
        keys = [f"{name}.{n}.weight" for n in names]
        parts = [getattr(module, n, None) for n in names]
        if all(type(p) is nn.Linear and p.bias is None for p in parts) and not skip.intersection(keys):
            collect = FusedCollector(module, names, fused_name)
            for n, key in zip(names, keys):
                out[key] = (f"{name}.{n}", lambda w, n=n, c=collect: c(n, w))
    build = packed_output(model)
    if build is not None and "lm_head.weight" not in skip:
        out["lm_head.weight"] = ("lm_head", build)
    return out


class FusedCollector:
    """Gathers the weights of one fusable group as they are read and installs the fused layer with the last
    one (the checkpoint's float weights are never packed twice). Returns None: nothing to replace per weight.
    `prepare(weight)` turns each weight into what `build(list)` fuses as soon as it arrives (int8: quantized
    rows, so no float weight of the group waits for the others)."""

    def __init__(self, module: nn.Module, names: list[str], fused_name: str, build=FusedLinear,
                 prepare=lambda w: w) -> None:
        self.module, self.names, self.fused_name, self.pending = module, names, fused_name, {}
        self.build, self.prepare = build, prepare

    def __call__(self, name: str, weight: torch.Tensor) -> None:
        self.pending[name] = self.prepare(weight)
        if len(self.pending) == len(self.names):
            fused = self.build([self.pending.pop(n) for n in self.names])
            install_fused(self.module, self.names, self.fused_name, fused)
