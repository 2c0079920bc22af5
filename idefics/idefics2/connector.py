"""The Idefics2 connector: vision features → a fixed number of text-width tokens per image.

`modality_projection` (a SwiGLU MLP, vision width → text intermediate → text width) then the perceiver
resampler: learned latents that cross-attend to the projected patches (and to themselves) through `depth`
pre-norm layers, with grouped-query attention and RMSNorm. Each image becomes `resampler_n_latents` tokens
(64 for idefics2-8b). Keys: `model.connector.modality_projection.*`, `model.connector.perceiver_resampler.*`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import RMSNorm, SwiGLU
from .config import Idefics2Config, Idefics2PerceiverConfig


def projection_mlp(in_dim: int, hidden: int, out_dim: int) -> SwiGLU:
    """The shared SwiGLU MLP (gate/up/down, no bias), with an output width different from its input width."""
    mlp = SwiGLU(in_dim, hidden)
    mlp.down_proj = nn.Linear(hidden, out_dim, bias=False)
    return mlp


class PerceiverAttention(nn.Module):
    """Queries from the latents; keys/values from [context; latents]. GQA: `kv_heads` < `heads`."""

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, latents: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        n, q_len, _ = latents.shape
        both = torch.cat([context, latents], dim=1)
        q = self.q_proj(latents).view(n, q_len, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(both).view(n, both.shape[1], self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(both).view(n, both.shape[1], self.kv_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(out.transpose(1, 2).reshape(n, q_len, -1))


class PerceiverLayer(nn.Module):
    def __init__(self, config: Idefics2PerceiverConfig) -> None:
        super().__init__()
        dim, eps = config.hidden_size, config.rms_norm_eps
        self.input_latents_norm = RMSNorm(dim, eps)
        self.input_context_norm = RMSNorm(dim, eps)
        self.self_attn = PerceiverAttention(dim, config.resampler_n_heads, config.num_key_value_heads,
                                            config.resampler_head_dim)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, 4 * dim)

    def forward(self, latents: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        latents = latents + self.self_attn(self.input_latents_norm(latents), self.input_context_norm(context), key_mask)
        return latents + self.mlp(self.post_attention_layernorm(latents))


class PerceiverResampler(nn.Module):
    def __init__(self, config: Idefics2PerceiverConfig) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.ones(config.resampler_n_latents, config.hidden_size))
        self.layers = nn.ModuleList(PerceiverLayer(config) for _ in range(config.resampler_depth))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        """context [N, patches, dim], context_mask [N, patches] bool → [N, n_latents, dim]."""
        n = context.shape[0]
        latents = self.latents.to(context.dtype).unsqueeze(0).expand(n, -1, -1)
        key_mask = None
        if not bool(context_mask.all()):  # padded patches are hidden; the latents always see each other
            ones = torch.ones(n, latents.shape[1], dtype=torch.bool, device=context.device)
            key_mask = torch.cat([context_mask.bool(), ones], dim=1)[:, None, None, :]
        for layer in self.layers:
            latents = layer(latents, context, key_mask)
        return self.norm(latents)


class Idefics2Connector(nn.Module):
    def __init__(self, config: Idefics2Config) -> None:
        super().__init__()
        text, vision = config.text_config, config.vision_config
        self.modality_projection = projection_mlp(vision.hidden_size, text.intermediate_size, text.hidden_size)
        self.perceiver_resampler = PerceiverResampler(config.perceiver_config)

    def forward(self, image_features: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """[N, patches, vision width] + [N, patches] bool → [N, n_latents, text width]."""
        return self.perceiver_resampler(self.modality_projection(image_features), patch_mask)
