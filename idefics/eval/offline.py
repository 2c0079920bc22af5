"""Offline evaluation tasks built from the synthetic idefics-mini data (`idefics data make-mini DIR`), so the
whole harness runs end to end without downloads (CI, quick checks of a retrained idefics-mini).

    mini-vqa            open-ended scene and reading questions (VQA accuracy, 3 beams, 5 new tokens)
    mini-vqa-colour     ... only "What colour is the star?" questions; likewise -shape, -count, -position,
                        -reading (the words and numbers of word images)
    mini-digits         handwritten digit recognition, ranked over the class names "0".."9" (top-1 accuracy)

Questions come from the ground truth of the chat samples (`meta.qa`: question_type, question, answer, image),
digits from the digit pairs (`meta.digit`); images stay PNG bytes from the shards. The evaluation split is
`DIR/test`, demonstrations come from `DIR/val` (or `DIR/train` if there is no val split).

A question has one true answer. VQA accuracy needs 10 annotator answers, so the answer is given 10 times:
then a prediction scores 100 if it equals the answer after the VQA normalisation, else 0.
"""

from __future__ import annotations

from pathlib import Path

from idefics.eval.annotations import AnnotationError, EvalSplit, OnError, EvalSample, _Problems
from idefics.eval.tasks import CLASSIFICATION_TEMPLATE, VQA_TEMPLATE, TaskSpec

VQA_ANNOTATORS = 10
QUESTION_TYPES: dict[str, tuple[str, ...]] = {
    "mini-vqa": ("colour", "shape", "count", "position", "read"),
    "mini-vqa-colour": ("colour",),
    "mini-vqa-shape": ("shape",),
    "mini-vqa-count": ("count",),
    "mini-vqa-position": ("position",),
    "mini-vqa-reading": ("read",),
}
DIGIT_CLASSES = tuple(str(d) for d in range(10))

MINI_TASKS: dict[str, TaskSpec] = {
    **{name: TaskSpec(name, "vqa", "vqa_accuracy", VQA_TEMPLATE, max_new_tokens=5) for name in QUESTION_TYPES},
    "mini-digits": TaskSpec("mini-digits", "classification", "top1_accuracy", CLASSIFICATION_TEMPLATE),
}


def is_mini_task(name: str) -> bool:
    return name in MINI_TASKS


def support_split_name(data_dir: str | Path) -> str:
    """Demonstrations come from val (same distribution as train, small), else from train."""
    data_dir = Path(data_dir)
    for split in ("val", "train"):
        if (data_dir / split).is_dir():
            return split
    raise AnnotationError(f"{data_dir}: no val/ or train/ split to draw demonstrations from "
                          "(make it with `idefics data make-mini DIR`)")


def load_mini_split(task: str, data_dir: str | Path, split: str, *, on_error: OnError = "raise") -> EvalSplit:
    """The samples of a mini task in one split of a synthetic data folder (see the module docstring).

    Bad data (an unreadable shard, a sample without the ground truth the task needs) is reported with the
    shard file and the sample key; on_error="skip" drops it and goes on."""
    from idefics.data.shards import DataError, ShardReader

    if task not in MINI_TASKS:
        raise ValueError(f"unknown offline task {task!r}; known: {', '.join(sorted(MINI_TASKS))}")
    split_dir = Path(data_dir) / split
    source = "digit_pairs" if task == "mini-digits" else "chat"
    shards = sorted(split_dir.glob(f"{source}-*.tar"))
    if not shards:
        raise AnnotationError(f"{split_dir}: no {source}-*.tar shards (is this an idefics-mini data folder? "
                              "make one with `idefics data make-mini DIR`)")
    problem = _Problems(on_error, split_dir)
    # The reader itself reports unreadable data naming the shard and the key: it raises, or logs and skips.
    # Every process reads the whole split (rank 0 of 1): the runner shares out the queries itself.
    reader = ShardReader([str(s) for s in shards], on_error=on_error, decode_images=False, rank=0, world_size=1)
    samples: list[EvalSample] = []
    try:
        for record in reader:
            where = f"{record.shard}: sample {record.key!r}"
            if task == "mini-digits":
                samples += _digit_samples(record, where, problem)
            else:
                samples += _question_samples(record, where, QUESTION_TYPES[task], problem)
    except DataError as error:
        raise AnnotationError(str(error)) from None
    if reader.errors:
        problem.messages.append(f"{split_dir}: skipped unreadable samples {dict(reader.errors)} (see the log)")
    return problem.finish(samples, DIGIT_CLASSES if task == "mini-digits" else ())


def _digit_samples(record, where: str, problem: _Problems) -> list[EvalSample]:
    digit = record.meta.get("digit")
    if record.meta.get("task") != "digit":
        return []
    if not isinstance(digit, int) or isinstance(digit, bool) or not 0 <= digit <= 9:
        problem(where, f"meta.digit must be an int 0-9, got {digit!r}")
        return []
    images = record.images
    if len(images) != 1:
        problem(where, f"a digit pair needs one image, got {len(images)}")
        return []
    return [EvalSample(record.key, images[0], {}, (), str(digit))]


def _question_samples(record, where: str, types: tuple[str, ...], problem: _Problems) -> list[EvalSample]:
    qa = record.meta.get("qa")
    if not isinstance(qa, list):
        problem(where, "a chat sample needs meta.qa, a list of {question_type, question, answer, image}")
        return []
    images, out = record.images, []
    for j, item in enumerate(qa):
        if not isinstance(item, dict) or item.get("question_type") not in types:
            continue
        question, answer, index = item.get("question"), item.get("answer"), item.get("image")
        if not isinstance(question, str) or not isinstance(answer, str) or not answer.strip():
            problem(f"{where} qa[{j}]", "question without a str question and a non-empty str answer")
            continue
        if not isinstance(index, int) or not 0 <= index < len(images):
            problem(f"{where} qa[{j}]", f"image index {index!r} is not one of the sample's {len(images)} images")
            continue
        out.append(EvalSample(f"{record.key}/{j}", images[index], {"question": question},
                          (answer,) * VQA_ANNOTATORS))
    return out
