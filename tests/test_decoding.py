"""The decoding state's row operations (join, select with repeats, copy, extend) against full forwards of the
same sequences: what continuous batching, beam search and class scoring rely on."""

from __future__ import annotations

import pytest
import torch

import idefics
from idefics.decoding import DecodeState


@pytest.fixture(scope="module")
def pipe(reference_checkpoint):
    folder, _ = reference_checkpoint("small_instruct")
    return idefics.load(folder)


def prompts(images):
    return [["User:", images[0], "Describe this image.\nAssistant:"], ["The quick", images[1], images[2], "brown"],
            ["text only prompt"]]


def full_logits(pipe, prompt, new_tokens: list[int]) -> torch.Tensor:
    """Next-token logits after the prompt + new tokens, by one forward without a cache (new tokens see the
    image the last prompt token sees)."""
    inputs = pipe.processor([prompt])
    ids = torch.cat([inputs["input_ids"], torch.tensor([new_tokens], dtype=torch.long)], 1)
    mask = torch.ones_like(ids)
    extra = {}
    if "image_attention_mask" in inputs:
        image_mask = inputs["image_attention_mask"]
        extra = {"pixel_values": inputs["pixel_values"],
                 "image_attention_mask": torch.cat([image_mask, image_mask[:, -1:].expand(-1, len(new_tokens), -1)], 1)}
    with torch.no_grad():
        return pipe.model(ids, mask, **extra).logits[0, -1].float()


@torch.inference_mode()
def test_rows_prefilled_apart_then_joined_decode_as_alone(pipe, images):
    texts = prompts(images)
    first, _ = DecodeState.prefill(pipe.model, pipe.processor([texts[0]]), 8)
    for prompt in texts[1:]:  # different lengths and image counts: the join pads both
        other, _ = DecodeState.prefill(pipe.model, pipe.processor([prompt]), 8)
        first.join(other, room=8)
    assert first.batch == 3
    steps = [[5, 9, 7], [11, 3, 4]]
    for tokens in steps:
        first.step(torch.tensor(tokens))
    for row, prompt in enumerate(texts):
        expected = full_logits(pipe, prompt, [steps[0][row], steps[1][row]])
        torch.testing.assert_close(first.logits[row], expected, atol=2e-5, rtol=0)


@torch.inference_mode()
def test_select_repeats_and_reorders_rows_and_trims_common_padding(pipe, images):
    texts = prompts(images)
    state, _ = DecodeState.prefill(pipe.model, pipe.processor(texts), 6)
    width = state.mask.shape[1]
    lengths = state.mask.sum(1).tolist()
    short, middle = sorted(range(3), key=lengths.__getitem__)[:2]
    state.select([short, short, middle])  # two copies of the shortest row, then the next: not the longest
    assert state.mask.shape[1] == lengths[middle] < width  # the padding common to them is gone
    state.step(torch.tensor([5, 6, 7]))
    torch.testing.assert_close(state.logits[0], full_logits(pipe, texts[short], [5]), atol=2e-5, rtol=0)
    torch.testing.assert_close(state.logits[1], full_logits(pipe, texts[short], [6]), atol=2e-5, rtol=0)
    torch.testing.assert_close(state.logits[2], full_logits(pipe, texts[middle], [7]), atol=2e-5, rtol=0)

@torch.inference_mode()
def test_copies_are_independent_and_extend_scores_continuations(pipe, images):
    texts = prompts(images)
    state, _ = DecodeState.prefill(pipe.model, pipe.processor(texts[:2]), 4)
    before = state.logits.clone()
    part = state.copy_rows([1, 1])
    inputs = pipe.processor(texts[:2])
    last_image = inputs["image_attention_mask"][1:2, -1:].expand(2, 3, -1)
    logits = part.extend(torch.tensor([[5, 6, 7], [8, 9, 10]]), image_attention_mask=last_image)
    torch.testing.assert_close(state.logits, before)  # the original state is untouched...
    state.step(torch.tensor([1, 2]))  # ...and still decodes from its own cache
    torch.testing.assert_close(state.logits[1], full_logits(pipe, texts[1], [2]), atol=2e-5, rtol=0)
    torch.testing.assert_close(logits[0, 1].float(), full_logits(pipe, texts[1], [5, 6]), atol=2e-5, rtol=0)
    torch.testing.assert_close(logits[1, 2].float(), full_logits(pipe, texts[1], [8, 9, 10]), atol=2e-5, rtol=0)


def test_prompt_and_budget_beyond_the_model_are_refused(pipe, images):
    limit = pipe.model.config.max_position_embeddings
    with pytest.raises(ValueError, match="max_position_embeddings"):
        DecodeState.prefill(pipe.model, pipe.processor([["hello"]]), limit)
