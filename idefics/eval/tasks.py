"""Evaluation task families: prompt templates, decoding settings, data loading and scoring per task.

Templates and decoding follow the only public executable reference of the Flamingo protocol, OpenFlamingo's
harness. IDEFICS's own harness strings are not public. The end-of-demonstration marker
("<|endofchunk|>" in OpenFlamingo) is a parameter of the template, since IDEFICS tokenizers have no such token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from idefics.eval.annotations import (
    EvalSplit,
    OnError,
    EvalSample,
    load_coco_captions,
    load_hateful_memes,
    load_image_folder,
    load_karpathy_captions,
    load_vqa,
    read_annotation_json,
)
from idefics.eval.metrics import (
    VQAVariant,
    cider_d,
    postprocess_caption_generation,
    postprocess_vqa_generation,
    roc_auc,
    top1_accuracy,
    vqa_accuracy,
)

Family = Literal["vqa", "caption", "classification"]
Metric = Literal["vqa_accuracy", "cider", "roc_auc", "top1_accuracy"]
OPENFLAMINGO_END_OF_CHUNK = "<|endofchunk|>"


@dataclass(frozen=True)
class PromptTemplate:
    """The text that follows each image: `pattern` is formatted with the sample's fields and {answer}.

    A demonstration is pattern(answer) + end_of_chunk + demo_separator; the query is pattern(answer="")
    and is where generation (or the class-name continuation) starts.
    """

    pattern: str
    demo_separator: str  # "\n" after open-ended demonstrations, "" between classification ones
    answer_from: Literal["reference", "label"]
    end_of_chunk: str = OPENFLAMINGO_END_OF_CHUNK

    def _format(self, sample: EvalSample, answer: str) -> str:
        try:
            return self.pattern.format(**sample.fields, answer=answer)
        except KeyError as e:
            raise ValueError(f"sample {sample.id!r} has no field {e} needed by the prompt {self.pattern!r}") from None

    def demo_answer(self, sample: EvalSample) -> str:
        """The answer a demonstration shows: the first reference (stripped) or the class label."""
        if self.answer_from == "label":
            if sample.label is None:
                raise ValueError(f"demonstration {sample.id!r} has no label")
            return sample.label
        if not sample.references:
            raise ValueError(f"demonstration {sample.id!r} has no reference answer/caption")
        return sample.references[0].strip()

    def demo_text(self, sample: EvalSample) -> str:
        return self._format(sample, self.demo_answer(sample)) + self.end_of_chunk + self.demo_separator

    def query_text(self, sample: EvalSample) -> str:
        return self._format(sample, "")

    def with_end_of_chunk(self, marker: str) -> PromptTemplate:
        return dataclasses.replace(self, end_of_chunk=marker)


# No space after "Question:" / "Output:", exactly as OpenFlamingo's EvalModel builds them.
VQA_TEMPLATE = PromptTemplate("Question:{question} Short answer:{answer}", "\n", "reference")
CAPTION_TEMPLATE = PromptTemplate("Output:{answer}", "\n", "reference")
CLASSIFICATION_TEMPLATE = PromptTemplate("Output:{answer}", "", "label")
HATEFUL_MEMES_TEMPLATE = PromptTemplate(
    "is an image with: '{text}' written on it. Is it hateful? Answer:{answer}", "", "label"
)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    family: Family
    metric: Metric
    template: PromptTemplate
    max_new_tokens: int = 0  # generation budget (open-ended tasks)
    num_beams: int = 3
    length_penalty: float = 0.0  # reference harness: raw summed log-prob ranks the beams
    vqa_image_name: str = ""  # file-name pattern for load_vqa

    def postprocess(self, generation: str) -> str:
        """Cut a raw generation down to the answer/caption, as the reference harness does."""
        if self.family == "vqa":
            return postprocess_vqa_generation(generation)
        if self.family == "caption":
            return postprocess_caption_generation(generation)
        raise ValueError(f"task {self.name!r} is scored by log-likelihood, not by generation")


_COCO_NAME = "COCO_{split}_{image_id:012d}.jpg"
TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec("vqav2", "vqa", "vqa_accuracy", VQA_TEMPLATE, max_new_tokens=5, vqa_image_name=_COCO_NAME),
        # OK-VQA: the reference harness also stems answers with nltk (not available offline): not done here.
        TaskSpec("okvqa", "vqa", "vqa_accuracy", VQA_TEMPLATE, max_new_tokens=5, vqa_image_name=_COCO_NAME),
        TaskSpec("textvqa", "vqa", "vqa_accuracy", VQA_TEMPLATE, max_new_tokens=10, vqa_image_name="{image_id}.jpg"),
        TaskSpec("vizwiz", "vqa", "vqa_accuracy", VQA_TEMPLATE, max_new_tokens=5, vqa_image_name="{image_id}"),
        TaskSpec("coco", "caption", "cider", CAPTION_TEMPLATE, max_new_tokens=20),
        TaskSpec("flickr30k", "caption", "cider", CAPTION_TEMPLATE, max_new_tokens=20),
        TaskSpec("nocaps", "caption", "cider", CAPTION_TEMPLATE, max_new_tokens=20),
        TaskSpec("textcaps", "caption", "cider", CAPTION_TEMPLATE, max_new_tokens=20),
        TaskSpec("imagenet", "classification", "top1_accuracy", CLASSIFICATION_TEMPLATE),
        # RenderedSST2 has no reference-harness prompt: it reuses the ImageNet one with "positive"/"negative".
        TaskSpec("rendered_sst2", "classification", "top1_accuracy", CLASSIFICATION_TEMPLATE),
        TaskSpec("hateful_memes", "classification", "roc_auc", HATEFUL_MEMES_TEMPLATE),
    ]
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def load_task_split(
    task: str | TaskSpec,
    *,
    images: str | Path,
    annotations: str | Path | None = None,
    questions: str | Path | None = None,
    split: str = "test",
    class_list: str | Path | None = None,
    on_error: OnError = "raise",
    check_images: bool = True,
) -> EvalSplit:
    """Load one split of a task from the files the user downloaded.

    vqa: `questions` + `annotations` (VQA layout), or only `annotations` holding questions with answers;
    caption: `annotations` is Karpathy-style (has "sentences") or COCO-style (has "annotations"), and
             `split` picks the Karpathy split ("train" for the support set, "test" to evaluate);
    imagenet / rendered_sst2: `images` is the folder with one sub-folder per class, `class_list` optional;
    hateful_memes: `annotations` is the jsonl, `images` the folder the "img" paths are relative to.
    """
    spec = get_task(task) if isinstance(task, str) else task
    if annotations is None and (spec.family != "classification" or spec.name == "hateful_memes"):
        raise ValueError(f"task {spec.name!r} needs an annotation file (annotations=...)")
    if spec.family == "vqa":
        if questions is None:
            return load_vqa(annotations, None, images, spec.vqa_image_name, on_error=on_error,
                            check_images=check_images)
        return load_vqa(questions, annotations, images, spec.vqa_image_name, on_error=on_error,
                        check_images=check_images)
    if spec.family == "caption":
        if _is_karpathy(Path(annotations)):
            return load_karpathy_captions(annotations, images, split, on_error=on_error, check_images=check_images)
        return load_coco_captions(annotations, images, on_error=on_error, check_images=check_images)
    if spec.name == "hateful_memes":
        return load_hateful_memes(annotations, images, on_error=on_error, check_images=check_images)
    return load_image_folder(images, class_list, on_error=on_error)


def _is_karpathy(path: Path) -> bool:
    data = read_annotation_json(path)
    images = data.get("images") if isinstance(data, dict) else None
    return bool(images) and isinstance(images[0], dict) and "sentences" in images[0]


def score_predictions(
    task: str | TaskSpec,
    samples: Sequence[EvalSample],
    predictions: Sequence[Any],
    *,
    vqa_variant: VQAVariant = "openflamingo",
    postprocess: bool = True,
) -> float:
    """Score one run in the unit the reference harness reports.

    predictions, per sample: the raw generated text (vqa, caption; post-processed here unless
    postprocess=False); P("yes") (hateful_memes); the predicted class name (imagenet, rendered_sst2).
    Units: VQA accuracy in % (2 decimals), CIDEr x100, ROC AUC and top-1 accuracy in [0, 1].
    """
    spec = get_task(task) if isinstance(task, str) else task
    if len(samples) != len(predictions):
        raise ValueError(f"{len(samples)} samples but {len(predictions)} predictions")
    if spec.family in ("vqa", "caption") and postprocess:
        predictions = [spec.postprocess(p) for p in predictions]
    if spec.metric == "vqa_accuracy":
        return vqa_accuracy(predictions, [s.answer_records or s.references for s in samples], vqa_variant)
    if spec.metric == "cider":
        ids = [s.id for s in samples]
        if len(set(ids)) != len(ids):
            raise ValueError("CIDEr needs one prediction per image, but sample ids repeat")
        refs = {s.id: list(s.references) for s in samples}
        return 100 * cider_d(refs, dict(zip(ids, predictions))).score
    labels = [s.label for s in samples]
    if spec.metric == "roc_auc":
        return roc_auc(labels, [float(p) for p in predictions])
    return top1_accuracy(list(predictions), labels)
