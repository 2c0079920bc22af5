"""Build an IDEFICS model from two pretrained backbones plus freshly initialised new blocks, and choose what
trains.

The recipe: a LLaMA-family decoder and a vision encoder are loaded as they are; the perceiver resampler, the
gated cross-attention blocks and the rows of the new tokens (`<fake_token_around_image>`, `<image>`,
`<end_of_utterance>`) are new. Gates start at tanh(0) = 0, so at step 0 the model computes exactly what the
language model alone computes (tested).

Backbones are named by source strings (`backbones.sources`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backbones.sources import (LANGUAGE_PREFIXES, VISION_PREFIX, LanguageBackbone, class_name_state,
                                load_language_backbone, vision_config_for, vision_state)
from ..config import IdeficsConfig, PerceiverConfig, VisionConfig
from ..layers import RotaryEmbedding
from ..model import Idefics
from ..processor import ImageSettings
from ..tokenizer import END_OF_UTTERANCE, FAKE_TOKEN, IMAGE_TOKEN, Tokenizer

NEW_TOKENS = (FAKE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE)
# Named groups for `freeze`; anything else in `trainable` is a parameter-name prefix.
TRAINABLE_GROUPS = {
    "perceiver": ("model.perceiver_resampler.",),
    "cross_attn": ("model.gated_cross_attn_layers.",),
    "new_tokens": ("model.embed_tokens.additional_embedding.", "lm_head.additional_fc."),
    "lm_head": ("lm_head.weight",),
    "language": LANGUAGE_PREFIXES,
    "vision": (VISION_PREFIX,),
    "all": ("",),
}
RECIPE_TRAINABLE = ("perceiver", "cross_attn", "new_tokens")


@dataclass
class ModelSpec:
    """What to build (the `model:` section of a training config)."""

    language: str = "gguf:smollm2"
    language_config: dict[str, Any] | None = None  # HF LLaMA config keys, for language: random
    tokenizer: str | None = None  # tokenizer folder (default: the language source's own tokenizer)
    vision: str = "efficientnet_lite0"
    # VisionConfig keys, for clip; for efficientnet_lite0: label_tokens (top-k class tokens), label_words, position_code
    vision_config: dict[str, Any] | None = None
    perceiver: dict[str, Any] | None = field(default_factory=lambda: {"n_latents": 64, "depth": 6, "heads": 16,
                                                                        "head_dim": 96, "qk_norms": True})
    cross_layer_interval: int = 4
    qk_layer_norms: bool = True
    dense_needs_image: bool = False  # tokens that see no image skip the whole gated block (cross_attention.py)
    new_tokens: list[str] = field(default_factory=lambda: list(NEW_TOKENS))
    # new token -> existing token whose input and output rows it starts from (else: mean input row, zero output)
    init_new_tokens_from: dict[str, str] = field(default_factory=lambda: {END_OF_UTTERANCE: "eos"})
    init_std: float = 0.02
    seed: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"model: unknown keys {unknown}; known: {sorted(names)}")
        return cls(**data)


def idefics_config(language: dict[str, Any], vision: VisionConfig, spec: ModelSpec) -> IdeficsConfig:
    """IDEFICS config: the decoder's sizes from its LLaMA config, the new blocks' sizes from the spec."""
    per = spec.perceiver
    perceiver = PerceiverConfig(use_resampler=per is not None)
    if per is not None:
        unknown = sorted(set(per) - {"n_latents", "depth", "heads", "head_dim", "qk_norms"})
        if unknown:
            raise ValueError(f"model.perceiver: unknown keys {unknown} (n_latents, depth, heads, head_dim, qk_norms)")
        perceiver = PerceiverConfig(True, per.get("n_latents", 64), per.get("depth", 6), per.get("heads", 16),
                                    per.get("head_dim", 96), per.get("qk_norms", True))
    rope = language.get("rope_scaling") or {}
    if rope and rope.get("rope_type", rope.get("type")) not in (None, "default"):
        raise ValueError(f"language backbone uses RoPE scaling {rope}; only default RoPE is supported")
    eos = language.get("eos_token_id")
    if vision.extra.get("label_tokens"):  # class-name tokens live in the language model's embedding space
        vision.extra["label_width"] = language["hidden_size"]
    config = IdeficsConfig(
        vocab_size=language["vocab_size"], additional_vocab_size=len(spec.new_tokens),
        hidden_size=language["hidden_size"], intermediate_size=language["intermediate_size"],
        num_hidden_layers=language["num_hidden_layers"], num_attention_heads=language["num_attention_heads"],
        num_key_value_heads=language.get("num_key_value_heads"), hidden_act=language.get("hidden_act", "silu"),
        rms_norm_eps=language.get("rms_norm_eps", 1e-6), rope_theta=language.get("rope_theta", 10000.0),
        max_position_embeddings=language.get("max_position_embeddings", 2048),
        pad_token_id=language.get("pad_token_id"), bos_token_id=language.get("bos_token_id"), eos_token_id=eos,
        tie_word_embeddings=bool(language.get("tie_word_embeddings", False)),
        cross_layer_interval=spec.cross_layer_interval, qk_layer_norms=spec.qk_layer_norms,
        alpha_type="float", alpha_initializer="zeros", use_resampler=per is not None,
        vision_config=vision, perceiver_config=perceiver)
    if spec.dense_needs_image:
        config.extra["dense_needs_image"] = True
    config.validate()
    return config


def write_tokenizer(backbone: LanguageBackbone, new_tokens: list[str], vocab_size: int, out_dir: Path,
                    max_length: int | None = None) -> Tokenizer:
    """Write the backbone's tokenizer plus the new special tokens to `out_dir`; the new tokens must get the ids
    vocab_size, vocab_size + 1, ... (the decoupled embedding looks them up by id - vocab_size)."""
    from ..backbones import save_tokenizer_files

    ids = save_tokenizer_files(backbone.tokenizer, backbone.chat_template, out_dir, new_tokens,
                               backbone.special_tokens, max_length)
    wrong = {t: i for n, (t, i) in enumerate(ids.items()) if i != vocab_size + n}
    if wrong:
        raise ValueError(f"new tokens must take ids {vocab_size}.. in order (the language model has {vocab_size} "
                         f"embedding rows), got {wrong}: the tokenizer has a different vocabulary size "
                         "than the embedding, or the tokens exist already at other ids")
    return Tokenizer.from_folder(out_dir)


@torch.no_grad()
def init_new_blocks(model: Idefics, std: float = 0.02, seed: int = 0) -> None:
    """Fresh weights for the perceiver and the gated cross-attention blocks: matrices N(0, std), norms at
    identity, latents N(0, 1) (as the reference), gates 0 (the block starts as the identity)."""
    gen = torch.Generator().manual_seed(seed + 2)
    blocks = [model.model.gated_cross_attn_layers]
    if model.config.use_resampler:
        blocks.append(model.model.perceiver_resampler)
    for module in blocks:
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "alpha" in leaf:
                p.zero_()
            elif leaf == "latents":
                p.copy_(torch.randn(p.shape, generator=gen))
            elif leaf == "bias":
                p.zero_()
            elif p.dim() == 1:  # RMSNorm / LayerNorm weights
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


@torch.no_grad()
def init_new_token_rows(model: Idefics, tokenizer: Tokenizer, new_tokens: list[str],
                        init_from: dict[str, str]) -> None:
    """Rows of the new tokens. A token named in `init_from` copies an existing token's input and output rows
    ("eos"/"bos" name the tokenizer's): a new end-of-utterance output row near zero costs ~70 steps of loss
    around 20 before the model learns to emit it; starting from the language model's own end token avoids
    that. Others: the mean input embedding and a zero output row (never a target: `<image>` and the fake
    token are masked out of the loss and banned from generation)."""
    embed, head = model.model.embed_tokens, model.lm_head
    mean_row = embed.weight.float().mean(0)
    for i, token in enumerate(new_tokens):
        source = init_from.get(token)
        if source is None:
            embed.additional_embedding.weight[i] = mean_row.to(embed.weight.dtype)
            head.additional_fc.weight[i] = 0.0
            continue
        name = {"eos": tokenizer.eos_token, "bos": tokenizer.bos_token}.get(source, source)
        source_id = tokenizer.token_to_id(name)
        if source_id is None or source_id >= model.config.vocab_size:
            raise ValueError(f"init_new_tokens_from: {token!r} <- {source!r}: {name!r} is not a base-vocabulary token")
        embed.additional_embedding.weight[i] = embed.weight[source_id]
        head.additional_fc.weight[i] = head.weight[source_id]


def load_backbone_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], prefixes: tuple[str, ...],
                          what: str) -> None:
    """Copy backbone tensors in, after checking that they cover exactly the backbone's part of the model."""
    expected = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = sorted(k for k in expected if k not in tensors and not (tied and k == "lm_head.weight"))
    unexpected = sorted(k for k in tensors if k not in expected and not k.endswith(("rotary_emb.inv_freq",)))
    misshaped = sorted(f"{k}: {list(tensors[k].shape)} vs {list(expected[k].shape)}"
                       for k in tensors if k in expected and tensors[k].shape != expected[k].shape)
    if missing or unexpected or misshaped:
        raise ValueError(f"{what} backbone does not fit the model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, mis-shaped {misshaped[:5]}")
    with torch.no_grad():
        state = model.state_dict(keep_vars=True)
        for name, tensor in tensors.items():
            if name in expected and not (tied and name == "lm_head.weight"):
                state[name].copy_(tensor)


def build_model(spec: ModelSpec, tokenizer_dir: str | Path) -> tuple[Idefics, Tokenizer, ImageSettings]:
    """The model (on CPU, float32, every parameter trainable until `freeze`), its tokenizer (written to
    `tokenizer_dir` with the new tokens) and its image preprocessing."""
    backbone = load_language_backbone(spec.language, spec.language_config, spec.tokenizer, spec.seed)
    vision, images = vision_config_for(spec.vision, spec.vision_config)
    config = idefics_config(backbone.config, vision, spec)
    config.extra["idefics_backbones"] = {"language": spec.language, "vision": spec.vision}
    tokenizer = write_tokenizer(backbone, spec.new_tokens, config.vocab_size, Path(tokenizer_dir),
                                config.max_position_embeddings)
    with torch.device("meta"):
        model = Idefics(config)
    model.to_empty(device="cpu")
    for module in model.modules():  # non-persistent buffers are not in any state dict
        if isinstance(module, RotaryEmbedding):
            module.inv_freq = module.frequencies()
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    load_backbone_tensors(model, backbone.state_dict, LANGUAGE_PREFIXES, f"language ({spec.language})")
    vision = {**vision_state(spec.vision, model, spec.seed, spec.init_std),
              **class_name_state(config, backbone)}
    load_backbone_tensors(model, vision, (VISION_PREFIX,), f"vision ({spec.vision})")
    init_new_blocks(model, spec.init_std, spec.seed)
    init_new_token_rows(model, tokenizer, spec.new_tokens, spec.init_new_tokens_from)
    return model, tokenizer, images


def freeze(model: nn.Module, trainable: list[str] | tuple[str, ...] = RECIPE_TRAINABLE) -> list[str]:
    """Set requires_grad per the recipe: only parameters named by `trainable` (groups from TRAINABLE_GROUPS or
    name prefixes) train. A frozen EfficientNet also keeps its BatchNorm statistics in train mode.
    Returns the trainable parameter names."""
    prefixes: list[str] = []
    for entry in trainable:
        prefixes.extend(TRAINABLE_GROUPS.get(entry, (entry,)))
    named = list(model.named_parameters(remove_duplicate=False))
    # a tied parameter appears under two names: it trains if either name is selected
    selected = {id(p) for name, p in named if name.startswith(tuple(prefixes))}
    for _, p in named:
        p.requires_grad_(id(p) in selected)
    unused = [e for e in trainable if not any(n.startswith(TRAINABLE_GROUPS.get(e, (e,))) for n, _ in named)]
    if unused:
        raise ValueError(f"trainable: {unused} match no parameter; groups: {sorted(TRAINABLE_GROUPS)} or a name prefix")
    vision_trains = any(p.requires_grad for n, p in model.named_parameters() if n.startswith(VISION_PREFIX))
    for module in model.modules():
        if hasattr(module, "frozen") and isinstance(module.frozen, bool):
            module.frozen = not vision_trains
            if module.frozen:
                module.eval()
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def copy_tokenizer(src: str | Path, dst: str | Path) -> None:
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(src) / name).exists():
            shutil.copyfile(Path(src) / name, dst / name)
