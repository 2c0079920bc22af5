"""Exports that name their frozen backbones instead of storing them, and instruction tuning from an export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from idefics.checkpoint import load_model
from idefics.config import IdeficsConfig
from idefics.data import Sample, ShardWriter, Turn
from idefics.backbones.sources import random_llama_state
from idefics.training.build import build_model
from idefics.training.checkpoints import export
from idefics.training.config import load_config
from idefics.training.trainer import train
from tests.training.test_training_build import CLIP, LLAMA
from tests.training.fixtures import REPO, caption, image, tiny_setup


@pytest.fixture(scope="module")
def backbones(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A LLaMA folder (hf:) with its tokenizer, a CLIP folder (clip:), and shards; all tiny and random."""
    root = tmp_path_factory.mktemp("backbones")
    tok, data = tiny_setup(root)
    llama = root / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps(LLAMA))
    save_file(random_llama_state(LLAMA, seed=5), str(llama / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (llama / name).write_bytes((tok / name).read_bytes())
    clip = root / "clip"
    clip.mkdir()
    gen = torch.Generator().manual_seed(3)
    model, _, _ = build_model(spec_overrides(llama, None), root / "t")
    vision = {"vision_model." + k.removeprefix("model.vision_model."): torch.randn(v.shape, generator=gen) * 0.05
              for k, v in model.state_dict().items() if k.startswith("model.vision_model.")}
    save_file(vision, str(clip / "model.safetensors"))
    return llama, clip, data


def spec_overrides(llama: Path, clip: Path | None):
    from idefics.training.build import ModelSpec

    return ModelSpec(language=f"hf:{llama}", vision=f"clip:{clip}" if clip else "clip", vision_config=CLIP,
                     perceiver={"n_latents": 4, "depth": 1, "heads": 2, "head_dim": 8}, cross_layer_interval=1)


def overrides(llama: Path, clip: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.language=hf:{llama}", f"model.vision=clip:{clip}", "model.language_config=null",
            f"data.train=[{{shards: {data}}}]", f"out_dir={out}", "train.export=reference", *extra]


def test_export_by_reference_leaves_out_backbones_and_loads_back(backbones, tmp_path):
    llama, clip, data = backbones
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides(llama, clip, data, tmp_path / "run",
                                                               "train.steps=2", "train.save_every=0"))
    train(cfg)
    folder = tmp_path / "run" / "export"
    config = json.loads((folder / "config.json").read_text())
    assert config["idefics_backbones"] == {"language": f"hf:{llama}", "vision": f"clip:{clip}"}
    stored = load_file(str(folder / "model.safetensors"))
    assert not any(k.startswith(("model.layers.", "model.vision_model.", "model.norm.")) for k in stored)
    assert "model.embed_tokens.weight" not in stored and "lm_head.weight" not in stored
    assert "model.embed_tokens.additional_embedding.weight" in stored
    assert any(k.startswith("model.gated_cross_attn_layers.") for k in stored)
    from idefics.backbones.sources import backbone_state_dict

    loaded = load_model(folder, extra_tensors=backbone_state_dict(config["idefics_backbones"],
                                                                  IdeficsConfig.from_json(folder / "config.json")))
    rebuilt, _, _ = build_model(cfg.model, tmp_path / "tok")
    rebuilt.load_state_dict(load_file(str(tmp_path / "run" / "checkpoints" / "step-000002" /
                                          "trainable.safetensors")), strict=False)
    ids = torch.tensor([[1, 400, 401, 400, 9, 12, 2]])
    mask = torch.zeros(1, 7, 1, dtype=torch.long)
    mask[0, 2:] = 1
    inputs = dict(input_ids=ids, pixel_values=torch.randn(1, 1, 3, 28, 28), image_attention_mask=mask)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, rebuilt.eval()(**inputs).logits)


def test_export_by_reference_refuses_changed_backbones(backbones, tmp_path):
    llama, clip, _ = backbones
    model, _, images = build_model(spec_overrides(llama, clip), tmp_path / "tok")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.01)
    with pytest.raises(ValueError, match="backbone tensors differ from their sources"):
        export(model, tmp_path / "tok", tmp_path / "out", images, {"language": f"hf:{llama}"})


def test_instruction_tuning_from_an_export(backbones, tmp_path):
    """Pretrain → export by reference → instruction-tune the language model and the new blocks on chats from that export: the
    language model trained, so the new export stores it and names only the vision backbone."""
    llama, clip, data = backbones
    pre = load_config(REPO / "configs" / "tiny.yaml", overrides(llama, clip, data, tmp_path / "pre",
                                                               "train.steps=2", "train.save_every=0"))
    train(pre)
    chats = tmp_path / "chats"
    with ShardWriter(str(chats / "chat-%05d.tar"), max_count=50) as writer:
        for i in range(24):
            writer.write(Sample("chat", f"c{i}", turns=[Turn("user", [image(i), "what is in this image?"]),
                                                        Turn("assistant", [caption(i)])]))
    tuned = load_config(REPO / "configs" / "tiny.yaml", overrides(
        llama, clip, chats, tmp_path / "sft", "train.steps=3", "train.save_every=0",
        "train.trainable=[language, perceiver, cross_attn, new_tokens]",
        f"init_from={tmp_path / 'pre' / 'export'}", "train.lr=1e-3"))
    summary = train(tuned)
    assert summary["steps"] == 3
    config = json.loads((tmp_path / "sft" / "export" / "config.json").read_text())
    assert config["idefics_backbones"] == {"vision": f"clip:{clip}"}
    stored = load_file(str(tmp_path / "sft" / "export" / "model.safetensors"))
    original = random_llama_state(LLAMA, seed=5)
    key = "model.layers.1.mlp.down_proj.weight"
    assert key in stored and not torch.equal(stored[key], original[key])
    assert not any(k.startswith("model.vision_model.") for k in stored)
