"""Building a model from backbones + fresh blocks, and freezing it per the recipe."""

from __future__ import annotations

import pytest
import torch

from idefics.backbones.sources import random_llama_state
from idefics.training.build import ModelSpec, build_model, freeze
from tests.training.fixtures import tiny_setup

LLAMA = dict(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=128, tie_word_embeddings=False,
             bos_token_id=1, eos_token_id=2, pad_token_id=0, rope_theta=10000.0)
CLIP = dict(embed_dim=32, image_size=28, patch_size=14, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2)


def spec(tok, **kw) -> ModelSpec:
    base = dict(language="random", language_config=LLAMA, tokenizer=str(tok), vision="clip", vision_config=CLIP,
                perceiver={"n_latents": 4, "depth": 1, "heads": 2, "head_dim": 8, "qk_norms": True},
                cross_layer_interval=1)
    return ModelSpec(**{**base, **kw})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    tok, _ = tiny_setup(root)
    return build_model(spec(tok), root / "out_tok"), tok


def test_fresh_model_computes_the_language_model(built):
    """Gates start at 0: with or without images, the logits over the base vocabulary are the language model's
    own (transformers' LLaMA with the same weights as the oracle)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    (model, tokenizer, _), _ = built
    llama = LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()
    llama.load_state_dict(random_llama_state(LLAMA, seed=0))
    ids = torch.tensor([[1, 5, 9, 401, 400, 7, 8, 2]])  # <s> w w <image> <fake> w w </s>
    image_mask = torch.zeros(1, 8, 1, dtype=torch.long)
    image_mask[0, 3:] = 1
    pixels = torch.randn(1, 1, 3, 28, 28)
    with torch.no_grad():
        text_only = model(ids).logits
        with_image = model(ids, pixel_values=pixels, image_attention_mask=image_mask).logits
        plain = torch.where(ids >= 400, 0, ids)  # the new tokens' embeddings differ; compare on base tokens only
        expected = llama(plain[:, :3]).logits
    assert with_image.shape == (1, 8, 403)
    assert torch.equal(text_only, with_image)
    assert torch.allclose(text_only[:, :3, :400], expected, atol=1e-5)


def test_new_token_rows_and_ids(built):
    (model, tokenizer, images), _ = built
    assert [tokenizer.token_to_id(t) for t in ("<fake_token_around_image>", "<image>", "<end_of_utterance>")] \
        == [400, 401, 402]
    embed, head = model.model.embed_tokens, model.lm_head
    eos = tokenizer.eos_token_id
    assert torch.equal(embed.additional_embedding.weight[2], embed.weight[eos])  # <end_of_utterance> <- eos
    assert torch.equal(head.additional_fc.weight[2], head.weight[eos])
    assert torch.allclose(embed.additional_embedding.weight[1], embed.weight.mean(0))
    assert not head.additional_fc.weight[:2].any()
    assert images.size == 28
    assert all(float(g.alpha_cross_attn.detach()) == 0 and float(g.alpha_dense.detach()) == 0
               for g in model.model.gated_cross_attn_layers)


def test_freeze_recipe_trains_only_new_blocks(built):
    (model, _, _), _ = built
    names = freeze(model)
    assert names and all(n.startswith(("model.perceiver_resampler.", "model.gated_cross_attn_layers.",
                                       "model.embed_tokens.additional_embedding.", "lm_head.additional_fc."))
                         for n in names)
    assert any(n.startswith("model.perceiver_resampler.") for n in names)
    assert "model.embed_tokens.additional_embedding.weight" in names and "lm_head.additional_fc.weight" in names
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert "model.layers.0.self_attn.q_proj.weight" in frozen and "model.embed_tokens.weight" in frozen
    assert any(n.startswith("model.vision_model.") for n in frozen)
    everything = freeze(model, ["all"])
    assert len(everything) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="match no parameter"):
        freeze(model, ["perceiver", "decoder"])
    freeze(model)


def test_tokenizer_that_does_not_fit_the_embedding_is_refused(tmp_path):
    tok, _ = tiny_setup(tmp_path)
    with pytest.raises(ValueError, match="new tokens must take ids 500"):
        build_model(spec(tok, language_config={**LLAMA, "vocab_size": 500}), tmp_path / "t")


def test_efficientnet_backbone_keeps_batchnorm_statistics(tmp_path):
    """The pretrained EfficientNet loads as the vision tower; frozen, its BatchNorm stays in eval mode when
    the model trains (batch statistics of small batches would overwrite ImageNet's)."""
    from idefics.backbones import load_efficientnet_lite0

    tok, _ = tiny_setup(tmp_path)
    model, _, images = build_model(spec(tok, vision="efficientnet_lite0", vision_config=None), tmp_path / "t")
    assert (images.size, images.mean) == (224, (0.5, 0.5, 0.5))
    reference = load_efficientnet_lite0()
    assert torch.equal(model.model.vision_model.net._conv_stem.weight, reference._conv_stem.weight)
    freeze(model)
    model.train()
    net = model.model.vision_model.net
    assert not net.training and not net._bn0.training
    pixels = torch.rand(1, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(net.forward_features(pixels), reference.forward_features(pixels), atol=1e-5)
