"""Two processes (torchrun, gloo on loopback) give the losses of one process with the same global batch, with
DDP and with FSDP (and gradient accumulation, and one process seeing only text); an FSDP checkpoint
(gathered to full tensors) resumes in one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training.fixtures import REPO, tiny_overrides, write_shards

STEPS = ("train.steps=4", "train.save_every=2", "data.split=batch", "train.batch_size=4", "data.pack=false")


def run(root: Path, out: Path, processes: int, *extra: str, resume: bool = False) -> None:
    # unpacked rows alternate between samples with images and text-only ones, so with 2 processes one of
    # them sees only text: the processes must still run the same blocks (DDP and FSDP would hang otherwise)
    mixed = root / "mixed"
    if not mixed.exists():
        write_shards(mixed, n=24, kinds="ptdt")
    sets = [a for o in tiny_overrides(root, out, *STEPS, f"data.train=[{{shards: {mixed}}}]", *extra)
            for a in ("--set", o)]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
                if processes > 1 else [sys.executable])
    command = launcher + ["-m", "idefics.training.cli", str(REPO / "configs" / "tiny.yaml"), *sets]
    command += ["--resume"] if resume else []
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    run(root, root / "one", 1)
    return root


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one(one_process, mode):
    root = one_process
    # 2 rows per process in micro-batches of 1: accumulation (DDP no_sync / FSDP deferred reduce-scatter) too
    run(root, root / mode, 2, f"train.distributed={mode}", "train.micro_batch_size=1")
    assert losses(root / mode) == pytest.approx(losses(root / "one"), rel=1e-5)
    a = load_file(str(root / "one" / "export" / "model.safetensors"))
    b = load_file(str(root / mode / "export" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    if mode == "fsdp":  # the gathered checkpoint continues in one process
        resumed = root / "fsdp-resumed"
        (resumed / "checkpoints").mkdir(parents=True)
        shutil.copytree(root / "fsdp" / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
        shutil.copyfile(root / "fsdp" / "metrics.jsonl", resumed / "metrics.jsonl")
        run(root, resumed, 1, resume=True)
        assert losses(resumed) == pytest.approx(losses(root / "one"), rel=1e-5)
