"""Generation with both caches equals full forwards; sampling options; streaming; stopping rules."""

from __future__ import annotations

import pytest
import torch

import idefics
from idefics.generation import GenerationParams, TextStream, process_logits


@pytest.fixture(scope="module")
def pipe(reference_checkpoint):
    folder, _ = reference_checkpoint("small_instruct")
    return idefics.load(folder)


def batch_prompts(images):
    return [["User:", images[0], "Describe this image.\nAssistant:"],
            ["The quick", images[1], images[2], "brown fox"], ["text only prompt"]]


def test_incremental_decoding_equals_full_forward_at_every_step(pipe, images):
    prompts = batch_prompts(images)
    inputs = pipe.processor(prompts)
    steps = 6
    generated = pipe.generate_detailed(prompts, max_new_tokens=steps, stop_token_ids=[])
    new = torch.tensor([g.token_ids for g in generated])
    # Full forward over prompt + generated tokens: generated tokens see the last prompt token's image.
    ids = torch.cat([inputs["input_ids"], new], 1)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(new)], 1)
    image_mask = torch.cat([inputs["image_attention_mask"],
                            inputs["image_attention_mask"][:, -1:].expand(-1, steps, -1)], 1)
    with torch.no_grad():
        full = pipe.model(ids, mask, inputs["pixel_values"], image_mask).logits
        cache = pipe.model.new_cache(len(prompts), ids.shape[1])
        prefix = inputs["input_ids"].shape[1]
        out = pipe.model(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"],
                         inputs["image_attention_mask"], cache=cache)
        torch.testing.assert_close(out.logits, full[:, :prefix], atol=1e-5, rtol=0)
        for step in range(steps - 1):
            out = pipe.model(new[:, step:step + 1], mask[:, :prefix + step + 1],
                             image_attention_mask=inputs["image_attention_mask"][:, -1:], cache=cache)
            torch.testing.assert_close(out.logits[:, 0], full[:, prefix + step], atol=1e-5, rtol=0)


def test_vision_and_image_projections_run_once_per_prompt(pipe, images):
    pipe.image_cache.clear()  # earlier tests saw these images: the cache would skip the vision encoder
    calls = {"vision": 0, "k_proj": 0}
    hooks = [pipe.model.model.vision_model.register_forward_hook(lambda *a: calls.__setitem__("vision", calls["vision"] + 1))]
    for layer in pipe.model.model.gated_cross_attn_layers:
        hooks.append(layer.cross_attn.k_proj.register_forward_hook(
            lambda *a: calls.__setitem__("k_proj", calls["k_proj"] + 1)))
    try:
        pipe.generate(batch_prompts(images)[:2], max_new_tokens=5, stop_token_ids=[])
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == {"vision": 1, "k_proj": len(pipe.model.model.gated_cross_attn_layers)}


def test_sampling_is_seeded_and_top_k_1_is_greedy(pipe, images):
    prompt = batch_prompts(images)[0]
    a = pipe.generate(prompt, max_new_tokens=8, do_sample=True, temperature=1.5, seed=1, stop_token_ids=[])
    b = pipe.generate(prompt, max_new_tokens=8, do_sample=True, temperature=1.5, seed=1, stop_token_ids=[])
    c = pipe.generate(prompt, max_new_tokens=8, do_sample=True, temperature=1.5, seed=2, stop_token_ids=[])
    assert a == b and a != c
    greedy = pipe.generate(prompt, max_new_tokens=8, stop_token_ids=[])
    assert pipe.generate(prompt, max_new_tokens=8, do_sample=True, top_k=1, seed=3, stop_token_ids=[]) == greedy


def test_logit_processing_against_hand_computed_values():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    seen = torch.tensor([[0, 3]])
    penalised = process_logits(logits, seen, GenerationParams(repetition_penalty=2.0))
    assert penalised.tolist() == [[1.0, 1.0, 0.5, -2.0]]  # positive divided, negative multiplied
    banned = process_logits(logits, seen, GenerationParams(banned_token_ids=[0]))
    assert banned[0, 0] == float("-inf") and banned[0, 1] == 1.0
    # top-p 0.7: probabilities softmax([2, 1, .5, -1]) = .57, .21, .13, .03 → keep the two largest
    top_p = process_logits(logits, seen, GenerationParams(do_sample=True, top_p=0.7))
    assert torch.isfinite(top_p).tolist() == [[True, True, False, False]]
    top_k = process_logits(logits, seen, GenerationParams(do_sample=True, top_k=3, temperature=0.5))
    assert top_k.tolist() == [[4.0, 2.0, 1.0, float("-inf")]]


def test_stream_pieces_join_to_generated_text(pipe, images):
    prompt = batch_prompts(images)[0]
    pieces = list(pipe.stream(prompt, max_new_tokens=10, stop_token_ids=[]))
    assert "".join(pieces) == pipe.generate(prompt, max_new_tokens=10, stop_token_ids=[])[0]
    assert len(pieces) > 1


def test_text_stream_holds_back_incomplete_utf8():
    table = {1: b"caf", 2: b"\xc3", 3: b"\xa9!"}
    stream = TextStream(lambda ids: b"".join(table[i] for i in ids).decode("utf-8", errors="replace"))
    assert [stream.push(1), stream.push(2), stream.push(3)] == ["caf", "", "é!"]


def test_stop_sequences_and_reasons(pipe, images):
    prompt = batch_prompts(images)[0]
    free = pipe.generate_detailed(prompt, max_new_tokens=8, stop_token_ids=[])[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 8
    stop = pipe.tokenizer.decode(free.token_ids[:3])[-2:]
    stopped = pipe.generate_detailed(prompt, max_new_tokens=8, stop_token_ids=[], stop_sequences=[stop])[0]
    assert stopped.finish_reason == "stop_sequence" and stop in stopped.text
    assert stopped.token_ids == free.token_ids[: len(stopped.token_ids)] and len(stopped.token_ids) <= 3


def test_instruct_checkpoint_stops_at_end_of_utterance(pipe):
    eou = pipe.tokenizer.token_to_id("<end_of_utterance>")
    assert eou in pipe.stop_token_ids() and pipe.tokenizer.eos_token_id in pipe.stop_token_ids()


def test_bad_requests_raise_clear_errors(pipe, images):
    prompt = batch_prompts(images)[0]
    with pytest.raises(ValueError, match="max_position_embeddings"):
        pipe.generate(prompt, max_new_tokens=10_000)
    with pytest.raises(ValueError, match="top_p"):
        pipe.generate(prompt, do_sample=True, top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        pipe.generate(prompt, max_new_tokens=0)
    long_text = " ".join(["the quick brown fox"] * 200)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        pipe.processor([long_text])


def test_image_features_rank_the_same_image_first(pipe, images):
    features = pipe.image_features([images[0], images[1], images[0], images[2]])
    assert features.shape[0] == 4
    torch.testing.assert_close(features[0], features[2])
    similarity = torch.nn.functional.cosine_similarity(features[:1], features, dim=-1)
    assert similarity.argsort(descending=True)[:2].tolist() in ([0, 2], [2, 0])


def test_out_of_range_token_ids_are_refused(pipe):
    with pytest.raises(ValueError, match="input_ids must be in"):
        pipe.model(torch.tensor([[1, 99999]]))
