"""Beam search: the same tokens as transformers' generate(num_beams=3, do_sample=False, ...) on random reference
checkpoints, for a batch of 2 prompts, with and without stop tokens, over length penalties and early stopping."""

from __future__ import annotations

import pytest
import torch

import idefics
from idefics.beam_search import beam_search, cut_at_stop_sequences
from idefics.generation import decode
from tests.helpers import random_image
from tests.reference_checkpoints import reference_processor

MAX_NEW = 8


def flatter(model: torch.nn.Module, factor: float) -> None:
    """Scale the output layer so that the next-token distribution is flatter: random models are otherwise so
    peaked that beam search, greedy search and every setting give the same tokens."""
    with torch.no_grad():
        model.lm_head.weight.mul_(factor)
        if getattr(model.lm_head, "additional_fc", None) is not None:
            model.lm_head.additional_fc.weight.mul_(factor)


@pytest.fixture(scope="module", params=["small_9b", "no_resampler"])
def models(request, reference_checkpoint, prompt_images):
    folder, session_ref = reference_checkpoint(request.param)
    ref = type(session_ref)(session_ref.config).eval()  # a copy: the session's reference model stays untouched
    ref.load_state_dict(session_ref.state_dict())
    pipe = idefics.load(folder)
    flatter(ref, 0.3)
    flatter(pipe.model, 0.3)
    batch = two_prompts(prompt_images)
    ours = pipe.processor(batch, add_end_of_utterance_token=False)
    theirs = reference_processor(folder)(text=batch, add_end_of_utterance_token=False)
    assert (ours["attention_mask"] == 0).any(), "the batch should need left padding"
    return pipe, ref, ours, theirs


@pytest.fixture(scope="module")
def prompt_images():
    return [random_image(i, (40 + 13 * i, 50 - 5 * i)) for i in range(3)]


def two_prompts(images):
    a, b, c = images
    return [["User:", a, "Describe this image.\nAssistant:"], ["The quick", b, "brown fox", c, "jumps over"]]


def reference_beams(ref, theirs, banned, stop_ids, length_penalty, early_stopping):
    out = ref.generate(**theirs, num_beams=3, do_sample=False, max_new_tokens=MAX_NEW, length_penalty=length_penalty,
                       early_stopping=early_stopping, bad_words_ids=[[t] for t in banned], eos_token_id=stop_ids,
                       pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    start = theirs["input_ids"].shape[1]
    # beam_indices is -1 past a hypothesis' end: it gives each hypothesis' length (padding is ambiguous)
    lengths = (out.beam_indices != -1).sum(1).tolist()
    return [out.sequences[i, start:start + n].tolist() for i, n in enumerate(lengths)]


SETTINGS = [(0.0, False), (1.0, False), (1.0, "never"), (-2.0, True)]


def test_beam_search_matches_reference(models):
    pipe, ref, ours, theirs = models
    banned = pipe.banned_token_ids()
    eos = pipe.stop_token_ids()
    seen_outputs, ended_early = set(), False
    for length_penalty, early_stopping in SETTINGS:
        free = beam_search(pipe.model, ours, 3, MAX_NEW, length_penalty, eos, banned, 0, early_stopping)
        assert free == reference_beams(ref, theirs, banned, eos, length_penalty, early_stopping)
        # stop on tokens the search produces, so hypotheses end early and at different steps per row
        stops = sorted({free[0][1], free[1][3]} | set(eos))
        got = beam_search(pipe.model, ours, 3, MAX_NEW, length_penalty, stops, banned, 0, early_stopping)
        expected = reference_beams(ref, theirs, banned, stops, length_penalty, early_stopping)
        assert got == expected, (length_penalty, early_stopping)
        ended_early |= any(len(row) < MAX_NEW for row in got)
        seen_outputs.add(str(got))
    assert ended_early, "some hypothesis should end on a stop token"
    assert len(seen_outputs) > 1, "the settings should change the result, or this test shows little"


def test_one_beam_is_greedy_and_three_beams_are_not(models):
    pipe, ref, ours, theirs = models
    banned = pipe.banned_token_ids()
    params = pipe.params(max_new_tokens=MAX_NEW, stop_token_ids=[])
    greedy = [[] for _ in range(2)]
    for step in decode(pipe.model, ours, params, pipe.tokenizer.pad_token_id):
        for row in range(2):
            if step.active[row]:
                greedy[row].append(int(step.tokens[row]))
    assert beam_search(pipe.model, ours, 1, MAX_NEW, 1.0, [], banned, 0) == greedy
    beams = beam_search(pipe.model, ours, 3, MAX_NEW, 1.0, [], banned, 0)
    assert beams != greedy, "3 beams should find other sequences than greedy search on these models"
    assert not set(banned) & {t for row in beams for t in row}


def test_vision_runs_once_per_prompt_image(models):
    pipe, ref, ours, theirs = models
    encoded = []
    hook = pipe.model.model.vision_model.register_forward_hook(lambda m, args, out: encoded.append(len(args[0])))
    try:
        beam_search(pipe.model, ours, 3, MAX_NEW, 1.0, [], pipe.banned_token_ids(), 0)
    finally:
        hook.remove()
    assert encoded == [3], "one vision pass over the batch's 3 images, none per beam or per step"


def test_pipeline_generate_with_beams(models, prompt_images):
    pipe, ref, ours, theirs = models
    batch = two_prompts(prompt_images)
    tokens = beam_search(pipe.model, ours, 3, MAX_NEW, 0.0, pipe.stop_token_ids(), pipe.banned_token_ids(), 0)
    texts = pipe.generate(batch, max_new_tokens=MAX_NEW, num_beams=3, length_penalty=0.0,
                          add_end_of_utterance_token=False)
    assert texts == [pipe.detokenize(t) for t in tokens]
    # a stop sequence cuts the text after its first occurrence
    stop = texts[1][2:4]
    cut = pipe.generate(batch, max_new_tokens=MAX_NEW, num_beams=3, length_penalty=0.0, stop_sequences=[stop],
                        add_end_of_utterance_token=False)
    assert cut[1] == texts[1][: texts[1].index(stop) + len(stop)]
    with pytest.raises(ValueError, match="do_sample"):
        pipe.generate(batch, num_beams=3, do_sample=True)


def test_cut_at_stop_sequences():
    assert cut_at_stop_sequences("red\nQuestion: blue", ["\n"]) == "red\n"
    assert cut_at_stop_sequences("abcdef", ["de", "bc"]) == "abc"
    assert cut_at_stop_sequences("abcdef", ["x", ""]) == "abcdef"
