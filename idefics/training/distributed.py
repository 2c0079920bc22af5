"""Many processes: the same trainer under `torchrun`, with DDP (every process holds the model, gradients are
averaged) or FSDP (`fully_shard`: parameters, gradients and optimizer state sharded across processes, the
ZeRO-3 equivalent, for models that do not fit one device). gloo on CPU, NCCL on GPU.

    torchrun --nproc-per-node 2 -m idefics.training.cli configs/tiny.yaml --set train.distributed=ddp

Under FSDP each decoder layer, gated cross-attention block (and its image key/value projections), the
perceiver and the vision encoder is its own shard unit, gathered only while it computes; the embeddings,
final norm and output layer form the root unit. Frozen and trainable parameters may share a unit.
Checkpoints gather full (unsharded) tensors on rank 0, so a run saved with N processes resumes with any N.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mode: str = "none"  # none | ddp | fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def setup(mode: str = "auto", device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); a plain
    `python` run is one process. mode: auto (ddp when several processes) | ddp | fsdp | none."""
    if mode not in ("auto", "ddp", "fsdp", "none"):
        raise ValueError(f"train.distributed must be auto, ddp, fsdp or none, got {mode!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world == 1:
        return DistInfo(device=dev, mode="none")
    if mode == "none":
        raise ValueError(f"{world} processes were started but train.distributed is 'none'")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, dev, "ddp" if mode == "auto" else mode)


def teardown() -> None:
    if dist.is_initialized():
        dist.barrier()  # no rank closes its gloo connections while a peer is still in a collective
        dist.destroy_process_group()


def wrap(module: nn.Module, info: DistInfo) -> nn.Module:
    """DDP or FSDP around the loss module (a `LossModel`), or the module itself for one process."""
    if info.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # Text-only batches leave the perceiver and cross-attention unused; DDP must not wait for them.
        return DistributedDataParallel(module, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                                       find_unused_parameters=True)
    if info.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        inner = module.model.model  # LossModel → Idefics → IdeficsModel
        units = []
        for gated in inner.gated_cross_attn_layers:
            # generation-style image projection calls k/v (and the k norm) outside the block's forward, so
            # they are units of their own, gathered when they are called
            attn = gated.cross_attn
            units += [attn.k_proj, attn.v_proj] + ([attn.k_layer_norm] if attn.qk_norms else [])
        units += [*inner.layers, *inner.gated_cross_attn_layers, inner.vision_model]
        if getattr(inner.config, "use_resampler", False):
            units.append(inner.perceiver_resampler)
        for unit in units:
            fully_shard(unit)
        fully_shard(module)
        return module
    return module


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.active:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_gather_object(obj: Any, info: DistInfo) -> list[Any]:
    if not info.active:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    if not info.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.active:
        dist.barrier()


def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float) -> float:
    """Clip to `max_norm` (if > 0) and return the global gradient norm (FSDP gradients are DTensors; their
    norm is reduced across processes by `clip_grad_norm_`)."""
    grads = [p for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def full_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded state of the trainable parameters and of the optimizer (keys are parameter names), on CPU,
    complete on rank 0. Frozen tensors are left out: they come from the backbones."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_state_dict(module, optimizer, options=options)


def load_full_state(module: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                    optimizer_state: dict) -> None:
    """Inverse of `full_state`: every process passes the full dicts (strict=False: only trainable tensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(module, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True, strict=False))
