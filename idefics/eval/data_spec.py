"""What `idefics eval --data PATH` points at, turned into the evaluation and support splits of a task.

For the offline tasks (mini-*), PATH is a synthetic data folder (`idefics data make-mini DIR`).
For the standard tasks, PATH is a small JSON file naming the files the user downloaded; relative paths are
relative to the JSON file. One task:

    {"eval":    {"images": "val2014", "questions": "v2_OpenEnded_mscoco_val2014_questions.json",
                 "annotations": "v2_mscoco_val2014_annotations.json"},
     "support": {"images": "train2014", "questions": "v2_OpenEnded_mscoco_train2014_questions.json",
                 "annotations": "v2_mscoco_train2014_annotations.json"}}

or several, keyed by task name: {"vqav2": {"eval": ..., "support": ...}, "coco": {...}}.
Keys of a part: images, annotations, questions, class_list, split (Karpathy captions: "test" / "train", the
defaults of eval / support). The support part inherits the eval part's keys it does not set, so Karpathy
captions need only {"support": {"split": "train"}}; a support set equal to the evaluation set is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from idefics.eval.annotations import AnnotationError, EvalSplit, OnError, read_annotation_json
from idefics.eval.offline import MINI_TASKS, load_mini_split, support_split_name
from idefics.eval.tasks import TaskSpec, get_task, load_task_split

PART_KEYS = ("images", "annotations", "questions", "class_list", "split")
PATH_KEYS = ("images", "annotations", "questions", "class_list")


@dataclass
class TaskData:
    spec: TaskSpec
    eval: EvalSplit
    support: EvalSplit
    problems: list[str] = field(default_factory=list)  # bad input skipped while loading (on_error="skip")


def resolve_task(name: str) -> TaskSpec:
    return MINI_TASKS[name] if name in MINI_TASKS else get_task(name)


def load_task_data(task: str, data: str | Path, on_error: OnError = "raise") -> TaskData:
    """The evaluation split and the support split (demonstrations) of `task` from `data`."""
    spec, data = resolve_task(task), Path(data)
    if task in MINI_TASKS:
        if not data.is_dir():
            raise AnnotationError(f"{data}: task {task} needs a synthetic data folder (idefics data make-mini DIR)")
        eval_split = load_mini_split(task, data, "test", on_error=on_error)
        support = load_mini_split(task, data, support_split_name(data), on_error=on_error)
    else:
        eval_part, support_part = read_data_spec(data, task)
        if _same_files(eval_part, support_part):
            raise AnnotationError(f"{data}: task {task}: the support set (demonstrations) is the evaluation set; "
                                  "give a 'support' part with the training files")
        eval_split = load_task_split(spec, **eval_part, on_error=on_error)
        support = load_task_split(spec, **support_part, on_error=on_error)
    if len(eval_split) == 0:
        raise AnnotationError(f"{data}: task {task} has no evaluation samples")
    if len(support) < 2:
        raise AnnotationError(f"{data}: task {task} needs at least 2 support samples for demonstrations, "
                              f"got {len(support)}")
    problems = [f"eval: {m}" for m in eval_split.skipped] + [f"support: {m}" for m in support.skipped]
    return TaskData(spec, eval_split, support, problems)


def read_data_spec(path: str | Path, task: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(eval keyword arguments, support keyword arguments) for `load_task_split`, paths made absolute."""
    path = Path(path)
    if path.is_dir():
        raise AnnotationError(f"{path}: task {task} needs --data to be a JSON file naming its annotation and "
                              "image files (see `idefics eval --help`)")
    doc = read_annotation_json(path)
    if isinstance(doc, dict) and "eval" not in doc and task in doc:
        doc = doc[task]
    if not isinstance(doc, dict) or not isinstance(doc.get("eval"), dict):
        raise AnnotationError(f"{path}: expected {{\"eval\": {{...}}, \"support\": {{...}}}} or such an object "
                              f"under the task name {task!r}")
    support = doc.get("support", {})
    if not isinstance(support, dict):
        raise AnnotationError(f"{path}: task {task}: 'support' must be an object")
    eval_part = _part(doc["eval"], path, task, "eval", {"split": "test"})
    support_part = _part({**{k: v for k, v in doc["eval"].items() if k != "split"}, **support}, path, task,
                         "support", {"split": "train"})
    return eval_part, support_part


def _part(raw: dict, path: Path, task: str, name: str, defaults: dict[str, str]) -> dict[str, Any]:
    unknown = sorted(set(raw) - set(PART_KEYS))
    if unknown:
        raise AnnotationError(f"{path}: task {task}: unknown key(s) {unknown} in '{name}'; "
                              f"allowed: {', '.join(PART_KEYS)}")
    for key, value in raw.items():
        if not isinstance(value, str):
            raise AnnotationError(f"{path}: task {task}: '{name}.{key}' must be a string, got {value!r}")
    if "images" not in raw:
        raise AnnotationError(f"{path}: task {task}: '{name}' needs 'images' (the image folder)")
    part = {**defaults, **raw}
    for key in PATH_KEYS:
        if key in part:
            part[key] = (path.parent / part[key]).resolve()
    return part


def _same_files(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in PART_KEYS)
