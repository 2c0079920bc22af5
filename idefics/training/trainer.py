"""The training loop: one readable function, not a framework.

    model = build (backbones + fresh blocks) → freeze → [LoRA] → DDP/FSDP
    for step in steps:
        rows = the step's packed rows (resumable data position)
        for each micro-batch:                 # gradient accumulation
            (ce + z_loss * z) summed over targets / targets in the whole step → backward
        clip → AdamW with warmup + linear decay → log (JSONL, tqdm) → validate → checkpoint
    export a folder idefics.load() reads

Everything a resumed run needs is in the checkpoint, so a run killed at any point (kill -9 included) and
resumed with `--resume` produces the same losses as one that was never interrupted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import load_model
from ..config import IdeficsConfig
from ..cross_attention import WORD_NORM
from ..data import expand_shards
from ..processor import ImageSettings
from ..tokenizer import Tokenizer
from . import distributed as dist_utils
from .batches import BatchStream, SourceSpec
from ..backbones.sources import LANGUAGE_PREFIXES, VISION_PREFIX, backbone_state_dict
from .build import build_model, copy_tokenizer, freeze
from .checkpoints import (ResumeError, export, frozen_fingerprint, list_checkpoints, load_checkpoint, verify,
                          save_checkpoint)
from .collate import Collator, SampleEncoder, with_blank_image
from .config import RunConfig
from .loss import LossModel
from .metrics import TrainingLog

log = logging.getLogger(__name__)


def lr_at(step: int, lr: float, warmup: int, total: int, final_lr: float = 0.0) -> float:
    """Linear warmup from 0 to `lr` over `warmup` steps, then linear decay to `final_lr` at `total`.
    `step` counts optimizer steps from 0 (the first update uses lr_at(0) = lr / warmup)."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr + (final_lr - lr) * min(1.0, progress)


def param_groups(model: torch.nn.Module, weight_decay: float, gate_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """Weight decay on matrices only: decaying norms, biases or the tanh gates toward zero is not wanted.
    The gates get their own group with `lr_scale`: Adam moves a scalar by about lr per step, so a gate that
    starts at 0 needs ~1/lr steps to open; a short run opens it sooner with a larger rate."""
    decay, no_decay, gates = [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            if name.rsplit(".", 1)[-1].startswith("alpha_"):
                gates.append(p)
            else:
                (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
    if gates:
        groups.append({"params": gates, "weight_decay": 0.0, "lr_scale": gate_lr_scale})
    return groups


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where it is faster: CUDA devices with bf16, and CPUs (the idefics-mini step runs 1.2-2.25x
    faster than in fp32 on 2-core x86 CPUs with AVX-512 or AMX); fp32 otherwise."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def setup_model(config: RunConfig, tokenizer_dir: Path) -> tuple[torch.nn.Module, Tokenizer, ImageSettings]:
    """Build from backbones (or load `init_from`), freeze per `train.trainable`, apply LoRA if configured."""
    if config.init_from:  # e.g. instruction tuning from a pretraining export
        folder = Path(config.init_from)
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"init_from: {folder} has no config.json (expected an exported model folder)")
        sources = json.loads((folder / "config.json").read_text()).get("idefics_backbones")
        extra = backbone_state_dict(sources, IdeficsConfig.from_json(folder / "config.json")) if sources else None
        model = load_model(folder, dtype="float32", extra_tensors=extra)
        copy_tokenizer(folder, tokenizer_dir)
        tokenizer = Tokenizer.from_folder(tokenizer_dir)
        images = ImageSettings.from_folder(folder, model.config.vision_config.image_size)
    else:
        model, tokenizer, images = build_model(config.model, tokenizer_dir)
    freeze(model, config.train.trainable)
    if config.lora:
        from .lora import apply_lora

        apply_lora(model, config.lora)
    model.model.gradient_checkpointing = config.train.gradient_checkpointing
    return model, tokenizer, images


def load_newest(checkpoints: list[Path]):
    """`load_checkpoint` of the newest checkpoint; if it is damaged, the error names the newest intact one and
    how to resume from it (a folder whose name has a dot is not a checkpoint)."""
    try:
        return load_checkpoint(checkpoints[-1])
    except ResumeError as error:
        for older in reversed(checkpoints[:-1]):
            try:
                verify(older)
            except ResumeError:
                continue
            raise ResumeError(f"{error}\nThe previous checkpoint {older} is intact. To resume from it, set the "
                              f"damaged one aside and run again with --resume:\n  mv {checkpoints[-1]} "
                              f"{checkpoints[-1]}.damaged") from None
        raise ResumeError(f"{error}\nNo earlier checkpoint is intact: start again without --resume.") from None


@torch.no_grad()
def gate_values(model: torch.nn.Module) -> dict[str, float]:
    """Mean |tanh(alpha)| of the cross-attention and dense gates: how much the new blocks contribute; with a word
    path, its largest gain (in residual-stream norm). (Under FSDP every process must call this: gathering a
    sharded gate is collective.)"""
    def abs_tanh(name: str) -> list[torch.Tensor]:
        values = []
        for layer in model.model.gated_cross_attn_layers:
            alpha = getattr(layer, name)
            alpha = alpha.full_tensor() if hasattr(alpha, "full_tensor") else alpha
            values.append(torch.tanh(alpha.float()).abs().mean())
        return values

    def mean(values: list[torch.Tensor]) -> float:
        return float(torch.stack(values).mean()) if values else 0.0

    gates = {"gate_xattn": mean(abs_tanh("alpha_cross_attn")), "gate_dense": mean(abs_tanh("alpha_dense"))}
    if getattr(model.model, "word_slots", 0):
        gates["word_gain"] = WORD_NORM * float(torch.stack(abs_tanh("alpha_word")).max())
    return gates


def micro_batches(rows: list, size: int) -> list[list]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def train(config: RunConfig, resume: bool = False) -> dict[str, Any]:
    """Run (or continue) the training run described by `config`; returns a summary."""
    run = Run(config, resume)
    run.loop()
    return run.finish()


class Run:
    """One training run: the model and optimizer, the data streams, the checkpoints and the log. Every process of
    a distributed run holds one; `loop` runs the steps, `finish` saves, exports and summarises."""

    def __init__(self, config: RunConfig, resume: bool) -> None:
        tc, dc = config.train, config.data
        self.config, self.tc, self.dc = config, tc, dc
        self.info = info = dist_utils.setup(tc.distributed, tc.device)
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.out_dir = Path(config.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        if info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if list_checkpoints(self.ckpt_root) and not resume:
                raise ResumeError(f"{self.out_dir} already holds checkpoints: pass --resume to continue that run, "
                                  "or choose another out_dir")
        dist_utils.barrier(info)
        random.seed(tc.seed)
        np.random.seed(tc.seed)
        torch.manual_seed(tc.seed)
        self.build_model()
        rows, remainder = divmod(tc.batch_size, info.world_size)
        self.rows_per_process, self.micro = rows, tc.micro_batch_size or rows
        if remainder or rows % self.micro:
            raise ValueError(f"train.batch_size {tc.batch_size} must split evenly over {info.world_size} processes "
                             f"and micro-batches of {self.micro} rows")
        self.encoder = SampleEncoder(self.tokenizer, self.images, dc.seq_len, dc.max_images)
        self.collate = Collator(self.tokenizer.pad_token_id, self.encoder.image_token_id, self.tokenizer.eos_token_id,
                                self.images.size, dc.seq_len if dc.pad_to_seq_len else None)
        self.data = self.stream(config.sources, dc.shuffle)
        self.metrics = TrainingLog(self.out_dir, info.is_main)
        self.start_step, self.tokens_seen, self.elapsed_before = 0, 0, 0.0
        self.done, self.last_loss = 0, float("nan")
        amp = autocast_dtype(tc.precision, info.device)
        self.autocast = (lambda: torch.autocast(info.device.type, dtype=amp)) if amp else contextlib.nullcontext
        if resume and list_checkpoints(self.ckpt_root):
            self.resume(list_checkpoints(self.ckpt_root))
        self.done = self.start_step

    def build_model(self) -> None:
        config, info, tc = self.config, self.info, self.tc
        name = "tokenizer" if info.is_main else f".tokenizer-rank{info.rank}"
        self.tokenizer_dir = self.out_dir / name
        self.model, self.tokenizer, self.images = setup_model(config, self.tokenizer_dir)
        if config.lora and info.mode == "fsdp":
            raise ValueError("LoRA with FSDP is not supported (merging needs unsharded weights): use DDP or one "
                             "process")
        self.model.to(info.device)
        self.model.train()
        self.fingerprint = frozen_fingerprint(self.model)  # before FSDP turns parameters into shards
        self.loss_model = dist_utils.wrap(LossModel(self.model), info)
        self.trainable = [p for p in self.loss_model.parameters() if p.requires_grad]
        groups = param_groups(self.loss_model, tc.weight_decay, tc.gate_lr_scale)
        self.optimizer = torch.optim.AdamW(groups, lr=tc.lr, betas=tc.betas, eps=tc.eps)

    def stream(self, sources: list[SourceSpec], shuffle: bool, split: str | None = None) -> BatchStream:
        info, dc = self.info, self.dc
        return BatchStream(sources, self.encoder, rows_per_step=self.rows_per_process, pack=dc.pack, rank=info.rank,
                           world_size=info.world_size, split=split or dc.split, seed=self.tc.seed, shuffle=shuffle,
                           shuffle_buffer=dc.shuffle_buffer, on_error=dc.on_error)

    def resume(self, checkpoints: list[Path]) -> None:
        info = self.info
        trainable_state, optim_state, state, rngs = load_newest(checkpoints)
        if state["frozen_fingerprint"] != self.fingerprint:
            raise ResumeError(f"{checkpoints[-1]} was trained on other frozen weights (fingerprint "
                              f"{state['frozen_fingerprint']} vs {self.fingerprint}): model config changed?")
        if state["world_size"] != info.world_size and self.dc.split == "shards":
            raise ResumeError(f"{checkpoints[-1]} was written by {state['world_size']} processes; with "
                              "data.split=shards resume with the same number")
        dist_utils.load_full_state(self.loss_model, self.optimizer,
                                   {"model." + k: v for k, v in trainable_state.items()}, optim_state)
        self.data.load_state_dict(state["data"][info.rank % len(state["data"])])
        set_rng_state(rngs[info.rank % len(rngs)])
        self.start_step, self.tokens_seen, self.elapsed_before = state["step"], state["tokens"], state["elapsed"]
        self.metrics.truncate(self.start_step)
        if info.is_main:
            print(f"resumed from {checkpoints[-1]} at step {self.start_step}")

    def save(self, step: int) -> None:
        info, tc = self.info, self.tc
        model_state, optim_state = dist_utils.full_state(self.loss_model, self.optimizer)
        data_states = dist_utils.all_gather_object(self.data.state_dict(), info)
        rngs = dist_utils.all_gather_object(rng_state(), info)
        if info.is_main:
            trainable_state = {k.removeprefix("model."): v for k, v in model_state.items()}
            state = {"step": step, "tokens": self.tokens_seen,
                     "elapsed": self.elapsed_before + time.time() - self.t_start,
                     "data": data_states, "world_size": info.world_size, "frozen_fingerprint": self.fingerprint,
                     "schedule": {"lr": tc.lr, "warmup_steps": tc.warmup_steps, "steps": tc.steps,
                                  "final_lr": tc.final_lr},
                     "config": self.config.to_dict()}
            save_checkpoint(self.ckpt_root, step, trainable_state, optim_state, state, rngs, tc.keep_checkpoints)
        dist_utils.barrier(info)

    def forward(self, batch: dict[str, torch.Tensor]):
        if self.info.mode == "fsdp":  # every process must run the image path (see with_blank_image)
            batch = with_blank_image(batch, self.encoder.image_token_id)
        batch = {k: v.to(self.info.device) for k, v in batch.items()}
        with self.autocast():
            return self.loss_model(**batch)

    @torch.no_grad()
    def validate(self) -> float | None:
        if self.config.data.val is None:
            return None
        self.loss_model.eval()
        # Every shard is a source of an evenly weighted mixture, so the first `val_batches` batches mix all
        # the validation shards (read one after the other they would be the first shard's only); every
        # process reads all of it and keeps its rows: the same rows whatever the process count.
        shards = [SourceSpec(f"val{i}", path, 1.0, 1) for i, path in enumerate(expand_shards(self.config.data.val))]
        val = self.stream(shards, shuffle=False, split="batch")
        total = torch.zeros(3, dtype=torch.float64)
        for _ in range(self.tc.val_batches):
            rows = val.next_rows()
            if rows is None:
                break
            for chunk in micro_batches(rows, self.micro):
                ce, z, n = self.forward(self.collate(chunk))
                total += torch.stack([ce.detach().double().cpu(), z.detach().double().cpu(), n.double().cpu()])
        self.loss_model.train()
        total = dist_utils.all_reduce_sum(total.to(self.info.device), self.info).cpu()
        return float((total[0] + self.tc.z_loss * total[1]) / total[2]) if total[2] > 0 else None

    def loop(self) -> None:
        tc, info = self.tc, self.info
        bar = None
        if info.is_main and tc.progress:
            from tqdm import tqdm

            bar = tqdm(total=tc.steps, initial=self.start_step, desc="train", unit="step", dynamic_ncols=True)
        self.t_start = time.time()
        for step in range(self.start_step, tc.steps):
            t0 = time.time()
            rows = self.data.next_rows()
            # every process must stop at the same step, or the others would wait for it forever
            ran_out = dist_utils.all_reduce_sum(torch.tensor(float(rows is None)).to(info.device), info)
            if float(ran_out) > 0:
                if info.is_main:
                    print(f"the training data ran out at step {step} (sources with epochs: null cycle forever)")
                break
            lr, loss_parts, n_targets, step_tokens, grad_norm = self.step(step, rows)
            dt = time.time() - t0
            ce_mean, z_mean = loss_parts
            self.last_loss = ce_mean + tc.z_loss * z_mean
            if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
                self.metrics.log({"split": "train", "step": step + 1, "loss": self.last_loss, "ce": ce_mean,
                                  "z": z_mean, "lr": lr, "grad_norm": grad_norm, "targets": int(n_targets),
                                  "tokens": int(step_tokens), "tokens_per_s": step_tokens / dt, "step_time": dt,
                                  "skipped": self.data.errors, **gate_values(self.model)})
            if bar is not None:
                bar.set_postfix(loss=f"{self.last_loss:.4f}", tok_s=f"{step_tokens / dt:.0f}", lr=f"{lr:.2e}")
                bar.update(1)
            self.done = step + 1
            self.after_step()
        if bar is not None:
            bar.close()

    def step(self, step: int, rows: list) -> tuple[float, tuple[float, float], float, float, float]:
        """One optimizer step on this process's rows: (lr, (ce, z) per target, targets, tokens, gradient norm)."""
        tc, info = self.tc, self.info
        batches = [self.collate(chunk) for chunk in micro_batches(rows, self.micro)]
        # every micro-batch's loss is divided by the step's target count over all processes
        local = torch.tensor([float((b["labels"][:, 1:] != -100).sum()) for b in batches]).sum()
        n_targets = float(dist_utils.all_reduce_sum(local.to(info.device), info))
        if n_targets == 0:
            raise ValueError(f"step {step}: the batch has no target tokens (check the data and the labels)")
        sums = torch.zeros(2, dtype=torch.float64)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            if info.mode == "fsdp":  # reduce-scatter gradients once per step, not once per micro-batch
                self.loss_model.set_requires_gradient_sync(last)
            sync = contextlib.nullcontext() if last or info.mode != "ddp" else self.loss_model.no_sync()
            with sync:
                ce, z, _ = self.forward(batch)
                loss = (ce + tc.z_loss * z) / n_targets * (info.world_size if info.active else 1)
                loss.backward()
            sums += torch.stack([ce.detach().double().cpu(), z.detach().double().cpu()])
        sums = dist_utils.all_reduce_sum(sums.to(info.device), info).cpu()
        grad_norm = dist_utils.clip_grad_norm(self.trainable, tc.grad_clip)
        lr = lr_at(step, tc.lr, tc.warmup_steps, tc.steps, tc.final_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        step_tokens = float(dist_utils.all_reduce_sum(
            torch.tensor(float(sum(int(b["attention_mask"].sum()) for b in batches))).to(info.device), info))
        self.tokens_seen += int(step_tokens)
        return lr, (float(sums[0]) / n_targets, float(sums[1]) / n_targets), n_targets, step_tokens, grad_norm

    def after_step(self) -> None:
        """Validation and checkpoints on their schedules."""
        tc, done = self.tc, self.done
        if tc.eval_every and done % tc.eval_every == 0:
            val_loss = self.validate()
            if val_loss is not None:
                self.metrics.log({"split": "val", "step": done, "loss": val_loss})
            self.metrics.plot()
        if tc.save_every and done % tc.save_every == 0 and done < tc.steps:
            self.save(done)
            self.metrics.plot()

    def finish(self) -> dict[str, Any]:
        """The last checkpoint, the export and `summary.json` (kept as it was when a finished run is resumed)."""
        if self.done > self.start_step:
            self.save(self.done)
        self.metrics.plot()
        exported = finish(self.config, self.loss_model, self.model, self.tokenizer_dir, self.images, self.info)
        summary = {"steps": self.done, "loss": self.last_loss if math.isfinite(self.last_loss) else None,
                   "tokens": self.tokens_seen, "skipped": self.data.errors,
                   "export": str(exported) if exported else None, "rank": self.info.rank}
        summary_path = self.out_dir / "summary.json"
        if self.done == self.start_step and summary_path.exists():  # a finished run resumed: nothing new
            summary = {**json.loads(summary_path.read_text()), "export": summary["export"], "rank": self.info.rank}
        if self.info.is_main:
            summary_path.write_text(json.dumps(summary, indent=1, allow_nan=False))
        dist_utils.teardown()
        return summary


def finish(config: RunConfig, loss_model: torch.nn.Module, model: torch.nn.Module, tokenizer_dir: Path,
           images: ImageSettings, info: dist_utils.DistInfo) -> Path | None:
    """Export the trained model to out_dir/export (LoRA adapters merged first)."""
    if config.train.export == "none":
        return None
    # which backbones trained (directly, or through LoRA adapters inside them): those are exported in full
    trained = {part for name, p in model.named_parameters() if p.requires_grad
               for part, prefixes in (("language", LANGUAGE_PREFIXES), ("vision", (VISION_PREFIX,)))
               if name.startswith(prefixes)}
    if config.lora:
        from .lora import merge_lora

        merge_lora(model)
    state = None
    if info.mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(loss_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        state = {k.removeprefix("model."): v for k, v in full.items()}
    out = Path(config.out_dir) / "export"
    if info.is_main:
        backbones = None
        if config.train.export == "reference":
            # left out: backbones that did not train and can be rebuilt from their name
            named = model.config.extra.get("idefics_backbones") or {}
            backbones = {k: v for k, v in named.items() if k not in trained and
                         ((k == "language" and v != "random")
                          or (k == "vision" and (v == "efficientnet_lite0" or v.startswith("clip:"))))}
        export(model, tokenizer_dir, out, images, backbones or None, state)
    dist_utils.barrier(info)
    return out
