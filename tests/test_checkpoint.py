"""Loading and saving checkpoints: round trips, shards, dtypes, and errors that name the offending tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import idefics
from idefics.checkpoint import CheckpointError, load_model, save_model
from idefics.config import IdeficsConfig


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_config_ignores_legacy_keys_and_reads_both_use_resampler(reference_checkpoint):
    folder, _ = reference_checkpoint("tiny_random")
    config = IdeficsConfig.from_json(folder / "config.json")
    assert config.use_resampler and config.perceiver_config.resampler_n_latents == 16
    assert config.extra["ffn_dim"] == 64  # kept for saving, unused by the model
    assert config.vision_config.embed_dim == 32 and config.num_cross_layers == 2


def test_round_trip_is_bit_identical_and_reference_loads_it(reference_checkpoint, tmp_path, images):
    from transformers import IdeficsForVisionText2Text

    folder, ref = reference_checkpoint("small_9b")
    pipe = idefics.load(folder)
    out = tmp_path / "saved"
    save_model(pipe.model, out)
    reloaded = load_model(out)
    original = pipe.model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    theirs = IdeficsForVisionText2Text.from_pretrained(out).eval()
    inputs = pipe.processor(["User:", images[0], "Hello"])
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs).logits, ref(**inputs).logits, atol=0, rtol=0)


def test_sharded_save_and_load(reference_checkpoint, tmp_path):
    folder, _ = reference_checkpoint("small_9b")
    model = load_model(folder)
    out = tmp_path / "sharded"
    save_model(model, out, max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).exists() for s in shards)
    reloaded = load_model(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_bfloat16_load(reference_checkpoint):
    folder, _ = reference_checkpoint("tiny_random")
    model = load_model(folder, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="unsupported dtype"):
        load_model(folder, dtype="float8")


def test_errors_name_every_bad_tensor(reference_checkpoint, tmp_path):
    folder, _ = reference_checkpoint("small_9b")
    bad = copy_checkpoint(folder, tmp_path / "bad")
    weights = load_file(bad / "model.safetensors")
    del weights["model.gated_cross_attn_layers.1.cross_attn.k_proj.weight"]
    del weights["lm_head.additional_fc.weight"]
    weights["model.norm.weight"] = torch.ones(7)
    weights["model.some_stray.weight"] = torch.ones(1)
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as error:
        load_model(bad)
    message = str(error.value)
    for name in ("model.gated_cross_attn_layers.1.cross_attn.k_proj.weight", "lm_head.additional_fc.weight",
                 "model.norm.weight: checkpoint [7] vs model [64]", "model.some_stray.weight",
                 "2 missing tensors", "1 unexpected tensors", "1 mis-shaped tensors"):
        assert name in message, name


def test_corrupt_or_incomplete_folders_are_refused(reference_checkpoint, tmp_path):
    folder, _ = reference_checkpoint("tiny_random")
    broken = copy_checkpoint(folder, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        load_model(broken)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(empty)
    shutil.copy(folder / "config.json", empty / "config.json")
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_model(empty)


PEAK_SCRIPT = """
import sys, torch
import idefics.checkpoint as c
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
base = rss()
model = c.load_model(sys.argv[1], dtype=sys.argv[2])
with torch.no_grad():  # touch every weight so mapped pages become resident
    model(torch.ones(1, 8, dtype=torch.long))
    for p in model.parameters():
        p.sum()
# VmHWM (not ru_maxrss, which execve inherits from a large parent such as pytest)
peak = [int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith('VmHWM')][0]
print(base, peak)
"""


def test_peak_memory_close_to_checkpoint_size(tmp_path):
    """Build a ~190 MB float32 checkpoint; loading it (same dtype) maps the file instead of copying it, so the
    process grows by about the checkpoint's size (once every weight is touched), not twice it."""
    import subprocess
    import sys

    from idefics.model import Idefics

    config = IdeficsConfig.from_dict(dict(
        vocab_size=32000, additional_vocab_size=2, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=8, cross_layer_interval=2, use_resampler=True,
        perceiver_config=dict(resampler_n_latents=8, resampler_depth=1, resampler_n_heads=2, resampler_head_dim=16),
        vision_config=dict(embed_dim=64, image_size=28, patch_size=14, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2)))
    save_model(Idefics(config), tmp_path / "ckpt")
    size = (tmp_path / "ckpt" / "model.safetensors").stat().st_size
    assert size > 100e6
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "ckpt"), "float32"],
                         capture_output=True, text=True, check=True).stdout.split()
    base, peak = int(out[0]), int(out[1])
    # + 80 MB: torch's lazily loaded kernels and this project's compiled ops; a copy would add another 190 MB
    assert 0.8 * size < peak - base < 1.25 * size + 80e6, (peak - base) / 1e6
