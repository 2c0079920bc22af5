"""Test-only: random-weight IDEFICS checkpoints saved by the reference implementation (transformers), with a
real `tokenizer.json` trained here. Imported by tests only; the `idefics` package never imports transformers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

BASE_SPECIALS = ["<unk>", "<s>", "</s>"]
IDEFICS_SPECIALS = ["<fake_token_around_image>", "<image>"]
EOU = "<end_of_utterance>"

CORPUS = """User: What is in this image? Assistant: A cat sitting on a mat.
Describe this image. The picture shows two dogs playing in the park near a tree.
Can you tell me a very short story based on the image? Once upon a time, a rooster stood on money.
Question: How many apples are there? Answer: three. Where are the cow and chicken? On a beach.
The quick brown fox jumps over the lazy dog 0123456789 colours red green blue yellow.
""" * 4


def make_tokenizer(folder: Path, vocab_size: int, instruct: bool) -> None:
    """A LLaMA-style (Metaspace BPE) tokenizer whose base vocabulary has exactly `vocab_size` entries,
    followed by the IDEFICS special tokens, as in the hub checkpoints (32000, 32001[, 32002])."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 400), special_tokens=BASE_SPECIALS, show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for i in range(len(vocab), vocab_size):  # filler entries so added tokens land at vocab_size
        vocab[f"<filler_{i}>"] = i
    tok = Tokenizer.from_str(json.dumps(data))
    specials = IDEFICS_SPECIALS + ([EOU] if instruct else [])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BASE_SPECIALS + specials])
    assert tok.token_to_id(specials[0]) == vocab_size, tok.token_to_id(specials[0])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    common = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps({**common, "additional_special_tokens": specials}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        **common, "tokenizer_class": "PreTrainedTokenizerFast", "padding_side": "left",
        "additional_special_tokens": specials, "model_max_length": 2048}))


TINY_RANDOM = dict(  # HuggingFaceM4/tiny-random-idefics, as published
    vocab_size=32000, additional_vocab_size=2, hidden_size=16, intermediate_size=11008, num_hidden_layers=2,
    num_attention_heads=4, rms_norm_eps=1e-6, max_position_embeddings=128, cross_layer_interval=1,
    qk_layer_norms=False, alpha_initializer="ones", alpha_type="vector", use_resampler=True,
    ffn_dim=64, word_embed_proj_dim=16,  # unused legacy keys, kept to check they are ignored
    perceiver_config=dict(use_resampler=True, resampler_n_latents=16, resampler_depth=2, resampler_n_heads=2,
                          resampler_head_dim=8, qk_layer_norms_perceiver=False),
    vision_config=dict(embed_dim=32, image_size=30, intermediate_size=37, patch_size=2, num_hidden_layers=5,
                       num_attention_heads=4, hidden_act="gelu"),
)

SMALL_9B = dict(  # the 9b layout scaled down: resampler, qk norms, interval 4, float alphas
    vocab_size=500, additional_vocab_size=2, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
    num_attention_heads=4, rms_norm_eps=1e-6, max_position_embeddings=256, cross_layer_interval=4,
    qk_layer_norms=True, alpha_initializer="zeros", alpha_type="float", use_resampler=True,
    cross_layer_activation_function="swiglu", vision_model_name="laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    perceiver_config=dict(use_resampler=True, resampler_n_latents=8, resampler_depth=2, resampler_n_heads=2,
                          resampler_head_dim=16, qk_layer_norms_perceiver=True),
    vision_config=dict(embed_dim=48, image_size=56, intermediate_size=96, patch_size=14, num_hidden_layers=2,
                       num_attention_heads=4, hidden_act="gelu"),
)

SMALL_INSTRUCT = {**SMALL_9B, "additional_vocab_size": 3, "rms_norm_eps": 1e-5, "alpha_type": "vector",
                  "alpha_initializer": "ones"}

NO_RESAMPLER = {**SMALL_9B, "use_resampler": False, "cross_layer_interval": 1, "qk_layer_norms": False,
                "num_hidden_layers": 3, "perceiver_config": {**SMALL_9B["perceiver_config"], "use_resampler": False}}

CONFIGS = {"tiny_random": (TINY_RANDOM, False), "small_9b": (SMALL_9B, False),
           "small_instruct": (SMALL_INSTRUCT, True), "no_resampler": (NO_RESAMPLER, False)}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, including the gates (at init they are 0 and would hide cross-attention)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "alpha" in name:
                p.copy_(0.5 + 0.5 * noise)
            elif name.endswith("weight") and p.dim() == 1:  # norms
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.02 * noise)
            elif "latents" in name:
                p.copy_(noise)
            else:
                p.copy_(0.05 * noise)


def build_reference_checkpoint(folder: Path, name: str, seed: int = 0):
    """Save a random reference model + tokenizer + preprocessor config; return the reference model."""
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    config_dict, instruct = CONFIGS[name]
    make_tokenizer(folder, config_dict["vocab_size"], instruct)
    torch.manual_seed(seed)
    model = IdeficsForVisionText2Text(IdeficsConfig(**config_dict)).eval()
    randomize(model, seed)
    model.save_pretrained(folder)
    size = config_dict["vision_config"]["image_size"]
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "IdeficsImageProcessor", "image_size": size,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_num_channels": 3}))
    return model


def reference_processor(folder: Path):
    from transformers import AutoTokenizer, IdeficsImageProcessorPil, IdeficsProcessor

    size = json.loads((folder / "preprocessor_config.json").read_text())["image_size"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return IdeficsProcessor(IdeficsImageProcessorPil(image_size=size), tokenizer)
