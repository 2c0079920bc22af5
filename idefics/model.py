"""IDEFICS v1: a frozen vision encoder and a frozen LLaMA joined by a perceiver resampler and gated
cross-attention blocks. Module names mirror the Hugging Face checkpoints (`model.*`, `lm_head.*`) so a
checkpoint's state dict loads as is."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import IdeficsConfig
from .cross_attention import GatedCrossAttentionLayer, image_mask_to_additive
from .language_model import DecoderLayer, causal_mask, position_ids_from_mask
from .layers import DecoupledEmbedding, DecoupledLinear, KVCache, RMSNorm, RotaryEmbedding
from .perceiver import PerceiverResampler
from .vision import build_vision_encoder


@dataclass
class ModelOutput:
    logits: torch.Tensor
    image_hidden_states: torch.Tensor | None = None  # [B, N, latents, dim]: perceiver output (or raw features)


@dataclass
class DecodeCache:
    """Everything generation keeps between steps: self-attention keys/values, and the image keys/values of
    every gated cross-attention layer (computed once at prefill; the reference recomputes them each step).
    `decoding.DecodeState` owns it: rows are selected, copied and joined there."""

    kv: KVCache
    cross_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    extras: dict = field(default_factory=dict)


def to_model(inputs: dict[str, torch.Tensor], keys: tuple[str, ...], device: torch.device,
             dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The given tensors of `inputs` on the model's device; floating-point ones in the model's dtype."""
    out = {}
    for key in keys:
        if inputs.get(key) is not None:
            value = inputs[key].to(device)
            out[key] = value.to(dtype) if value.is_floating_point() else value
    return out


class IdeficsModel(nn.Module):
    def __init__(self, config: IdeficsConfig) -> None:
        super().__init__()
        self.config = config
        c, vc, pc = config, config.vision_config, config.perceiver_config
        self.embed_tokens = DecoupledEmbedding(c.vocab_size, c.additional_vocab_size, c.hidden_size, c.pad_token_id)
        self.vision_model = build_vision_encoder(vc)
        image_dim = vc.embed_dim
        # the encoder's words (idefics-mini's class names) reach the decoder through the cross-attention's word path
        self.word_slots = int(getattr(self.vision_model, "label_words", 0))
        if self.word_slots and self.vision_model.label_width != c.hidden_size:
            raise ValueError(f"vision_config.label_width ({self.vision_model.label_width}) must equal hidden_size "
                             f"({c.hidden_size}) with label_words")
        if c.use_resampler:
            self.perceiver_resampler = PerceiverResampler(image_dim, pc.resampler_depth, pc.resampler_n_heads,
                                                          pc.resampler_head_dim, pc.resampler_n_latents,
                                                          pc.qk_layer_norms_perceiver)
        self.layers = nn.ModuleList(
            DecoderLayer(c.hidden_size, c.intermediate_size, c.num_attention_heads, c.kv_heads, c.rms_norm_eps)
            for _ in range(c.num_hidden_layers))
        alpha_std = float(c.extra.get("alphas_initializer_range", 0.0))
        self.gated_cross_attn_layers = nn.ModuleList(
            GatedCrossAttentionLayer(c.hidden_size, c.intermediate_size, image_dim, c.num_attention_heads,
                                     c.qk_layer_norms, c.rms_norm_eps, c.alpha_type, c.alpha_initializer, alpha_std,
                                     dense_needs_image=bool(c.extra.get("dense_needs_image", False)),
                                     word_slots=self.word_slots)
            for _ in range(c.num_cross_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.rotary = RotaryEmbedding(c.head_dim, c.rope_theta)
        self.gradient_checkpointing = False

    @property
    def latents_per_image(self) -> int:
        if self.config.image_latents:  # the resampler's latents, plus tokens the encoder sends past it
            return self.config.image_latents + getattr(self.vision_model, "passthrough_tokens", 0)
        return self.vision_model.num_tokens

    def encode_images(self, pixel_values: torch.Tensor, image_attention_mask: torch.Tensor | None = None,
                      class_probs: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N, 3, H, W] → [B, N, latents, dim]. Images no token attends to (batch padding) are not
        encoded: their slot stays zero, which changes no output because the mask hides them. `class_probs`
        ([B, N, classes], training only) goes to an encoder that takes it (see `EfficientNetEncoder`)."""
        b, n = pixel_values.shape[:2]
        flat = pixel_values.reshape(b * n, *pixel_values.shape[2:])
        used = torch.ones(b * n, dtype=torch.bool, device=flat.device)
        if image_attention_mask is not None:
            used = image_attention_mask.bool().any(1).reshape(b * n)
        dtype = self.embed_tokens.weight.dtype
        out = torch.zeros(b * n, self.latents_per_image, self.config.vision_config.embed_dim,
                          dtype=dtype, device=flat.device)
        if used.any():
            if class_probs is None:
                features = self.vision_model(flat[used])
            else:
                features = self.vision_model(flat[used], class_probs.reshape(b * n, -1)[used])
            if self.config.use_resampler:
                # an encoder's last `passthrough_tokens` tokens (idefics-mini's class names) are words, not
                # features: they reach the cross-attention beside the latents, not through the resampler
                skip = getattr(self.vision_model, "passthrough_tokens", 0)
                latents = self.perceiver_resampler(features[:, :features.shape[1] - skip].to(dtype))
                features = torch.cat([latents, features[:, features.shape[1] - skip:].to(dtype)], dim=1)
            out[used] = features.to(dtype)
        return out.view(b, n, *out.shape[1:])

    def cross_inputs(self, image_states: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        flat = image_states.reshape(image_states.shape[0], -1, image_states.shape[-1])
        words = self.vision_model.words(image_states, self.embed_tokens) if self.word_slots else None
        return [layer.cross_attn.project_images(flat, words) for layer in self.gated_cross_attn_layers]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_attention_mask: torch.Tensor | None = None,
                image_hidden_states: torch.Tensor | None = None, cache: DecodeCache | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`attention_mask` covers the cached positions and the new ones ([B, past + T]); `image_attention_mask`
        covers the new tokens only ([B, T, N])."""
        b, t = input_ids.shape
        past = cache.kv.length if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(b, past + t, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape != (b, past + t):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(b, past + t)}")
        width = self.config.vocab_size + self.config.additional_vocab_size
        if t and (int(input_ids.min()) < 0 or int(input_ids.max()) >= width):
            raise ValueError(f"input_ids must be in [0, {width}), got values in "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        x = self.embed_tokens(input_ids)

        cross_kv = cache.cross_kv if cache is not None else None
        if cross_kv is None and (pixel_values is not None or image_hidden_states is not None):
            if image_attention_mask is None:
                raise ValueError("image_attention_mask is required with pixel_values or image_hidden_states")
            if image_hidden_states is None:
                image_hidden_states = self.encode_images(pixel_values, image_attention_mask)
            cross_kv = self.cross_inputs(image_hidden_states.to(x.dtype))
            if cache is not None:
                cache.cross_kv = cross_kv
        xmask = gate = None
        if cross_kv is not None and image_attention_mask is not None and image_attention_mask.bool().any():
            xmask, gate = image_mask_to_additive(image_attention_mask, self.latents_per_image, x.dtype)
        else:
            cross_kv = [None] * len(self.gated_cross_attn_layers)  # no token sees an image

        positions = position_ids_from_mask(attention_mask)[:, -t:]
        rope = self.rotary(positions, x.dtype)
        mask = causal_mask(attention_mask, t)
        interval = self.config.cross_layer_interval
        kv_cache = cache.kv if cache is not None else None
        for i, layer in enumerate(self.layers):
            if i % interval == 0:
                gated = self.gated_cross_attn_layers[i // interval]
                args = (x, cross_kv[i // interval], xmask, gate)
                x = checkpoint(gated, *args, use_reentrant=False) if self._checkpointing() else \
                    gated(*args, kv_cache.step_plans if kv_cache is not None else None)
            if self._checkpointing():
                x = checkpoint(layer, x, rope, mask, None, i, use_reentrant=False)
            else:
                x = layer(x, rope, mask, kv_cache, i)
        if cache is not None:
            cache.kv.advance(t)
        return self.norm(x), image_hidden_states

    def _checkpointing(self) -> bool:
        return self.gradient_checkpointing and self.training and torch.is_grad_enabled()


class Idefics(nn.Module):
    """`Idefics(config)(input_ids, attention_mask, pixel_values, image_attention_mask).logits` has shape
    [B, T, vocab_size + additional_vocab_size]."""

    def __init__(self, config: IdeficsConfig) -> None:
        super().__init__()
        self.config = config
        self.model = IdeficsModel(config)
        self.lm_head = DecoupledLinear(config.hidden_size, config.vocab_size, config.additional_vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_attention_mask: torch.Tensor | None = None,
                image_hidden_states: torch.Tensor | None = None, cache: DecodeCache | None = None,
                logits_to_keep: int = 0) -> ModelOutput:
        """`logits_to_keep` > 0 computes logits for the last positions only (generation needs one)."""
        hidden, images = self.model(input_ids, attention_mask, pixel_values, image_attention_mask,
                                    image_hidden_states, cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return ModelOutput(logits=self.lm_head(hidden), image_hidden_states=images)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def prefill_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The processor outputs the first forward of generation needs, on the model's device and dtype."""
        return to_model(inputs, ("pixel_values", "image_attention_mask", "image_hidden_states"), self.device, self.dtype)

    def step_inputs(self, prefill: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What each decoding step needs besides the new token: new tokens attend to the image the last
        prompt token attends to (as the reference does); image keys/values come from the cache."""
        mask = prefill.get("image_attention_mask")
        return {} if mask is None else {"image_attention_mask": mask[:, -1:]}

    def new_cache(self, batch: int, max_len: int) -> DecodeCache:
        c = self.config
        return DecodeCache(KVCache(c.num_hidden_layers, batch, c.kv_heads, max_len, c.head_dim, self.dtype, self.device))
