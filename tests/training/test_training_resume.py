"""Resume: a run killed with kill -9 and resumed equals the uninterrupted run; corrupt or partial checkpoints
are refused with an error naming the file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from idefics.training.checkpoints import ResumeError
from idefics.training.trainer import train
from tests.training.fixtures import REPO, TINY, losses, tiny_config, tiny_overrides


def run_cli(root: Path, out: Path, *args: str) -> subprocess.Popen:
    sets = [a for o in tiny_overrides(root, out, "train.steps=8", "train.save_every=3") for a in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "idefics.training.cli", str(TINY), *sets, *args], env=env,
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    whole = run_cli(tmp_path, tmp_path / "whole")
    killed = run_cli(tmp_path, tmp_path / "killed")
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "checkpoints" / "step-000006").exists():
        assert killed.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert whole.wait() == 0, whole.stderr.read().decode()[-2000:]
    resumed = run_cli(tmp_path, tmp_path / "killed", "--resume")
    assert resumed.wait() == 0, resumed.stderr.read().decode()[-2000:]
    assert losses(tmp_path / "killed") == losses(tmp_path / "whole")
    assert len(losses(tmp_path / "whole")) == 8
    a = load_file(str(tmp_path / "whole" / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "export" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_corrupt_or_partial_checkpoint_is_refused(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "run", "train.steps=2", "train.save_every=1", "train.export=none")
    train(cfg)
    newest = tmp_path / "run" / "checkpoints" / "step-000002"
    data = bytearray((newest / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newest / "optimizer.pt").write_bytes(bytes(data))
    with pytest.raises(ResumeError, match="optimizer.pt does not match its SHA-256"):
        train(cfg, resume=True)
    (newest / "manifest.json").unlink()
    with pytest.raises(ResumeError, match="incomplete: no manifest.json"):
        train(cfg, resume=True)
    with pytest.raises(ResumeError, match="pass --resume"):
        train(cfg)


def test_a_damaged_newest_checkpoint_names_the_intact_one_and_resuming_from_it_works(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "run", "train.steps=3", "train.save_every=1", "train.export=none",
                      "train.keep_checkpoints=3")
    train(cfg)
    root = tmp_path / "run" / "checkpoints"
    newest = root / "step-000003"
    (newest / "rng.pt").write_bytes(b"damaged")
    with pytest.raises(ResumeError) as error:
        train(cfg, resume=True)
    message = str(error.value)
    assert f"previous checkpoint {root / 'step-000002'} is intact" in message
    assert f"mv {newest} {newest}.damaged" in message
    newest.rename(newest.with_name(newest.name + ".damaged"))  # what the message says to do
    summary = train(cfg, resume=True)
    assert summary["steps"] == 3 and summary["loss"] is not None
    # a finished run resumed again keeps its summary (valid JSON, no NaN)
    again = train(cfg, resume=True)
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert again["steps"] == saved["steps"] == 3 and saved["loss"] == summary["loss"]
