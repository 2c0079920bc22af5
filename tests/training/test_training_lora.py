"""LoRA (peft): only the adapters train, and the merged model equals the model with adapters applied."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from idefics.training.build import build_model, freeze
from idefics.training.config import load_config
from idefics.training.lora import apply_lora, merge_lora
from idefics.training.trainer import train
from tests.training.fixtures import REPO, image, tiny_overrides


def test_lora_trains_only_adapters_and_merges_into_the_weights(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml", tiny_overrides(tmp_path, tmp_path / "run"))
    model, _, _ = build_model(cfg.model, tmp_path / "tok")
    keys_before = set(model.state_dict())
    freeze(model, [])
    names = apply_lora(model, {"r": 4, "alpha": 8})
    assert names and {n for n, p in model.named_parameters() if p.requires_grad} == set(names)
    assert all(".layers." in n and ".self_attn." in n for n in names)  # not the cross-attention q_proj
    with torch.no_grad():  # B starts at 0 (adapters are a no-op); give them weights so merging matters
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids = torch.tensor([[1, 400, 401, 400, 7, 8, 9, 2]])
    mask = torch.zeros(1, 8, 1, dtype=torch.long)
    mask[0, 2:] = 1
    inputs = dict(input_ids=ids, pixel_values=torch.randn(1, 1, 3, 28, 28), image_attention_mask=mask)
    model.eval()
    with torch.no_grad():
        adapted = model(**inputs).logits
        assert merge_lora(model) == 2 * 4  # 2 layers x q, k, v, o
        merged = model(**inputs).logits
    assert set(model.state_dict()) == keys_before
    assert torch.allclose(adapted, merged, atol=1e-5)


def test_lora_training_run_exports_merged_weights(tmp_path):
    import idefics

    overrides = tiny_overrides(tmp_path, tmp_path / "run", "train.steps=3", "train.save_every=0",
                               "train.trainable=[]", "lora={r: 4, alpha: 8, target_modules: [o_proj, down_proj]}")
    cfg = load_config(REPO / "configs" / "tiny.yaml", overrides)
    train(cfg)
    trained = load_file(str(tmp_path / "run" / "checkpoints" / "step-000003" / "trainable.safetensors"))
    assert trained and all("lora_" in k for k in trained)
    assert any(".mlp.down_proj." in k for k in trained) and any(".o_proj." in k for k in trained)
    fresh, _, _ = build_model(cfg.model, tmp_path / "tok")
    freeze(fresh, [])
    apply_lora(fresh, {"r": 4, "alpha": 8, "target_modules": ["o_proj", "down_proj"]})
    fresh.load_state_dict(trained, strict=False)
    pipe = idefics.load(tmp_path / "run" / "export")
    assert not any("lora" in k for k in pipe.model.state_dict())
    inputs = pipe.processor([[image(2), "a red cat"]])
    with torch.no_grad():
        assert torch.allclose(pipe.model(**inputs).logits, fresh.eval()(**inputs).logits, atol=1e-5)


def test_bad_lora_config_is_refused(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml", tiny_overrides(tmp_path, tmp_path / "run"))
    model, _, _ = build_model(cfg.model, tmp_path / "tok")
    with pytest.raises(ValueError, match="unknown keys"):
        apply_lora(model, {"rank": 4})
    with pytest.raises(ValueError, match="matches no module"):
        apply_lora(model, {"target_modules": ["no_such_proj"]})
