"""Image encoders. An encoder maps pixel values [images, 3, H, W] to features [images, tokens, width].

`ClipVisionTransformer` is the CLIP ViT copy inside the IDEFICS checkpoints (keys `model.vision_model.*`).
IDEFICS uses the output of the last encoder layer, CLS token included, *before* `post_layernorm`
(the post-LN only feeds the pooled output, which IDEFICS discards). Other encoders plug in through
`build_vision_encoder` (e.g. EfficientNet-Lite0 for idefics-mini)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .cpu import ops

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
        patches = ops.conv2d(self.patch_embedding, pixel_values.to(self.patch_embedding.weight.dtype))
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
        return EfficientNetEncoder(net, label_tokens=int(config.extra.get("label_tokens", 0)),
                                   label_width=int(config.extra.get("label_width", 0)),
                                   position_code=bool(config.extra.get("position_code", False)),
                                   label_words=int(config.extra.get("label_words", 0)))
    raise ValueError(f"unknown vision_config.model_type {config.model_type!r}")


class EfficientNetEncoder(nn.Module):
    """Adapts EfficientNet-Lite0 to the encoder contract: [images, 3, 224, 224] → [images, tokens, 1280].

    Tokens: the 7×7 feature map (49 tokens), optionally with a fixed 2-D sinusoidal position code added (a
    convolutional feature carries little of where it is, and the perceiver has no position embedding of its
    own), then optionally `label_tokens` tokens that let the frozen ImageNet classifier speak: for each of its
    top-k classes, the language model's own embedding of the class name (`class_names`, [1000, label_width],
    a frozen buffer rebuilt from the backbones' sources), its probability and its rank. They skip the
    perceiver (`passthrough_tokens`): the cross-attention reads them beside its latents. With `label_words` = S,
    each label token also carries the embedding of its name's first token (`class_words`, unit norm) and the ids
    of the S tokens that name its class (`class_word_ids`: the name's first tokens, then the kind's first token;
    each id as two multiples of 1/256 below 1, exact in bfloat16); `words` turns the ids into the language
    model's own embeddings for the cross-attention's word path.
    """

    FEATURE_WIDTH, GRID = 1280, 7
    POSITION_AMPLITUDE = 0.5  # the features are ReLU6 outputs with mean ~0.2 and std ~0.7

    def __init__(self, net: nn.Module, label_tokens: int = 0, label_width: int = 0, position_code: bool = False,
                 label_words: int = 0):
        super().__init__()
        self.net = net
        room = self.FEATURE_WIDTH - label_tokens - 3 - 2 * label_words
        room = room // 2 if label_words else room
        if label_tokens and not 0 < label_width <= room:
            raise ValueError(f"label_width must be in 1..{room} with label_tokens={label_tokens} and "
                             f"label_words={label_words}, got {label_width}")
        if label_words and not label_tokens:
            raise ValueError("label_words needs label_tokens")
        self.label_tokens, self.label_width, self.label_words = label_tokens, label_width, label_words
        if label_tokens:
            self.register_buffer("class_names", torch.zeros(net._fc.out_features, label_width))
        if label_words:
            classes = net._fc.out_features
            self.register_buffer("class_words", torch.zeros(classes, label_width))
            self.register_buffer("class_word_ids", torch.full((classes, label_words), -1, dtype=torch.long))
        self.uses_position_code = position_code
        self._position_code: torch.Tensor | None = None  # built on first use: models are built on the meta device

    @classmethod
    def sinusoidal_grid(cls, device: torch.device | str = "cpu") -> torch.Tensor:
        """[49, 1280]: even channels follow the row, odd ones the column, at 8 frequencies and 80 phases."""
        grid = torch.arange(cls.GRID, dtype=torch.float64, device=device)
        channel = torch.arange(cls.FEATURE_WIDTH, device=device)
        freq = (channel // 2 % 8 + 1).double() * math.pi / cls.GRID
        phase = (channel // 16).double() * (2 * math.pi / 80)
        rows = torch.sin(grid[:, None] * freq + phase)  # [7, 1280]
        by_row = rows[:, None, :].expand(cls.GRID, cls.GRID, -1)
        by_col = rows[None, :, :].expand(cls.GRID, cls.GRID, -1)
        code = torch.where(channel % 2 == 0, by_row, by_col).reshape(cls.GRID ** 2, cls.FEATURE_WIDTH)
        return (cls.POSITION_AMPLITUDE * code).float()

    @property
    def output_width(self) -> int:
        return self.FEATURE_WIDTH

    @property
    def num_tokens(self) -> int:
        return self.GRID ** 2 + self.label_tokens

    @property
    def passthrough_tokens(self) -> int:
        """The label tokens go to the cross-attention as they are, beside the perceiver's latents."""
        return self.label_tokens

    def forward(self, pixel_values: torch.Tensor, class_probs: torch.Tensor | None = None) -> torch.Tensor:
        """`class_probs` [images, 1000] replaces the classifier's probabilities where a row is not NaN
        (training on made-up predictions teaches the blocks to name any class)."""
        features = self.net.forward_features(pixel_values.to(next(self.net.parameters()).dtype))
        tokens = features
        if self.uses_position_code:
            code = self._position_code
            if code is None or code.device != features.device or code.dtype != features.dtype:
                code = self._position_code = self.sinusoidal_grid(features.device).to(features.dtype)
            tokens = features + code
        if not self.label_tokens:
            return tokens
        probs = self.net._fc(features.mean(dim=1)).float().softmax(dim=-1)
        if class_probs is not None:
            given = ~class_probs.isnan().any(dim=-1)
            probs = torch.where(given[:, None], class_probs.to(probs.device, probs.dtype).nan_to_num(0.0), probs)
        return torch.cat([tokens, self.label_token_values(probs).to(tokens.dtype)], dim=1)

    def label_token_values(self, probs: torch.Tensor) -> torch.Tensor:
        """[images, 1000] probabilities → [images, label_tokens, 1280]: class-name embedding | probability,
        log-probability / 10 | rank one-hot | 1 (marks a label token) | first-token embedding, then word ids as
        (id // 256, id % 256) / 256 pairs, (-1, -1) for an empty slot (`label_words`) | zeros."""
        k, width = self.label_tokens, self.label_width
        top = probs.topk(k, dim=-1)
        n = probs.shape[0]
        out = torch.zeros(n, k, self.FEATURE_WIDTH, dtype=torch.float32, device=probs.device)
        out[..., :width] = self.class_names.float()[top.indices]
        out[..., width] = top.values
        out[..., width + 1] = top.values.clamp_min(1e-6).log() / 10
        out[..., width + 2: width + 2 + k] = torch.eye(k, device=probs.device)
        out[..., width + 2 + k] = 1.0
        if self.label_words:
            out[..., self.word_offset:self.word_offset + width] = self.class_words.float()[top.indices]
            ids = self.class_word_ids[top.indices]  # [images, k, slots]
            pairs = torch.stack([ids.div(256, rounding_mode="floor"), ids.remainder(256)], dim=-1).float() / 256
            pairs = torch.where(ids[..., None] >= 0, pairs, -1.0).flatten(-2)
            out[..., self.ids_offset:self.ids_offset + 2 * self.label_words] = pairs
        return out

    @property
    def word_offset(self) -> int:
        return self.label_width + self.label_tokens + 3

    @property
    def ids_offset(self) -> int:
        return self.word_offset + self.label_width

    def words(self, image_states: torch.Tensor, embed: nn.Module) -> torch.Tensor:
        """[B, N, latents, 1280] cross-attention inputs (latents, then the label tokens) and the language model's
        input embedding → [B, N * latents, label_words, hidden]: each label token's words as unit-norm
        embeddings, zero for empty slots and for the latents."""
        b, n, length, _ = image_states.shape
        k, slots = self.label_tokens, self.label_words
        pairs = image_states[:, :, length - k:, self.ids_offset:self.ids_offset + 2 * slots].float() * 256
        pairs = pairs.round().unflatten(-1, (slots, 2)).long()
        ids = pairs[..., 0] * 256 + pairs[..., 1]  # [B, N, k, slots]
        vectors = embed(ids.clamp_min(0)).float()
        vectors = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-6) * (pairs[..., :1] >= 0)
        out = vectors.new_zeros(b, n, length, slots, vectors.shape[-1])
        out[:, :, length - k:] = vectors
        return out.reshape(b, n * length, slots, vectors.shape[-1])
