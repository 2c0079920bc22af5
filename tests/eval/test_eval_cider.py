"""CIDEr-D and the PTB tokenizer against the reference vectors, pycocoevalcap called directly, and an
independent re-implementation of the CIDEr-D formula (Vedantam et al. 2015, as pycocoevalcap computes it)."""

import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from idefics.eval import metrics
from idefics.eval.metrics import cider_d, ptb_tokenize
from tests.helpers import VECTORS

VECTORS = VECTORS / "cider_vectors.json"
V = json.loads(VECTORS.read_text())
GTS_A = V["three_images_pretokenized"]["gts"]


def independent_cider_d(gts, res, n=4, sigma=6.0):
    """CIDEr-D from its definition: tf-idf n-gram vectors, clipped cosine, Gaussian length penalty."""
    def grams(sentence):
        words = sentence.split()
        return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))

    ids = list(res)
    doc_freq = Counter(g for i in ids for g in set().union(*(grams(r) for r in gts[i])))
    log_n = math.log(len(ids))

    def vectorize(sentence):
        counts = grams(sentence)
        vec = [{g: c * (log_n - math.log(max(1, doc_freq[g]))) for g, c in counts.items() if len(g) == k + 1}
               for k in range(n)]
        bigram_occurrences = sum(c for g, c in counts.items() if len(g) == 2)
        return vec, [math.sqrt(sum(v * v for v in order.values())) for order in vec], bigram_occurrences

    per_image = {}
    for i in ids:
        vh, nh, lh = vectorize(res[i][0])
        total = [0.0] * n
        for ref in gts[i]:
            vr, nr, lr = vectorize(ref)
            for k in range(n):
                val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                total[k] += val * math.exp(-((lh - lr) ** 2) / (2 * sigma**2))
        per_image[i] = 10 * (sum(total) / n) / len(gts[i])
    return sum(per_image.values()) / len(per_image), per_image


@pytest.mark.parametrize("case", ["three_images_pretokenized", "three_images_cand_equals_a_ref"])
def test_pretokenized_vectors(case):
    res = {k: v[0] for k, v in V[case]["res"].items()}
    got = cider_d(GTS_A, res, tokenize=False)
    assert got.score == pytest.approx(V[case]["corpus"], abs=1e-12)
    assert list(got.per_image.values()) == pytest.approx(V[case]["per_image"], abs=1e-12)


def test_empty_and_repeated_candidate_vectors():
    base = {k: v[0] for k, v in V["three_images_pretokenized"]["res"].items()}
    for case, cand in [("empty_candidate_img1", ""), ("repeated_candidate_img1", "a cat on the mat a cat on the mat")]:
        got = cider_d(GTS_A, {**base, "1": cand}, tokenize=False)
        assert got.score == pytest.approx(V[case]["corpus"], abs=1e-12)
        assert list(got.per_image.values()) == pytest.approx(V[case]["per_image"], abs=1e-12)


def test_single_image_corpus_scores_zero():
    # With one image every n-gram has idf log(1) - log(1) = 0 (vector case C).
    got = cider_d({"1": GTS_A["1"]}, {"1": "a cat is on the mat"}, tokenize=False)
    assert (got.score, got.per_image) == (V["single_image_identical_to_ref"]["corpus"], {"1": 0.0})


def test_only_candidate_images_are_scored():
    # Extra reference images are ignored: scoring images 1 and 2 equals scoring a 2-image corpus.
    res = {"1": "a cat on the mat", "2": "a dog runs in the park"}
    got = cider_d(GTS_A, res, tokenize=False)
    want = Cider().compute_score({k: GTS_A[k] for k in res}, {k: [v] for k, v in res.items()})
    assert got.score == pytest.approx(want[0], abs=1e-12)


def test_ptb_pipeline_vector():
    case = V["ptb_pipeline"]
    refs = {k: [c["caption"] for c in v] for k, v in case["raw_gts"].items()}
    cands = {k: v[0]["caption"] for k, v in case["raw_res"].items()}
    assert ptb_tokenize(refs) == case["tokenized_gts"]
    assert ptb_tokenize({k: [c] for k, c in cands.items()}) == case["tokenized_res"]
    got = cider_d(refs, cands)
    assert got.score == pytest.approx(case["corpus"], abs=1e-12)
    assert list(got.per_image.values()) == pytest.approx(case["per_image"], abs=1e-12)


def test_ptb_tricky_vectors():
    tricky = V["ptb_tricky"]
    got = ptb_tokenize({i: [raw] for i, raw in enumerate(tricky)})
    assert [got[i][0] for i in range(len(tricky))] == list(tricky.values())


def _random_corpus(rng, n_images):
    vocab = "a the cat dog man woman red blue sits runs on in park street near with two big small".split()
    sentence = lambda: " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 9)))
    gts = {f"img{i}": [sentence() or "a" for _ in range(rng.randint(1, 5))] for i in range(n_images)}
    return gts, {k: sentence() for k in gts}


def test_random_corpora_match_pycocoevalcap_and_the_formula():
    rng = random.Random(0)
    for trial in range(40):
        gts, res = _random_corpus(rng, rng.randint(1, 8))
        got = cider_d(gts, res, tokenize=False)
        direct_score, direct_scores = Cider().compute_score(gts, {k: [v] for k, v in res.items()})
        indep_score, indep_per_image = independent_cider_d(gts, {k: [v] for k, v in res.items()})
        assert got.score == pytest.approx(direct_score, abs=1e-12)
        assert list(got.per_image.values()) == pytest.approx(list(direct_scores), abs=1e-12)
        assert got.score == pytest.approx(indep_score, abs=1e-9)
        assert got.per_image == pytest.approx(indep_per_image, abs=1e-9)


def test_random_raw_corpus_matches_direct_pycocoevalcap_pipeline():
    rng = random.Random(1)
    gts, res = _random_corpus(rng, 6)
    gts = {k: [s.capitalize() + rng.choice([".", "!", ""]) for s in v] for k, v in gts.items()}
    res = {k: '"' + v + '",' for k, v in res.items()}
    tok = PTBTokenizer()
    want, _ = Cider().compute_score(tok.tokenize({k: [{"caption": c} for c in v] for k, v in gts.items()}),
                                    tok.tokenize({k: [{"caption": c}] for k, c in res.items()}))
    assert cider_d(gts, res).score == pytest.approx(want, abs=1e-12)


def test_missing_java_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="Java runtime"):
        cider_d(GTS_A, {"1": "a cat"})


def test_bad_caption_input_is_named():
    with pytest.raises(ValueError, match="image '9' has no reference captions"):
        cider_d(GTS_A, {"9": "a cat"}, tokenize=False)
    with pytest.raises(ValueError, match="image '1' must be one str"):
        cider_d(GTS_A, {"1": ["a cat"]}, tokenize=False)
    with pytest.raises(ValueError, match="non-empty list"):
        cider_d({"1": []}, {"1": "a cat"}, tokenize=False)
    with pytest.raises(ValueError, match="empty set"):
        cider_d(GTS_A, {}, tokenize=False)
