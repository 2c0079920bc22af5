"""The Idefics2 image encoder: SigLIP adapted to native resolution (NaViT, "Patch n' Pack").

Images arrive padded (bottom/right) to the largest one of the batch, with `pixel_attention_mask` telling real
pixels from padding. A patch is real when all its pixels are; padded patches get position 0 and are hidden
from attention as keys. Real patches get their position from a fixed `patches_per_side`² grid of learned
embeddings: each image's patch rows/columns are spread evenly over the grid ("bucketed" fractional coordinates),
so an image of any size and aspect ratio uses the whole grid.

Differences from the CLIP encoder of IDEFICS v1 (`idefics/vision.py`): patch conv with bias, no CLS token, no
pre-LayerNorm, and `post_layernorm` *is* applied to the output. Keys: `model.vision_model.*`."""

from __future__ import annotations

import torch
from torch import nn

from ..cpu import ops
from ..vision import VisionAttention, VisionMLP
from .config import Idefics2VisionConfig


def patch_attention_mask(pixel_attention_mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[N, H, W] 0/1 pixels → [N, H // p, W // p] bool: a patch is valid iff all its p×p pixels are.
    Rows/columns beyond a multiple of the patch size are dropped, as the patch convolution drops them."""
    n, h, w = pixel_attention_mask.shape
    rows, cols = h // patch_size, w // patch_size
    pixels = pixel_attention_mask[:, : rows * patch_size, : cols * patch_size].bool()
    return pixels.reshape(n, rows, patch_size, cols, patch_size).all(dim=4).all(dim=2)


def navit_position_ids(patch_mask: torch.Tensor, patches_per_side: int) -> torch.Tensor:
    """[N, rows, cols] bool → [N, rows * cols] position ids into the `patches_per_side`² grid.

    Patch row i of an image with `valid_rows` real rows sits at fractional height i / valid_rows, which falls
    into one of `patches_per_side` equal buckets; likewise for columns. Padding patches get position 0."""
    n, rows, cols = patch_mask.shape
    device = patch_mask.device
    # The reference counts valid rows in the first column and valid columns in the first row (the valid region
    # is a top-left rectangle). float32 throughout, as the reference, so bucket edges fall the same way.
    valid_rows = patch_mask[:, :, 0].sum(1)
    valid_cols = patch_mask[:, 0, :].sum(1)
    boundaries = torch.arange(1 / patches_per_side, 1.0, 1 / patches_per_side, device=device)
    frac_h = torch.arange(rows, device=device, dtype=torch.float32)[None] * (1.0 / valid_rows)[:, None]
    frac_w = torch.arange(cols, device=device, dtype=torch.float32)[None] * (1.0 / valid_cols)[:, None]
    bucket_h = torch.bucketize(frac_h.clamp(max=1.0 - 1e-6), boundaries, right=True)
    bucket_w = torch.bucketize(frac_w.clamp(max=1.0 - 1e-6), boundaries, right=True)
    ids = (bucket_h[:, :, None] * patches_per_side + bucket_w[:, None, :]).reshape(n, -1)
    return torch.where(patch_mask.reshape(n, -1), ids, torch.zeros_like(ids))


class SiglipEmbeddings(nn.Module):
    def __init__(self, config: Idefics2VisionConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.patches_per_side = config.patches_per_side
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size,
                                         stride=config.patch_size)
        self.position_embedding = nn.Embedding(self.patches_per_side ** 2, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        patches = ops.conv2d(self.patch_embedding, pixel_values).flatten(2).transpose(1, 2)  # [N, rows * cols, dim]
        return patches + self.position_embedding(navit_position_ids(patch_mask, self.patches_per_side))


class SiglipLayer(nn.Module):
    def __init__(self, config: Idefics2VisionConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.layer_norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(dim, config.num_attention_heads)  # keys/names as CLIP
        self.layer_norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(dim, config.intermediate_size, config.hidden_act)  # fc1 → act → fc2, as CLIP

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), key_mask)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, config: Idefics2VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, key_mask)
        return x


class Idefics2VisionTransformer(nn.Module):
    """[N, 3, H, W] pixels + [N, rows, cols] patch mask → [N, rows * cols, hidden] features (post-LN)."""

    def __init__(self, config: Idefics2VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = SiglipEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        n, _, h, w = pixel_values.shape
        p = self.config.patch_size
        if h < p or w < p:
            raise ValueError(f"images must be at least {p}x{p} pixels (one patch), got {h}x{w}")
        if patch_mask is None:
            patch_mask = torch.ones(n, h // p, w // p, dtype=torch.bool, device=pixel_values.device)
        x = self.embeddings(pixel_values.to(self.embeddings.patch_embedding.weight.dtype), patch_mask)
        flat = patch_mask.reshape(n, -1)
        key_mask = None if bool(flat.all()) else flat[:, None, None, :]  # [N, 1, 1, keys]
        return self.post_layernorm(self.encoder(x, key_mask))
