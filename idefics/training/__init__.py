"""Training: the IDEFICS recipe (frozen backbones, new perceiver / gated cross-attention / token rows,
next-token loss with z-loss on packed image-text data) and instruction tuning, on one process or many.

    from idefics.training import load_config, train
    train(load_config("configs/mini_pretrain.yaml", ["train.steps=100"]))

Modules: build (model from backbones, freeze), collate (samples → tensors, pure), loss, batches (resumable
data stream), trainer (the loop), checkpoints (atomic checkpoints, export), distributed (DDP/FSDP),
lora (peft adapters, merge), config (YAML/TOML + overrides), cli (`idefics train`).
"""

from .build import ModelSpec, build_model, freeze
from .checkpoints import ResumeError, export
from .config import RunConfig, load_config
from .trainer import train

__all__ = ["ResumeError", "ModelSpec", "RunConfig", "build_model", "export", "freeze", "load_config", "train"]
