"""The idefics-mini report: what the embedded model can do, measured on the synthetic TEST split only.

1. Instruct-format question answering by question type (colour, shape, count, position, reading, digits, ...),
   greedy, exact match after normalisation — against the most-frequent-answer baseline ("chance") and against
   the same model with every cross-attention gate forced to zero (the text-only ablation). Held-out
   combinations (colour-shape pairs, words, digit images never seen in training) are also scored apart.
2. In-context few-shot learning on a prompt format never used in training (OpenFlamingo's
   "<image>Question: ... Short answer: ..." instead of the trained "User: ... Assistant:"), at 0/1/2/4 shots,
   through the evaluation harness (`idefics/eval`), with a plot of score vs shots.

    python -m idefics.mini_report --data data/mini --out reports      # the embedded model
    python -m idefics.mini_report --model runs/mini_instruct/export --data data/mini --limit 40
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

from .data.shards import ShardReader, expand_shards


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
    """Every tanh gate at 0: the language model alone (the ablation)."""
    layers = model.model.gated_cross_attn_layers
    saved = [(layer.alpha_cross_attn.data.clone(), layer.alpha_dense.data.clone()) for layer in layers]
    for layer in layers:
        layer.alpha_cross_attn.data.zero_()
        layer.alpha_dense.data.zero_()
    try:
        yield
    finally:
        for layer, (a, d) in zip(layers, saved):
            layer.alpha_cross_attn.data.copy_(a)
            layer.alpha_dense.data.copy_(d)


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
    by_type: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for q in questions:
        by_type[q["type"]][normalise(q["answer"])] += 1
    return {k: 100 * c.most_common(1)[0][1] / sum(c.values()) for k, c in by_type.items()}


def few_shot(pipe, data: Path, out: Path, limit: int, shots: list[int]) -> list[Any]:
    from .eval.runner import EvalConfig, run_eval

    config = EvalConfig(tasks=["mini-vqa", "mini-digits"], data=data, shots=shots, seeds=[0], limit=limit,
                        decoding="greedy", out_dir=out / "fewshot", progress=True)
    return run_eval(pipe, config)


def write_report(out: Path, model_name: str, table: dict, baseline: dict, fewshot: list[Any], seconds: float) -> Path:
    lines = [f"# idefics-mini report ({model_name})", "",
             "Synthetic **test** split only (`idefics data make-mini`, seed 0); greedy decoding; exact match after "
             "lower-casing and removing punctuation. `gates = 0` is the same model with every cross-attention "
             "gate closed (the language model alone, which cannot see the image).", "",
             "## Instruct-format questions", "",
             "| question type | n | idefics-mini | gates = 0 | most frequent answer |", "|---|---|---|---|---|"]
    for kind, row in table["model"].items():
        ablated = table["ablation"].get(kind, {}).get("accuracy", float("nan"))
        lines.append(f"| {kind} | {row['n']} | {row['accuracy']:.1f} | {ablated:.1f} | "
                     f"{baseline.get(kind, float('nan')):.1f} |")
    if fewshot:
        lines += ["", "## In-context few-shot, new prompt format", "",
                  "Prompt format never used in training: `<image>Question: ... Short answer: ...` (OpenFlamingo's), "
                  "demonstrations from the validation split; 0 shots = two text-only demonstrations (the "
                  "Flamingo protocol). Plot: `fewshot/results.png`.", "",
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
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the embedded idefics-mini)")
    parser.add_argument("--data", default="data/mini", help="output of `idefics data make-mini`")
    parser.add_argument("--out", default="reports", help="where the report, JSON and plot go")
    parser.add_argument("--per-type", type=int, default=40, help="test questions per question type")
    parser.add_argument("--fewshot-limit", type=int, default=60, help="queries per few-shot task (0: skip)")
    parser.add_argument("--shots", default="0,1,2,4")
    args = parser.parse_args(argv)
    import idefics

    start = time.time()
    pipe = idefics.load(args.model)
    out, data = Path(args.out), Path(args.data)
    out.mkdir(parents=True, exist_ok=True)
    questions = test_questions(data, args.per_type)
    table = {"model": score(questions, answer_all(pipe, questions, "idefics-mini"))}
    with gates_closed(pipe.model):
        table["ablation"] = score(questions, answer_all(pipe, questions, "gates = 0"))
    baseline = majority_baseline(questions)
    shots = [int(s) for s in args.shots.split(",")]
    fewshot = few_shot(pipe, data, out, args.fewshot_limit, shots) if args.fewshot_limit else []
    (out / "idefics-mini.json").write_text(json.dumps({"table": table, "baseline": baseline,
                                                       "fewshot": [vars(r) for r in fewshot]}, indent=2))
    path = write_report(out, pipe.name, table, baseline, fewshot, time.time() - start)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
