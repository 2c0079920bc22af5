"""idefics-mini, the embedded default model: where it lives, and its frozen backbones, which are read from
installed packages instead of being stored in the checkpoint folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch

ASSET_DIR = Path(__file__).parents[1] / "assets" / "idefics-mini"


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
    from ..config import IdeficsConfig
    from ..backbones.sources import backbone_state_dict  # the same code that builds them for training

    return backbone_state_dict(sources, IdeficsConfig.from_dict(config))
