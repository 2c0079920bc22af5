"""Model configuration, read from and written to Hugging Face `config.json` files.

The dataclasses mirror the hub JSON so a checkpoint's `config.json` maps field by field. Keys we do not use
(legacy IDEFICS keys such as `ffn_dim`, `cross_layer_activation_function`, `vision_model_name`, old flat
`resampler_*` keys) are kept in `extra` so that saving writes them back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def read_json(path: str | Path, required: bool = True) -> dict[str, Any]:
    """A JSON file of a checkpoint folder; a missing optional file reads as {}. Errors name the file."""
    path = Path(path)
    if not path.exists() and not required:
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None


def _split_known(cls: type, data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    names = {f.name for f in dataclasses.fields(cls)}
    known = {k: v for k, v in data.items() if k in names}
    extra = {k: v for k, v in data.items() if k not in names}
    return known, extra


@dataclass
class VisionConfig:
    """The image encoder. `model_type` selects the module: the CLIP ViT copy of IDEFICS ("idefics_vision"),
    or a pluggable backbone ("efficientnet_lite0") that only needs `embed_dim` = its feature width."""

    model_type: str = "idefics_vision"
    embed_dim: int = 768
    image_size: int = 224
    intermediate_size: int = 5120
    patch_size: int = 14
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_channels: int = 3
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VisionConfig":
        data = dict(data)
        if "hidden_size" in data and "embed_dim" not in data:  # hidden_size is an alias in the reference
            data["embed_dim"] = data.pop("hidden_size")
        known, extra = _split_known(cls, data)
        known.pop("extra", None)
        return cls(**known, extra=extra)

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1  # patches + CLS


@dataclass
class PerceiverConfig:
    use_resampler: bool = False
    resampler_n_latents: int = 64
    resampler_depth: int = 6
    resampler_n_heads: int = 16
    resampler_head_dim: int = 96
    qk_layer_norms_perceiver: bool = False
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PerceiverConfig":
        known, extra = _split_known(cls, data)
        known.pop("extra", None)
        return cls(**known, extra=extra)


@dataclass
class IdeficsConfig:
    """IDEFICS v1 (`model_type: "idefics"`). Defaults are the reference class defaults, not the 9b values."""

    model_type: str = "idefics"
    vocab_size: int = 32000
    additional_vocab_size: int = 0
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # GQA for pluggable LLaMA-family decoders; None = MHA
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    cross_layer_interval: int = 1
    qk_layer_norms: bool = False
    alpha_type: str = "float"
    alpha_initializer: str = "zeros"
    use_resampler: bool = False
    torch_dtype: str | None = None
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    perceiver_config: PerceiverConfig = field(default_factory=PerceiverConfig)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "IdeficsConfig":
        data = dict(data)
        vision = VisionConfig.from_dict(data.pop("vision_config", None) or {})
        perceiver = PerceiverConfig.from_dict(data.pop("perceiver_config", None) or {})
        # transformers 5 writes RoPE settings as `rope_parameters`; older configs have a flat `rope_theta`.
        rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
        if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in data:
            data["rope_theta"] = rope["rope_theta"]
        if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"config.json: RoPE scaling {rope!r} is not supported (only the default RoPE)")
        data.setdefault("torch_dtype", data.get("dtype"))
        known, extra = _split_known(cls, data)
        for key in ("vision_config", "perceiver_config", "extra"):
            known.pop(key, None)
        config = cls(**known, vision_config=vision, perceiver_config=perceiver, extra=extra)
        config.validate()
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> "IdeficsConfig":
        return cls.from_dict(read_json(path))

    def validate(self) -> None:
        problems = []
        if self.model_type != "idefics":
            problems.append(f"model_type is {self.model_type!r}, expected 'idefics'")
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.kv_heads:
            problems.append(f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads {self.kv_heads}")
        if self.cross_layer_interval < 1:
            problems.append(f"cross_layer_interval must be >= 1, got {self.cross_layer_interval}")
        if self.alpha_type not in ("float", "vector"):
            problems.append(f"alpha_type must be 'float' or 'vector', got {self.alpha_type!r}")
        if problems:
            raise ValueError("invalid IDEFICS config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def num_cross_layers(self) -> int:
        return len(range(0, self.num_hidden_layers, self.cross_layer_interval))

    @property
    def image_latents(self) -> int | None:
        """Tokens per image seen by cross-attention (None: depends on the vision encoder's output)."""
        return self.perceiver_config.resampler_n_latents if self.use_resampler else None

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "vision_config", "perceiver_config"):
                continue
            value = getattr(self, f.name)
            if f.name == "num_key_value_heads" and value is None:
                continue
            out[f.name] = value
        out.update(self.extra)
        out["vision_config"] = _sub_to_dict(self.vision_config)
        out["perceiver_config"] = _sub_to_dict(self.perceiver_config)
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def _sub_to_dict(sub: Any) -> dict[str, Any]:
    out = {f.name: getattr(sub, f.name) for f in dataclasses.fields(sub) if f.name != "extra"}
    out.update(sub.extra)
    return out
