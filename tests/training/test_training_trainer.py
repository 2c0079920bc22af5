"""The single-process trainer on configs/tiny.yaml: what trains, that it learns, export, and bad data handling
(resume: test_training_resume.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from idefics.training.build import build_model
from idefics.training.trainer import lr_at, train
from tests.training.fixtures import REPO, TINY, image, losses, tiny_config, tiny_overrides, write_shards


def test_schedule_warms_up_then_decays_linearly():
    lrs = [lr_at(s, 1.0, warmup=4, total=12, final_lr=0.2) for s in range(12)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4:8] == pytest.approx([1.0, 0.9, 0.8, 0.7])
    assert lrs[-1] == pytest.approx(0.3) and lr_at(12, 1.0, 4, 12, 0.2) == pytest.approx(0.2)


def test_training_changes_trainable_tensors_only(tmp_path):
    """After training, every frozen tensor is bit-identical to the freshly built model's and every trainable
    one has moved. (Two steps: at the first, the gates are 0 and only they and the token rows get a gradient.)"""
    cfg = tiny_config(tmp_path, tmp_path / "run", "train.steps=2", "train.warmup_steps=0", "train.weight_decay=0")
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
    summary = train(tiny_config(tmp_path, tmp_path / "run", "train.steps=24", "train.save_every=0", "train.lr=1e-2",
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


def test_export_loads_with_idefics_load(tmp_path):
    import idefics

    cfg = tiny_config(tmp_path, tmp_path / "run", "train.steps=2", "train.save_every=0")
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
    summary = train(tiny_config(tmp_path, tmp_path / "skip", *base))
    assert summary["skipped"] == {"image": 1, "too_long": 1}
    with pytest.raises(DataError) as error:
        train(tiny_config(tmp_path, tmp_path / "raise", *base, "data.on_error=raise"))
    assert error.value.key == "broken" and error.value.shard.endswith("zz-00000.tar")
    assert "zz-00000.tar" in str(error.value) and "broken" in str(error.value)
    sets = [a for o in tiny_overrides(tmp_path, tmp_path / "cli", *base, "data.on_error=raise") for a in ("--set", o)]
    result = subprocess.run([sys.executable, "-m", "idefics.training.cli", str(TINY), *sets], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "DataError: shard" in result.stderr and "zz-00000.tar" in result.stderr and "'broken'" in result.stderr
