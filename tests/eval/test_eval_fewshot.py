"""Demonstration selection (random, RICES, 0-shot trick) and interleaved prompt construction."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from idefics.eval.annotations import EvalSample
from idefics.eval.fewshot import (
    RICES,
    build_prompt,
    count_images,
    effective_num_shots,
    fewshot_prompt,
    random_demo_indices,
    render_prompt,
    support_subset,
)
from idefics.eval.tasks import CAPTION_TEMPLATE, CLASSIFICATION_TEMPLATE, HATEFUL_MEMES_TEMPLATE, VQA_TEMPLATE


def vqa(i, question, answer=None):
    return EvalSample(f"q{i}", Path(f"img{i}.jpg"), {"question": question}, (answer,) if answer else ())


def caption(i, text):
    return EvalSample(f"c{i}", Path(f"cap{i}.jpg"), {}, (text,))


def meme(i, text, label=None):
    return EvalSample(f"m{i}", Path(f"meme{i}.png"), {"text": text}, (), label)


BUS, DOGS, RAIN = vqa(1, "What color is the bus?", "red"), vqa(2, "How many dogs?", "2"), vqa(3, "Is it raining?")


# ---------------------------------------------------------------- exact reference-harness strings (§1.2)

def test_vqa_two_shot_string():
    prompt = build_prompt(RAIN, [BUS, DOGS], VQA_TEMPLATE)
    assert render_prompt(prompt) == (
        "<image>Question:What color is the bus? Short answer:red<|endofchunk|>\n"
        "<image>Question:How many dogs? Short answer:2<|endofchunk|>\n"
        "<image>Question:Is it raining? Short answer:")
    assert prompt[0] == BUS.image and prompt[2] == DOGS.image and prompt[4] == RAIN.image


def test_vqa_zero_shot_string_has_only_the_query_image():
    prompt = build_prompt(RAIN, [BUS, DOGS], VQA_TEMPLATE, demo_images=False)
    assert render_prompt(prompt) == (
        "Question:What color is the bus? Short answer:red<|endofchunk|>\n"
        "Question:How many dogs? Short answer:2<|endofchunk|>\n"
        "<image>Question:Is it raining? Short answer:")
    assert [type(x) for x in prompt] == [str, type(RAIN.image), str] and prompt[1] == RAIN.image


def test_caption_zero_shot_string_strips_the_demo_caption():
    demos = [caption(1, "A red bus. "), caption(2, "Two dogs playing.")]
    prompt = build_prompt(caption(3, "unused"), demos, CAPTION_TEMPLATE, demo_images=False)
    assert render_prompt(prompt) == (
        "Output:A red bus.<|endofchunk|>\nOutput:Two dogs playing.<|endofchunk|>\n<image>Output:")


def test_hateful_memes_two_shot_string_has_no_newlines():
    demos = [meme(1, "you are so smart", "no"), meme(2, "look at this", "yes")]
    prompt = build_prompt(meme(3, "the meme text"), demos, HATEFUL_MEMES_TEMPLATE)
    assert render_prompt(prompt) == (
        "<image>is an image with: 'you are so smart' written on it. Is it hateful? Answer:no<|endofchunk|>"
        "<image>is an image with: 'look at this' written on it. Is it hateful? Answer:yes<|endofchunk|>"
        "<image>is an image with: 'the meme text' written on it. Is it hateful? Answer:")


def test_end_of_chunk_marker_is_configurable_and_builder_is_pure():
    template = VQA_TEMPLATE.with_end_of_chunk("</s>")
    demos = [BUS, DOGS]
    before = copy.deepcopy(demos)
    first = build_prompt(RAIN, demos, template)
    assert first == build_prompt(RAIN, demos, template) and demos == before
    assert render_prompt(first).count("</s>\n") == 2 and "<|endofchunk|>" not in render_prompt(first)


def test_missing_template_field_or_answer_is_named():
    with pytest.raises(ValueError, match="sample 'c1' has no field 'question'"):
        build_prompt(caption(1, "x"), [], VQA_TEMPLATE)
    with pytest.raises(ValueError, match="demonstration 'q3' has no reference"):
        build_prompt(BUS, [RAIN], VQA_TEMPLATE)
    with pytest.raises(ValueError, match="demonstration 'm1' has no label"):
        build_prompt(meme(2, "t"), [meme(1, "t")], HATEFUL_MEMES_TEMPLATE)


# ---------------------------------------------------------------- random selection and the 0-shot trick

SUPPORT = [vqa(100 + i, f"Question {i}?", f"answer {i}") for i in range(50)]


def test_random_selection_is_deterministic_and_order_independent():
    ids = [f"query{i}" for i in range(20)]
    forward = {q: random_demo_indices(50, 8, seed=42, query_id=q) for q in ids}
    backward = {q: random_demo_indices(50, 8, seed=42, query_id=q) for q in reversed(ids)}
    assert forward == backward
    for demos in forward.values():
        assert len(set(demos)) == 8 and all(0 <= i < 50 for i in demos)
    other_seed = {q: random_demo_indices(50, 8, seed=43, query_id=q) for q in ids}
    assert other_seed != forward
    assert len({tuple(d) for d in forward.values()}) > 15  # queries get different demonstrations


def test_random_selection_covers_the_support_set_uniformly():
    counts = np.zeros(10)
    for q in range(3000):
        for i in random_demo_indices(10, 2, seed=0, query_id=str(q)):
            counts[i] += 1
    assert counts.sum() == 6000 and np.all(np.abs(counts - 600) < 90)  # ~3.7 sigma of a binomial


def test_support_subset():
    subset = support_subset(10_000, 2048, seed=42)
    assert subset == support_subset(10_000, 2048, seed=42) and subset != support_subset(10_000, 2048, seed=1)
    assert len(set(subset)) == 2048 and subset == sorted(subset) and max(subset) < 10_000
    assert support_subset(5, 2048, seed=42) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("num_shots", [0, 4, 8])
def test_fewshot_prompt_image_count(num_shots):
    prompt = fewshot_prompt(RAIN, SUPPORT, num_shots, VQA_TEMPLATE, seed=42)
    text = render_prompt(prompt)
    assert effective_num_shots(num_shots) == (num_shots or 2)
    assert text.count("Short answer:answer ") == effective_num_shots(num_shots)
    # 0-shot: two text-only demonstrations, the query image is the only image; k-shot: k demo images + query.
    assert count_images(prompt) == num_shots + 1
    assert prompt[-2] == RAIN.image and text.endswith("<image>Question:Is it raining? Short answer:")
    assert prompt == fewshot_prompt(RAIN, SUPPORT, num_shots, VQA_TEMPLATE, seed=42)


def test_fewshot_prompt_bad_arguments():
    with pytest.raises(ValueError, match="num_shots must be >= 0"):
        fewshot_prompt(RAIN, SUPPORT, -1, VQA_TEMPLATE)
    with pytest.raises(ValueError, match="cannot draw 8 demonstrations from a support set of 3"):
        fewshot_prompt(RAIN, SUPPORT[:3], 8, VQA_TEMPLATE)
    with pytest.raises(ValueError, match="shows 4 demonstrations, got 3"):
        fewshot_prompt(RAIN, SUPPORT, 4, VQA_TEMPLATE, demo_indices=[0, 1, 2])


# ---------------------------------------------------------------- RICES

def test_rices_reference_vector():
    # Cosine similarities [0.1, 0.9, 0.5, 0.7] to the query, k=3 -> top-k [1, 3, 2] -> order [2, 3, 1].
    sims = torch.tensor([0.1, 0.9, 0.5, 0.7])
    lengths = torch.tensor([[3.0], [0.5], [7.0], [1.0]])  # cosine similarity must ignore the lengths
    support = torch.stack([sims, (1 - sims**2).sqrt(), torch.zeros(4)], dim=1) * lengths
    query = torch.tensor([2.0, 0.0, 0.0])
    rices = RICES(support)
    assert rices.similarities(query)[0].tolist() == pytest.approx(sims.tolist(), abs=1e-6)
    assert rices.select(query, 3) == [[2, 3, 1]]


def test_rices_finds_known_neighbours_most_similar_last():
    gen = torch.Generator().manual_seed(0)
    # Orthogonal support directions with arbitrary lengths: cosine similarity must ignore the lengths.
    directions = torch.linalg.qr(torch.randn(256, 200, generator=gen)).Q.T  # [200, 256], orthonormal rows
    support = directions * torch.rand(200, 1, generator=gen).add(0.1).mul(10)
    targets, runner_up = [17, 3, 150], [90, 91, 92]
    # cos(query, target) ~ 0.86, cos(query, runner-up) ~ 0.51, every other item ~ 0.
    queries = torch.stack([2.0 * (directions[t] + 0.6 * directions[r]) + 0.001 * torch.randn(256, generator=gen)
                           for t, r in zip(targets, runner_up)])
    chosen = RICES(support).select(queries, 4)
    assert [row[-1] for row in chosen] == targets
    assert [row[-2] for row in chosen] == runner_up


def test_rices_matches_brute_force_cosine_ranking():
    rng = np.random.default_rng(3)
    support, queries = rng.normal(size=(64, 16)), rng.normal(size=(5, 16))
    cos = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (
        support / np.linalg.norm(support, axis=1, keepdims=True)).T
    want = [list(reversed(np.argsort(-row)[:6].tolist())) for row in cos]
    assert RICES(torch.from_numpy(support)).select(torch.from_numpy(queries), 6) == want


def test_rices_prompt_puts_the_nearest_demo_next_to_the_query():
    support = [vqa(200 + i, f"Q{i}?", f"a{i}") for i in range(4)]
    feats = torch.eye(4)
    query_feat = torch.tensor([0.1, 0.2, 0.9, 0.5])
    order = RICES(feats).select(query_feat, 2)[0]
    prompt = fewshot_prompt(RAIN, support, 2, VQA_TEMPLATE, demo_indices=order)
    images = [x for x in prompt if isinstance(x, Path)]
    assert images == [support[3].image, support[2].image, RAIN.image]


def test_rices_bad_input():
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        RICES(torch.zeros(5))
    with pytest.raises(ValueError, match="all zeros"):
        RICES(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="dimension 3, support 2"):
        RICES(torch.eye(2)).select(torch.ones(3), 1)
    with pytest.raises(ValueError, match="k=3"):
        RICES(torch.eye(2)).select(torch.ones(2), 3)


def test_classification_demos_use_labels():
    demos = [EvalSample("d1", Path("d1.png"), {}, (), "tench"), EvalSample("d2", Path("d2.png"), {}, (), "goldfish")]
    prompt = build_prompt(EvalSample("q", Path("q.png"), {}, (), "shark"), demos, CLASSIFICATION_TEMPLATE)
    assert render_prompt(prompt) == (
        "<image>Output:tench<|endofchunk|><image>Output:goldfish<|endofchunk|><image>Output:")
