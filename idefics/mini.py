"""idefics-mini, the embedded default model: where it lives, and its frozen backbones, which are read from
installed packages instead of being stored in the checkpoint folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

ASSET_DIR = Path(__file__).parent / "assets" / "idefics-mini"


def default_model_path() -> Path:
    if not (ASSET_DIR / "config.json").exists():
        raise FileNotFoundError(
            f"the embedded model idefics-mini is not in this installation ({ASSET_DIR}); "
            "pass a checkpoint folder to idefics.load(path)")
    return ASSET_DIR


def backbone_tensors(folder: Path) -> dict[str, torch.Tensor] | None:
    """Tensors of the frozen backbones named in `config.json` under `idefics_backbones`, keyed as in the model
    (None for an ordinary checkpoint that holds all its tensors)."""
    path = Path(folder) / "config.json"
    if not path.exists():
        return None  # the loader reports the missing config
    config = json.loads(path.read_text())
    sources = config.get("idefics_backbones")
    if not sources:
        return None
    tensors: dict[str, torch.Tensor] = {}
    language = sources.get("language")
    if language == "gguf:smollm2":
        from .backbones.gguf_llama import load_gguf_llama

        # HF-LLaMA key names are the model's own (model.embed_tokens.weight, model.layers.*, model.norm.weight)
        tensors.update(load_gguf_llama().state_dict)
    elif language is not None:
        raise ValueError(f"{folder}/config.json: unknown language backbone source {language!r} (known: gguf:smollm2)")
    vision = sources.get("vision")
    if vision == "efficientnet_lite0":
        from .backbones.efficientnet import load_efficientnet_lite0

        net = load_efficientnet_lite0()
        tensors.update({f"model.vision_model.net.{k}": v for k, v in net.state_dict().items()})
    elif vision is not None:
        raise ValueError(f"{folder}/config.json: unknown vision backbone source {vision!r} (known: efficientnet_lite0)")
    return tensors
