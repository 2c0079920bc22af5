"""The single-process trainer on configs/tiny.yaml: what trains, that it learns, exact resume after kill -9,
refusal of corrupt checkpoints, export, and bad data handling."""

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

from idefics.training.build import build_model
from idefics.training.checkpoints import CheckpointError
from idefics.training.config import load_config
from idefics.training.trainer import lr_at, train
from training_fixtures import REPO, image, tiny_overrides, write_shards

TINY = REPO / "configs" / "tiny.yaml"


def losses(out: Path, split: str = "train") -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["split"] == split]


def config(root: Path, out: Path, *extra: str):
    return load_config(TINY, tiny_overrides(root, out, *extra))


def test_schedule_warms_up_then_decays_linearly():
    lrs = [lr_at(s, 1.0, warmup=4, total=12, final_lr=0.2) for s in range(12)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4:8] == pytest.approx([1.0, 0.9, 0.8, 0.7])
    assert lrs[-1] == pytest.approx(0.3) and lr_at(12, 1.0, 4, 12, 0.2) == pytest.approx(0.2)


def test_training_changes_trainable_tensors_only(tmp_path):
    """After training, every frozen tensor is bit-identical to the freshly built model's and every trainable
    one has moved. (Two steps: at the first, the gates are 0 and only they and the token rows get a gradient.)"""
    cfg = config(tmp_path, tmp_path / "run", "train.steps=2", "train.warmup_steps=0", "train.weight_decay=0")
    train(cfg)
    fresh, _, _ = build_model(cfg.model, tmp_path / "tok-again")
    after = load_file(str(tmp_path / "run" / "export" / "model.safetensors"))
    trainable = load_file(str(tmp_path / "run" / "checkpoints" / "step-000002" / "trainable.safetensors"))
    assert set(trainable) == {n for n in after if n.startswith(("model.perceiver_resampler.",
                              "model.gated_cross_attn_layers.", "model.embed_tokens.additional",
                              "lm_head.additional"))}
    for name, before in fresh.state_dict().items():
        if name in trainable:
            assert not torch.equal(after[name], before), f"{name} did not change"
        else:
            assert torch.equal(after[name], before), f"frozen {name} changed"


def test_a_few_steps_lower_the_loss(tmp_path):
    summary = train(config(tmp_path, tmp_path / "run", "train.steps=24", "train.save_every=0", "train.lr=1e-2",
                           f"data.val={tmp_path / 'data'}", "train.eval_every=12", "train.val_batches=2",
                           "train.export=none"))
    train_losses, val_losses = losses(tmp_path / "run"), losses(tmp_path / "run", "val")
    assert len(train_losses) == 24 and summary["steps"] == 24
    assert sum(train_losses[-5:]) / 5 < sum(train_losses[:5]) / 5 - 0.2
    assert len(val_losses) == 2 and val_losses[1] < val_losses[0]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss", "ce", "z", "lr", "grad_norm", "tokens_per_s", "step_time"} <= set(record)
    assert record["loss"] == pytest.approx(record["ce"] + 1e-3 * record["z"])


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
    cfg = config(tmp_path, tmp_path / "run", "train.steps=2", "train.save_every=1", "train.export=none")
    train(cfg)
    newest = tmp_path / "run" / "checkpoints" / "step-000002"
    data = bytearray((newest / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newest / "optimizer.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="optimizer.pt does not match its SHA-256"):
        train(cfg, resume=True)
    (newest / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete: no manifest.json"):
        train(cfg, resume=True)
    with pytest.raises(CheckpointError, match="pass --resume"):
        train(cfg)


def test_export_loads_with_idefics_load(tmp_path):
    import idefics

    cfg = config(tmp_path, tmp_path / "run", "train.steps=2", "train.save_every=0")
    train(cfg)
    pipe = idefics.load(tmp_path / "run" / "export")
    rebuilt, _, _ = build_model(cfg.model, tmp_path / "tok-again")
    trained = load_file(str(tmp_path / "run" / "checkpoints" / "step-000002" / "trainable.safetensors"))
    rebuilt.load_state_dict(trained, strict=False)
    inputs = pipe.processor([[image(1), "a red cat"]])
    with torch.no_grad():
        assert torch.allclose(pipe.model(**inputs).logits, rebuilt.eval()(**inputs).logits, atol=1e-5)
    assert pipe.processor.images.size == 28


def test_bad_data_is_skipped_and_counted_or_stops_naming_shard_and_key(tmp_path):
    from idefics.data import DataError, Sample, ShardWriter

    bad = tmp_path / "bad"
    write_shards(bad, n=12, per_shard=12)
    with ShardWriter(str(bad / "zz-%05d.tar"), max_count=10) as writer:
        writer.write(Sample("pair", "broken", items=[b"\x89PNG\r\n\x1a\ngarbage", "a red cat"]))
        writer.write(Sample("pair", "toolong", items=[image(0), "red " * 80]))
        writer.write(Sample("pair", "fine", items=[image(1), "a blue dog"]))
    base = ("train.steps=3", "train.batch_size=2", f"data.train=[{{shards: {bad}, epochs: 1}}]", "train.export=none")
    summary = train(config(tmp_path, tmp_path / "skip", *base))
    assert summary["skipped"] == {"image": 1, "too_long": 1}
    with pytest.raises(DataError) as error:
        train(config(tmp_path, tmp_path / "raise", *base, "data.on_error=raise"))
    assert error.value.key == "broken" and error.value.shard.endswith("zz-00000.tar")
    assert "zz-00000.tar" in str(error.value) and "broken" in str(error.value)
    sets = [a for o in tiny_overrides(tmp_path, tmp_path / "cli", *base, "data.on_error=raise") for a in ("--set", o)]
    result = subprocess.run([sys.executable, "-m", "idefics.training.cli", str(TINY), *sets], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "DataError: shard" in result.stderr and "zz-00000.tar" in result.stderr and "'broken'" in result.stderr
