"""The evaluation runner end to end on a small random reference checkpoint: offline mini tasks (report, plot,
determinism), RICES on a constructed case, the 0-shot prompts, bad input, the CLI, and 2 processes = 1."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import idefics
from tests.helpers import png_bytes, random_image
from idefics.eval import cli as eval_cli
from idefics.eval.annotations import AnnotationError
from idefics.eval.engine import ImageFeatureStore, class_log_likelihoods, encode_prompts, end_of_demo_marker
from idefics.eval.fewshot import fewshot_prompt, random_demo_indices
from idefics.eval.metrics import yes_probability
from idefics.eval.offline import MINI_TASKS, load_mini_split
from idefics.eval.report import read_results_json
from idefics.eval.runner import EvalConfig, EvalError, run_eval, template_for
from idefics.eval.metrics import postprocess_vqa_generation, vqa_accuracy
from idefics.eval.tasks import score_predictions


@pytest.fixture(scope="module")
def checkpoint(reference_checkpoint):
    return reference_checkpoint("small_9b")[0]


@pytest.fixture(scope="module")
def pipe(checkpoint):
    return idefics.load(checkpoint)


@pytest.fixture(scope="module")
def mini_data(tmp_path_factory):
    from idefics.data.synthetic import make_mini_data

    folder = tmp_path_factory.mktemp("mini")
    make_mini_data(str(folder), seed=0, n_train=0, n_val=40, n_test=40, progress=False)
    return folder


def read_predictions(out: Path, task: str, shots: int, seed: int) -> list[dict]:
    lines = (out / "predictions" / f"{task}-{shots}shot-seed{seed}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


# --------------------------------------------------------------------------------------------------
# the model side: cached image features, KV-cached class scores


def test_encode_prompts_equals_processor_and_pixel_path(pipe):
    images = [png_bytes(random_image(i)) for i in range(3)]
    prompts = [[images[0], "Output:a cat\n", images[1], "Output:"], ["Question: x", images[2], "Answer:"]]
    cache = ImageFeatureStore(pipe)
    ours = encode_prompts(pipe, prompts, cache)
    theirs = pipe.processor(prompts, add_end_of_utterance_token=False)
    for key in ("input_ids", "attention_mask", "image_attention_mask"):
        assert torch.equal(ours[key], theirs[key]), key
    real = theirs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(pipe.model(**ours).logits[real], pipe.model(**theirs).logits[real],
                                   atol=1e-5, rtol=0)
    # RICES compares what Pipeline.image_features computes
    torch.testing.assert_close(cache.pooled(images), pipe.image_features(images), atol=0, rtol=0)
    assert (cache.misses, cache.hits) == (3, 3)


def test_class_log_likelihoods_equal_pipeline_log_likelihood(pipe):
    images = [png_bytes(random_image(i)) for i in range(2)]
    prompts = [[images[0], "Output:a\n", images[1], "Output:"], ["Hello", images[1], "Answer:"]]
    names = ["yes", "no", "blue car", "3"]  # different token counts
    sums, counts = class_log_likelihoods(pipe, prompts, names, ImageFeatureStore(pipe), max_rows=3)
    for p, prompt in enumerate(prompts):
        expected = pipe.log_likelihood([prompt] * len(names), names)
        torch.testing.assert_close(sums[p].float(), torch.tensor(expected), atol=1e-4, rtol=0)
        alone = int(pipe.processor([prompt], add_end_of_utterance_token=False)["attention_mask"].sum())
        for c, name in enumerate(names):
            full = int(pipe.processor([prompt + [name]], add_end_of_utterance_token=False)["attention_mask"].sum())
            assert counts[p, c] == full - alone


def test_end_of_demo_marker(pipe, reference_checkpoint):
    marker, stops = end_of_demo_marker(pipe)
    assert marker == "\n" and set(pipe.stop_token_ids()) <= set(stops)
    instruct = idefics.load(reference_checkpoint("small_instruct")[0])
    marker, stops = end_of_demo_marker(instruct)
    eou = instruct.tokenizer.token_to_id("<end_of_utterance>")
    assert marker == "<end_of_utterance>" and eou in stops
    # each demonstration ends with exactly one marker ("\n" is already the open-ended separator)
    assert template_for(MINI_TASKS["mini-vqa"].template, marker).end_of_chunk == marker
    assert template_for(MINI_TASKS["mini-vqa"].template, "\n").end_of_chunk == ""
    assert template_for(MINI_TASKS["mini-digits"].template, "\n").end_of_chunk == "\n"


# --------------------------------------------------------------------------------------------------
# end to end on the offline tasks


def mini_config(data, out, **kwargs):
    base = dict(tasks=["mini-vqa", "mini-digits"], data=data, shots=[0, 2], seeds=[1], limit=4, batch_size=4,
                out_dir=out, progress=False)
    return EvalConfig(**{**base, **kwargs})


def test_mini_tasks_end_to_end(pipe, mini_data, tmp_path):
    results = run_eval(pipe, mini_config(mini_data, tmp_path / "a"))
    assert [(r.task, r.shots) for r in results] == [("mini-vqa", 0), ("mini-vqa", 2), ("mini-digits", 0),
                                                     ("mini-digits", 2)]
    # one call wrote the table and the plot
    table = (tmp_path / "a" / "results.md").read_text()
    for r in results:
        assert f"| {r.task} | {r.shots} |" in table
    assert Image.open(tmp_path / "a" / "results.png").size[0] > 100
    assert read_results_json(tmp_path / "a" / "results.json") == results

    support = {s.id: s for s in load_mini_split("mini-vqa", mini_data, "val")}
    test = {s.id: s for s in load_mini_split("mini-vqa", mini_data, "test")}
    stops = end_of_demo_marker(pipe)[1]
    for r in results:
        records = read_predictions(tmp_path / "a", r.task, r.shots, 1)
        assert len(records) == r.n == 4
        # 0-shot: two text-only demonstrations, so the query's is the only image
        assert all(rec["images"] == (1 if r.shots == 0 else 3) for rec in records)
        assert all(len(rec["demos"]) == 2 for rec in records)
        if r.task == "mini-vqa":
            assert all(rec["prompt"].count("Short answer:") == 3 for rec in records)
            # the score is the metric applied to the recorded raw outputs
            samples = [test[rec["id"]] for rec in records]
            assert r.score == score_predictions("vqav2", samples, [rec["output"] for rec in records])
            # and the file alone is enough to recompute it: every answer is written
            assert all(len(rec["reference"]) == len(test[rec["id"]].references) for rec in records)
            from_file = vqa_accuracy([postprocess_vqa_generation(rec["output"]) for rec in records],
                                     [rec.get("answers") or rec["reference"] for rec in records])
            assert from_file == r.score
            # and a recorded output is what the pipeline generates for that prompt (3 beams, penalty 0)
            rec, query = records[0], samples[0]
            demos = [support[d] for d in rec["demos"]]
            prompt = fewshot_prompt(query, demos, r.shots, template_for(MINI_TASKS["mini-vqa"].template, "\n"),
                                    demo_indices=[0, 1])
            text = pipe.generate(prompt, max_new_tokens=5, num_beams=3, length_penalty=0.0, stop_token_ids=stops,
                                 add_end_of_utterance_token=False)[0]
            assert rec["output"] == text.split("\n")[0]
        else:
            labels = [rec["reference"] for rec in records]
            assert r.score == sum(rec["prediction"] == y for rec, y in zip(records, labels)) / len(labels)
            for rec in records:  # the prediction is the best mean log-probability of the 10 digits
                assert rec["prediction"] == max(rec["class_scores"], key=rec["class_scores"].get)
                assert sorted(rec["class_scores"]) == [str(d) for d in range(10)]

    # deterministic for a seed; another seed draws other demonstrations
    again = run_eval(pipe, mini_config(mini_data, tmp_path / "b"))
    assert again == results
    for task in ("mini-vqa", "mini-digits"):
        assert read_predictions(tmp_path / "a", task, 2, 1) == read_predictions(tmp_path / "b", task, 2, 1)
    run_eval(pipe, mini_config(mini_data, tmp_path / "c", tasks=["mini-digits"], shots=[2], seeds=[2]))
    test_digits = load_mini_split("mini-digits", mini_data, "test")
    val_digits = load_mini_split("mini-digits", mini_data, "val")
    for seed, out in ((1, "a"), (2, "c")):
        records = read_predictions(tmp_path / out, "mini-digits", 2, seed)
        # --limit draws its samples with the seed; demonstrations are drawn per (seed, query)
        chosen = sorted(np.random.default_rng(seed).choice(len(test_digits), 4, replace=False))
        assert [r["id"] for r in records] == [test_digits[int(i)].id for i in chosen]
        for r in records:
            assert r["demos"] == [val_digits[i].id for i in random_demo_indices(len(val_digits), 2, seed, r["id"])]


# --------------------------------------------------------------------------------------------------
# RICES on a constructed case


def write_vizwiz(folder: Path, name: str, images: dict[str, Image.Image]) -> Path:
    for file, image in images.items():
        image.save(folder / "images" / file)
    records = [{"image": file, "question": f"What is {file}?", "answers": [{"answer": file[:-4]}] * 10}
               for file in images]
    (folder / name).write_text(json.dumps(records))
    return folder / name


def test_rices_picks_the_nearest_neighbours(pipe, tmp_path):
    (tmp_path / "images").mkdir()
    query = random_image(100, (60, 60))
    near = Image.fromarray(np.clip(np.asarray(query, dtype=np.int16) + 6, 0, 255).astype(np.uint8))
    support = {f"s{i}.png": random_image(200 + i, (60, 60)) for i in range(6)}
    support.update({"same.png": query.copy(), "near.png": near})
    write_vizwiz(tmp_path, "train.json", support)
    write_vizwiz(tmp_path, "val.json", {"query.png": query, "other.png": random_image(300, (60, 60))})
    spec = {"eval": {"images": "images", "annotations": "val.json"}, "support": {"annotations": "train.json"}}
    (tmp_path / "data.json").write_text(json.dumps(spec))
    config = EvalConfig(tasks=["vizwiz"], data=tmp_path / "data.json", shots=[0, 2], seeds=[0],
                        selection="rices", out_dir=tmp_path / "out", progress=False, decoding="greedy")
    run_eval(pipe, config)
    files = list(support)
    features = pipe.image_features([tmp_path / "images" / f for f in files])
    for shots in (0, 2):
        records = {r["id"]: r for r in read_predictions(tmp_path / "out", "vizwiz", shots, 0)}
        assert records["query"]["demos"] == ["near", "same"], "most similar (the same image) last"
        for name in ("query", "other"):  # brute-force cosine similarity, most similar last
            q = pipe.image_features([tmp_path / "images" / f"{name}.png"])
            sims = torch.nn.functional.cosine_similarity(q, features)
            expected = [files[int(i)][:-4] for i in sims.argsort(descending=True)[:2].flip(0)]
            assert records[name]["demos"] == expected
        assert records["query"]["images"] == (1 if shots == 0 else 3)


# --------------------------------------------------------------------------------------------------
# bad input


def hateful_memes(tmp_path: Path) -> Path:
    (tmp_path / "hm").mkdir()
    for i in range(8):
        random_image(400 + i, (40, 40)).save(tmp_path / "hm" / f"{i}.png")
    (tmp_path / "hm" / "7.png").write_bytes(b"this is not an image")
    good = [{"id": i, "img": f"{i}.png", "text": f"meme {i}", "label": i % 2} for i in range(8)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good[:4]))
    dev = [json.dumps(good[4]), json.dumps(good[5]), '{"id": 9, "img": "5.png", "text": ', json.dumps(
        {**good[6], "img": "missing.png"}), json.dumps(good[6]), json.dumps(good[7])]
    (tmp_path / "dev.jsonl").write_text("\n".join(dev) + "\n")
    spec = {"eval": {"images": "hm", "annotations": "dev.jsonl"}, "support": {"annotations": "train.jsonl"}}
    (tmp_path / "data.json").write_text(json.dumps(spec))
    return tmp_path / "data.json"


def test_bad_input_reported_with_file_and_line(pipe, tmp_path):
    data = hateful_memes(tmp_path)
    dev = (tmp_path / "dev.jsonl").resolve()
    config = EvalConfig(tasks=["hateful_memes"], data=data, shots=[2], seeds=[0], progress=False)
    with pytest.raises(AnnotationError, match=f"{dev}:3: malformed JSON line"):
        run_eval(pipe, config)

    config.on_error = "skip"
    config.out_dir = tmp_path / "out"
    with pytest.warns(UserWarning, match="skipped 2 bad sample"):
        [result] = run_eval(pipe, config)
    problems = "\n".join(result.extra["problems"])
    assert f"{dev}:3: malformed JSON line" in problems
    assert f"{dev}:4: image file not found" in problems and "missing.png" in problems
    # 7.png exists but is not an image: found at evaluation time, reported with the sample and the file
    assert result.extra["skipped"] == 1 and "sample '7'" in problems and "7.png" in problems
    records = {r["id"]: r for r in read_predictions(tmp_path / "out", "hateful_memes", 2, 0)}
    assert set(records) == {"4", "5", "6", "7"} and "error" in records["7"] and result.n == 3
    # P(yes) from the mean log-probabilities of "no" and "yes", as the reference's HatefulMemes scorer
    for record in records.values():
        if "error" not in record:
            scores = record["class_scores"]
            assert record["p_yes"] == pytest.approx(yes_probability(scores["no"], scores["yes"]))

    config.on_error = "raise"
    config.data = tmp_path / "data2.json"
    (tmp_path / "dev2.jsonl").write_text("\n".join((tmp_path / "dev.jsonl").read_text().splitlines()[-2:]) + "\n")
    config.data.write_text(json.dumps({"eval": {"images": "hm", "annotations": "dev2.jsonl"},
                                       "support": {"annotations": "train.jsonl"}}))
    with pytest.raises(EvalError, match=r"hateful_memes: sample '7' \(image .*7\.png\).*not a readable image"):
        run_eval(pipe, config)


# --------------------------------------------------------------------------------------------------
# the command line


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idefics")
    eval_cli.register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_help_teaches_and_bad_data_is_a_clear_error(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit):
        eval_parser().parse_args(["eval", "--help"])
    text = capsys.readouterr().out
    for needle in ("examples:", "--selection {random,rices}", "torchrun", "mini-vqa", '"support"', "--on-error"):
        assert needle in text
    with pytest.raises(SystemExit):
        eval_parser().parse_args(["eval", "--model", "m", "--task", "coco", "--data", "d", "--shots", "0,x"])
    assert "comma-separated integers" in capsys.readouterr().err

    (tmp_path / "data.json").write_text('{"eval": {"images": "x",\n "annotations": }}')
    args = eval_parser().parse_args(["eval", "--model", str(checkpoint), "--task", "coco", "--data",
                                     str(tmp_path / "data.json"), "--out", str(tmp_path / "out"), "--quiet"])
    assert args.func(args) == 2
    assert f"{tmp_path / 'data.json'}:2:" in capsys.readouterr().err  # file:line of the malformed JSON
