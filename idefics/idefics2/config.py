"""Idefics2 configuration (`model_type: "idefics2"`), read from and written to Hugging Face `config.json`.

Three sub-configs, as in the reference: `vision_config` (SigLIP encoder), `perceiver_config` (the connector's
resampler) and `text_config` (Mistral). Hub configs only hold the values that differ from the reference class
defaults, so the defaults below are the reference's (`Idefics2VisionConfig`, `Idefics2PerceiverConfig`,
`MistralConfig`), not the idefics2-8b values. Unused keys are kept in `extra` and written back on save.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import _split_known, _sub_to_dict, read_json


def _from_dict(cls: type, data: dict[str, Any]):
    data = {k: v for k, v in data.items() if k != "model_type"}  # hub configs carry stale sub-model types
    known, extra = _split_known(cls, data)
    known.pop("extra", None)
    return cls(**known, extra=extra)


@dataclass
class Idefics2VisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def patches_per_side(self) -> int:
        """Side of the learned position grid (70 for idefics2-8b: 980 px / 14 px)."""
        return self.image_size // self.patch_size


@dataclass
class Idefics2PerceiverConfig:
    hidden_act: str = "silu"
    hidden_size: int = 4096
    rms_norm_eps: float = 1e-6
    resampler_n_latents: int = 64
    resampler_depth: int = 3
    resampler_n_heads: int = 16
    resampler_head_dim: int = 96
    num_key_value_heads: int = 4
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class MistralConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096 * 32
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    rope_theta: float = 10000.0
    sliding_window: int | None = 4096
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MistralConfig":
        data = dict(data)
        # transformers 5 writes RoPE settings as `rope_parameters`; hub configs have a flat `rope_theta`.
        rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
        if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in data:
            data["rope_theta"] = rope["rope_theta"]
        if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"config.json: text_config RoPE scaling {rope!r} is not supported (only the default RoPE)")
        return _from_dict(cls, data)


# When `text_config` is absent the reference builds Mistral with these (Idefics2Config.sub_configs_defaults).
IDEFICS2_TEXT_DEFAULTS = {"max_position_embeddings": 4096 * 8, "rms_norm_eps": 1e-5, "pad_token_id": 0}


@dataclass
class Idefics2Config:
    model_type: str = "idefics2"
    image_token_id: int = 32001
    tie_word_embeddings: bool = False
    use_cache: bool = True
    torch_dtype: str | None = None
    text_config: MistralConfig = field(default_factory=lambda: MistralConfig(**IDEFICS2_TEXT_DEFAULTS))
    vision_config: Idefics2VisionConfig = field(default_factory=Idefics2VisionConfig)
    perceiver_config: Idefics2PerceiverConfig = field(default_factory=Idefics2PerceiverConfig)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Idefics2Config":
        data = dict(data)
        text_data = data.pop("text_config", None)
        text = MistralConfig.from_dict(IDEFICS2_TEXT_DEFAULTS if text_data is None else text_data)
        vision = _from_dict(Idefics2VisionConfig, data.pop("vision_config", None) or {})
        perceiver = _from_dict(Idefics2PerceiverConfig, data.pop("perceiver_config", None) or {})
        if perceiver.hidden_size != text.hidden_size:
            # The reference's rule: a perceiver config without the text width takes width and eps from the text.
            perceiver.hidden_size, perceiver.rms_norm_eps = text.hidden_size, text.rms_norm_eps
        data.setdefault("torch_dtype", data.get("dtype"))
        known, extra = _split_known(cls, data)
        for key in ("text_config", "vision_config", "perceiver_config", "extra"):
            known.pop(key, None)
        config = cls(**known, text_config=text, vision_config=vision, perceiver_config=perceiver, extra=extra)
        config.validate()
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> "Idefics2Config":
        return cls.from_dict(read_json(path))

    def validate(self) -> None:
        t, v, p = self.text_config, self.vision_config, self.perceiver_config
        problems = []
        if self.model_type != "idefics2":
            problems.append(f"model_type is {self.model_type!r}, expected 'idefics2'")
        if t.hidden_size % t.num_attention_heads:
            problems.append(f"text hidden_size {t.hidden_size} is not divisible by num_attention_heads "
                            f"{t.num_attention_heads}")
        elif t.head_dim != t.hidden_size // t.num_attention_heads:
            problems.append(f"text head_dim {t.head_dim} != hidden_size / num_attention_heads is not supported")
        if t.num_attention_heads % t.num_key_value_heads:
            problems.append(f"text num_attention_heads {t.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads {t.num_key_value_heads}")
        if p.resampler_n_heads % p.num_key_value_heads:
            problems.append(f"perceiver resampler_n_heads {p.resampler_n_heads} is not a multiple of "
                            f"num_key_value_heads {p.num_key_value_heads}")
        if v.hidden_size % v.num_attention_heads:
            problems.append(f"vision hidden_size {v.hidden_size} is not divisible by num_attention_heads "
                            f"{v.num_attention_heads}")
        for name, act in (("text_config", t.hidden_act), ("perceiver_config", p.hidden_act)):
            if act != "silu":
                problems.append(f"{name}.hidden_act {act!r} is not supported (the SwiGLU MLPs use 'silu')")
        if t.sliding_window is not None and t.sliding_window < 1:
            problems.append(f"text sliding_window must be >= 1 or null, got {t.sliding_window}")
        if not 0 <= self.image_token_id < t.vocab_size:
            problems.append(f"image_token_id {self.image_token_id} is outside the vocabulary (size {t.vocab_size})")
        if problems:
            raise ValueError("invalid Idefics2 config: " + "; ".join(problems))

    # The surface generation and the pipeline read (the same names as IdeficsConfig).
    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    @property
    def additional_vocab_size(self) -> int:
        return 0  # plain embedding and lm_head: the new tokens are ordinary vocabulary rows

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def max_position_embeddings(self) -> int:
        return self.text_config.max_position_embeddings

    @property
    def head_dim(self) -> int:
        return self.text_config.hidden_size // self.text_config.num_attention_heads

    @property
    def image_seq_len(self) -> int:
        return self.perceiver_config.resampler_n_latents

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.text_config.eos_token_id
        if eos is None:
            return []
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name not in ("extra", "text_config", "vision_config", "perceiver_config"):
                out[f.name] = getattr(self, f.name)
        out.update(self.extra)
        out["text_config"] = {"model_type": "mistral", **_sub_to_dict(self.text_config)}
        out["vision_config"] = _sub_to_dict(self.vision_config)
        out["perceiver_config"] = _sub_to_dict(self.perceiver_config)
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
