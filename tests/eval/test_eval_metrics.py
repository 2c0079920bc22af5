"""VQA accuracy, post-processing, ROC AUC and top-k accuracy against the reference vectors
(tests/vectors, computed by running the reference implementations) and independent formulas."""

import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from idefics.eval.metrics import (
    VQA_VARIANTS,
    normalize_vqa_answer,
    postprocess_caption_generation,
    postprocess_vqa_generation,
    roc_auc,
    top1_accuracy,
    topk_accuracy,
    vqa_accuracy,
    vqa_question_accuracy,
    yes_probability,
)
from tests.helpers import VECTORS

VARIANT_KEYS = {"openflamingo": "OF", "official2016": "O2016", "official2021": "O2021"}
DISTINCT = ["dog", "bird", "fish", "horse", "cow", "sheep", "goat", "lion", "tiger", "bear"]


def load_vectors(name):
    path = VECTORS / name
    assert path.is_file(), f"reference vectors missing: {path}"
    return json.loads(path.read_text())


# ---------------------------------------------------------------- VQA normalisation and accuracy

@pytest.mark.parametrize("case", load_vectors("vqa_vectors.json")["normalization"], ids=lambda c: repr(c["input"]))
def test_normalization_vectors(case):
    # All three variants share the normalisation functions; the vectors agree across variants.
    assert {case["OF"], case["O2016"], case["O2021"]} == {normalize_vqa_answer(case["input"])}


def _vizwiz_q0(with_ids):
    pairs = ([("unanswerable", "yes")] * 4 + [("unanswerable", "maybe")] + [("unanswerable", "yes")] * 2
             + [("unanswerable", "no"), ("cannot repair this computer automatically", "maybe"),
                ("blank screen", "yes")])
    recs = [{"answer": a, "answer_confidence": c} for a, c in pairs]
    if with_ids:
        for i, r in enumerate(recs):
            r["answer_id"] = i + 1
    return recs


# GT answers of each vector case (the JSON holds only the case names).
# Plain strings get distinct answer_ids, like VQAv2 annotations.
VQA_CASE_ANSWERS = {
    "10x'yes', pred 'yes'": ["yes"] * 10,
    "10x'yes', pred 'Yes'": ["yes"] * 10,
    "10x'yes', pred 'yes.'": ["yes"] * 10,
    "10x'2', pred 'two'": ["2"] * 10,
    **{f"m={m} of 10 GT match (others distinct)": ["cat"] * m + DISTINCT[: 10 - m] for m in range(11)},
    # Not spelled out in the doc; any mix of "two" and "2" with answer ids scores 100 in every variant.
    "mixed number words, pred 'two'": ["two", "2"] * 5,
    "mixed number words, pred '2'": ["two", "2"] * 5,
    "VizWiz val q0 (no answer_id), pred 'unanswerable'": _vizwiz_q0(with_ids=False),
    "same answers WITH answer_id, pred 'unanswerable'": _vizwiz_q0(with_ids=True),
    "4 GT answers only (['a b','a b','c','d']), pred 'a b'": ["a b", "a b", "c", "d"],
    "GT 3x'two'+7 distinct, pred '2'": ["two"] * 3 + DISTINCT[:7],
    "GT 3x'two'+7 distinct, pred 'two'": ["two"] * 3 + DISTINCT[:7],
    "GT 2x'The cat'+2x'cat'+6 distinct, pred 'cat'": ["The cat"] * 2 + ["cat"] * 2 + DISTINCT[:6],
    "GT 4x't-shirt'+6 distinct, pred 't shirt'": ["t-shirt"] * 4 + DISTINCT[:6],
    "GT 10x'yes', pred ' yes\\n'": ["yes"] * 10,
}


def test_every_accuracy_vector_has_its_answers():
    cases = [c["case"] for c in load_vectors("vqa_vectors.json")["accuracy"]]
    assert set(cases) <= set(VQA_CASE_ANSWERS), set(cases) - set(VQA_CASE_ANSWERS)


@pytest.mark.parametrize("case", load_vectors("vqa_vectors.json")["accuracy"], ids=lambda c: c["case"])
@pytest.mark.parametrize("variant", VQA_VARIANTS)
def test_accuracy_vectors(case, variant):
    answers = VQA_CASE_ANSWERS[case["case"]]
    got = 100 * vqa_question_accuracy(case["pred"], answers, variant)
    assert got == pytest.approx(case[VARIANT_KEYS[variant]], abs=1e-9)


def test_answer_records_are_not_mutated():
    answers = [{"answer": " The Cat ", "answer_id": i} for i in range(3)] + [{"answer": "dog", "answer_id": 9}]
    before = json.dumps(answers)
    for variant in VQA_VARIANTS:
        vqa_question_accuracy("cat", answers, variant)
    assert json.dumps(answers) == before


@pytest.mark.parametrize("variant", VQA_VARIANTS)
def test_accuracy_matches_closed_form_on_random_questions(variant):
    # m of n distinct-id answers equal the prediction, the others are distinct words that never match:
    # leaving out a matching answer leaves m-1 matches, leaving out another leaves m.
    rng = random.Random(0)
    preds, gts, expected = [], [], []
    for _ in range(300):
        n = rng.randint(1, 10)
        m = rng.randint(0, n)
        pred = rng.choice(["cat", "2", "yes", "red"])
        others = rng.sample([w for w in DISTINCT], n - m)
        answers = [pred] * m + others
        rng.shuffle(answers)
        want = (m * min(1, (m - 1) / 3) + (n - m) * min(1, m / 3)) / n
        assert vqa_question_accuracy(pred, answers, variant) == pytest.approx(want, abs=1e-12)
        preds.append(pred), gts.append(answers), expected.append(want)
    assert vqa_accuracy(preds, gts, variant) == round(100 * sum(expected) / len(expected), 2)


def test_variants_disagree_only_where_documented():
    # Upper-case prediction vs unanimous GT: only official2021 skips normalisation.
    scores = {v: vqa_question_accuracy("YES", ["yes"] * 10, v) for v in VQA_VARIANTS}
    assert scores == {"openflamingo": 1.0, "official2016": 1.0, "official2021": 0.0}


def test_vqa_bad_input_is_named():
    with pytest.raises(ValueError, match="unknown VQA accuracy variant"):
        vqa_question_accuracy("yes", ["yes"], "official2019")
    with pytest.raises(ValueError, match="no ground-truth answers"):
        vqa_question_accuracy("yes", [], "openflamingo")
    with pytest.raises(ValueError, match="question #1: VQA answer #0"):
        vqa_accuracy(["yes", "no"], [["yes"], [{"text": "no"}]])
    with pytest.raises(ValueError, match="2 predictions but 1 answer lists"):
        vqa_accuracy(["yes", "no"], [["yes"]])


# ---------------------------------------------------------------- post-processing

@pytest.mark.parametrize("raw,want", load_vectors("postprocess_vectors.json")["vqa"].items())
def test_postprocess_vqa_vectors(raw, want):
    assert postprocess_vqa_generation(raw) == want


@pytest.mark.parametrize("raw,want", load_vectors("postprocess_vectors.json")["caption"].items())
def test_postprocess_caption_vectors(raw, want):
    assert postprocess_caption_generation(raw) == want


# ---------------------------------------------------------------- ROC AUC, HatefulMemes P(yes), accuracy

ROC_CASES = load_vectors("misc_vectors.json")["roc_auc"]


@pytest.mark.parametrize("case", [c for c in ROC_CASES if c["auc"] is not None], ids=lambda c: c["note"])
def test_roc_auc_vectors(case):
    assert roc_auc(case["y_true"], case["y_score"]) == pytest.approx(case["auc"], abs=1e-12)


@pytest.mark.parametrize("case", [c for c in ROC_CASES if c["auc"] is None], ids=lambda c: c["note"])
def test_roc_auc_single_class_vector_is_undefined(case):
    with pytest.warns(UserWarning, match="Only one class"):
        assert math.isnan(roc_auc(case["y_true"], case["y_score"]))


def _pairwise_auc(labels, scores):
    """P(score_pos > score_neg) + 1/2 P(tie): the Mann-Whitney form of the ROC AUC."""
    pos = [s for y, s in zip(labels, scores) if y == 1]
    neg = [s for y, s in zip(labels, scores) if y == 0]
    wins = sum((p > q) + 0.5 * (p == q) for p, q in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_roc_auc_matches_sklearn_and_pairwise_on_random_data():
    rng = np.random.default_rng(1)
    for _ in range(50):
        n = int(rng.integers(2, 60))
        labels = rng.integers(0, 2, n)
        labels[:2] = [0, 1]
        scores = np.round(rng.random(n), 1)  # coarse scores: many ties
        got = roc_auc(labels.tolist(), scores.tolist())
        assert got == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        assert got == pytest.approx(_pairwise_auc(labels.tolist(), scores.tolist()), abs=1e-12)
        strings = ["yes" if y else "no" for y in labels]  # "yes" is the positive (greater) label
        assert roc_auc(strings, scores.tolist()) == pytest.approx(got, abs=1e-12)


def test_roc_auc_bad_input():
    with pytest.raises(ValueError, match="3 labels but 2 scores"):
        roc_auc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="binary"):
        roc_auc([0, 1, 2], [0.1, 0.2, 0.3])


@pytest.mark.parametrize("case", load_vectors("misc_vectors.json")["of_hateful_memes_score"],
                         ids=lambda c: f"{c['logprob_no']},{c['logprob_yes']}")
def test_hateful_memes_yes_probability_vectors(case):
    p_yes = case["pred_label_score_and_P(yes)"][2]  # the reference ran in float32
    assert yes_probability(case["logprob_no"], case["logprob_yes"]) == pytest.approx(p_yes, abs=1e-6)


def test_top1_and_topk_accuracy():
    assert top1_accuracy(["cat", "dog", "cat", "bird"], ["cat", "cat", "cat", "bird"]) == 0.75
    scores = [[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.3, 0.3, 0.4]]
    # row 0: ranks 1,2,0; row 1: 0,1,2; row 2: 2, then the tie 0 before 1.
    assert topk_accuracy(scores, [2, 0, 1], k=1) == pytest.approx(1 / 3)
    assert topk_accuracy(scores, [2, 0, 1], k=2) == pytest.approx(2 / 3)
    assert topk_accuracy(scores, [2, 0, 1], k=3) == 1.0
    with pytest.raises(ValueError, match="k=4"):
        topk_accuracy(scores, [2, 0, 1], k=4)
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        top1_accuracy(["a", "b"], ["a"])
