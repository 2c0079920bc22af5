"""The LLaMA decoder block (self-attention with RoPE and optional grouped-query attention, SwiGLU MLP),
with keys as in Hugging Face checkpoints: `self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`,
`input_layernorm`, `post_attention_layernorm`."""

from __future__ import annotations

import torch
from torch import nn

from .cpu import ops
from .layers import KVCache, RMSNorm, SwiGLU, apply_rotary, attention


class SelfAttention(nn.Module):
    FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}  # one matmul on CPU (`cpu.packing.fuse_for_cpu`)

    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        b, t, _ = x.shape
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        qkv = ops.fused_output(x, self.q_proj, self.k_proj, self.v_proj)
        flat = qkv.split([h * d, kv * d, kv * d], -1) if qkv is not None else \
            [p(x) for p in (self.q_proj, self.k_proj, self.v_proj)]
        fused = cache.rotate_and_update(layer, *flat, rope) if cache is not None else None
        if fused is not None:  # rotation and cache write in one CPU op
            q, k, v = fused
        else:
            if qkv is not None:  # rotate the query and key heads together, in one pass
                heads = qkv.view(b, t, h + 2 * kv, d).transpose(1, 2)
                qk = apply_rotary(heads[:, :h + kv], *rope)
                q, k, v = qk[:, :h], qk[:, h:], heads[:, h + kv:]
            else:
                q, k, v = (p.view(b, t, -1, d).transpose(1, 2) for p in flat)
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            if cache is not None:
                k, v = cache.update(layer, k, v)
        out = attention(q, k, v, mask, enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, hidden: int, heads: int, kv_heads: int, eps: float) -> None:
        super().__init__()
        self.self_attn = SelfAttention(dim, heads, kv_heads)
        self.mlp = SwiGLU(dim, hidden)
        self.input_layernorm = RMSNorm(dim, eps)
        self.post_attention_layernorm = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        if cache is not None and x.shape[1] == 1:  # a decoding step: one C++ op where it applies
            out = ops.decoder_layer_step(self, x, rope, mask, cache, layer)
            if out is not None:
                return out
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


def causal_mask(attention_mask: torch.Tensor, query_len: int, sliding_window: int | None = None,
                ) -> torch.Tensor | None:
    """Boolean [B, 1, T, S] mask: query t (the last T of S positions) sees keys s <= its own position that are
    not padding. Padding queries see themselves only, so no row is empty (an empty row would give NaN).
    With `sliding_window` W (Mistral), keys more than W - 1 positions back are hidden too (t - W < s <= t).
    Returns None when plain causal attention over all keys is exact (no padding, single query)."""
    b, s = attention_mask.shape
    key_ok = attention_mask.bool()
    if query_len == 1 and bool(key_ok.all()) and (sliding_window is None or s <= sliding_window):
        return None
    q_pos = torch.arange(s - query_len, s, device=attention_mask.device)
    k_pos = torch.arange(s, device=attention_mask.device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None] & key_ok[:, None, :]  # [B, T, S]
    if sliding_window is not None:
        allowed &= (k_pos[None, :] > q_pos[:, None] - sliding_window)[None]
    allowed |= (k_pos[None, :] == q_pos[:, None])[None]
    return allowed[:, None]


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only (left padding shifts nothing); padding slots get position 1,
    as in the reference."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)
