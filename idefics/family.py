"""The model families this package runs, chosen once from config.json's `model_type`: IDEFICS ("idefics") and
Idefics2 ("idefics2"). A `ModelFamily` holds everything that differs between them outside the models themselves,
so no other module asks which family it has:

- how config.json is read and which model class it builds;
- the processor (IDEFICS: prompt items with its own image placement; Idefics2: image splitting, `<image>` runs);
- how images reach the model: IDEFICS reads an image's perceiver latents through cross-attention (a per-token
  image mask), Idefics2 puts them at its `<image>` positions in the sequence (`images_in_sequence`);
- whether the tokenizer adds `<s>` (Idefics2) or the prompt text carries it (IDEFICS);
- `describe`, the architecture in a few lines for `idefics info`;
- `quantized`: the parameter-name prefixes of the parts weight-only quantization converts (the decoder, and
  IDEFICS's gated cross-attention).

Adding a family is one more `ModelFamily` in FAMILIES (its modules imported when it is chosen)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn


@dataclass(frozen=True)
class ModelFamily:
    name: str
    read_config: Callable[[Path], Any]
    build: Callable[[Any], nn.Module]
    make_processor: Callable[..., Any]  # (folder, tokenizer, config, image_policy) -> processor
    describe: Callable[[Any, nn.Module], list[str]]
    images_in_sequence: bool
    tokenizer_adds_bos: bool
    quantized: tuple[str, ...]


def family_of(config_or_type: Any) -> ModelFamily:
    """The family of a config object or a `model_type` string."""
    name = config_or_type if isinstance(config_or_type, str) else getattr(config_or_type, "model_type", "idefics")
    if name not in FAMILIES:
        raise ValueError(f"unknown model_type {name!r}; this package runs {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def read_config(path: Path) -> Any:
    """The config class named by config.json's `model_type` (default "idefics")."""
    try:
        model_type = json.loads(Path(path).read_text()).get("model_type", "idefics")
    except (OSError, json.JSONDecodeError, AttributeError) as error:
        raise ValueError(f"cannot read model config {path}: {error}") from None
    return family_of(model_type).read_config(Path(path))


# ------------------------------------------------------------------------------------------------------ IDEFICS

def _idefics_config(path: Path):
    from .config import IdeficsConfig

    return IdeficsConfig.from_json(path)


def _idefics_model(config) -> nn.Module:
    from .model import Idefics

    return Idefics(config)


def _idefics_processor(folder: Path, tokenizer, config, image_policy):
    from .processor import ImageSettings, Processor

    images = ImageSettings.from_folder(folder, config.vision_config.image_size)
    return Processor(tokenizer, images, image_policy, max_length=config.max_position_embeddings)


def _describe_idefics(config, model: nn.Module) -> list[str]:
    vc, pc, inner = config.vision_config, config.perceiver_config, model.model
    lines = [f"language model (LLaMA): {config.num_hidden_layers} layers x {config.hidden_size} wide, "
             f"{config.num_attention_heads} heads ({config.kv_heads} kv), mlp {config.intermediate_size}, "
             f"rms eps {config.rms_norm_eps}, rope theta {config.rope_theta}, context {config.max_position_embeddings}",
             f"vision: {vc.model_type}, width {vc.embed_dim}, {vc.image_size}px, "
             f"{inner.vision_model.num_tokens} tokens per image"]
    if config.use_resampler:
        lines.append(f"perceiver: {pc.resampler_n_latents} latents, depth {pc.resampler_depth}, "
                     f"{pc.resampler_n_heads} heads x {pc.resampler_head_dim}, qk norms {pc.qk_layer_norms_perceiver}")
    lines.append(f"cross-attention: {config.num_cross_layers} blocks, before every {config.cross_layer_interval} "
                 f"layer(s), qk norms {config.qk_layer_norms}, {config.alpha_type} gates")
    return lines


# ----------------------------------------------------------------------------------------------------- Idefics2

def _idefics2_config(path: Path):
    from .idefics2.config import Idefics2Config

    return Idefics2Config.from_json(path)


def _idefics2_model(config) -> nn.Module:
    from .idefics2.model import Idefics2

    return Idefics2(config)


def _idefics2_processor(folder: Path, tokenizer, config, image_policy):
    from .idefics2.processor import Idefics2Processor

    return Idefics2Processor.from_folder(folder, tokenizer, config.image_seq_len, image_policy,
                                         max_length=config.max_position_embeddings)


def _describe_idefics2(config, model: nn.Module) -> list[str]:
    t, v, p = config.text_config, config.vision_config, config.perceiver_config
    return [f"language model (Mistral): {t.num_hidden_layers} layers x {t.hidden_size} wide, {t.num_attention_heads} "
            f"heads ({t.num_key_value_heads} kv), mlp {t.intermediate_size}, sliding window {t.sliding_window}, "
            f"context {t.max_position_embeddings}",
            f"vision (SigLIP): {v.num_hidden_layers} layers x {v.hidden_size}, patch {v.patch_size}, up to "
            f"{v.image_size}px at native resolution",
            f"connector: perceiver {p.resampler_n_latents} latents, depth {p.resampler_depth}, "
            f"{p.resampler_n_heads} heads ({p.num_key_value_heads} kv) x {p.resampler_head_dim}; image tokens go "
            "into the text sequence"]


FAMILIES = {
    "idefics": ModelFamily("idefics", _idefics_config, _idefics_model, _idefics_processor, _describe_idefics,
                           images_in_sequence=False, tokenizer_adds_bos=False,
                           quantized=("model.layers.", "model.gated_cross_attn_layers.")),
    "idefics2": ModelFamily("idefics2", _idefics2_config, _idefics2_model, _idefics2_processor, _describe_idefics2,
                            images_in_sequence=True, tokenizer_adds_bos=True, quantized=("model.text_model.layers.",)),
}
