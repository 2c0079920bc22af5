"""The idefics-mini report: what the embedded model sees, on images it never saw in training.

1. Real photos bundled with scikit-image, scikit-learn and matplotlib, asked "What is in this picture?": the
   answer verbatim, whether it names the main object, beside the frozen ImageNet classifier's own top-1 and the
   same model with its cross-attention gates closed (the language model alone).
2. Fashion-MNIST's test split and the last 300 scikit-learn digits (real photos and real handwriting), beside
   the gates-closed model and a linear probe on the frozen backbone's features.
3. The synthetic test split: questions by type (colour, shape, count, position, reading, ...), against the
   most-frequent-answer baseline and the gates-closed model.
4. In-context learning of answer formats never used in training (`idefics.mini.fewshot`), 0/1/2/4 shots.
5. Text-only prompts: the same greedy answers as the frozen SmolLM2 run by transformers (when installed).

    python -m idefics.mini_report --data data/mini --out reports      # the embedded model
    python -m idefics.mini_report --model runs/mini_photos/export --per-type 20 --real 100
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import re
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from PIL import Image
from tqdm import tqdm

from ..data.shards import ShardReader, expand_shards
from ..model_options import add_model_options, load_from_args
from . import realworld


def normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def test_questions(data: Path, per_type: int) -> list[dict]:
    """Single-question plain-format chats from the test split, up to `per_type` per question type."""
    counts: collections.Counter = collections.Counter()
    out = []
    reader = ShardReader(expand_shards(str(data / "test" / "chat-*.tar")), decode_images=False)
    for sample in reader:
        qa = sample.meta.get("qa") or []
        if len(sample.turns) != 2 or len(qa) != 1 or sample.meta.get("answer_format", "plain") != "plain":
            continue
        kind = qa[0]["question_type"]
        if counts[kind] >= per_type:
            continue
        images = [item for item in sample.turns[0].content if not isinstance(item, str)]
        if len(images) != 1:
            continue
        counts[kind] += 1
        out.append({"type": kind, "question": qa[0]["question"], "answer": qa[0]["answer"], "image": images[0],
                    "held_out": bool(sample.meta.get("held_out")), "key": sample.key})
    return out


@contextlib.contextmanager
def gates_closed(model: torch.nn.Module) -> Iterator[None]:
    """Every tanh gate at 0 (cross-attention, dense and the word path): the language model alone (the ablation)."""
    gates = [p for layer in model.model.gated_cross_attn_layers for name, p in layer.named_parameters()
             if name.startswith("alpha_")]
    saved = [p.data.clone() for p in gates]
    for p in gates:
        p.data.zero_()
    try:
        yield
    finally:
        for p, value in zip(gates, saved):
            p.data.copy_(value)


def answer_all(pipe, questions: list[dict], label: str) -> list[str]:
    answers = []
    for q in tqdm(questions, desc=label, leave=False):
        prompt = ["User:", Image.open(io.BytesIO(q["image"])), f"{q['question']}<end_of_utterance>", "\nAssistant:"]
        answers.append(pipe.generate(prompt, max_new_tokens=8, add_end_of_utterance_token=False)[0])
    return answers


def score(questions: list[dict], answers: list[str]) -> dict[str, dict[str, float]]:
    by_type: dict[str, list[bool]] = collections.defaultdict(list)
    for q, a in zip(questions, answers):
        right = normalise(a) == normalise(q["answer"])
        by_type[q["type"]].append(right)
        if q["held_out"]:
            by_type["(held-out samples)"].append(right)
        by_type["(all)"].append(right)
    return {k: {"accuracy": 100 * sum(v) / len(v), "n": len(v)} for k, v in sorted(by_type.items())}


def majority_baseline(questions: list[dict]) -> dict[str, float]:
    """Accuracy of always answering the most frequent answer of the question's type (per type, and over
    all / the held-out samples with each question answered by its own type's most frequent answer)."""
    by_type: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for q in questions:
        by_type[q["type"]][normalise(q["answer"])] += 1
    guesses = [by_type[q["type"]].most_common(1)[0][0] for q in questions]
    return {k: row["accuracy"] for k, row in score(questions, guesses).items()}


def few_shot(pipe, data: Path, out: Path, limit: int, shots: list[int]) -> list[Any]:
    from ..eval.runner import EvalConfig, run_eval

    config = EvalConfig(tasks=["mini-vqa", "mini-digits"], data=data, shots=shots, seeds=[0], limit=limit,
                        decoding="greedy", out_dir=out / "fewshot", progress=True)
    return run_eval(pipe, config)


def new_format_fewshot(pipe, data: Path, queries_per_kind: int, shots: list[int]) -> dict[str, list[dict]]:
    from . import fewshot as mini_fewshot

    def generate(prompt: list) -> str:
        return pipe.generate(prompt, max_new_tokens=6)[0]

    results = {"idefics-mini": mini_fewshot.run(generate, data, queries_per_kind=queries_per_kind, shots=shots)}
    with gates_closed(pipe.model):
        results["gates = 0"] = mini_fewshot.run(generate, data, queries_per_kind=queries_per_kind, shots=shots)
    return results


def new_format_lines(results: dict[str, list[dict]]) -> list[str]:
    from ..data.language import HELD_OUT_FORMATS
    from .fewshot import mean_by_shots

    model, ablation = results["idefics-mini"], results["gates = 0"]
    shots = sorted({r["shots"] for r in model})
    lines = ["", "## In-context learning of a new answer format", "",
             "The prompt is only images and answers, e.g. `<image>Tag: red\\n<image>Tag: blue\\n<image>Tag:` "
             "(2 shots): what to name (colour, shape, count or digit) and how to write it are given by the "
             "demonstrations alone, in formats never used in training (" +
             ", ".join(f"`{f}`" for f in HELD_OUT_FORMATS) + ", one per query in turn). 0 shots = the query image "
             "and the format prefix alone. Queries from the test split, demonstrations from the validation "
             "split. Exact match of the first line. Plot: `fewshot/new_format.png`.", "",
             "| label kind | n | " + " | ".join(f"{k} shots" for k in shots) + " | gates = 0, " +
             " / ".join(map(str, shots)) + " shots |", "|---|---|" + "---|" * (len(shots) + 1)]
    kinds = sorted({r["kind"] for r in model}, key=[r["kind"] for r in model].index)
    for kind in kinds:
        cells = {r["shots"]: r for r in model if r["kind"] == kind}
        off = {r["shots"]: r for r in ablation if r["kind"] == kind}
        lines.append(f"| {kind} | {cells[shots[0]]['n']} | " + " | ".join(f"{cells[k]['accuracy']:.1f}" for k in shots)
                     + " | " + " / ".join(f"{off[k]['accuracy']:.0f}" for k in shots) + " |")
    means, off_means = mean_by_shots(model), mean_by_shots(ablation)
    lines.append("| **mean** | | " + " | ".join(f"**{means[k]:.1f}**" for k in shots) + " | " +
                 " / ".join(f"{off_means[k]:.0f}" for k in shots) + " |")
    return lines


def write_report(out: Path, model_name: str, real: dict, table: dict, baseline: dict,
                 new_format: dict[str, list[dict]], fewshot: list[Any], seconds: float) -> Path:
    lines = [f"# idefics-mini report ({model_name})", "",
             "Only images never used in training; greedy decoding. `gates = 0` is the same model with every "
             "cross-attention gate closed (the language model alone, which cannot see the image).", ""]
    lines += realworld.lines(real["photos"], real.get("fashion"), real.get("digits"), real.get("text"))
    lines += ["", "## Synthetic test split, instruct-format questions", "",
              "The test split of `idefics data make-mini` (seed 0); exact match after lower-casing and removing "
              "punctuation.", "",
              "| question type | n | idefics-mini | gates = 0 | chance (always the most frequent answer) |",
              "|---|---|---|---|---|"]
    for kind, row in table["model"].items():
        ablated = table["ablation"].get(kind, {}).get("accuracy", float("nan"))
        lines.append(f"| {kind} | {row['n']} | {row['accuracy']:.1f} | {ablated:.1f} | "
                     f"{baseline.get(kind, float('nan')):.1f} |")
    if new_format:
        lines += new_format_lines(new_format)
    if fewshot:
        lines += ["", "## The evaluation harness, OpenFlamingo prompt format", "",
                  "Prompt format never used in training: `<image>Question: ... Short answer: ...` (OpenFlamingo's), "
                  "demonstrations from the validation split; 0 shots = two text-only demonstrations (the "
                  "Flamingo protocol, which already shows the answer format at 0 shots). Plot: "
                  "`fewshot/results.png`.", "",
                  "| task | shots | score | n |", "|---|---|---|---|"]
        for r in fewshot:
            lines.append(f"| {r.task} | {r.shots} | {r.score:.3g} | {r.n} |")
    lines += ["", f"Produced by `python -m idefics.mini_report` in {seconds / 60:.1f} min."]
    path = out / "idefics-mini.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m idefics.mini_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--data", default="data/mini", help="output of `idefics data make-mini`")
    parser.add_argument("--out", default="reports", help="where the report, JSON and plots go")
    parser.add_argument("--real", type=int, default=500, help="Fashion-MNIST test photos to ask about (0: skip "
                        "Fashion-MNIST and the digits)")
    parser.add_argument("--probe-train", type=int, default=3000,
                        help="Fashion-MNIST training photos for the linear probe baseline")
    parser.add_argument("--per-type", type=int, default=40, help="synthetic test questions per question type")
    parser.add_argument("--new-format-queries", type=int, default=60,
                        help="queries per label kind in the new-format few-shot test (0: skip)")
    parser.add_argument("--fewshot-limit", type=int, default=0,
                        help="queries per evaluation-harness task in OpenFlamingo's prompt format (0: skip)")
    parser.add_argument("--shots", default="0,1,2,4")
    parser.add_argument("--no-text", action="store_true", help="skip the text-only comparison with SmolLM2")
    args = parser.parse_args(argv)
    start = time.time()
    pipe = load_from_args(args)
    out, data = Path(args.out), Path(args.data)
    out.mkdir(parents=True, exist_ok=True)
    closed = lambda: gates_closed(pipe.model)  # noqa: E731
    real: dict[str, Any] = {"photos": realworld.photos_section(pipe, closed)}
    if args.real:
        real["fashion"] = realworld.fashion_section(pipe, closed, args.real, args.probe_train)
        real["digits"] = realworld.digits_section(pipe, closed)
    if not args.no_text:
        real["text"] = realworld.text_only_section(pipe)
    questions = test_questions(data, args.per_type)
    table = {"model": score(questions, answer_all(pipe, questions, "idefics-mini"))}
    with gates_closed(pipe.model):
        table["ablation"] = score(questions, answer_all(pipe, questions, "gates = 0"))
    baseline = majority_baseline(questions)
    shots = [int(s) for s in args.shots.split(",")]
    new_format = new_format_fewshot(pipe, data, args.new_format_queries, shots) if args.new_format_queries else {}
    if new_format:
        from .fewshot import plot

        plot(new_format, out / "fewshot" / "new_format.png")
    fewshot = few_shot(pipe, data, out, args.fewshot_limit, shots) if args.fewshot_limit else []
    (out / "idefics-mini.json").write_text(json.dumps({"real": real, "table": table, "baseline": baseline,
                                                       "new_format_fewshot": new_format,
                                                       "fewshot": [vars(r) for r in fewshot]}, indent=2))
    path = write_report(out, pipe.name, real, table, baseline, new_format, fewshot, time.time() - start)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
