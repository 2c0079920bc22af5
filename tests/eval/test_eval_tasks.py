"""Annotation readers and task scoring on tiny datasets written to tmp dirs, including bad-input reporting."""

import json
from pathlib import Path

import pytest
from PIL import Image

from idefics.eval.annotations import (
    AnnotationError,
    EvalSample,
    load_coco_captions,
    load_hateful_memes,
    load_image_folder,
    load_karpathy_captions,
    load_vqa,
    read_class_list,
)
from idefics.eval.tasks import TASKS, get_task, load_task_split, score_predictions
from tests.helpers import VECTORS


def make_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2), (200, 10, 10)).save(path)
    return path


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, indent=1))
    return path


def answers(*texts):
    return [{"answer": t, "answer_confidence": "yes", "answer_id": i + 1} for i, t in enumerate(texts)]


@pytest.fixture
def vqa_files(tmp_path):
    images = tmp_path / "val2014"
    for image_id in (1, 2, 3):
        make_image(images / f"COCO_val2014_{image_id:012d}.jpg")
    questions = write_json(tmp_path / "q.json", {"questions": [
        {"image_id": 1, "question": "What color is the bus?", "question_id": 10},
        {"image_id": 2, "question": "How many dogs?", "question_id": 20},
        {"image_id": 3, "question": "Is it raining?", "question_id": 30},
    ]})
    # Annotations in another order: they are matched by question_id.
    annotations = write_json(tmp_path / "a.json", {"annotations": [
        {"question_id": 30, "image_id": 3, "answers": answers(*["no"] * 10)},
        {"question_id": 10, "image_id": 1, "answers": answers("red", "red", "dark red", *["red"] * 7)},
        {"question_id": 20, "image_id": 2, "answers": answers("2", "two", "2", "2")},
    ]})
    return questions, annotations, images


def test_vqa_layout(vqa_files):
    questions, annotations, images = vqa_files
    split = load_vqa(questions, annotations, images)
    assert [s.id for s in split] == ["10", "20", "30"]
    first = split[0]
    assert first.image == images / "COCO_val2014_000000000001.jpg"
    assert first.fields == {"question": "What color is the bus?"}
    assert first.references[:3] == ("red", "red", "dark red") and len(first.references) == 10
    assert first.answer_records[2] == {"answer": "dark red", "answer_confidence": "yes", "answer_id": 3}
    assert split.skipped == []


def test_vqa_bad_input_raise_names_file_and_item(vqa_files, tmp_path):
    questions, annotations, images = vqa_files
    (images / "COCO_val2014_000000000002.jpg").unlink()
    with pytest.raises(AnnotationError, match=r"q\.json: questions\[1\] \(question_id=20\): image file not found"):
        load_vqa(questions, annotations, images)


def test_vqa_bad_input_skip_counts(vqa_files):
    questions, annotations, images = vqa_files
    data = json.loads(questions.read_text())
    data["questions"] += [{"image_id": 1, "question": "Orphan?", "question_id": 99},  # no annotation
                          {"image_id": 1, "question_id": 98}]  # no question text
    write_json(questions, data)
    (images / "COCO_val2014_000000000003.jpg").unlink()
    with pytest.warns(UserWarning, match=r"skipped 3 bad sample\(s\), kept 2"):
        split = load_vqa(questions, annotations, images, on_error="skip")
    assert [s.id for s in split] == ["10", "20"]
    assert len(split.skipped) == 3
    assert any("questions[3] (question_id=99): question without answers" in m for m in split.skipped)
    assert any("questions[4]: missing key 'question'" in m for m in split.skipped)


def test_vqa_empty_answers_and_malformed_json(vqa_files):
    questions, annotations, images = vqa_files
    data = json.loads(annotations.read_text())
    data["annotations"][2]["answers"] = []
    write_json(annotations, data)
    with pytest.raises(AnnotationError, match=r"a\.json: annotations\[2\] \(question_id=20\): question without"):
        load_vqa(questions, annotations, images)
    annotations.write_text('{"annotations": [\n  {"question_id": 1,\n  oops}\n]}')
    with pytest.raises(AnnotationError, match=r"a\.json:3:3: malformed JSON"):
        load_vqa(questions, annotations, images)
    with pytest.raises(AnnotationError, match="annotation file not found"):
        load_vqa(questions, annotations.with_name("nope.json"), images)


def test_textvqa_and_vizwiz_single_file_layouts(tmp_path):
    make_image(tmp_path / "img" / "abc123.jpg")
    make_image(tmp_path / "img" / "VizWiz_val_00000000.jpg")
    textvqa = write_json(tmp_path / "textvqa.json", {"data": [
        {"image_id": "abc123", "question": "What brand?", "question_id": 5, "answers": ["nike"] * 10}]})
    split = load_task_split("textvqa", annotations=textvqa, images=tmp_path / "img")
    assert split[0].image.name == "abc123.jpg" and split[0].references == ("nike",) * 10
    vizwiz = write_json(tmp_path / "vizwiz.json", [
        {"image": "VizWiz_val_00000000.jpg", "question": "What is this?",
         "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10}])
    split = load_task_split("vizwiz", annotations=vizwiz, images=tmp_path / "img")
    assert split[0].id == "VizWiz_val_00000000" and split[0].image.name == "VizWiz_val_00000000.jpg"
    # The records keep no answer_id, so the metric sees the VizWiz duplicate-removal quirk.
    assert "answer_id" not in split[0].answer_records[0]


def test_karpathy_captions(tmp_path):
    make_image(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    make_image(tmp_path / "train2014" / "COCO_train2014_000000000007.jpg")
    karpathy = write_json(tmp_path / "dataset_coco.json", {"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "split": "test", "cocoid": 42,
         "sentences": [{"raw": " A red bus. "}, {"raw": "A bus."}]},
        {"filepath": "train2014", "filename": "COCO_train2014_000000000007.jpg", "split": "train", "cocoid": 7,
         "sentences": [{"raw": "Two dogs playing."}]},
    ]})
    test = load_task_split("coco", annotations=karpathy, images=tmp_path, split="test")
    assert [(s.id, s.references) for s in test] == [("42", (" A red bus. ", "A bus."))]
    assert test[0].image == tmp_path / "val2014" / "COCO_val2014_000000000042.jpg"
    assert [s.id for s in load_karpathy_captions(karpathy, tmp_path, "train")] == ["7"]


def test_karpathy_flickr_ids_and_bad_items(tmp_path):
    make_image(tmp_path / "1000092795.jpg")
    karpathy = write_json(tmp_path / "dataset_flickr30k.json", {"images": [
        {"filename": "1000092795.jpg", "split": "test", "sentences": [{"raw": "Two young guys."}]},
        {"filename": "missing.jpg", "split": "test", "sentences": [{"raw": "x"}]},
        {"filename": "nocaps.jpg", "split": "test", "sentences": []},
    ]})
    with pytest.raises(AnnotationError, match=r"images\[1\]: image file not found: .*missing\.jpg"):
        load_karpathy_captions(karpathy, tmp_path, "test")
    with pytest.warns(UserWarning, match="skipped 2"):
        split = load_karpathy_captions(karpathy, tmp_path, "test", on_error="skip")
    assert [s.id for s in split] == ["1000092795"]
    assert "images[2]: image without captions" in split.skipped[1]


def test_coco_format_captions(tmp_path):
    make_image(tmp_path / "a.jpg"), make_image(tmp_path / "b.jpg")
    coco = write_json(tmp_path / "nocaps_val.json", {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "annotations": [{"image_id": 1, "caption": "first"}, {"image_id": 2, "caption": "x"},
                        {"image_id": 1, "caption": "second"}]})
    split = load_task_split("nocaps", annotations=coco, images=tmp_path)
    assert [(s.id, s.references) for s in split] == [("1", ("first", "second")), ("2", ("x",))]
    data = json.loads(coco.read_text())
    data["annotations"] = data["annotations"][:1] + [{"image_id": 2}]
    write_json(coco, data)
    with pytest.raises(AnnotationError, match=r"annotations\[1\]: missing key 'caption'"):
        load_coco_captions(coco, tmp_path)
    with pytest.warns(UserWarning, match="skipped 2"):  # the bad annotation, then image 2 without captions
        assert [s.id for s in load_coco_captions(coco, tmp_path, on_error="skip")] == ["1"]


def test_image_folder_with_class_list(tmp_path):
    root = tmp_path / "val"
    make_image(root / "n01" / "x1.JPEG"), make_image(root / "n01" / "x2.jpeg"), make_image(root / "n02" / "y.png")
    (root / "n02" / "notes.txt").write_text("not an image")
    classes = tmp_path / "classes.txt"
    classes.write_text("# wnid name\nn01 tench\n\nn02\tgoldfish, Carassius auratus\n")
    split = load_task_split("imagenet", images=root, class_list=classes)
    assert split.class_names == ("tench", "goldfish, Carassius auratus")
    assert [(s.id, s.label) for s in split] == [("n01/x1.JPEG", "tench"), ("n01/x2.jpeg", "tench"),
                                                ("n02/y.png", "goldfish, Carassius auratus")]


def test_image_folder_bad_class_list(tmp_path):
    root = tmp_path / "val"
    make_image(root / "n01" / "a.png"), make_image(root / "stray" / "b.png")
    classes = tmp_path / "classes.txt"
    classes.write_text("n01 tench\nn03 shark\n")
    with pytest.raises(AnnotationError, match="stray: folder is not in the class list"):
        load_image_folder(root, classes)
    with pytest.warns(UserWarning, match="skipped 2"):
        split = load_image_folder(root, classes, on_error="skip")
    assert any(m.startswith(f"{classes}:2: class folder not found") for m in split.skipped)
    assert split.class_names == ("tench", "shark")  # a class without images is still a candidate answer
    classes.write_text("n01 tench\nn02 shark\nn01 other\n")
    with pytest.raises(AnnotationError, match=r"classes\.txt:3: duplicate folder 'n01' \(first on line 1\)"):
        read_class_list(classes)


def test_rendered_sst2_folders(tmp_path):
    make_image(tmp_path / "test" / "positive" / "0.png"), make_image(tmp_path / "test" / "negative" / "1.png")
    split = load_task_split("rendered_sst2", images=tmp_path / "test")
    assert split.class_names == ("negative", "positive")
    assert [(s.id, s.label) for s in split] == [("negative/1.png", "negative"), ("positive/0.png", "positive")]


def test_hateful_memes_jsonl(tmp_path):
    make_image(tmp_path / "img" / "01235.png"), make_image(tmp_path / "img" / "01236.png")
    lines = ['{"id": 1235, "img": "img/01235.png", "label": 1, "text": "the meme text"}',
             '{"id": 1236, "img": "img/01236.png", "label": 0, "text": "look at this"',
             "",
             '{"id": 1237, "img": "img/01237.png", "text": "no label"}',
             '{"id": 1236, "img": "img/01236.png", "label": 0, "text": "look at this"}']
    jsonl = tmp_path / "dev.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    with pytest.raises(AnnotationError, match=r"dev\.jsonl:2: malformed JSON line"):
        load_hateful_memes(jsonl, tmp_path)
    with pytest.warns(UserWarning, match="skipped 2"):
        split = load_task_split("hateful_memes", annotations=jsonl, images=tmp_path, on_error="skip")
    assert [(s.id, s.label, s.fields["text"]) for s in split] == [("1235", "yes", "the meme text"),
                                                                   ("1236", "no", "look at this")]
    assert split.skipped[1].startswith(f"{jsonl}:4: 'label' must be 0 or 1")
    # image_dir may also be the img folder itself, as in the reference harness.
    with pytest.warns(UserWarning, match="skipped 2"):
        split = load_hateful_memes(jsonl, tmp_path / "img", on_error="skip")
    assert split[0].image == tmp_path / "img" / "01235.png"


def test_on_error_must_be_known(vqa_files):
    with pytest.raises(ValueError, match="on_error"):
        load_vqa(*vqa_files, on_error="ignore")
    with pytest.raises(ValueError, match="unknown task 'vqa3'"):
        get_task("vqa3")
    with pytest.raises(ValueError, match="'coco' needs an annotation file"):
        load_task_split("coco", images=vqa_files[2])


def test_vqa_duplicate_annotation_is_reported(vqa_files):
    questions, annotations, images = vqa_files
    data = json.loads(annotations.read_text())
    data["annotations"].append(dict(data["annotations"][0]))
    write_json(annotations, data)
    want = r"annotations\[3\]: duplicate question_id 30 \(first at annotations\[0\]\)"
    with pytest.raises(AnnotationError, match=want):
        load_vqa(questions, annotations, images)


def test_score_vqa_postprocesses_generations(vqa_files):
    split = load_vqa(*vqa_files)
    # " red, white" -> "red" (10/10 match); "two Answer: 2" -> "two " -> "2" (3 of 4 GT answers are "2" and
    # "two" normalises to "2": 100); " yes\nQuestion:..." -> "yes" vs 10x"no": 0.
    raw = [" red, white", "two Answer: 2", " yes\nQuestion: what"]
    assert score_predictions("vqav2", split.samples, raw) == pytest.approx(round(100 * 2 / 3, 2))
    assert score_predictions("vqav2", split.samples, ["red", "2", "no"], postprocess=False) == 100.0


def test_score_captions_is_cider_times_100():
    # The PTB pipeline vector of cider_vectors.json, through raw generations with trailing junk.
    vectors = VECTORS / "cider_vectors.json"
    case = json.loads(vectors.read_text())["ptb_pipeline"]
    samples = [EvalSample(k, Path(f"{k}.jpg"), {}, tuple(c["caption"] for c in v)) for k, v in case["raw_gts"].items()]
    raw = [v[0]["caption"] + "\nOutput: junk" for v in case["raw_res"].values()]
    assert score_predictions("coco", samples, raw) == pytest.approx(100 * case["corpus"], abs=1e-9)


def test_score_classification():
    samples = [EvalSample(str(i), Path("x.png"), {}, (), label) for i, label in enumerate(["no", "yes", "no", "yes"])]
    assert score_predictions("hateful_memes", samples, [0.3, 0.9, 0.6, 0.6]) == 0.875  # misc vector
    assert score_predictions("imagenet", samples, ["no", "yes", "yes", "yes"]) == 0.75
    assert TASKS["textvqa"].max_new_tokens == 10 and TASKS["coco"].max_new_tokens == 20
    with pytest.raises(ValueError, match="4 samples but 3 predictions"):
        score_predictions("imagenet", samples, ["no"] * 3)
