"""Image encoders. An encoder maps pixel values [images, 3, H, W] to features [images, tokens, width].

`ClipVisionTransformer` is the CLIP ViT copy inside the IDEFICS checkpoints (keys `model.vision_model.*`).
IDEFICS uses the output of the last encoder layer, CLS token included, *before* `post_layernorm`
(the post-LN only feeds the pooled output, which IDEFICS discards). Other encoders plug in through
`build_vision_encoder` (e.g. EfficientNet-Lite0 for idefics-mini)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .packing import conv2d

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "silu": F.silu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.image_size, self.patch_size = config.image_size, config.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(dim))
        self.patch_embedding = nn.Conv2d(config.num_channels, dim, config.patch_size, config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(config.num_image_tokens, dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        if (height, width) != (self.image_size, self.image_size):
            raise ValueError(f"images must be {self.image_size}x{self.image_size} pixels, got {height}x{width}")
        patches = conv2d(self.patch_embedding, pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # [N, patches, dim]
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight.to(patches.dtype)


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention over an image's tokens (CLIP, and SigLIP with a key mask for the
    padded patches of a native-resolution image)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = (p(x).view(n, t, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return self.out_proj(out.transpose(1, 2).reshape(n, t, d))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.layer_norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(dim, config.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(dim, config.intermediate_size, config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class ClipVisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)  # sic: checkpoint key
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)  # loaded, unused

    @property
    def output_width(self) -> int:
        return self.config.embed_dim

    @property
    def num_tokens(self) -> int:
        return self.config.num_image_tokens

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)))


def build_vision_encoder(config: VisionConfig) -> nn.Module:
    """The encoder named by `config.model_type`. Every encoder exposes `output_width`, `num_tokens` and maps
    [images, 3, H, W] → [images, tokens, output_width]."""
    if config.model_type in ("idefics_vision", "clip_vision_model", "clip"):
        return ClipVisionTransformer(config)
    if config.model_type == "efficientnet_lite0":
        from .backbones.efficientnet import EfficientNetLite0

        net = EfficientNetLite0()
        net.frozen = True  # BatchNorm keeps its ImageNet statistics even when the parent model trains
        return EfficientNetEncoder(net)
    raise ValueError(f"unknown vision_config.model_type {config.model_type!r}")


class EfficientNetEncoder(nn.Module):
    """Adapts EfficientNet-Lite0 (feature map 7x7x1280 at 224 px) to the encoder contract: 49 tokens x 1280."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    @property
    def output_width(self) -> int:
        return 1280

    @property
    def num_tokens(self) -> int:
        return 49

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(pixel_values.to(next(self.net.parameters()).dtype))
