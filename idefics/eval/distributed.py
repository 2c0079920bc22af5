"""Many processes for the evaluation harness: under `torchrun` each process evaluates its share of the
queries; per-query records are exchanged as Python objects over a gloo group (CPU, works with or without
GPUs), so the merged results do not depend on the process count."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch.distributed as dist

_group = None  # the gloo group used for object exchange


def init_from_env() -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) with the gloo
    backend. Returns True if this call initialised it (the caller then destroys it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    dist.init_process_group("gloo")
    return True


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def _object_group():
    """A gloo group: all_gather_object over NCCL would need CUDA tensors and a current device."""
    global _group
    if dist.get_backend() == "gloo":
        return None
    if _group is None:
        _group = dist.new_group(backend="gloo")
    return _group


def all_gather(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order (just [obj] without a process group)."""
    if not is_active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_object_group())
    return out


def broadcast(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every process."""
    if not is_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_object_group())
    return box[0]


def finish(initialised_here: bool, completed: bool, code: int) -> int:
    """End a run: returns `code`, except in a process that joined a process group here, which leaves now with
    that code. Every rank first finishes its last collective (a barrier; after a failure the peers may never
    arrive, so then none). The process group is not torn down: gloo's worker threads can abort the teardown
    ("terminate called without an active exception", seen in ~5% of 2-process runs here), after the results are
    written, turning a finished run into a failed one; the OS closes the sockets."""
    global _group
    if not (initialised_here and dist.is_initialized()):
        return code
    if completed:
        dist.barrier()
    _group = None
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
