"""Gated cross-attention (Flamingo's "gated xattn-dense" block, IDEFICS flavour).

Text tokens attend to the image latents of the most recent preceding image. The block is added before every
`cross_layer_interval`-th decoder layer and is the identity at initialisation (tanh(0) = 0), so training starts
from the unchanged language model. Tokens that see no image get a zero attention output (the dense sub-block
still runs for them). Image keys/values do not depend on the text, so generation computes them once per prompt
(`project_images`) and reuses them at every step.

The word path (idefics-mini): an encoder that sends words to the cross-attention (the frozen classifier's class
names as the language model's own token embeddings, several word slots per class: `EfficientNetEncoder.words`)
has them carried, unprojected, beside each head's values: the attention weights that read the image pick a class,
a learned choice from the text (`word_select`: none, or one of the slots) picks which of its words comes next, and
the block adds that word to the residual stream at a learned gain (`alpha_word`, up to WORD_NORM). A projected
value path would have to learn a 576-dimensional identity map before a name could reach the output; this one is
exact from the first step."""

from __future__ import annotations

import torch
from torch import nn

from .cpu import ops
from .layers import RMSNorm, SwiGLU, attention

# The largest norm the word path adds. The decoder's residual stream grows with depth (idefics-mini's language
# model: ~100 at layer 10, ~500 at layer 25); an embedding needs a norm of that order to move the next token.
WORD_NORM = 500.0


class CrossAttention(nn.Module):
    def __init__(self, dim: int, image_dim: int, heads: int, qk_norms: bool, eps: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(image_dim, dim, bias=False)
        self.v_proj = nn.Linear(image_dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.qk_norms = qk_norms
        if qk_norms:
            self.q_layer_norm = RMSNorm(self.head_dim, eps)
            self.k_layer_norm = RMSNorm(self.head_dim, eps)

    def project_images(self, images: torch.Tensor, words: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L, image_dim] image latents → keys, values [B, heads, L, head_dim]. With `words` ([B, L, slots,
        dim], the word path's embeddings, zero for tokens that carry none) each head's values carry its slice of
        every slot too: values [B, heads, L, (1 + slots) * head_dim]."""
        b, n, _ = images.shape
        k = self.k_proj(images).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(images).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        if self.qk_norms:
            k = self.k_layer_norm(k)
        if words is not None:
            slots = words.shape[2]  # per head: [its values | its slice of slot 1 | ... | of slot S]
            per_head = words.to(v.dtype).view(b, n, slots, self.heads, self.head_dim).permute(0, 3, 1, 2, 4)
            v = torch.cat([v, per_head.reshape(b, self.heads, n, slots * self.head_dim)], dim=-1)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The attention output, and the attended words [B, T, slots, dim] when the values carry them (else None)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        if self.qk_norms:
            q = self.q_layer_norm(q)
        out = attention(q, kv[0], kv[1], mask)
        words = None
        if out.shape[-1] > self.head_dim:
            out, words = out[..., :self.head_dim], out[..., self.head_dim:]
            words = words.unflatten(-1, (-1, self.head_dim)).permute(0, 2, 3, 1, 4).reshape(b, t, -1, self.heads
                                                                                             * self.head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), words


class GatedCrossAttentionLayer(nn.Module):
    def __init__(self, dim: int, hidden: int, image_dim: int, heads: int, qk_norms: bool, eps: float,
                 alpha_type: str = "float", alpha_initializer: str = "zeros", alpha_std: float = 0.0,
                 dense_needs_image: bool = False, word_slots: int = 0) -> None:
        super().__init__()
        # The reference applies the dense (MLP) half to every token. With `dense_needs_image` (config key
        # "dense_needs_image", idefics-mini's) tokens that see no image pass through the whole block unchanged,
        # so a text-only prompt gets exactly the frozen language model's answer, alone or in any batch.
        self.dense_needs_image = dense_needs_image
        self.cross_attn = CrossAttention(dim, image_dim, heads, qk_norms, eps)
        self.mlp = SwiGLU(dim, hidden)
        self.input_layernorm = RMSNorm(dim, eps)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        shape = (1,) if alpha_type == "float" else (1, 1, dim)
        self.alpha_cross_attn = nn.Parameter(init_alpha(shape, alpha_initializer, alpha_std))
        self.alpha_dense = nn.Parameter(init_alpha(shape, alpha_initializer, alpha_std))
        if word_slots:  # starts closed, like the other gates: WORD_NORM * tanh(0) = 0
            self.alpha_word = nn.Parameter(torch.zeros(1))
        if word_slots > 1:
            self.word_select = nn.Linear(dim, 1 + word_slots)  # which word comes next: none, or a slot
            with torch.no_grad():  # starts on the first slot (the first token of a name)
                self.word_select.weight.zero_()
                self.word_select.bias.copy_(torch.tensor([0.0, 3.0] + [0.0] * (word_slots - 1)))

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None, mask: torch.Tensor | None,
                gate: torch.Tensor | None, plans: dict | None = None) -> torch.Tensor:
        """`mask`: additive [B, 1, T, L]; `gate`: [B, T], 1 where the token sees an image.
        `kv` None means no token sees an image: the attention output is zero for all of them. `plans`: a
        generation's `KVCache.step_plans` (the decoding step's checks are done once)."""
        if self.dense_needs_image and kv is None:
            return x
        if x.shape[1] == 1:  # a decoding step: one C++ op where it applies
            out = ops.gated_cross_attention_step(self, x, kv, mask, gate, plans)
            if out is not None:
                return out
        if kv is not None:
            normed = self.input_layernorm(x)
            attn, words = self.cross_attn(normed, kv, mask)
            unseen = (gate == 0)[:, :, None]
            x = x + torch.tanh(self.alpha_cross_attn) * attn.masked_fill(unseen, 0.0)
            if words is not None:
                word = words[:, :, 0]
                if words.shape[2] > 1:  # [B, T, slots, 1] weights; "none" (slot 0) adds nothing
                    word = (self.word_select(normed).softmax(-1)[..., 1:, None] * words).sum(dim=2)
                x = x + WORD_NORM * torch.tanh(self.alpha_word) * word.masked_fill(unseen, 0.0)
        dense = self.mlp(self.post_attention_layernorm(x))
        if self.dense_needs_image:
            dense = dense.masked_fill((gate == 0)[:, :, None], 0.0)
        return x + torch.tanh(self.alpha_dense) * dense


def init_alpha(shape: tuple[int, ...], how: str, std: float) -> torch.Tensor:
    if how == "zeros":
        return torch.zeros(shape)
    if how == "ones":
        return torch.ones(shape)
    if how in ("normal", "gaussian", "random"):
        return torch.randn(shape) * std
    raise ValueError(f"unknown alpha_initializer {how!r} (zeros, ones, normal)")


def image_mask_to_additive(image_attention_mask: torch.Tensor, latents_per_image: int,
                           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T, N] 0/1 image mask → additive [B, 1, T, N*L] mask (finfo.min where not attended, as the
    reference) and the [B, T] gate (1 where the token attends to at least one image)."""
    b, t, n = image_attention_mask.shape
    visible = image_attention_mask.bool()[..., None].expand(b, t, n, latents_per_image).reshape(b, t, n * latents_per_image)
    additive = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    additive.masked_fill_(~visible, torch.finfo(dtype).min)
    return additive[:, None], visible.any(-1).to(dtype)
