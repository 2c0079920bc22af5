"""The two real pretrained backbones of `idefics-mini`, checked against independent references.

SmolLM2 (GGUF): transformers' own GGUF tokenizer conversion and GGUF model loader are the oracle.
EfficientNet-Lite0: ImageNet predictions on real photos that ship with scikit-image.
"""

import os
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from idefics.backbones.efficientnet import (
    SamePaddingConv2d,
    efficientnet_preprocess,
    load_efficientnet_lite0,
)
from idefics.backbones.gguf_llama import (
    find_smollm2_gguf,
    load_gguf_llama,
    save_tokenizer_files,
    unpermute_rotary_rows,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

IDEFICS_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
TOKENIZER_SAMPLES = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Prices rose 12.5% in 2024; call 555-0199 before 9:30.",
    "héllo wörld, naïve café — 日本語のテキスト and emoji 🤗🚀",
    "  leading spaces,\ttabs\t\tand\n\n\nnewlines   trailing   ",
    "def f(x):\n    return x ** 2  # square\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]


# ----------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from GGUF


@pytest.fixture(scope="module")
def ours():
    start = time.perf_counter()
    model = load_gguf_llama()
    print(f"\nload_gguf_llama: {time.perf_counter() - start:.1f} s")
    return model


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    path = find_smollm2_gguf()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def hf_gguf_model():
    from transformers import AutoModelForCausalLM

    path = find_smollm2_gguf()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    print(f"\ntransformers GGUF loader: {time.perf_counter() - start:.1f} s")
    return model


@pytest.fixture(scope="module")
def our_hf_model(ours):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**ours.config))
    model.load_state_dict(ours.state_dict, strict=True)
    return model.eval()


@pytest.mark.parametrize("text", TOKENIZER_SAMPLES)
def test_token_ids_match_transformers_gguf_tokenizer(ours, hf_tokenizer, text):
    expected = hf_tokenizer(text, add_special_tokens=True)["input_ids"]
    assert ours.tokenizer.encode(text).ids == expected
    assert ours.tokenizer.decode(expected, skip_special_tokens=False) == text


def test_special_tokens_and_chat_template(ours, hf_tokenizer):
    for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert ours.special_tokens[role] == getattr(hf_tokenizer, role)
    assert ours.tokenizer.token_to_id(ours.special_tokens["eos_token"]) == ours.config["eos_token_id"]
    assert ours.chat_template == hf_tokenizer.chat_template
    assert "<|im_start|>" in ours.chat_template


def test_config_matches_transformers_gguf_config(ours, hf_gguf_model):
    reference = hf_gguf_model.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
                "eos_token_id", "pad_token_id"):
        assert ours.config[key] == getattr(reference, key), key
    assert ours.config["rope_theta"] == reference.rope_parameters["rope_theta"] == 100000.0
    assert ours.config["rms_norm_eps"] == pytest.approx(reference.rms_norm_eps, rel=1e-6)
    assert ours.config["num_hidden_layers"] == 30 and ours.config["num_key_value_heads"] == 3


def test_state_dict_matches_transformers_gguf_weights(ours, hf_gguf_model):
    reference = hf_gguf_model.state_dict()
    assert set(ours.state_dict) == set(reference)
    for name, tensor in ours.state_dict.items():
        assert tensor.dtype == torch.float32, name
        assert tensor.shape == reference[name].shape, name
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-6, msg=name)
    # SmolLM2 ties the output head to the embedding.
    assert ours.state_dict["lm_head.weight"] is ours.state_dict["model.embed_tokens.weight"]


def test_logits_match_transformers_gguf_loader(ours, our_hf_model, hf_gguf_model, hf_tokenizer):
    text = "<|im_start|>user\nName three colours of the rainbow.<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([hf_tokenizer(text)["input_ids"]])
    with torch.no_grad():
        ours_logits = our_hf_model(ids).logits
        reference_logits = hf_gguf_model(ids).logits
    torch.testing.assert_close(ours_logits, reference_logits, rtol=1e-4, atol=1e-4)


def test_greedy_generation_knows_the_capital_of_france(ours, our_hf_model):
    prompt = torch.tensor([ours.tokenizer.encode("The capital of France is").ids])
    with torch.no_grad():
        output = our_hf_model.generate(prompt, max_new_tokens=4, do_sample=False)
    continuation = ours.tokenizer.decode(output[0, prompt.shape[1]:].tolist())
    assert continuation.strip().startswith("Paris"), continuation


def test_unpermute_inverts_llama_cpp_permutation():
    rows, cols, heads = 12, 5, 3
    weight = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    # llama.cpp's convert script interleaves the two rotary halves of each head.
    permuted = weight.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)
    assert not np.array_equal(permuted, weight)
    np.testing.assert_array_equal(unpermute_rotary_rows(permuted, heads), weight)


def test_saved_tokenizer_folder_loads_in_transformers(ours, hf_tokenizer, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab_before = ours.tokenizer.get_vocab_size()
    extra_ids = save_tokenizer_files(ours.tokenizer, ours.chat_template, tmp_path, IDEFICS_TOKENS,
                                     special_tokens=ours.special_tokens, model_max_length=8192)
    assert ours.tokenizer.get_vocab_size() == vocab_before  # the caller's tokenizer is untouched
    assert {p.name for p in tmp_path.iterdir()} >= {"tokenizer.json", "tokenizer_config.json",
                                                    "special_tokens_map.json"}
    assert list(extra_ids.values()) == [vocab_before, vocab_before + 1, vocab_before + 2]

    for loaded in (AutoTokenizer.from_pretrained(tmp_path), PreTrainedTokenizerFast.from_pretrained(tmp_path)):
        for token, token_id in extra_ids.items():
            assert loaded.convert_tokens_to_ids(token) == token_id
            assert token in loaded.all_special_tokens
        assert loaded.eos_token == "<|im_end|>" and loaded.pad_token == "<|im_end|>"
        prompt = "User: what is in this picture?"
        text = f"<fake_token_around_image><image><fake_token_around_image>{prompt}<end_of_utterance>\n"
        ids = loaded(text)["input_ids"]
        expected_prompt = hf_tokenizer(prompt)["input_ids"]
        assert ids == [extra_ids["<fake_token_around_image>"], extra_ids["<image>"],
                       extra_ids["<fake_token_around_image>"], *expected_prompt,
                       extra_ids["<end_of_utterance>"], *hf_tokenizer("\n")["input_ids"]]
        assert loaded.decode(ids, skip_special_tokens=True) == prompt + "\n"
        messages = [{"role": "user", "content": "Hi there"}]
        assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
            hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_gguf_bad_input_gives_clear_errors(tmp_path, ours):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_gguf_llama(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"definitely not a gguf file" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        load_gguf_llama(junk)
    with pytest.raises(ValueError, match="Unknown special token roles"):
        save_tokenizer_files(ours.tokenizer, None, tmp_path / "tok", special_tokens={"cls_token": "<|im_end|>"})
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        save_tokenizer_files(ours.tokenizer, None, tmp_path / "tok", special_tokens={"bos_token": "<s>"})


# ----------------------------------------------------------------------------------------------------
# EfficientNet-Lite0


# ImageNet-1k class indices, with their names, accepted for each scikit-image photo.
IMAGENET_EXPECTED = {
    "chelsea": {281: "tabby", 282: "tiger cat", 285: "Egyptian cat"},
    "coffee": {967: "espresso", 968: "cup", 504: "coffee mug"},
    "rocket": {657: "missile", 744: "projectile, missile", 812: "space shuttle"},
}


@pytest.fixture(scope="module")
def efficientnet():
    return load_efficientnet_lite0()


@pytest.fixture(scope="module")
def photos():
    import skimage.data

    return {name: Image.fromarray(getattr(skimage.data, name)()) for name in IMAGENET_EXPECTED}


def test_imagenet_predictions_on_real_photos(efficientnet, photos):
    pixels = torch.stack([efficientnet_preprocess(image) for image in photos.values()])
    with torch.no_grad():
        top5 = efficientnet(pixels).topk(5, dim=-1).indices.tolist()
    for name, predicted in zip(photos, top5):
        assert set(predicted) & set(IMAGENET_EXPECTED[name]), f"{name}: top-5 {predicted}"
    # The cat and the coffee are unambiguous: their top-1 must be right.
    assert top5[0][0] in IMAGENET_EXPECTED["chelsea"] and top5[1][0] in IMAGENET_EXPECTED["coffee"]


def test_feature_tokens_shape_and_layout(efficientnet, photos):
    pixels = torch.stack([efficientnet_preprocess(photos["chelsea"]), efficientnet_preprocess(photos["coffee"])])
    with torch.no_grad():
        tokens = efficientnet.forward_features(pixels)
        feature_map = efficientnet.feature_map(pixels)
    assert tokens.shape == (2, 49, 1280)
    assert feature_map.shape == (2, 1280, 7, 7)
    torch.testing.assert_close(tokens[:, 3 * 7 + 5], feature_map[:, :, 3, 5])  # row-major token order
    assert tokens.min() >= 0 and tokens.max() <= 6  # ReLU6 output
    assert not torch.allclose(tokens[0], tokens[1])


def test_efficientnet_is_frozen_even_inside_a_training_parent(efficientnet, photos):
    assert all(not p.requires_grad for p in efficientnet.parameters())
    pixels = efficientnet_preprocess(photos["rocket"])[None]
    running_mean = efficientnet._bn1.running_mean.clone()
    with torch.no_grad():
        before = efficientnet(pixels)
    parent = torch.nn.Sequential(efficientnet)
    parent.train()
    try:
        assert not efficientnet.training and not efficientnet._blocks[3]._bn1.training
        with torch.no_grad():
            after = efficientnet(pixels)
    finally:
        parent.eval()
    torch.testing.assert_close(after, before)
    torch.testing.assert_close(efficientnet._bn1.running_mean, running_mean)


def test_same_padding_matches_tensorflow_rule():
    conv = SamePaddingConv2d(2, 2, kernel_size=3, stride=2, groups=2)
    x = torch.randn(1, 2, 10, 9)
    # TF SAME: output ceil(n / 2); for even n the single extra pixel goes on the bottom/right.
    expected = F.conv2d(F.pad(x, (1, 1, 0, 1)), conv.weight, stride=2, groups=2)
    assert conv(x).shape == (1, 2, 5, 5)
    torch.testing.assert_close(conv(x), expected)


def test_preprocess_scales_to_minus_one_one():
    white_grey = Image.new("L", (300, 200), color=255)
    black_rgba = Image.new("RGBA", (50, 80), color=(0, 0, 0, 255))
    white, black = efficientnet_preprocess(white_grey), efficientnet_preprocess(black_rgba, size=64)
    assert white.shape == (3, 224, 224) and black.shape == (3, 64, 64)
    assert torch.all(white == 1.0) and torch.all(black == -1.0)
    with pytest.raises(TypeError, match="PIL"):
        efficientnet_preprocess(np.zeros((10, 10, 3), dtype=np.uint8))


def test_efficientnet_bad_input_gives_clear_errors(efficientnet):
    with pytest.raises(ValueError, match="shape"):
        efficientnet(torch.zeros(1, 4, 224, 224))
    with pytest.raises(ValueError, match="shape"):
        efficientnet.forward_features(torch.zeros(3, 224, 224))
    with pytest.raises(ValueError, match="dtype"):
        load_efficientnet_lite0(dtype=torch.int64)


def test_batch_of_eight_forward_time(efficientnet, photos):
    pixels = torch.stack([efficientnet_preprocess(image) for image in photos.values()] * 3)[:8]
    with torch.no_grad():
        efficientnet.forward_features(pixels)  # warm-up
        start = time.perf_counter()
        tokens = efficientnet.forward_features(pixels)
        elapsed = time.perf_counter() - start
    print(f"\nEfficientNet-Lite0 forward_features, batch 8 at 224 px: {elapsed:.2f} s")
    assert tokens.shape == (8, 49, 1280)
    assert elapsed < 10.0
