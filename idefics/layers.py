"""Building blocks shared by the decoders: RMSNorm, rotary embeddings, SwiGLU MLP, the KV cache,
and the decoupled embedding / output layers that add new tokens next to a frozen vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cpu import ops


class RMSNorm(nn.Module):
    """LLaMA RMSNorm. Statistics in float32; cast to the weight's dtype only when that is half precision
    (as the reference does, so bf16 results match bit for bit). `F.rms_norm` on the float32 input computes the
    reference's x * rsqrt(mean(x^2) + eps) bit for bit in one kernel instead of five."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        out = ops.rms_norm(x, weight, self.eps)
        if out is not None:
            return out
        x = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(weight.dtype)
        return weight * x


class SwiGLU(nn.Module):
    FUSED = {"gate_up_proj": ("gate_proj", "up_proj")}  # one matmul on CPU (`cpu.packing.fuse_for_cpu`)

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = ops.run_together(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for LLaMA's rotate-half RoPE, computed in float32 for the given positions. The sine comes
    with the sign of rotate-half folded in ([-sin, sin] over the two halves), so `apply_rotary` needs one
    swap of halves instead of a negation and a concatenation (same products: IEEE negation is exact)."""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self.frequencies(), persistent=False)

    def frequencies(self, device: torch.device | str | None = None) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        return 1.0 / (self.theta ** exponents)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # [B, T, D/2]
        sin = freqs.sin()
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype)[:, None], torch.cat([-sin, sin], dim=-1).to(dtype)[:, None]  # [B, 1, T, D]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] written as [x2, x1] * [-sin, sin]."""
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    return x * cos + swapped * signed_sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              enable_gqa: bool = False) -> torch.Tensor:
    """`scaled_dot_product_attention`, except for single-query (decoding) steps on CPU: those read k/v as they lie
    (a strided view of the KV cache) in this project's float32 kernel (`ops.decode_attention`), or, where
    it does not apply, run SDPA in float32 for bf16/fp16 (its fused CPU kernel is 3-5x slower for one query in
    reduced precision; float32 is at least as accurate: the kernel accumulates in float32 too). The result is in
    the input dtype."""
    if q.shape[-2] == 1 and q.device.type == "cpu":
        out = ops.decode_attention(q, k, v, mask)
        if out is not None:
            return out
        if q.dtype in (torch.bfloat16, torch.float16):
            if mask is not None and mask.is_floating_point():
                mask = mask.float()
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                 enable_gqa=enable_gqa)
            return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


class KVCache:
    """Preallocated self-attention keys/values for every layer, position-major: [layers, B, max_len, kv_heads,
    head_dim], so a decoding step reads all heads of a position from one place (`attention` reads the cache as it
    lies); layers see [B, kv_heads, positions, head_dim] views. `length` is the number of positions written so far
    (the same for every row: rows are left-padded)."""

    def __init__(self, n_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (n_layers, batch, max_len, kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0
        self.max_len = max_len
        # The layers' C++ decoding-step arguments that do not change from step to step (`cpu.steps.step_plan`).
        self.step_plans: dict = {}

    def positions(self, n: int) -> tuple[int, int]:
        """Where n new positions go: [start, end); an error when they do not fit."""
        start, end = self.length, self.length + n
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.max_len} allocated")
        return start, end

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.positions(k.shape[2])
        self.keys[layer, :, start:end] = k.transpose(1, 2)
        self.values[layer, :, start:end] = v.transpose(1, 2)
        return self.layer(layer, end)

    def layer(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [0, end) of a layer, as [B, kv_heads, end, head_dim] views."""
        return self.keys[layer, :, :end].transpose(1, 2), self.values[layer, :, :end].transpose(1, 2)

    def rotate_and_update(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...] | None:
        """q, k, v [B, T, heads * head_dim] → rotated q [B, heads, T, head_dim] and this layer's keys/values up to
        the new positions, with k rotated and stored, as `apply_rotary` then `update` give them; one CPU op
        (`ops.rotary_into_cache`). None where that op does not apply: use those two instead."""
        start, end = self.positions(q.shape[1])
        q = ops.rotary_into_cache(q, k, v, rope, self.keys, self.values, layer, start)
        return None if q is None else (q, *self.layer(layer, end))

    def advance(self, n: int) -> None:
        self.length += n

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only some batch rows (finished rows leave the batch)."""
        self.keys = self.keys[:, rows]
        self.values = self.values[:, rows]

    def drop_front(self, n: int) -> None:
        """Forget the first n positions (padding in every row): the cache shrinks by n."""
        self.keys = self.keys[:, :, n:].contiguous()
        self.values = self.values[:, :, n:].contiguous()
        self.length -= n
        self.max_len -= n

    @staticmethod
    def joined(parts: list["KVCache"], capacity: int) -> "KVCache":
        """The rows of several caches in one, each left-padded to the longest length; room for `capacity`
        positions."""
        first = parts[0]
        n_layers, _, _, kv_heads, head_dim = first.keys.shape
        length = max(p.length for p in parts)
        out = KVCache(n_layers, sum(p.keys.shape[1] for p in parts), kv_heads, capacity, head_dim,
                      first.keys.dtype, first.keys.device)
        row = 0
        for part in parts:
            rows, shift = part.keys.shape[1], length - part.length
            out.keys[:, row:row + rows, shift:length] = part.keys[:, :, :part.length]
            out.values[:, row:row + rows, shift:length] = part.values[:, :, :part.length]
            row += rows
        out.length = length
        return out


class DecoupledEmbedding(nn.Module):
    """A frozen-vocabulary embedding plus `additional_embedding` rows for new tokens (ids >= vocab_size)."""

    def __init__(self, vocab_size: int, additional: int, dim: int, padding_idx: int | None = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))
        self.padding_idx = padding_idx
        self.additional_embedding = nn.Embedding(additional, dim) if additional > 0 else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.additional_embedding is None:
            return F.embedding(ids, self.weight)
        is_new = ids >= self.vocab_size
        out = F.embedding(torch.where(is_new, 0, ids), self.weight)
        if is_new.any():
            out[is_new] = self.additional_embedding(ids[is_new] - self.vocab_size).to(out.dtype)
        return out


class DecoupledLinear(nn.Module):
    """Output layer whose logits are [vocabulary logits, additional-token logits]."""

    def __init__(self, dim: int, vocab_size: int, additional: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))
        self.additional_fc = nn.Linear(dim, additional, bias=False) if additional > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.weight)
        if self.additional_fc is None:
            return logits
        return torch.cat([logits, self.additional_fc(x)], dim=-1)
