"""LoRA adapters (with `peft`) for instruction tuning, and merging them into the weights for export.

Config (`lora:` section):

    lora:
      r: 8                    # adapter rank
      alpha: 16               # scale = alpha / r
      dropout: 0.0
      target_modules: null    # default: the decoder's self-attention projections (DEFAULT_TARGETS, a regex
                              # over full module names); or a list of name suffixes / a regex string

The adapters train on top of whatever `train.trainable` leaves trainable (e.g. the new blocks, or nothing:
`trainable: []`); the adapted base weights stay frozen. `merge_lora` folds W + (alpha/r) B A into each
adapted layer and puts the plain layer back, so the exported model has the ordinary IDEFICS keys.
"""

from __future__ import annotations

from typing import Any

from torch import nn

DEFAULT_TARGETS = r".*model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj"
KEYS = {"r", "alpha", "dropout", "target_modules"}


def apply_lora(model: nn.Module, spec: dict[str, Any]) -> list[str]:
    """Inject adapters in place; returns the names of the adapter parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    unknown = sorted(set(spec) - KEYS)
    if unknown:
        raise ValueError(f"lora: unknown keys {unknown}; known: {sorted(KEYS)}")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    targets = spec.get("target_modules") or DEFAULT_TARGETS
    config = LoraConfig(r=int(spec.get("r", 8)), lora_alpha=float(spec.get("alpha", 16)),
                        lora_dropout=float(spec.get("dropout", 0.0)), target_modules=targets, bias="none")
    try:
        inject_adapter_in_model(config, model)
    except ValueError as error:  # peft: "Target modules ... not found in the base model"
        raise ValueError(f"lora.target_modules {targets!r} matches no module of the model ({error})") from None
    for p in model.parameters():  # peft freezes everything but the adapters; keep the recipe's choice too
        if id(p) in trainable:
            p.requires_grad_(True)
    return [n for n, p in model.named_parameters() if "lora_" in n]


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base layer and replace the adapted module by the plain layer.
    Returns the number of merged layers."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
            merged += 1
    return merged
