"""Image-feature cache: same outputs as encoding, the vision encoder skipped for images seen before (by content),
LRU eviction within the byte budget."""

from __future__ import annotations

import pytest
import torch

import idefics
from tests.helpers import png_bytes
from idefics.image_cache import ImageFeatureCache, image_key, with_cached_images


@pytest.fixture(scope="module")
def pipe(reference_checkpoint):
    folder, _ = reference_checkpoint("small_instruct")
    return idefics.load(folder)


def count_vision_calls(pipe):
    calls = []
    hook = pipe.model.model.vision_model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    return calls, hook


def test_cached_features_equal_encoding(pipe, images):
    inputs = pipe.processor([["User:", images[0], "a", images[1]], ["x", images[1], images[2]], ["text only"]])
    with torch.no_grad():
        expected = pipe.model.model.encode_images(inputs["pixel_values"], inputs["image_attention_mask"])
    cache = ImageFeatureCache()
    first = cache.encode(pipe.model, inputs["pixel_values"], inputs["image_attention_mask"])
    again = cache.encode(pipe.model, inputs["pixel_values"], inputs["image_attention_mask"])
    torch.testing.assert_close(first, expected, atol=1e-6, rtol=0)
    assert torch.equal(first, again)
    assert len(cache) == 3 and cache.hits == 4  # misses are encoded once; the second call hits all 4 slots


def test_generation_with_cache_equals_without_and_skips_vision(pipe, images):
    prompt = ["User:", images[0], "Describe this image.<end_of_utterance>", "\nAssistant:"]
    pipe.image_cache = None
    plain = pipe.generate_detailed(prompt, max_new_tokens=5, stop_token_ids=[])[0]
    pipe.image_cache = ImageFeatureCache()
    calls, hook = count_vision_calls(pipe)
    try:
        first = pipe.generate_detailed(prompt, max_new_tokens=5, stop_token_ids=[])[0]
        # next chat turn: the same picture again, now from PNG bytes, plus a new one
        turn = prompt + [" It is noise.<end_of_utterance>", "\nUser:", png_bytes(images[0]), images[3], "And now?"]
        second = pipe.generate_detailed(turn, max_new_tokens=3, stop_token_ids=[])[0]
    finally:
        hook.remove()
    assert first.token_ids == plain.token_ids
    assert first.logprobs == pytest.approx(plain.logprobs, abs=1e-5)
    assert calls == [1, 1]  # the second turn encodes only images[3]
    assert pipe.image_cache.hits >= 1 and len(second.token_ids) == 3


def test_log_likelihood_uses_cache(pipe, images):
    pipe.image_cache = None
    plain = pipe.log_likelihood([[images[2], "Question: colour? Answer:"]], [" red"])
    pipe.image_cache = ImageFeatureCache()
    cached = [pipe.log_likelihood([[images[2], "Question: colour? Answer:"]], [" red"]) for _ in range(2)]
    assert cached[0] == pytest.approx(plain, abs=1e-5) and cached[1] == pytest.approx(plain, abs=1e-5)
    assert pipe.image_cache.hits == 1


def test_lru_eviction_respects_byte_budget():
    entry = torch.zeros(4, 8)  # 128 bytes
    cache = ImageFeatureCache(max_bytes=3 * 128)
    for key in "abc":
        cache.put(key, entry)
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", entry)
    assert cache.get("b") is None and cache.get("a") is not None and len(cache) == 3
    assert cache.bytes == 3 * 128
    cache.put("huge", torch.zeros(1000))  # larger than the whole budget: not stored
    assert cache.get("huge") is None and cache.bytes <= cache.max_bytes
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0


def test_keys_follow_content_and_dtype():
    a = torch.rand(3, 8, 8)
    assert image_key(a, torch.float32) == image_key(a.clone(), torch.float32)
    assert image_key(a, torch.float32) != image_key(a, torch.bfloat16)
    b = a.clone()
    b[0, 0, 0] += 1e-3
    assert image_key(a, torch.float32) != image_key(b, torch.float32)


def test_text_only_inputs_pass_through(pipe):
    inputs = pipe.processor(["no image here"])
    assert with_cached_images(pipe.model, inputs, ImageFeatureCache()) is inputs
