"""The training run's configuration: a YAML or TOML file with four sections, plus `key.path=value`
overrides from the command line. Every key and its default is below; unknown keys are errors.

    out_dir: runs/tiny                 # checkpoints, metrics.jsonl, loss.png, tokenizer/, export/
    model:   {...}                     # ModelSpec (build.py): backbones, new blocks' sizes, new tokens
    data:    {...}                     # DataConfig: sources with weights/epochs, seq_len, packing, errors
    train:   {...}                     # TrainConfig: steps, batch, optimizer, schedule, precision, intervals
    lora:    null                      # or {r, alpha, dropout, target_modules}: see lora.py
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .batches import SourceSpec
from .build import RECIPE_TRAINABLE, ModelSpec


@dataclass
class DataConfig:
    train: list[dict[str, Any]] = field(default_factory=list)  # [{name, shards, weight, epochs}]
    val: Any = None  # shards for validation (path, glob, list), or None
    seq_len: int = 512
    max_images: int = 8  # images per packed row
    pack: bool = True
    shuffle: bool = True
    shuffle_buffer: int = 256
    on_error: str = "skip"  # skip (count and warn) | raise (stop, naming shard and key)
    split: str = "shards"  # shards: each process reads its own shards | batch: each reads all, keeps its rows
    pad_to_seq_len: bool = False  # constant shapes (helps compiled / GPU runs)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8  # rows (packed sequences) per optimizer step, over all processes
    micro_batch_size: int = 0  # rows per forward pass per process (0: batch_size / processes, no accumulation)
    lr: float = 1e-4
    final_lr: float = 0.0  # linear decay ends here at `steps`
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices only (not norms, biases, gates)
    gate_lr_scale: float = 1.0  # the tanh gates' learning rate is lr x this (they start at 0, see trainer)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    z_loss: float = 1e-3
    precision: str = "auto"  # auto (bf16 autocast where faster: CUDA with bf16, and CPU) | bf16 | fp32
    gradient_checkpointing: bool = False
    trainable: list[str] = field(default_factory=lambda: list(RECIPE_TRAINABLE))
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # 0: no validation during training
    val_batches: int = 4
    save_every: int = 100  # 0: only at the end
    keep_checkpoints: int = 2
    distributed: str = "auto"  # auto | ddp | fsdp | none
    device: str = "auto"
    threads: int = 0  # torch threads (0: torch's default)
    export: str = "reference"  # reference: new tensors only, backbones named in config.json | full | none
    progress: bool = True


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: dict[str, Any] | None = None
    init_from: str | None = None  # a trained IDEFICS folder to start from (instruction tuning) instead of `model`

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def sources(self) -> list[SourceSpec]:
        return [SourceSpec.from_dict(s) for s in self.data.train]


def _coerce(value: Any, default: Any, where: str) -> Any:
    """Numbers and booleans written as strings become numbers and booleans. (YAML 1.1 reads `3e-4`, without
    a dot, as a string; command-line overrides are strings to begin with.)"""
    if not isinstance(value, str) or isinstance(default, str) or default is None:
        return value
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false"):
                raise ValueError(value)
            return value.lower() == "true"
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise ValueError(f"{where}: expected a {type(default).__name__}, got {value!r}") from None
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known keys: {sorted(fields)}")
    defaults = cls()
    return cls(**{k: _coerce(v, getattr(defaults, k), f"{where}.{k}") for k, v in data.items()})


def from_dict(data: dict[str, Any]) -> RunConfig:
    data = dict(data)
    top = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(data) - top)
    if unknown:
        raise ValueError(f"config: unknown top-level keys {unknown}; known: {sorted(top)}")
    config = RunConfig(out_dir=str(data.get("out_dir", RunConfig.out_dir)),
                       model=_build(ModelSpec, data.get("model") or {}, "model"),
                       data=_build(DataConfig, data.get("data") or {}, "data"),
                       train=_build(TrainConfig, data.get("train") or {}, "train"),
                       lora=data.get("lora"), init_from=data.get("init_from"))
    config.train.betas = tuple(config.train.betas)
    validate(config)
    return config


def validate(config: RunConfig) -> None:
    t, d = config.train, config.data
    problems = []
    if not d.train:
        problems.append("data.train lists no sources")
    if t.steps < 1 or t.batch_size < 1 or t.micro_batch_size < 0:
        problems.append("train.steps and train.batch_size must be >= 1, micro_batch_size >= 0")
    if t.precision not in ("auto", "bf16", "fp32"):
        problems.append(f"train.precision must be auto, bf16 or fp32, got {t.precision!r}")
    if t.export not in ("reference", "full", "none"):
        problems.append(f"train.export must be reference, full or none, got {t.export!r}")
    if t.warmup_steps < 0 or t.warmup_steps > t.steps:
        problems.append(f"train.warmup_steps must be in [0, steps], got {t.warmup_steps}")
    if d.seq_len < 8:
        problems.append(f"data.seq_len must be >= 8, got {d.seq_len}")
    if problems:
        raise ValueError("invalid training config: " + "; ".join(problems))
    for source in d.train:
        SourceSpec.from_dict(source)


def read_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"cannot read config {path}: {error.strerror or error}") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the config must be a mapping of sections (out_dir, model, data, train)")
    return data


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """`train.lr=3e-4` → data["train"]["lr"] = 3e-4 (the value is read as YAML: numbers, true/false, null,
    lists `[a, b]` and mappings `{k: v}` work)."""
    if "=" not in assignment:
        raise ValueError(f"override {assignment!r} must look like section.key=value (e.g. train.lr=3e-4)")
    path, raw = assignment.split("=", 1)
    keys = path.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ValueError(f"override {assignment!r}: cannot read the value ({error})") from None
    node = data
    for key in keys[:-1]:
        if node.get(key) is None:
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict):
            raise ValueError(f"override {assignment!r}: {key} is not a section")
    node[keys[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    data = read_file(path) if path else {}
    for assignment in overrides:
        apply_override(data, assignment)
    return from_dict(data)
