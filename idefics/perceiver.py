"""The IDEFICS perceiver resampler: a fixed set of learned latents cross-attends to an image's features
and returns `n_latents` tokens per image, at the vision width.

IDEFICS flavour (differs from Flamingo/OpenFlamingo): keys and values run over [context; latents],
the MLP uses ReLU, optional LayerNorm (with bias) q/k norms over the head dimension, softmax in the
activation dtype after subtracting the row max, and no attention mask or time embeddings."""

from __future__ import annotations

import torch
from torch import nn

from .cpu import ops


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, qk_norms: bool) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.context_layer_norm = nn.LayerNorm(dim)
        self.latents_layer_norm = nn.LayerNorm(dim)
        if qk_norms:
            self.q_layer_norm = nn.LayerNorm(head_dim)
            self.k_layer_norm = nn.LayerNorm(head_dim)
        self.qk_norms = qk_norms
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.output_proj = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        context = self.context_layer_norm(context)
        latents = self.latents_layer_norm(latents)
        both = torch.cat([context, latents], dim=-2)
        n = context.shape[0]
        q = self.q_proj(latents).view(n, -1, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(both).view(n, -1, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(both).view(n, -1, self.heads, self.head_dim).transpose(1, 2)
        if self.qk_norms:
            q, k = self.q_layer_norm(q), self.k_layer_norm(k)
        scores = ops.matmul(q * self.head_dim**-0.5, k.transpose(-1, -2))
        attn = (scores - scores.amax(dim=-1, keepdim=True).detach()).softmax(dim=-1)
        return self.output_proj(ops.matmul(attn, v).transpose(1, 2).flatten(-2))


class PerceiverMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, hidden, bias=False)
        self.c_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.relu(self.fc(self.ln(x))))


class PerceiverResampler(nn.Module):
    """[images, tokens, dim] → [images, n_latents, dim]. Keys: `latents`, `blocks.{i}.0.*` (attention),
    `blocks.{i}.1.*` (MLP), `layer_norm`."""

    def __init__(self, dim: int, depth: int, heads: int, head_dim: int, n_latents: int, qk_norms: bool) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(n_latents, dim))
        self.blocks = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads, head_dim, qk_norms), PerceiverMLP(dim, 4 * dim)])
            for _ in range(depth)
        )
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        latents = self.latents.repeat(context.shape[0], 1, 1)
        for attn, mlp in self.blocks:
            latents = attn(context, latents) + latents
            latents = mlp(latents) + latents
        return self.layer_norm(latents)
