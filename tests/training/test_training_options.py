"""Config files and overrides, the `train` command, and options that must not change the result:
gradient accumulation and gradient checkpointing."""

from __future__ import annotations

import argparse
import json

import pytest

from idefics.training import cli
from idefics.training.config import load_config
from idefics.training.trainer import train
from tests.training.fixtures import REPO, tiny_overrides

TINY = REPO / "configs" / "tiny.yaml"


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_yaml_and_toml_configs_with_overrides(tmp_path):
    (tmp_path / "run.toml").write_text('out_dir = "x"\n[train]\nlr = 3e-4\nsteps = 7\nwarmup_steps = 2\n'
                                       '[[data.train]]\nname = "a"\nshards = "s/*.tar"\nweight = 2\n')
    config = load_config(tmp_path / "run.toml", ["train.steps=9", "data.seq_len=128", "lora={r: 4}"])
    assert (config.out_dir, config.train.lr, config.train.steps, config.data.seq_len) == ("x", 3e-4, 9, 128)
    assert config.sources[0].name == "a" and config.sources[0].weight == 2.0 and config.lora == {"r": 4}
    (tmp_path / "run.yaml").write_text("train:\n  lr: 3e-4\n  betas: [0.9, 0.95]\ndata:\n  train: [{shards: s}]\n")
    config = load_config(tmp_path / "run.yaml", ["train.gradient_checkpointing=true"])
    assert config.train.lr == 3e-4 and config.train.betas == (0.9, 0.95) and config.train.gradient_checkpointing


@pytest.mark.parametrize("text, overrides, message", [
    ("train: {lr: 1}\n", ["train.learning_rate=1"], "train: unknown keys ['learning_rate']"),
    ("train: {}\n", [], "data.train lists no sources"),
    ("data: {train: [{shards: s}]}\n", ["train.lr=fast"], "train.lr: expected a float, got 'fast'"),
    ("data: {train: [{shards: s}]}\n", ["train.lr"], "must look like section.key=value"),
    ("data: {train: [{shards: s}]}\n", ["train.precision=fp8"], "precision must be auto, bf16 or fp32"),
    ("data: [unclosed\n", [], "not valid YAML"),
])
def test_bad_configs_are_named(tmp_path, text, overrides, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(tmp_path / "c.yaml", overrides)


def test_train_subcommand_registers_and_teaches(capsys):
    parser = argparse.ArgumentParser(prog="idefics")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", str(TINY), "--set", "train.steps=3", "--print-config"])
    assert args.func(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["train"]["steps"] == 3 and printed["model"]["language"] == "random"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    help_text = capsys.readouterr().out
    assert "examples:" in help_text and "--resume" in help_text and "torchrun" in help_text
    args = parser.parse_args(["train", str(TINY), "--set", "train.lr=fast"])
    assert args.func(args) == 2 and "train.lr: expected a float" in capsys.readouterr().err


def test_accumulation_and_checkpointing_do_not_change_the_losses(tmp_path):
    """Micro-batches of 1 row with 4 accumulation steps, and gradient checkpointing, give the losses of one
    4-row batch: each micro-batch's loss is divided by the whole step's target count."""
    base = ("train.steps=3", "train.save_every=0", "train.export=none")
    train(load_config(TINY, tiny_overrides(tmp_path, tmp_path / "whole", *base)))
    train(load_config(TINY, tiny_overrides(tmp_path, tmp_path / "accum", *base, "train.micro_batch_size=1")))
    train(load_config(TINY, tiny_overrides(tmp_path, tmp_path / "ckpt", *base, "train.gradient_checkpointing=true")))
    whole = losses(tmp_path / "whole")
    assert losses(tmp_path / "accum") == pytest.approx(whole, rel=1e-5)
    assert losses(tmp_path / "ckpt") == pytest.approx(whole, rel=1e-6)
    with pytest.raises(ValueError, match="must split evenly"):
        train(load_config(TINY, tiny_overrides(tmp_path, tmp_path / "bad", *base, "train.micro_batch_size=3")))


def test_bf16_autocast_trains_close_to_fp32(tmp_path):
    base = ("train.steps=3", "train.save_every=0", "train.export=none")
    train(load_config(TINY, tiny_overrides(tmp_path, tmp_path / "fp32", *base)))
    train(load_config(TINY, tiny_overrides(tmp_path, tmp_path / "bf16", *base, "train.precision=bf16")))
    assert losses(tmp_path / "bf16") == pytest.approx(losses(tmp_path / "fp32"), abs=0.05)
    assert losses(tmp_path / "bf16") != losses(tmp_path / "fp32")  # autocast really ran in bf16


def test_gates_get_their_own_learning_rate_and_no_weight_decay():
    import torch

    from idefics.training.trainer import lr_at, param_groups

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.alpha_cross_attn = torch.nn.Parameter(torch.zeros(1))
            self.alpha_dense = torch.nn.Parameter(torch.zeros(1))
            self.frozen = torch.nn.Parameter(torch.ones(4, 4), requires_grad=False)

    block = Block()
    decay, no_decay, gates = param_groups(block, 0.1, gate_lr_scale=10.0)
    assert decay["params"] == [block.proj.weight] and decay["weight_decay"] == 0.1
    assert no_decay["params"] == [block.proj.bias] and no_decay["weight_decay"] == 0.0
    assert gates["params"] == [block.alpha_cross_attn, block.alpha_dense]
    assert gates["weight_decay"] == 0.0 and gates["lr_scale"] == 10.0
    # one AdamW step moves a parameter by about lr: the gates move 10 times as far
    optimizer = torch.optim.AdamW([decay, no_decay, gates], lr=1e-3)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(50, 1e-3, 10, 100, 0.0) * group["lr_scale"]
    (block.proj(torch.ones(1, 4)).sum() * (1 + block.alpha_cross_attn + block.alpha_dense)).backward()
    before = block.proj.bias.detach().clone()
    optimizer.step()
    bias_step = (block.proj.bias - before).abs().max()
    assert torch.allclose(block.alpha_cross_attn.abs(), 10 * bias_step, rtol=1e-3)
