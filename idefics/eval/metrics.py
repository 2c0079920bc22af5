"""Metrics of the few-shot evaluation protocol: VQA accuracy, CIDEr-D, ROC AUC, top-k accuracy.

The VQA normalisation reproduces the official GT-Vision-Lab evaluation byte for byte, quirks included:
three published variants disagree on edge cases, so the variant is a parameter.
CIDEr-D is pycocoevalcap's own scorer behind its PTB tokenizer (a Java program). ROC AUC is scikit-learn's.
"""

from __future__ import annotations

import math
import re
import shutil
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

VQAVariant = Literal["openflamingo", "official2016", "official2021"]
VQA_VARIANTS: tuple[str, ...] = ("openflamingo", "official2016", "official2021")

# --------------------------------------------------------------------------------------------------
# VQA answer normalisation (tables from the official vqaEval.py; they define the metric)
# --------------------------------------------------------------------------------------------------

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = [
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
]
# The keys with capitals (Im, Ive, Id've, I'dve) can never match because words are lower-cased first, and
# "somebody'd" maps to "somebodyd" (a reversed entry): both are kept because the official scorer has them.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The official pattern is written "(?!<=\d)": a typo for a lookbehind that is really a lookahead for the
# literal "<=". So every "." not followed by a digit goes. The official call passes re.UNICODE (=32) in the
# position of `count`, hence at most 32 periods are removed; we keep both quirks on purpose.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"(?!<=\d)(\.)(?!\d)")
_OFFICIAL_PERIOD_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """The official `processPunctuation`: delete or space out punctuation, then drop periods."""
    out = text
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _PUNCTUATION:
        # The test looks at the ORIGINAL text, not the progressively edited one.
        if (p + " " in text) or (" " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """The official `processDigitArticle`: lower-case, number words to digits, drop articles, contractions."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa_answer(text: str) -> str:
    """Full normalisation (whitespace, punctuation, digits/articles/contractions) as applied to predictions."""
    return process_digit_article(process_punctuation(_clean_whitespace(text)))


# --------------------------------------------------------------------------------------------------
# VQA accuracy
# --------------------------------------------------------------------------------------------------

def _answer_records(answers: Sequence[str | Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Answers as dicts. Plain strings get a distinct `answer_id` each, as VQAv2 annotations have.

    The official scorer removes every GT dict EQUAL to the one left out, so records without `answer_id`
    (the VizWiz files) that are identical are removed together; keeping the records whole keeps that quirk.
    """
    records = []
    for i, a in enumerate(answers):
        if isinstance(a, str):
            records.append({"answer": a, "answer_id": i + 1})
        elif isinstance(a, Mapping) and isinstance(a.get("answer"), str):
            records.append(dict(a))
        else:
            raise ValueError(f"VQA answer #{i} must be a str or a dict with a str 'answer', got {a!r}")
    return records


def vqa_question_accuracy(
    prediction: str, answers: Sequence[str | Mapping[str, Any]], variant: VQAVariant = "openflamingo"
) -> float:
    """Accuracy of one prediction against the annotators' answers, in [0, 1].

    acc = mean over GT datum g of min(1, #{other GT answers equal to the prediction} / 3), after the
    normalisation that `variant` prescribes:
      openflamingo: prediction and GT always fully normalised (what OpenFlamingo publishes);
      official2016: prediction always fully normalised, GT only punctuation-processed and only if the GT
                    answers are not all identical (GT-Vision-Lab/VQA 2016-2021, widely copied);
      official2021: both fully normalised, but only if the GT answers are not all identical (current HEAD).
    """
    if variant not in VQA_VARIANTS:
        raise ValueError(f"unknown VQA accuracy variant {variant!r}; choose one of {VQA_VARIANTS}")
    if not isinstance(prediction, str):
        raise ValueError(f"VQA prediction must be a str, got {type(prediction).__name__}")
    records = _answer_records(answers)
    if not records:
        raise ValueError("VQA question has no ground-truth answers")

    pred = _clean_whitespace(prediction)
    if variant == "official2016":
        pred = normalize_vqa_answer(pred)
        if len({r["answer"] for r in records}) > 1:
            for r in records:
                r["answer"] = process_punctuation(r["answer"])
    else:
        for r in records:
            r["answer"] = _clean_whitespace(r["answer"])
        all_identical = len({r["answer"] for r in records}) == 1
        if variant == "openflamingo" or not all_identical:
            pred = normalize_vqa_answer(pred)
            for r in records:
                r["answer"] = normalize_vqa_answer(r["answer"])

    per_datum = []
    for left_out in records:
        others = [r for r in records if r != left_out]  # dict inequality: equal duplicates go too
        matches = sum(r["answer"] == pred for r in others)
        per_datum.append(min(1.0, matches / 3))
    return sum(per_datum) / len(per_datum)


def vqa_accuracy(
    predictions: Sequence[str],
    answers: Sequence[Sequence[str | Mapping[str, Any]]],
    variant: VQAVariant = "openflamingo",
) -> float:
    """Overall VQA accuracy as the official scorer reports it: a percentage rounded to 2 decimals."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    if not predictions:
        raise ValueError("VQA accuracy of an empty set of predictions is undefined")
    accs = []
    for i, (pred, gts) in enumerate(zip(predictions, answers)):
        try:
            accs.append(vqa_question_accuracy(pred, gts, variant))
        except ValueError as e:
            raise ValueError(f"question #{i}: {e}") from None
    return round(100 * sum(accs) / len(accs), 2)


# --------------------------------------------------------------------------------------------------
# Post-processing of generations (OpenFlamingo's, exactly; no strip: the VQA scorer strips later)
# --------------------------------------------------------------------------------------------------

def postprocess_vqa_generation(text: str) -> str:
    """Cut at the first 'Question'/'Answer'/'Short' (case-sensitive, even mid-word), then at the first ', '."""
    answer = re.split("Question|Answer|Short", text, maxsplit=1)[0]
    return re.split(", ", answer, maxsplit=1)[0]


def postprocess_caption_generation(text: str) -> str:
    """Cut at the first 'Output' (case-sensitive) and remove double quotes."""
    return text.split("Output", 1)[0].replace('"', "")


# --------------------------------------------------------------------------------------------------
# CIDEr-D through pycocoevalcap
# --------------------------------------------------------------------------------------------------

def _require_java() -> None:
    if shutil.which("java") is None:
        raise RuntimeError(
            "CIDEr needs a Java runtime: pycocoevalcap's PTB tokenizer runs the Stanford CoreNLP jar with "
            "`java`, which is not on PATH. Install one (e.g. `apt-get install default-jre-headless`)."
        )


def ptb_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """Tokenise captions exactly as COCO caption evaluation does (lower-cased PTB tokens, punctuation dropped)."""
    _require_java()
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    for key, caps in captions.items():
        if isinstance(caps, str) or not all(isinstance(c, str) for c in caps):
            raise ValueError(f"captions for image {key!r} must be a list of str, got {caps!r}")
    nonempty = {k: [{"caption": c} for c in caps] for k, caps in captions.items() if len(caps) > 0}
    tokenized = PTBTokenizer().tokenize(nonempty) if nonempty else {}
    return {k: tokenized.get(k, []) for k in captions}


@dataclass(frozen=True)
class CiderResult:
    score: float                        # corpus CIDEr-D on pycocoevalcap's scale (OpenFlamingo reports x100)
    per_image: dict[Hashable, float]


def cider_d(
    references: Mapping[Hashable, Sequence[str]],
    candidates: Mapping[Hashable, str],
    tokenize: bool = True,
) -> CiderResult:
    """Corpus CIDEr-D of one candidate caption per image, with pycocoevalcap's `Cider` scorer.

    Only the images present in `candidates` are scored (as COCOEvalCap with params["image_id"] set to the
    result ids): the idf is computed over those images, so the score depends on which images are evaluated.
    With `tokenize=True` both sides go through the PTB tokenizer first (needs Java).
    """
    from pycocoevalcap.cider.cider import Cider

    if not candidates:
        raise ValueError("CIDEr of an empty set of candidates is undefined")
    for image_id, cand in candidates.items():
        if image_id not in references:
            raise ValueError(f"candidate for image {image_id!r} has no reference captions")
        if not isinstance(cand, str):
            raise ValueError(f"candidate for image {image_id!r} must be one str, got {cand!r}")
        refs = references[image_id]
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"references for image {image_id!r} must be a non-empty list of str, got {refs!r}")
    ids = list(candidates)
    gts = {i: list(references[i]) for i in ids}
    res = {i: [candidates[i]] for i in ids}
    if tokenize:
        gts, res = ptb_tokenize(gts), ptb_tokenize(res)
    score, scores = Cider().compute_score(gts, res)
    return CiderResult(float(score), {i: float(s) for i, s in zip(gts.keys(), scores)})


# --------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------

def roc_auc(labels: Sequence[Any], scores: Sequence[float]) -> float:
    """Area under the ROC curve (scikit-learn). The positive class is the greater label ("yes" > "no", 1 > 0).

    With a single class in `labels` the AUC is undefined: warns and returns nan (as scikit-learn >= 1.6 does).
    """
    from sklearn.metrics import roc_auc_score

    if len(labels) != len(scores):
        raise ValueError(f"{len(labels)} labels but {len(scores)} scores")
    if len(set(labels)) > 2:
        raise ValueError(f"ROC AUC needs binary labels, got classes {sorted(set(labels))!r}")
    if len(set(labels)) < 2:
        warnings.warn("Only one class is present in the labels: ROC AUC is not defined; returning nan",
                      stacklevel=2)
        return float("nan")
    return float(roc_auc_score(list(labels), np.asarray(scores, dtype=np.float64)))


def yes_probability(logprob_no: float, logprob_yes: float) -> float:
    """P("yes") from the class log-likelihoods, as OpenFlamingo's HatefulMemes scorer obtains it.

    OpenFlamingo takes the winning class's softmax score and flips it when "no" wins; either way this is
    the softmax probability of "yes" over {"no", "yes"}.
    """
    m = max(logprob_no, logprob_yes)
    return math.exp(logprob_yes - m) / (math.exp(logprob_no - m) + math.exp(logprob_yes - m))


def top1_accuracy(predictions: Sequence[Any], labels: Sequence[Any]) -> float:
    """Fraction of predictions equal to their label, in [0, 1] (OpenFlamingo's ImageNet unit)."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not labels:
        raise ValueError("accuracy of an empty set is undefined")
    return sum(p == y for p, y in zip(predictions, labels)) / len(labels)


def topk_accuracy(class_scores: np.ndarray | Sequence[Sequence[float]], labels: Sequence[int], k: int = 1) -> float:
    """Fraction of rows whose label index is among the k highest scores (ties broken by lower index)."""
    scores = np.asarray(class_scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] != len(labels):
        raise ValueError(f"class_scores must be [n_samples={len(labels)}, n_classes], got shape {scores.shape}")
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k={k} must be between 1 and the number of classes {scores.shape[1]}")
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean([label in row for label, row in zip(labels, order)]))
