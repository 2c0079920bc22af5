"""Same inputs, same logits, same greedy text as transformers' IdeficsForVisionText2Text + IdeficsProcessor."""

from __future__ import annotations

import base64

import pytest
import torch

import idefics
from idefics.cpu import packing
from tests.helpers import png_bytes, random_image
from tests.reference_checkpoints import CONFIGS, reference_processor

ALL_CONFIGS = list(CONFIGS)


def prompt_battery(images):
    """Prompts covering the processor's cases (as lists of items)."""
    a, b, c, d = images
    return {
        "one_image": ["User:", a, "Describe this image.\nAssistant:"],
        "several_images": ["The quick", a, "brown fox", b, "jumps over", c, "the lazy dog"],
        "consecutive_images": ["Compare", a, b, c, "which is red?"],
        "text_only": ["The quick brown fox jumps over the lazy dog"],
        "image_first_and_last": [a, "between two images", d],
        "instruct": ["User: What is in this image?", a, "<end_of_utterance>", "\nAssistant: A cat.<end_of_utterance>",
                     "\nUser:", b, "And this one?<end_of_utterance>", "\nAssistant:"],
        "spaces_and_newlines": ["  User:  ", a, "\n Describe \n", "  two texts  ", "in a row"],
    }


def run_both(folder, ref_model, prompts, **kwargs):
    pipe = idefics.load(folder)
    ours = pipe.processor(prompts, **kwargs)
    theirs = reference_processor(folder)(text=prompts, **kwargs)
    return pipe, ours, theirs


def assert_inputs_equal(ours, theirs):
    assert set(ours) == set(theirs)
    for key in ("input_ids", "attention_mask", "image_attention_mask"):
        assert torch.equal(ours[key].long(), theirs[key].long()), key
    # PIL bicubic on the same uint8 pixels; only float rounding of the normalisation may differ
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_processor_matches_reference_on_battery(reference_checkpoint, images, name):
    folder, ref = reference_checkpoint(name)
    for case, prompt in prompt_battery(images).items():
        _, ours, theirs = run_both(folder, ref, prompt, add_end_of_utterance_token=False)
        assert_inputs_equal(ours, theirs)


def test_processor_batch_with_padding_and_eou(reference_checkpoint, images):
    folder, ref = reference_checkpoint("small_instruct")
    battery = prompt_battery(images)
    batch = [battery["one_image"], battery["text_only"], battery["several_images"], battery["consecutive_images"]]
    for eou in (False, True):
        _, ours, theirs = run_both(folder, ref, batch, add_end_of_utterance_token=eou)
        assert_inputs_equal(ours, theirs)
    assert (ours["attention_mask"] == 0).any(), "the batch should need left padding"


def test_data_uri_is_the_same_image(reference_checkpoint):
    folder, ref = reference_checkpoint("small_9b")
    image = random_image(7)
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()
    pipe = idefics.load(folder)
    ours = pipe.processor(["User:", uri, "What is it?"])
    theirs = reference_processor(folder)(text=["User:", image, "What is it?"], add_end_of_utterance_token=False)
    assert_inputs_equal(ours, theirs)


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_logits_match_reference_float32(reference_checkpoint, images, name):
    folder, ref = reference_checkpoint(name)
    battery = prompt_battery(images)
    batch = [battery["one_image"], battery["several_images"], battery["text_only"], battery["image_first_and_last"]]
    pipe, ours, theirs = run_both(folder, ref, batch, add_end_of_utterance_token=False)
    with torch.no_grad():
        our_logits = pipe.model(**ours).logits
        ref_logits = ref(**theirs).logits
    width = CONFIGS[name][0]["vocab_size"] + CONFIGS[name][0]["additional_vocab_size"]
    assert our_logits.shape == ref_logits.shape == (*ours["input_ids"].shape, width)
    real = ours["attention_mask"].bool()  # padding positions carry no meaning
    torch.testing.assert_close(our_logits[real], ref_logits[real], atol=1e-4, rtol=0)


def test_logits_bfloat16_close_to_reference(reference_checkpoint, images):
    """Both sides in bfloat16: differences come from operation order only (stated tolerance: 0.1 absolute on
    logits of magnitude ~5, i.e. a few bf16 ulps)."""
    folder, ref = reference_checkpoint("small_9b")
    battery = prompt_battery(images)
    batch = [battery["one_image"], battery["several_images"]]
    pipe = idefics.load(folder, dtype="bfloat16")
    assert pipe.model.dtype == torch.bfloat16
    ours = pipe.processor(batch)
    ref_bf16 = type(ref)(ref.config).eval()
    ref_bf16.load_state_dict(ref.state_dict())
    ref_bf16 = ref_bf16.to(torch.bfloat16)
    with torch.no_grad():
        our_logits = pipe.model(**ours).logits.float()
        theirs = dict(ours, pixel_values=ours["pixel_values"].to(torch.bfloat16))
        ref_logits = ref_bf16(**theirs).logits.float()
        fp32_logits = ref(**ours).logits
    real = ours["attention_mask"].bool()
    diff = (our_logits - ref_logits)[real].abs().max().item()
    scale = fp32_logits[real].abs().max().item()
    assert diff < 0.1, (diff, scale)
    # and bf16 is near float32 on both sides by the same order of magnitude
    assert (our_logits - fp32_logits)[real].abs().max().item() < 0.2


def reference_greedy(ref, processor, inputs, max_new_tokens, stop_ids):
    bad = processor.tokenizer(["<image>", "<fake_token_around_image>"], add_special_tokens=False).input_ids
    out = ref.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, bad_words_ids=bad,
                       eos_token_id=stop_ids, pad_token_id=0)
    return out[:, inputs["input_ids"].shape[1]:].tolist()


def trim_after_stop(tokens, stop_ids):
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: i + 1]
    return tokens


@pytest.mark.parametrize("name", ["small_9b", "small_instruct", "no_resampler"])
def test_greedy_generation_matches_reference(reference_checkpoint, images, name):
    folder, ref = reference_checkpoint(name)
    battery = prompt_battery(images)
    batch = [battery["one_image"], battery["several_images"], battery["text_only"]]
    pipe, ours, theirs = run_both(folder, ref, batch, add_end_of_utterance_token=False)
    # Stop on a token the model actually produces so rows stop at different steps.
    free = pipe.generate_detailed(batch, max_new_tokens=12, stop_token_ids=[], add_end_of_utterance_token=False)
    stop_ids = sorted({free[0].token_ids[3], free[1].token_ids[-1]} | set(pipe.stop_token_ids()))
    expected = reference_greedy(ref, reference_processor(folder), theirs, 12, stop_ids)
    got = pipe.generate_detailed(batch, max_new_tokens=12, stop_token_ids=stop_ids, add_end_of_utterance_token=False)
    for row, generation in enumerate(got):
        assert generation.token_ids == trim_after_stop(expected[row], stop_ids), row
        assert generation.finish_reason == ("eos_token" if generation.token_ids[-1] in stop_ids else "length")
    # single prompt alone gives the same tokens as inside the batch
    single = pipe.generate_detailed(batch[1], max_new_tokens=12, stop_token_ids=stop_ids,
                                    add_end_of_utterance_token=False)
    assert single[0].token_ids == got[1].token_ids


def test_banned_image_tokens_never_generated(reference_checkpoint, images):
    import copy

    folder, shared_ref = reference_checkpoint("small_9b")
    ref = copy.deepcopy(shared_ref)  # the session fixture is shared: change a copy
    pipe = idefics.load(folder)
    image_id = pipe.tokenizer.token_to_id("<image>")
    prompt = prompt_battery(images)["one_image"]
    with torch.no_grad():  # make <image> the model's favourite token: its output row along the last hidden state
        hidden = pipe.model.model(**pipe.processor(prompt))[0][0, -1]
        pipe.model.lm_head.additional_fc.weight[image_id - pipe.config.vocab_size] = 10 * hidden / hidden.norm()
        ref.lm_head.additional_fc.weight.copy_(pipe.model.lm_head.additional_fc.weight)
    logits = pipe.model(**pipe.processor(prompt)).logits[0, -1]
    assert logits.argmax().item() == image_id
    got = pipe.generate_detailed(prompt, max_new_tokens=6)[0].token_ids
    assert image_id not in got and pipe.tokenizer.token_to_id("<fake_token_around_image>") not in got
    theirs = reference_processor(folder)(text=prompt, add_end_of_utterance_token=False)
    assert got == trim_after_stop(reference_greedy(ref, reference_processor(folder), theirs, 6,
                                                   pipe.stop_token_ids())[0], pipe.stop_token_ids())


@pytest.mark.parametrize("name", ["small_9b", "small_instruct", "no_resampler"])
def test_logits_bfloat16_bit_identical_to_reference(reference_checkpoint, images, name):
    """Both sides loaded in bf16 as users load them (`from_pretrained(dtype=bfloat16)` keeps the rotary
    frequencies in float32, as we do): every op of ours rounds like the reference's (our matmuls give oneDNN's
    bits, RMSNorm and RoPE keep its operation order), so the logits are equal, not just close."""
    from transformers import IdeficsForVisionText2Text

    folder, _ = reference_checkpoint(name)
    pipe = idefics.load(folder, dtype="bfloat16")
    battery = prompt_battery(images)
    ours = pipe.processor([battery["one_image"], battery["several_images"]])  # left padding in row 0
    ref_bf16 = IdeficsForVisionText2Text.from_pretrained(folder, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        our_logits = pipe.model(**ours).logits
        ref_logits = ref_bf16(**dict(ours, pixel_values=ours["pixel_values"].to(torch.bfloat16))).logits
    real = ours["attention_mask"].bool()  # padding positions carry no meaning
    if packing.layout(torch.bfloat16) == "widened":
        # a CPU without bf16 arithmetic: our products run in float32 (`packing.layout`), ATen's bf16 ones sum in
        # their own order, so roundings differ by a bf16 step here and there and grow through the layers
        diff = (our_logits[real].float() - ref_logits[real].float()).abs()
        scale = ref_logits[real].float().abs().max()
        print(f"widened bf16: max |diff| {diff.max():.4f} of logits up to {scale:.2f}")
        assert diff.max() <= 0.01 * scale and diff.mean() <= 0.001 * scale
        agree = (our_logits[real].argmax(-1) == ref_logits[real].argmax(-1)).float().mean()
        assert agree >= 0.95, agree
    else:
        assert torch.equal(our_logits[real], ref_logits[real])
