"""Idefics2: SigLIP encoder → connector (SwiGLU projection + perceiver) → image tokens placed directly in the
text sequence of a Mistral decoder. There is no cross-attention: the 64 tokens of each image replace the
embeddings of the `<image>` placeholder tokens, so during generation they live in the ordinary KV cache and
the vision encoder and connector run once per request (at prefill).

Module names mirror the Hugging Face checkpoints (`model.vision_model.*`, `model.connector.*`,
`model.text_model.*`, `lm_head.weight`) so a checkpoint's state dict loads as is. The decoder blocks, RMSNorm,
RoPE, KV cache and decode cache are the ones IDEFICS v1 uses."""

from __future__ import annotations

import torch
from torch import nn

from ..language_model import DecoderLayer, causal_mask, position_ids_from_mask
from ..layers import KVCache, RMSNorm, RotaryEmbedding
from ..model import DecodeCache, ModelOutput, to_model
from .config import Idefics2Config, MistralConfig
from .connector import Idefics2Connector
from .vision import Idefics2VisionTransformer, patch_attention_mask


class MistralModel(nn.Module):
    """Embeddings + LLaMA-style decoder blocks with grouped-query attention and a sliding attention window."""

    def __init__(self, config: MistralConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.layers = nn.ModuleList(
            DecoderLayer(c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
                         c.rms_norm_eps)
            for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.rotary = RotaryEmbedding(c.hidden_size // c.num_attention_heads, c.rope_theta)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, kv: KVCache | None = None,
                ) -> torch.Tensor:
        """`attention_mask` covers cached and new positions ([B, past + T]); returns normed hidden states."""
        t = inputs_embeds.shape[1]
        positions = position_ids_from_mask(attention_mask)[:, -t:]
        rope = self.rotary(positions, inputs_embeds.dtype)
        mask = causal_mask(attention_mask, t, self.config.sliding_window)
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, kv, i)
        if kv is not None:
            kv.advance(t)
        return self.norm(x)


class Idefics2Model(nn.Module):
    def __init__(self, config: Idefics2Config) -> None:
        super().__init__()
        self.config = config
        self.vision_model = Idefics2VisionTransformer(config.vision_config)
        self.connector = Idefics2Connector(config)
        self.text_model = MistralModel(config.text_config)

    def encode_images(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None = None,
                      ) -> torch.Tensor:
        """[B, N, 3, H, W] (+ [B, N, H, W] pixel mask) → [real images, n_latents, text width], in batch order.
        Padding image slots (mask all zero, or without a mask: all-zero pixels, the reference's rule) are not
        encoded."""
        if pixel_values.dim() != 5:
            raise ValueError(f"pixel_values must be [batch, images, channels, height, width], "
                             f"got shape {tuple(pixel_values.shape)}")
        b, n, c, h, w = pixel_values.shape
        flat = pixel_values.reshape(b * n, c, h, w)
        if pixel_attention_mask is None:
            real = (flat != 0).flatten(1).any(1)
            pixel_mask = torch.ones(b * n, h, w, dtype=torch.bool, device=flat.device)
        else:
            if pixel_attention_mask.shape != (b, n, h, w):
                raise ValueError(f"pixel_attention_mask has shape {tuple(pixel_attention_mask.shape)}, expected "
                                 f"{(b, n, h, w)} to match pixel_values")
            pixel_mask = pixel_attention_mask.reshape(b * n, h, w).bool()
            real = pixel_mask.flatten(1).any(1)
        dtype = self.text_model.embed_tokens.weight.dtype
        if not bool(real.any()):
            return torch.zeros(0, self.config.image_seq_len, self.config.hidden_size, dtype=dtype, device=flat.device)
        patch_mask = patch_attention_mask(pixel_mask[real], self.config.vision_config.patch_size)
        features = self.vision_model(flat[real].to(dtype), patch_mask)
        return self.connector(features, patch_mask.flatten(1)).to(dtype)

    def merge_images(self, input_ids: torch.Tensor, embeds: torch.Tensor, image_states: torch.Tensor) -> torch.Tensor:
        """Put image tokens, in order, into the `<image>` positions of the batch (row by row)."""
        slots = input_ids == self.config.image_token_id
        n_slots, n_tokens = int(slots.sum()), image_states.shape[0] * image_states.shape[1]
        if n_slots != n_tokens:
            per_image = self.config.image_seq_len
            raise ValueError(f"the prompts have {n_slots} <image> tokens but the images give {n_tokens} "
                             f"({image_states.shape[0]} images x {image_states.shape[1]} tokens); each image needs "
                             f"{per_image} <image> tokens (x5 with image splitting): build inputs with the "
                             "Idefics2 processor")
        embeds = embeds.clone()
        embeds[slots] = image_states.reshape(-1, image_states.shape[-1]).to(embeds.dtype)
        return embeds

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, pixel_attention_mask: torch.Tensor | None = None,
                image_hidden_states: torch.Tensor | None = None, cache: DecodeCache | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        past = cache.kv.length if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(b, past + t, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape != (b, past + t):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(b, past + t)}")
        vocab = self.config.vocab_size
        if t and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            raise ValueError(f"input_ids must be in [0, {vocab}), got values in "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        embeds = self.text_model.embed_tokens(input_ids)
        if image_hidden_states is None and pixel_values is not None:
            image_hidden_states = self.encode_images(pixel_values, pixel_attention_mask)
        if image_hidden_states is not None:
            embeds = self.merge_images(input_ids, embeds, image_hidden_states)
        kv = cache.kv if cache is not None else None
        return self.text_model(embeds, attention_mask, kv), image_hidden_states


class Idefics2(nn.Module):
    """`Idefics2(config)(input_ids, attention_mask, pixel_values, pixel_attention_mask).logits` has shape
    [B, T, vocab_size]. The same surface as `Idefics`, so generation and the pipeline drive either."""

    def __init__(self, config: Idefics2Config) -> None:
        super().__init__()
        self.config = config
        self.model = Idefics2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.text_model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, pixel_attention_mask: torch.Tensor | None = None,
                image_hidden_states: torch.Tensor | None = None, cache: DecodeCache | None = None,
                logits_to_keep: int = 0) -> ModelOutput:
        """`image_hidden_states` ([images, n_latents, width], the connector output a previous call returned)
        replaces `pixel_values`. `logits_to_keep` > 0 computes logits for the last positions only."""
        hidden, images = self.model(input_ids, attention_mask, pixel_values, pixel_attention_mask,
                                    image_hidden_states, cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return ModelOutput(logits=self.lm_head(hidden), image_hidden_states=images)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.text_model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.text_model.embed_tokens.weight.device

    def prefill_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The processor outputs the first forward of generation needs, on the model's device and dtype."""
        return to_model(inputs, ("pixel_values", "pixel_attention_mask", "image_hidden_states"), self.device,
                        self.dtype)

    def step_inputs(self, prefill: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Decoding steps need nothing besides the new token: the image tokens are already in the KV cache."""
        return {}

    def new_cache(self, batch: int, max_len: int) -> DecodeCache:
        t = self.config.text_config
        return DecodeCache(KVCache(t.num_hidden_layers, batch, t.num_key_value_heads, max_len, self.config.head_dim,
                                   self.dtype, self.device))
