"""Readers for the annotation formats of the evaluation datasets, which users download themselves.

Every reader returns an `EvalSplit` of uniform `EvalSample`s. Bad input (missing image, malformed record, a
question without answers...) is reported with the file and the line or JSON item. With on_error="raise" the
first problem stops loading with an `AnnotationError`; with on_error="skip" the bad samples are dropped, each
problem is logged, and one warning gives the count. A file that cannot be read or parsed at all always raises.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class AnnotationError(ValueError):
    """Bad evaluation data. The message starts with the file and the line or item at fault."""


@dataclass(frozen=True)
class EvalSample:
    id: str
    image: Path
    fields: Mapping[str, str] = field(default_factory=dict)  # prompt-template fields: "question", "text"
    references: tuple[str, ...] = ()  # VQA answers (annotator order) or reference captions
    label: str | None = None  # class name, for classification
    answer_records: tuple[Mapping[str, Any], ...] = ()  # VQA: whole records, the metric depends on them


@dataclass
class EvalSplit:
    samples: list[EvalSample]
    class_names: tuple[str, ...] = ()  # candidate labels, for classification
    skipped: list[str] = field(default_factory=list)  # problems that were skipped (on_error="skip")

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[EvalSample]:
        return iter(self.samples)

    def __getitem__(self, i: int) -> EvalSample:
        return self.samples[i]


class _Problems:
    """Collects bad-input reports for one load, raising or counting according to on_error."""

    def __init__(self, on_error: OnError, source: Path):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error, self.source, self.messages = on_error, source, []

    def __call__(self, where: str, message: str) -> None:
        text = f"{where}: {message}"
        if self.on_error == "raise":
            raise AnnotationError(text)
        logger.warning("skipping bad sample: %s", text)
        self.messages.append(text)

    def finish(self, samples: list[EvalSample], class_names: tuple[str, ...] = ()) -> EvalSplit:
        if self.messages:
            warnings.warn(f"{self.source}: skipped {len(self.messages)} bad sample(s), kept {len(samples)}; "
                          f"first problem: {self.messages[0]}", stacklevel=3)
        return EvalSplit(samples, class_names, self.messages)


def read_annotation_json(path: str | Path) -> Any:
    """Parse a JSON file; a missing, undecodable or malformed file raises AnnotationError naming file:line:col."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise AnnotationError(f"{path}: annotation file not found") from None
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _list_under(data: Any, key: str, path: Path) -> list:
    items = data.get(key) if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise AnnotationError(f"{path}: expected a JSON object with a list under {key!r}")
    return items


def _image_ok(image: Path, where: str, problem: _Problems, check: bool) -> bool:
    if check and not image.is_file():
        problem(where, f"image file not found: {image}")
        return False
    return True


def _require(record: Any, keys: Mapping[str, type | tuple[type, ...]]) -> str | None:
    """Why `record` lacks one of `keys` with the right type, or None if it is fine."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    for key, kind in keys.items():
        if key not in record:
            return f"missing key {key!r}"
        if not isinstance(record[key], kind) or isinstance(record[key], bool):
            return f"key {key!r} has the wrong type ({type(record[key]).__name__})"
    return None


# --------------------------------------------------------------------------------------------------
# Open-ended VQA
# --------------------------------------------------------------------------------------------------

def _answers_of(record: dict) -> tuple[tuple[str, ...], tuple[dict, ...]] | str:
    """(answer texts, answer records) of a VQA record, or why they are unusable."""
    raw = record.get("answers")
    if not isinstance(raw, list) or not raw:
        return "question without answers"
    recs = [{"answer": a} if isinstance(a, str) else a for a in raw]  # TextVQA lists plain strings
    for j, a in enumerate(recs):
        if not isinstance(a, dict) or not isinstance(a.get("answer"), str):
            return f"answers[{j}] is not an answer string or a record with a str 'answer'"
    return tuple(a["answer"] for a in recs), tuple(recs)


def load_vqa(
    questions_file: str | Path,
    annotations_file: str | Path | None,
    image_dir: str | Path,
    image_name: str = "COCO_{split}_{image_id:012d}.jpg",
    *,
    on_error: OnError = "raise",
    check_images: bool = True,
) -> EvalSplit:
    """Open-ended VQA samples (VQAv2, OK-VQA, TextVQA, VizWiz).

    Two layouts are read:
      - the VQA layout: `questions_file` {"questions": [{question_id, image_id, question}]} and
        `annotations_file` {"annotations": [{question_id, answers: [{answer, answer_id, ...}]}]},
        matched by question_id (the reference harness matches by position, the same for well-formed files);
      - a single file (annotations_file=None) whose records carry their answers: TextVQA's
        {"data": [{question_id, image_id, question, answers: [str]}]} or VizWiz's
        [{image, question, answers: [{answer, answer_confidence}]}].
    `image_name` is formatted with the record's image_id (VizWiz: its "image") and split=image_dir.name:
    VQAv2/OK-VQA "COCO_{split}_{image_id:012d}.jpg", TextVQA "{image_id}.jpg", VizWiz "{image_id}".
    """
    questions_file, image_dir = Path(questions_file), Path(image_dir)
    problem = _Problems(on_error, questions_file)
    data = read_annotation_json(questions_file)
    if annotations_file is None:
        questions = data if isinstance(data, list) else _list_under(data, "data", questions_file)
        qkey, by_qid, afile = ("" if isinstance(data, list) else "data"), None, questions_file
    else:
        questions, qkey = _list_under(data, "questions", questions_file), "questions"
        afile = Path(annotations_file)
        by_qid = {}
        for j, ann in enumerate(_list_under(read_annotation_json(afile), "annotations", afile)):
            why = _require(ann, {"question_id": (int, str)})
            if why is None and ann["question_id"] in by_qid:
                first = by_qid[ann["question_id"]][0]
                why = f"duplicate question_id {ann['question_id']!r} (first at annotations[{first}])"
            if why:
                problem(f"{afile}: annotations[{j}]", why)
                continue
            by_qid[ann["question_id"]] = (j, ann)

    samples = []
    for i, q in enumerate(questions):
        where = f"{questions_file}: {qkey}[{i}]"
        image_key = "image" if isinstance(q, dict) and "image" in q and "image_id" not in q else "image_id"
        required = {"question": str, image_key: (int, str)}
        if by_qid is not None:
            required["question_id"] = (int, str)  # the key that links a question to its answers
        why = _require(q, required)
        if why:
            problem(where, why)
            continue
        qid = q.get("question_id", Path(str(q[image_key])).stem)
        where = f"{where} (question_id={qid})"
        if by_qid is None:
            answer_record, answer_where = q, where
        elif qid in by_qid:
            j, answer_record = by_qid[qid]
            answer_where = f"{afile}: annotations[{j}] (question_id={qid})"
        else:
            problem(where, f"question without answers: no annotation with this question_id in {afile}")
            continue
        answers = _answers_of(answer_record)
        if isinstance(answers, str):
            problem(answer_where, answers)
            continue
        try:
            image = image_dir / image_name.format(image_id=q[image_key], split=image_dir.name)
        except (ValueError, KeyError, IndexError) as e:
            problem(where, f"cannot build the image file name from {image_name!r} and "
                           f"image_id={q[image_key]!r}: {e}")
            continue
        if _image_ok(image, where, problem, check_images):
            texts, records = answers
            samples.append(EvalSample(str(qid), image, {"question": q["question"]}, texts, None, records))
    return problem.finish(samples)


# --------------------------------------------------------------------------------------------------
# Captioning
# --------------------------------------------------------------------------------------------------

def load_karpathy_captions(
    karpathy_file: str | Path,
    image_dir: str | Path,
    split: str,
    *,
    on_error: OnError = "raise",
    check_images: bool = True,
) -> EvalSplit:
    """Caption samples of one split ("train" = support set, "test" = evaluation) of a Karpathy-style JSON
    {"images": [{filename, split, sentences: [{raw}], filepath?, cocoid?}]} (COCO, Flickr30k, ...).

    The image is image_dir/filepath/filename when "filepath" is present (COCO), else image_dir/filename.
    The sample id is the cocoid when present, else the file-name stem (as the reference harness does).
    """
    karpathy_file, image_dir = Path(karpathy_file), Path(image_dir)
    problem = _Problems(on_error, karpathy_file)
    samples = []
    for i, item in enumerate(_list_under(read_annotation_json(karpathy_file), "images", karpathy_file)):
        where = f"{karpathy_file}: images[{i}]"
        why = _require(item, {"filename": str, "split": str, "sentences": list})
        if why:
            problem(where, why)
            continue
        if item["split"] != split:
            continue
        sentences = item["sentences"]
        if not sentences or not all(isinstance(s, dict) and isinstance(s.get("raw"), str) for s in sentences):
            problem(where, "image without captions: 'sentences' must be a non-empty list of {'raw': str}")
            continue
        image = image_dir / item.get("filepath", "") / item["filename"]
        sample_id = str(item["cocoid"]) if "cocoid" in item else Path(item["filename"]).stem
        if _image_ok(image, where, problem, check_images):
            samples.append(EvalSample(sample_id, image, {}, tuple(s["raw"] for s in sentences)))
    return problem.finish(samples)


def load_coco_captions(
    captions_file: str | Path,
    image_dir: str | Path,
    *,
    on_error: OnError = "raise",
    check_images: bool = True,
) -> EvalSplit:
    """Caption samples of a COCO-format file {"images": [{id, file_name}], "annotations": [{image_id,
    caption}]} (COCO captions_*.json, NoCaps). Captions keep the file's order per image."""
    captions_file, image_dir = Path(captions_file), Path(image_dir)
    problem = _Problems(on_error, captions_file)
    data = read_annotation_json(captions_file)
    captions: dict[Any, list[str]] = {}
    for j, ann in enumerate(_list_under(data, "annotations", captions_file)):
        why = _require(ann, {"image_id": (int, str), "caption": str})
        if why:
            problem(f"{captions_file}: annotations[{j}]", why)
            continue
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
    samples = []
    for i, img in enumerate(_list_under(data, "images", captions_file)):
        where = f"{captions_file}: images[{i}]"
        why = _require(img, {"id": (int, str), "file_name": str})
        if why:
            problem(where, why)
            continue
        if img["id"] not in captions:
            problem(f"{where} (id={img['id']})", "image without captions")
            continue
        image = image_dir / img["file_name"]
        if _image_ok(image, where, problem, check_images):
            samples.append(EvalSample(str(img["id"]), image, {}, tuple(captions[img["id"]])))
    return problem.finish(samples)


# --------------------------------------------------------------------------------------------------
# Closed-set classification
# --------------------------------------------------------------------------------------------------

def read_class_list(class_list_file: str | Path) -> list[tuple[str, str, int]]:
    """(folder, class name, line number) per line of "<folder> <class name>"; a line with only a folder
    name uses it as the class name. Blank lines and lines starting with '#' are ignored."""
    path = Path(class_list_file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise AnnotationError(f"{path}: class list file not found") from None
    entries, seen_folders, seen_names = [], {}, {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.strip().split(maxsplit=1)
        folder, name = parts[0], (parts[1].strip() if len(parts) > 1 else parts[0])
        for key, seen, what in ((folder, seen_folders, "folder"), (name, seen_names, "class name")):
            if key in seen:
                raise AnnotationError(f"{path}:{lineno}: duplicate {what} {key!r} (first on line {seen[key]})")
            seen[key] = lineno
        entries.append((folder, name, lineno))
    if not entries:
        raise AnnotationError(f"{path}: the class list is empty")
    return entries


def load_image_folder(
    root: str | Path,
    class_list_file: str | Path | None = None,
    *,
    on_error: OnError = "raise",
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
) -> EvalSplit:
    """Classification samples from one folder per class (ImageNet, RenderedSST2): root/<folder>/<image>.

    Class names come from `class_list_file` (see `read_class_list`) or, without one, are the sorted folder
    names. A listed class without a folder, or a folder that is not listed, is a problem to report.
    """
    root = Path(root)
    if not root.is_dir():
        raise AnnotationError(f"{root}: image folder not found")
    problem = _Problems(on_error, Path(class_list_file) if class_list_file else root)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if class_list_file is None:
        entries = [(f, f, 0) for f in folders]
    else:
        entries = read_class_list(class_list_file)
        listed = {folder for folder, _, _ in entries}
        for folder in folders:
            if folder not in listed:
                problem(f"{root / folder}", f"folder is not in the class list {class_list_file}")
    if not entries:
        raise AnnotationError(f"{root}: no class folders found")
    samples = []
    for folder, name, lineno in entries:
        class_dir = root / folder
        if not class_dir.is_dir():
            problem(f"{class_list_file}:{lineno}", f"class folder not found: {class_dir}")
            continue
        for image in sorted(class_dir.iterdir()):
            if image.is_file() and image.suffix.lower() in extensions:
                samples.append(EvalSample(f"{folder}/{image.name}", image, {}, (), name))
    return problem.finish(samples, tuple(name for _, name, _ in entries))


def load_hateful_memes(
    jsonl_file: str | Path,
    image_dir: str | Path,
    *,
    on_error: OnError = "raise",
    check_images: bool = True,
) -> EvalSplit:
    """HatefulMemes samples from its jsonl ({"id", "img", "text", "label": 0|1} per line).

    Labels become "no"/"yes" (1 = hateful = "yes"). The image is image_dir/img (img is "img/123.png" in
    the release), or image_dir/<file name of img> when image_dir is the img folder itself.
    """
    jsonl_file, image_dir = Path(jsonl_file), Path(image_dir)
    problem = _Problems(on_error, jsonl_file)
    try:
        lines = jsonl_file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise AnnotationError(f"{jsonl_file}: annotation file not found") from None
    samples = []
    for lineno, line in enumerate(lines, start=1):
        where = f"{jsonl_file}:{lineno}"
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            problem(where, f"malformed JSON line: {e.msg} at column {e.colno}")
            continue
        why = _require(record, {"id": (int, str), "img": str, "text": str})
        if why is None and record.get("label") not in (0, 1):
            why = f"'label' must be 0 or 1, got {record.get('label', '<missing>')!r}"
        if why:
            problem(where, why)
            continue
        image = image_dir / record["img"]
        if not image.is_file() and (image_dir / Path(record["img"]).name).is_file():
            image = image_dir / Path(record["img"]).name
        if _image_ok(image, where, problem, check_images):
            label = "yes" if record["label"] == 1 else "no"
            samples.append(EvalSample(str(record["id"]), image, {"text": record["text"]}, (), label))
    return problem.finish(samples, ("no", "yes"))
