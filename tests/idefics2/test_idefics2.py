"""Idefics2 against the reference (transformers 5.23 `Idefics2ForConditionalGeneration`): random-weight,
scaled-down checkpoints saved by the reference, loaded with `idefics.load`; logits within 1e-4 (float32) and
identical greedy tokens, with and without image splitting, batches of differently sized images, several images
per prompt, text-only prompts and a sliding attention window shorter than the prompt.

Also holds the helpers that build those checkpoints (imported by test_idefics2_processor.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import idefics
from idefics.checkpoint import load_model, save_model
from idefics.idefics2 import Idefics2Config
from idefics.idefics2.vision import navit_position_ids
from tests.reference_checkpoints import make_tokenizer, randomize

BASE_VOCAB = 300  # tokenizer base vocabulary; <fake_token_around_image>, <image>, <end_of_utterance> follow
IMAGE_TOKEN_ID = BASE_VOCAB + 1
IMAGE_SEQ_LEN = 4
SIZE = {"shortest_edge": 21, "longest_edge": 56}
REFERENCE_VERSION = "5.23.0"  # token ids depend on it: 5.x inserts a space after a closing fake token
# The chat template of the idefics2-8b processor config, as published (spec §4).
HUB_CHAT_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}{% if message['content'][0]['type'] == 'image' %}"
    "{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def make_idefics2_tokenizer(folder: Path) -> None:
    """The v1 test tokenizer (instruct: three added tokens) plus the `<s> $A` post-processor that Llama
    `tokenizer.json` files carry, so `<s>` comes from the tokenizer as in the hub checkpoints."""
    from tokenizers import Tokenizer, processors

    make_tokenizer(folder, BASE_VOCAB, instruct=True)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    tok.save(str(folder / "tokenizer.json"))


def reference_config_dict(sliding_window: int | None = 4096) -> dict:
    return dict(
        image_token_id=IMAGE_TOKEN_ID, tie_word_embeddings=False,
        text_config=dict(model_type="mistral", vocab_size=BASE_VOCAB + 3, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, rms_norm_eps=1e-5, pad_token_id=0, rope_theta=10000.0,
                         sliding_window=sliding_window),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=56, patch_size=7),  # 8x8 position grid
        perceiver_config=dict(hidden_size=64, rms_norm_eps=1e-5, resampler_n_latents=IMAGE_SEQ_LEN,
                              resampler_depth=2, resampler_n_heads=4, resampler_head_dim=8, num_key_value_heads=2))


def reference_processor(folder: Path, splitting: bool, size: dict | None = None):
    """The reference processor with the PIL image backend (the path our PIL resizing reproduces)."""
    from transformers import AutoTokenizer, Idefics2ImageProcessorPil, Idefics2Processor

    image_processor = Idefics2ImageProcessorPil(do_image_splitting=splitting, size=size or SIZE)
    return Idefics2Processor(image_processor, AutoTokenizer.from_pretrained(folder), image_seq_len=IMAGE_SEQ_LEN,
                             chat_template=HUB_CHAT_TEMPLATE)


def build_reference_idefics2(folder: Path, splitting: bool, sliding_window: int | None = 4096, seed: int = 0,
                             hub_layout: bool = False):
    """Save a random reference model, tokenizer and processor files; return the reference model. `hub_layout`
    writes the processor files as the idefics2-8b repo has them (preprocessor_config.json + processor_config.json
    with the chat template) instead of transformers 5's single processor_config.json."""
    from transformers import Idefics2Config as RefConfig
    from transformers import Idefics2ForConditionalGeneration

    make_idefics2_tokenizer(folder)
    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration(RefConfig(**reference_config_dict(sliding_window))).eval()
    randomize(model, seed)
    model.save_pretrained(folder)
    if hub_layout:
        (folder / "preprocessor_config.json").write_text(json.dumps({
            "do_convert_rgb": True, "do_image_splitting": splitting, "do_normalize": True, "do_pad": True,
            "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "image_processor_type": "Idefics2ImageProcessor", "processor_class": "Idefics2Processor",
            "resample": 2, "rescale_factor": 1 / 255, "size": SIZE}))
        (folder / "processor_config.json").write_text(json.dumps({
            "image_seq_len": IMAGE_SEQ_LEN, "processor_class": "Idefics2Processor",
            "chat_template": HUB_CHAT_TEMPLATE}))
    else:
        reference_processor(folder, splitting).save_pretrained(folder)
    return model


def noise_image(seed: int, width: int, height: int, mode: str = "RGB") -> Image.Image:
    array = np.random.default_rng(seed).integers(0, 256, (height, width, len(mode)), dtype=np.uint8)
    return Image.fromarray(array[..., 0] if mode == "L" else array, mode)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (folder, reference model, splitting), built once per module."""
    specs = {"split": dict(splitting=True), "nosplit": dict(splitting=False, hub_layout=True, seed=1),
             "window": dict(splitting=False, sliding_window=8, seed=2)}
    built = {}

    def get(name: str):
        if name not in built:
            folder = tmp_path_factory.mktemp(f"idefics2_{name}")
            built[name] = (folder, build_reference_idefics2(folder, **specs[name]), specs[name]["splitting"])
        return built[name]

    return get


@pytest.fixture(scope="module")
def sample():
    """Two prompts: one image; two differently sized images (one larger than longest_edge, one smaller than
    shortest_edge), so the batch is padded in images, height, width and tokens."""
    images = [noise_image(0, 70, 40), noise_image(1, 120, 200), noise_image(2, 15, 10)]
    texts = ["User:<image>Describe this image.<end_of_utterance>\nAssistant:",
             "The quick<image> brown fox<image>jumps over the lazy dog"]
    return texts, [[images[0]], [images[1], images[2]]]


def reference_logits(ref, inputs: dict) -> torch.Tensor:
    """Reference logits with positions counted from the attention mask (its forward alone would count left
    padding as positions; its generate does not)."""
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return ref(**inputs, position_ids=positions).logits


def assert_logits_match(ref, pipe, folder: Path, texts, images, splitting: bool):
    theirs = reference_processor(folder, splitting)(text=texts, images=images, padding=True, return_tensors="pt")
    ours = pipe.processor(text=texts, images=images)
    assert sorted(ours) == sorted(theirs.keys())
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    with torch.no_grad():
        logits = pipe.model(**ours).logits
    expected = reference_logits(ref, dict(theirs))
    real = ours["attention_mask"].bool()
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits[real], expected[real], atol=1e-4, rtol=1e-4)
    return ours, logits


def test_reference_version_is_pinned():
    import transformers

    assert transformers.__version__ == REFERENCE_VERSION, (
        f"token-id comparisons are pinned to transformers {REFERENCE_VERSION} (spacing after "
        f"<fake_token_around_image> changed between releases); installed {transformers.__version__}")


@pytest.mark.parametrize("name", ["split", "nosplit"])
def test_logits_match_reference(checkpoints, sample, name):
    folder, ref, splitting = checkpoints(name)
    pipe = idefics.load(folder)
    assert type(pipe.model).__name__ == "Idefics2"
    assert type(pipe.model.lm_head).__name__ == "PackedLinear"  # untied output layer: packed, same logits
    assert pipe.processor.images.do_image_splitting is splitting  # read from either processor-file layout
    texts, images = sample
    ours, logits = assert_logits_match(ref, pipe, folder, texts, images, splitting)
    per_image = IMAGE_SEQ_LEN * (5 if splitting else 1)
    assert int((ours["input_ids"] == IMAGE_TOKEN_ID).sum()) == 3 * per_image
    assert ours["pixel_values"].shape[:2] == (2, 2 * (5 if splitting else 1))
    # Images matter: other pixels change the logits of the tokens after them.
    other = [[noise_image(7, 70, 40)], images[1]]
    with torch.no_grad():
        changed = pipe.model(**pipe.processor(text=texts, images=other)).logits
    assert not torch.allclose(changed[0, -1], logits[0, -1], atol=1e-3)
    torch.testing.assert_close(changed[1], logits[1])  # the other row is unaffected


def test_text_only_and_single_prompt(checkpoints):
    folder, ref, splitting = checkpoints("split")
    pipe = idefics.load(folder)
    assert_logits_match(ref, pipe, folder, ["Question: How many apples are there?", "A cat"], None, splitting)
    assert_logits_match(ref, pipe, folder, "Where are the cow and chicken?<image>", [noise_image(3, 30, 60)],
                        splitting)


def test_sliding_window_shorter_than_prompt(checkpoints, sample):
    folder, ref, splitting = checkpoints("window")
    pipe = idefics.load(folder)
    texts, images = sample
    ours, logits = assert_logits_match(ref, pipe, folder, texts, images, splitting)
    assert ours["input_ids"].shape[1] > 2 * pipe.model.config.text_config.sliding_window
    pipe.model.config.text_config.sliding_window = None  # the window really hides keys: without it, logits change
    with torch.no_grad():
        unwindowed = pipe.model(**ours).logits
    assert not torch.allclose(unwindowed[0, -1], logits[0, -1], atol=1e-3)


def reference_greedy(ref, folder, splitting, texts, images, pipe, max_new_tokens):
    theirs = reference_processor(folder, splitting)(text=texts, images=images, padding=True, return_tensors="pt")
    bad = [[pipe.tokenizer.require_id("<image>")], [pipe.tokenizer.require_id("<fake_token_around_image>")]]
    with torch.no_grad():
        out = ref.generate(**theirs, max_new_tokens=max_new_tokens, do_sample=False, bad_words_ids=bad,
                           eos_token_id=pipe.stop_token_ids(), pad_token_id=0)
    return out[:, theirs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("name", ["split", "window"])
def test_greedy_tokens_match_reference(checkpoints, sample, name):
    folder, ref, splitting = checkpoints(name)
    pipe = idefics.load(folder)
    texts, images = sample
    calls = {"vision": 0, "connector": 0}
    pipe.model.model.vision_model.register_forward_hook(lambda *_: calls.__setitem__("vision", calls["vision"] + 1))
    pipe.model.model.connector.register_forward_hook(
        lambda *_: calls.__setitem__("connector", calls["connector"] + 1))
    ours = pipe.generate_detailed(texts, images=images, max_new_tokens=12)
    assert calls == {"vision": 1, "connector": 1}  # image tokens are reused through the KV cache
    expected = reference_greedy(ref, folder, splitting, texts, images, pipe, 12)
    for generation, row in zip(ours, expected):
        assert generation.token_ids == row[:len(generation.token_ids)]
        if generation.finish_reason == "length":
            assert len(generation.token_ids) == 12


def test_interleaved_prompts_generate_like_reference_convention(checkpoints):
    folder, ref, splitting = checkpoints("nosplit")
    pipe = idefics.load(folder)
    image_a, image_b = noise_image(4, 50, 30), noise_image(5, 28, 64)
    interleaved = [["User:", image_a, "Describe this image.<end_of_utterance>\nAssistant:"],
                   ["The quick", image_b, "brown fox", image_a, "three"]]
    texts = ["User:<image>Describe this image.<end_of_utterance>\nAssistant:",
             "The quick<image>brown fox<image>three"]
    images = [[image_a], [image_b, image_a]]
    for key, value in pipe.processor(interleaved).items():
        assert torch.equal(value, pipe.processor(text=texts, images=images)[key]), key
    generated = pipe.generate(interleaved, max_new_tokens=6)
    assert generated == pipe.generate(texts, images=images, max_new_tokens=6)
    expected = reference_greedy(ref, folder, splitting, texts, images, pipe, 6)
    for generation, row in zip(pipe.generate_detailed(interleaved, max_new_tokens=6), expected):
        assert generation.token_ids == row[:len(generation.token_ids)]
    pieces = list(pipe.stream(texts[0], images=[image_a], max_new_tokens=6))
    assert "".join(pieces) == generated[0]


def test_saved_checkpoint_loads_in_reference(checkpoints, tmp_path):
    """Our config.json and weights round-trip: the reference loads what save_model writes, same logits."""
    from transformers import Idefics2ForConditionalGeneration

    folder, ref, splitting = checkpoints("nosplit")
    pipe = idefics.load(folder)
    save_model(pipe.model, tmp_path)
    reloaded = Idefics2ForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[1, 5, 300] + [IMAGE_TOKEN_ID] * IMAGE_SEQ_LEN + [300, 7, 9]])
    pixels = torch.randn(1, 1, 3, 42, 35)
    with torch.no_grad():
        expected = reloaded(input_ids=ids, pixel_values=pixels).logits
        torch.testing.assert_close(pipe.model(ids, pixel_values=pixels).logits, expected, atol=1e-4, rtol=1e-4)
    assert load_model(tmp_path).config.to_dict() == pipe.model.config.to_dict()


def test_hub_style_config_parses_like_reference():
    """A config.json as the 4.40-era hub files have it: stale sub-model types, flat rope_theta, most fields
    left at the class defaults. Every value we read must be the one the reference reads."""
    from transformers import Idefics2Config as RefConfig

    hub = {"architectures": ["Idefics2ForConditionalGeneration"], "image_token_id": 32001, "model_type": "idefics2",
           "torch_dtype": "float32", "use_cache": True,
           "perceiver_config": {"model_type": "idefics2", "resampler_depth": 3, "resampler_n_latents": 64},
           "text_config": {"model_type": "mistral", "max_position_embeddings": 32768, "rms_norm_eps": 1e-05,
                           "sliding_window": 4096, "vocab_size": 32003, "pad_token_id": 0, "rope_theta": 10000.0},
           "vision_config": {"hidden_size": 1152, "image_size": 980, "intermediate_size": 4304,
                             "model_type": "idefics2", "num_attention_heads": 16, "num_hidden_layers": 27,
                             "patch_size": 14}}
    ours, theirs = Idefics2Config.from_dict(json.loads(json.dumps(hub))), RefConfig(**json.loads(json.dumps(hub)))
    for sub in ("text_config", "vision_config", "perceiver_config"):
        for field, value in vars(getattr(ours, sub)).items():
            if field not in ("extra", "rope_theta"):  # rope_theta: checked below
                assert value == getattr(getattr(theirs, sub), field), f"{sub}.{field}"
    assert ours.image_token_id == theirs.image_token_id and ours.vocab_size == 32003
    assert ours.text_config.rope_theta == theirs.text_config.rope_parameters["rope_theta"]
    assert ours.eos_token_ids == [2] and ours.additional_vocab_size == 0
    with pytest.raises(ValueError, match="num_key_value_heads"):
        Idefics2Config.from_dict({**hub, "text_config": {**hub["text_config"], "num_key_value_heads": 5}})


def test_navit_position_ids_by_hand():
    """A 2x3 image in a 3x4 padded patch grid, 8x8 position grid: rows at 0, 1/2 → buckets 0, 4; columns at
    0, 1/3, 2/3 → buckets 0, 2, 5; padding patches get 0."""
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[0, :2, :3] = True
    ids = navit_position_ids(mask, 8).view(3, 4)
    assert ids.tolist() == [[0, 2, 5, 0], [32, 34, 37, 0], [0, 0, 0, 0]]


def test_bad_inputs_give_clear_errors(checkpoints, sample):
    folder, _, _ = checkpoints("split")
    pipe = idefics.load(folder)
    texts, images = sample
    with pytest.raises(ValueError, match="1 <image> markers but 2 images"):
        pipe.processor(text=texts, images=[images[1], images[1]])
    with pytest.raises(ValueError, match="3 <image> markers in total but 2 images"):
        pipe.processor(text=texts, images=[images[0][0], images[1][0]])
    inputs = pipe.processor(text=texts, images=images)
    with pytest.raises(ValueError, match="pixel_attention_mask has shape"):
        pipe.model(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                   inputs["pixel_attention_mask"][:, :1])
    one_image_token_less = inputs["input_ids"].clone()
    one_image_token_less[1, int((one_image_token_less[1] == IMAGE_TOKEN_ID).nonzero()[0])] = 5
    with pytest.raises(ValueError, match="<image> tokens but the images give"):
        pipe.model(one_image_token_less, inputs["attention_mask"], inputs["pixel_values"],
                   inputs["pixel_attention_mask"])
    with pytest.raises(ValueError, match="input_ids must be in"):
        pipe.model(torch.tensor([[1, 10_000]]))
    with pytest.raises(ValueError, match="size must be"):
        pipe.processor(text=texts, images=images, size={"shortest_edge": 20})


def test_bfloat16_runs(checkpoints, sample):
    folder, _, _ = checkpoints("split")
    full, half = idefics.load(folder), idefics.load(folder, dtype="bfloat16")
    texts, images = sample
    with torch.no_grad():
        reference = full.model(**full.processor(text=texts, images=images)).logits[:, -1]
        logits = half.model(**half.processor(text=texts, images=images)).logits[:, -1].float()
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert torch.nn.functional.cosine_similarity(logits, reference, dim=-1).min() > 0.98
    assert len(half.generate(texts, images=images, max_new_tokens=3)) == 2


def test_int8_quantized_loading_covers_idefics2(checkpoints, sample):
    """Weight-only int8 replaces the decoder's linear layers and stays close to the unquantized model."""
    folder, _, _ = checkpoints("nosplit")
    texts, images = sample
    plain = idefics.load(folder)
    quantized = idefics.load(folder, quantize="int8")
    assert sum(type(m).__name__ == "Int8Linear" for m in quantized.model.modules()) > 0
    assert type(quantized.model.lm_head).__name__ == "PackedLinear"  # the output layer stays bf16, packed
    inputs = plain.processor(text=texts, images=images)
    with torch.no_grad():
        a = plain.model(**inputs).logits
        b = quantized.model(**inputs).logits
    real = inputs["attention_mask"].bool()
    agreement = (a[real].argmax(-1) == b[real].argmax(-1)).float().mean().item()
    assert agreement > 0.9 and (a[real] - b[real]).abs().max().item() < 0.5 * a[real].abs().max().item()


@pytest.mark.parametrize("name", ["split", "nosplit"])
def test_evaluation_harness_runs_idefics2(checkpoints, name, tmp_path):
    """The harness's cached image features give the processor's tokens and the pixel path's logits, and its
    KV-cached class scores equal `pipe.log_likelihood`; then a few-shot run end to end."""
    from idefics.data.synthetic import make_mini_data
    from idefics.eval.engine import ImageFeatureStore, class_log_likelihoods, encode_prompts
    from idefics.eval.runner import EvalConfig, run_eval

    folder, _, _ = checkpoints(name)
    pipe = idefics.load(folder)
    images = [noise_image(10 + i, 40 + 20 * i, 60) for i in range(3)]
    prompts = [[images[0], "Output: a cat\n", images[1], "Output:"], ["Question: x", images[2], "Answer:"]]
    cache = ImageFeatureStore(pipe)
    ours = encode_prompts(pipe, prompts, cache)
    theirs = pipe.processor(prompts)
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(ours[key], theirs[key]), key
    real = theirs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(pipe.model(**ours).logits[real], pipe.model(**theirs).logits[real],
                                   atol=1e-5, rtol=0)
    names = ["yes", "no", "blue car"]
    sums, counts = class_log_likelihoods(pipe, prompts, names, cache, max_rows=2)
    for p, prompt in enumerate(prompts):
        torch.testing.assert_close(sums[p].float(), torch.tensor(pipe.log_likelihood([prompt] * 3, names)),
                                   atol=1e-4, rtol=0)
    assert bool((counts > 0).all())

    data = tmp_path / "mini"
    make_mini_data(str(data), seed=0, n_train=0, n_val=20, n_test=20, progress=False)
    results = run_eval(pipe, EvalConfig(tasks=["mini-vqa", "mini-digits"], data=data, shots=[0, 2], seeds=[0],
                                        limit=3, decoding="greedy", progress=False))
    assert {(r.task, r.shots) for r in results} == {(t, s) for t in ("mini-vqa", "mini-digits") for s in (0, 2)}
    assert all(1 <= r.n <= 3 for r in results)  # this small test split has 2 open questions of the mini-vqa types
