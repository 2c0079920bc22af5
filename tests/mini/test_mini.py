"""The embedded idefics-mini: it loads offline in a fresh process and answers a fixed prompt stably; the
report's ablation really removes the image pathway."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import idefics
from tests.helpers import random_image
from idefics.mini import ASSET_DIR
from idefics.mini.report import gates_closed, majority_baseline, normalise

FIXED_PROMPT = """
import random, sys
import idefics
from idefics.mini.demo import held_out_examples
label, image, question, expected = held_out_examples()[0]
pipe = idefics.load()
answer = pipe.generate(["User:", image, question + "<end_of_utterance>", "\\nAssistant:"], max_new_tokens=6,
                       add_end_of_utterance_token=False)[0]
print(repr(answer))
"""


@pytest.mark.skipif(not (ASSET_DIR / "config.json").exists(), reason="idefics-mini has not been exported yet")
def test_default_model_loads_offline_in_a_fresh_process_with_a_stable_answer():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", NO_PROXY="*", http_proxy="http://0.0.0.0:9",
               https_proxy="http://0.0.0.0:9")
    runs = [subprocess.run([sys.executable, "-c", FIXED_PROMPT], capture_output=True, text=True, env=env,
                           timeout=600) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout and runs[0].stdout.strip() not in ("''", "")


def test_closed_gates_make_the_image_irrelevant(reference_checkpoint):
    folder, _ = reference_checkpoint("small_9b")
    pipe = idefics.load(folder)
    prompts = [["User:", random_image(1), "What is it?"], ["User:", random_image(2), "What is it?"]]
    with torch.no_grad():
        open_logits = pipe.model(**pipe.processor(prompts)).logits
        with gates_closed(pipe.model):
            closed = pipe.model(**pipe.processor(prompts)).logits
        reopened = pipe.model(**pipe.processor(prompts)).logits
    assert not torch.allclose(open_logits[0], open_logits[1], atol=1e-3)  # the images matter
    torch.testing.assert_close(closed[0], closed[1])  # ... and no longer do with the gates closed
    torch.testing.assert_close(reopened, open_logits)  # the gates are restored


def test_report_helpers():
    assert normalise(" Red. ") == "red" and normalise("Seven!") == "seven"
    questions = [{"type": "colour", "answer": a, "held_out": h}
                 for a, h in (("red", False), ("red", True), ("blue", True), ("Red", False))]
    questions.append({"type": "count", "answer": "2", "held_out": False})
    # colour: always "red" is right 3 times of 4; count: 1 of 1; held out: red yes, blue no
    assert majority_baseline(questions) == {"(all)": 80.0, "(held-out samples)": 50.0, "colour": 75.0,
                                            "count": 100.0}


def test_new_format_prompt_and_scoring():
    from idefics.mini.fewshot import build_prompt, is_correct, label_of, prefix_of

    assert prefix_of("Tag: {x}") == "Tag:" and prefix_of("<{x}>") == "<"
    assert build_prompt([("img1", "red"), ("img2", "blue")], "query", "Tag: {x}") == [
        "img1", "Tag: red\n", "img2", "Tag: blue\n", "query", "Tag:"]
    assert build_prompt([], "query", "Category = {x}") == ["query", "Category ="]
    assert is_correct(" red\n<image>Tag: blue", "Tag: {x}", "red")
    assert is_correct("red>", "<{x}>", "red") and not is_correct(" red", "<{x}>", "blue")
    assert not is_correct(" a red circle", "Tag: {x}", "red")  # the format is part of the answer
    scene = {"task": "scene", "mode": "single", "count": 1, "objects": [{"colour": "red", "shape": "star"}]}
    assert (label_of(scene, "colour"), label_of(scene, "shape"), label_of(scene, "count")) == ("red", "star", None)
    assert label_of({"task": "digit", "digit": 7}, "digit") == "7" and label_of(scene, "digit") is None


def test_new_format_is_never_in_training_text():
    from idefics.data.language import DOC_FORMATS, HELD_OUT_FORMATS, ANSWER_FORMATS

    trained = set(DOC_FORMATS) | {f["pattern"] for f in ANSWER_FORMATS}
    assert not trained & set(HELD_OUT_FORMATS)
    for fmt in HELD_OUT_FORMATS:  # not even the prefix, e.g. "Tag:" inside another format
        assert not any(fmt.split("{x}")[0].strip() in t for t in trained if t.split("{x}")[0].strip())


@pytest.mark.skipif(not (ASSET_DIR / "config.json").exists(), reason="idefics-mini has not been exported yet")
def test_text_only_prompts_answer_exactly_as_the_frozen_smollm2():
    """No image, no cross-attention: the greedy answers are transformers' SmolLM2 (its own GGUF loader)."""
    from idefics.mini.realworld import TEXT_PROMPTS, prompt_ids, smollm2_reference

    pipe = idefics.load()
    ours = [pipe.generate([prompt], max_new_tokens=12)[0] for prompt in TEXT_PROMPTS[:3]]
    assert ours == smollm2_reference([prompt_ids(pipe, p) for p in TEXT_PROMPTS[:3]], 12)


def test_dense_needs_image_leaves_tokens_without_an_image_to_the_language_model(reference_checkpoint, tmp_path):
    """With `dense_needs_image` (idefics-mini's config) the gated blocks change nothing for tokens that see no
    image: a text-only prompt scores exactly as with every gate closed, alone or batched with an image prompt,
    and tokens after an image still see it."""
    import json
    import shutil

    folder, _ = reference_checkpoint("small_9b")
    flagged = tmp_path / "flagged"
    shutil.copytree(folder, flagged)
    config = json.loads((flagged / "config.json").read_text())
    (flagged / "config.json").write_text(json.dumps({**config, "dense_needs_image": True}))
    pipe = idefics.load(flagged)
    for layer in pipe.model.model.gated_cross_attn_layers:  # open gates: the blocks would change everything
        layer.alpha_cross_attn.data.fill_(1.0)
        layer.alpha_dense.data.fill_(1.0)
    text = ["User: what is the capital of France?"]
    mixed = [text, ["User:", random_image(3), "What is it?"]]
    with torch.no_grad():
        alone = pipe.model(**pipe.processor(text)).logits
        batched = pipe.model(**pipe.processor(mixed)).logits
        with gates_closed(pipe.model):
            lm_only = pipe.model(**pipe.processor(mixed)).logits
    torch.testing.assert_close(alone, lm_only[:1, -alone.shape[1]:], rtol=0, atol=0)
    torch.testing.assert_close(batched[:1], lm_only[:1], rtol=0, atol=0)
    assert not torch.allclose(batched[1, -1], lm_only[1, -1], atol=1e-3)  # the image row still sees its image
    answer = pipe.generate(text, max_new_tokens=5)
    with gates_closed(pipe.model):
        assert pipe.generate(text, max_new_tokens=5) == answer
