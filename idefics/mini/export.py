"""Copy a trained idefics-mini export into the package as the embedded default model.

The export holds only the trained tensors (perceiver, gated cross-attention, new token rows) with
`idefics_backbones` in config.json naming where the frozen ones come from (installed wheels). Tensors are
stored in bfloat16 to halve the size of the committed file; `idefics.load()` gives float32 unless asked.

    python -m idefics.mini.export runs/mini_photos/export idefics/assets/idefics-mini
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

COPIED = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "preprocessor_config.json", "chat_template.jinja")


def export_mini(source: str | Path, target: str | Path) -> Path:
    source, target = Path(source), Path(target)
    config = json.loads((source / "config.json").read_text())
    if not config.get("idefics_backbones"):
        raise ValueError(f"{source}: not a reference export (config.json has no idefics_backbones)")
    tensors = {}
    for path in sorted(source.glob("*.safetensors")):
        tensors.update(load_file(path))
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()},
              staging / "model.safetensors", metadata={"format": "pt"})
    for name in COPIED:
        if (source / name).exists():
            shutil.copy(source / name, staging / name)
    config["torch_dtype"] = "float32"  # what load() gives by default; the file itself is bfloat16
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m idefics.mini.export EXPORT_DIR TARGET_DIR")
    print(export_mini(sys.argv[1], sys.argv[2]))
