"""Training checkpoints (to resume) and exports (to load with `idefics.load()`).

A checkpoint is a folder `out_dir/checkpoints/step-000100/`:

    trainable.safetensors   the trainable tensors (frozen backbone tensors are rebuilt from their sources;
                            `frozen_fingerprint` in state.json checks they are the same ones)
    optimizer.pt            AdamW state, keyed by parameter name
    state.json              step, data position per process, schedule, counters, config
    rng.pt                  python / numpy / torch (CPU and CUDA) random states per process
    manifest.json           size and SHA-256 of every file above — written last

It is written to `step-000100.tmp/`, each file flushed to disk, then renamed: a crash leaves either a
complete checkpoint or a `.tmp` folder that is ignored. Loading checks the manifest first and refuses a
folder with a missing, truncated or altered file, naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import save_model
from ..config import IdeficsConfig
from ..processor import ImageSettings
from ..backbones.sources import LANGUAGE_PREFIXES, VISION_PREFIX, backbone_state_dict
from .build import copy_tokenizer

FILES = ("trainable.safetensors", "optimizer.pt", "state.json", "rng.pt")


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the folder and the file."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def save_checkpoint(root: Path, step: int, trainable: dict[str, torch.Tensor], optimizer: dict, state: dict,
                    rng: list[dict], keep: int = 2) -> Path:
    """Write a checkpoint atomically (see module doc) and delete all but the newest `keep`."""
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    torch.save(optimizer, tmp / "optimizer.pt")
    torch.save(rng, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True))
    manifest = {}
    for name in FILES:
        _fsync(tmp / name)
        manifest[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
    (tmp / "manifest.json").write_text(json.dumps({"step": step, "files": manifest}, indent=1))
    _fsync(tmp / "manifest.json")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoint folders (not `.tmp`), oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and "." not in p.name)


def verify(folder: Path) -> dict:
    """The manifest, after checking that every file it names is there with its size and hash."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        raise ResumeError(f"checkpoint {folder} is incomplete: no manifest.json (it is written last). "
                              "Delete the folder to resume from an earlier checkpoint.")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ResumeError(f"checkpoint {folder}: manifest.json is corrupt ({error})") from None
    for name in FILES:
        path = folder / name
        if name not in files:
            raise ResumeError(f"checkpoint {folder}: manifest.json does not list {name}")
        if not path.exists():
            raise ResumeError(f"checkpoint {folder} is incomplete: {name} is missing")
        if path.stat().st_size != files[name]["bytes"]:
            raise ResumeError(f"checkpoint {folder}: {name} is {path.stat().st_size} bytes, the manifest "
                                  f"says {files[name]['bytes']} (truncated or partly written)")
        if _sha256(path) != files[name]["sha256"]:
            raise ResumeError(f"checkpoint {folder}: {name} does not match its SHA-256 in manifest.json "
                                  "(the file is corrupt)")
    return manifest


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict, dict, list[dict]]:
    """(trainable tensors, optimizer state, state.json, rng states) of a verified checkpoint."""
    verify(folder)
    trainable = load_file(str(folder / "trainable.safetensors"))
    optimizer = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
    rng = torch.load(folder / "rng.pt", map_location="cpu", weights_only=False)
    return trainable, optimizer, json.loads((folder / "state.json").read_text()), rng


def frozen_fingerprint(model: torch.nn.Module) -> str:
    """A cheap identity of the frozen tensors: resuming against different backbones is refused."""
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda x: x[0]):
        if not p.requires_grad:
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
            digest.update(name.encode() + sample.numpy().tobytes())
    return digest.hexdigest()[:16]


class _StateHolder:
    """What `save_model` needs from a model: `.config` and `.state_dict()`."""

    def __init__(self, config: IdeficsConfig, state: dict[str, torch.Tensor]) -> None:
        self.config, self._state = config, state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def export(model: torch.nn.Module, tokenizer_dir: str | Path, out_dir: str | Path, images: ImageSettings,
           backbones: dict[str, str] | None = None, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a folder `idefics.load()` reads: config.json, model.safetensors, tokenizer files and
    preprocessor_config.json.

    With `backbones` (e.g. {"language": "gguf:smollm2", "vision": "efficientnet_lite0"}) only the tensors
    that are not the backbones' are written, and config.json gets `"idefics_backbones": backbones`; the
    loader rebuilds the rest from those sources (`backbones.sources.backbone_state_dict`). The backbone tensors are
    first compared with their sources, so a model whose backbone weights changed (trained, LoRA-merged)
    cannot be exported this way by mistake. `state` overrides `model.state_dict()` (FSDP gathers it)."""
    out_dir = Path(out_dir)
    state = dict(state if state is not None else model.state_dict())
    config = IdeficsConfig.from_dict(model.config.to_dict())
    config.extra.pop("idefics_backbones", None)
    skip: tuple[str, ...] = ()
    if backbones:
        reference = backbone_state_dict(backbones, model.config)
        changed = [k for k, v in reference.items() if k in state and not torch.equal(state[k].cpu().to(v.dtype), v)]
        if changed:
            raise ValueError(f"cannot export by reference: {len(changed)} backbone tensors differ from their "
                             f"sources {backbones} (e.g. {changed[:3]}); export in full instead")
        skip = tuple(k for k in reference)
        config.extra["idefics_backbones"] = dict(backbones)
        if "language" in backbones:
            skip += LANGUAGE_PREFIXES
        if "vision" in backbones:
            skip += (VISION_PREFIX,)
    kept = {k: v.detach() for k, v in state.items() if not k.startswith(skip)}
    save_model(_StateHolder(config, kept), out_dir)
    copy_tokenizer(tokenizer_dir, out_dir)
    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "IdeficsImageProcessor", "image_size": images.size,
        "image_mean": list(images.mean), "image_std": list(images.std), "image_num_channels": 3}, indent=1))
    return out_dir
