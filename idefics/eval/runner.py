"""The few-shot evaluation loop: tasks x shots x seeds, one `EvalResult` per run, reported as JSON, a
markdown table and a PNG plot (report.py).

One run (task, shots, seed), as OpenFlamingo's evaluation harness:
  1. the evaluation samples (all, or `limit` drawn with the seed) and a support set of `support_size`
     training samples drawn with the seed;
  2. per query, `effective_num_shots(shots)` demonstrations: random (drawn from (seed, query id)), or RICES
     (the most similar support images by the model's own pooled vision features, most similar last);
     0-shot shows two demonstrations as text only;
  3. open-ended tasks generate (3 beams, length penalty 0, the task's token budget; or greedy) until the
     end-of-demonstration marker, which `end_of_demo_marker` chooses; classification ranks the class names
     by their mean per-token log-probability (HatefulMemes: P("yes") from the two, for ROC AUC);
  4. the raw outputs are post-processed and scored by `score_predictions`.

Queries are cut into batches of `batch_size` in evaluation order; under torchrun each process takes every
world_size-th batch, and the per-query records are gathered (gloo) and scored once by rank 0. Since every
query sits in the same batch whatever the number of processes, and images are encoded alone (engine.py),
a run on N processes gives exactly the outputs and the score of a run on one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from tqdm import tqdm

from idefics.eval import distributed
from idefics.eval.annotations import AnnotationError, OnError, EvalSample
from idefics.eval.data_spec import TaskData, load_task_data
from idefics.eval.engine import (Decoding, ImageFeatureStore, class_log_likelihoods, encode_prompts,
                                 end_of_demo_marker, generate_tokens)
from idefics.eval.fewshot import (RICES, count_images, effective_num_shots, fewshot_prompt, random_demo_indices,
                                  render_prompt, support_subset)
from idefics.eval.metrics import VQAVariant, roc_auc, vqa_question_accuracy, yes_probability
from idefics.eval.report import EvalResult, write_report
from idefics.eval.tasks import PromptTemplate, TaskSpec, score_predictions

logger = logging.getLogger(__name__)
Selection = Literal["random", "rices"]


class EvalError(RuntimeError):
    """A query could not be evaluated (with on_error="raise"); the message names the task and the sample."""


@dataclass
class EvalConfig:
    tasks: Sequence[str]
    data: str | Path
    shots: Sequence[int] = (0, 4, 8)
    seeds: Sequence[int] = (42,)
    selection: Selection = "random"
    limit: int | None = None  # evaluate this many samples (drawn with the seed), not the whole split
    support_size: int = 2048  # demonstrations come from this many support samples (drawn with the seed)
    batch_size: int = 8
    decoding: Decoding = "beam"
    on_error: OnError = "raise"
    vqa_variant: VQAVariant = "openflamingo"
    out_dir: str | Path | None = None
    progress: bool = True

    def validate(self) -> None:
        problems = []
        if not self.tasks:
            problems.append("no task given")
        if not self.shots or any(s < 0 for s in self.shots):
            problems.append(f"shots must be non-negative numbers, got {list(self.shots)}")
        if not self.seeds:
            problems.append("no seed given")
        if self.selection not in ("random", "rices"):
            problems.append(f"selection must be 'random' or 'rices', got {self.selection!r}")
        if self.decoding not in ("beam", "greedy"):
            problems.append(f"decoding must be 'beam' or 'greedy', got {self.decoding!r}")
        if self.on_error not in ("raise", "skip"):
            problems.append(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")
        if self.limit is not None and self.limit < 1:
            problems.append(f"limit must be >= 1, got {self.limit}")
        if self.batch_size < 1 or self.support_size < 2:
            problems.append("batch_size must be >= 1 and support_size >= 2")
        if problems:
            raise ValueError("; ".join(problems))


def run_eval(pipe: Any, config: EvalConfig) -> list[EvalResult]:
    """Run every (task, shots, seed) of `config`; write the report if `config.out_dir` (rank 0 only)."""
    config.validate()
    evaluator = Evaluator(pipe, config)
    results = []
    for task in config.tasks:
        data = load_task_data(task, config.data, config.on_error)
        for message in data.problems:
            logger.warning("%s: skipped bad input: %s", task, message)
        results += evaluator.run_task(data)
    if config.out_dir is not None and distributed.rank() == 0:
        paths = write_report(results, config.out_dir)
        logger.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return results


def template_for(template: PromptTemplate, marker: str) -> PromptTemplate:
    """The template with `marker` ending each demonstration exactly once (a "\n" marker stands in for the
    "\n" separator of open-ended demonstrations instead of doubling it)."""
    return template.with_end_of_chunk("" if marker == template.demo_separator else marker)


class Evaluator:
    def __init__(self, pipe: Any, config: EvalConfig) -> None:
        self.pipe, self.config = pipe, config
        self.features = ImageFeatureStore(pipe)
        self.marker, self.stop_ids = end_of_demo_marker(pipe)
        self.rank, self.world_size = distributed.rank(), distributed.world_size()

    def run_task(self, data: TaskData) -> list[EvalResult]:
        self.classes = list(data.eval.class_names or data.support.class_names)
        if data.spec.family == "classification" and len(self.classes) < 2:
            raise AnnotationError(f"{data.spec.name}: classification needs at least 2 class names")
        if data.spec.metric == "roc_auc" and not {"no", "yes"} <= set(self.classes):
            raise AnnotationError(f"{data.spec.name}: ROC AUC needs the classes 'no' and 'yes', got {self.classes}")
        results = []
        for seed in self.config.seeds:
            queries = self.eval_subset(data, seed)
            support = [data.support[i] for i in support_subset(len(data.support), self.config.support_size, seed)]
            rices = None
            if self.config.selection == "rices":
                rices, support = self.support_features(data, support)
            for shots in self.config.shots:
                if effective_num_shots(shots) > len(support):
                    raise ValueError(f"{data.spec.name}: {shots} shots need more than the {len(support)} "
                                     "support samples")
                results.append(self.run(data, queries, support, rices, shots, seed))
        return results

    def eval_subset(self, data: TaskData, seed: int) -> list[EvalSample]:
        n, limit = len(data.eval), self.config.limit
        if limit is None or limit >= n:
            return list(data.eval)
        chosen = np.random.default_rng(seed).choice(n, size=limit, replace=False)
        return [data.eval[int(i)] for i in sorted(chosen)]

    def support_features(self, data: TaskData, support: list[EvalSample]) -> tuple[RICES, list[EvalSample]]:
        """RICES over the support images (each process encodes every world_size-th one), and the support
        samples it covers: with on_error="skip" a support image that cannot be read is left out."""
        mine, problems = {}, []
        for i, sample in enumerate(support):
            if i % self.world_size != self.rank:
                continue
            try:
                mine[i] = self.features.get(sample.image, f"support sample {sample.id!r}").pooled.cpu()
            except (ValueError, OSError) as error:
                if self.config.on_error == "raise":
                    raise EvalError(f"{data.spec.name}: {error}") from error
                problems.append(f"support: {error}")
        merged, all_problems = {}, []
        for part, part_problems in distributed.all_gather((mine, problems)):
            merged.update(part)
            all_problems += part_problems
        for message in all_problems:
            logger.warning("%s: skipped bad input: %s", data.spec.name, message)
        data.problems += [m for m in all_problems if m not in data.problems]
        kept = sorted(merged)
        return RICES(torch.stack([merged[i] for i in kept])), [support[i] for i in kept]

    def run(self, data: TaskData, queries: list[EvalSample], support: list[EvalSample], rices: RICES | None,
            shots: int, seed: int) -> EvalResult:
        spec, size = data.spec, self.config.batch_size
        batches = [list(range(i, min(i + size, len(queries)))) for i in range(0, len(queries), size)]
        mine = batches[self.rank::self.world_size]
        records: dict[int, dict] = {}
        running = RunningScore(spec, self.config.vqa_variant)
        bar = tqdm(total=sum(map(len, mine)), desc=f"{spec.name} {shots}-shot seed {seed}", unit="q",
                   disable=not self.config.progress or self.rank != 0, dynamic_ncols=True)
        with bar:
            for batch in mine:
                done = self.run_batch(spec, [queries[i] for i in batch], batch, support, rices, shots, seed)
                for i, record in done.items():
                    running.add(queries[i], record)
                records.update(done)
                bar.update(len(batch))
                score = running.value()
                if score is not None:
                    bar.set_postfix_str(f"{spec.metric} {score:.2f}")
        parts = distributed.all_gather(records)
        merged = {i: r for part in parts for i, r in part.items()}
        result = None
        if self.rank == 0:
            result = self.score(data, queries, [merged[i] for i in range(len(queries))], len(support), shots, seed)
            result.extra["queries_per_process"] = [len(part) for part in parts]
        return distributed.broadcast(result)

    def run_batch(self, spec: TaskSpec, batch: list[EvalSample], positions: list[int], support: list[EvalSample],
                  rices: RICES | None, shots: int, seed: int) -> dict[int, dict]:
        """Records of one batch; with on_error="skip" a failing batch is retried query by query, and a
        query that still fails gets a record with its error."""
        try:
            return dict(zip(positions, self.evaluate_queries(spec, batch, support, rices, shots, seed)))
        except (ValueError, OSError) as error:
            if len(batch) == 1:
                where = f"{spec.name}: sample {batch[0].id!r} (image {_describe(batch[0].image)})"
                if self.config.on_error == "raise":
                    raise EvalError(f"{where}: {error}") from error
                logger.warning("skipping %s: %s", where, error)
                return {positions[0]: {"id": batch[0].id, "error": f"{where}: {error}"}}
        out = {}
        for query, position in zip(batch, positions):
            out.update(self.run_batch(spec, [query], [position], support, rices, shots, seed))
        return out

    def evaluate_queries(self, spec: TaskSpec, batch: list[EvalSample], support: list[EvalSample], rices: RICES | None,
                         shots: int, seed: int) -> list[dict]:
        k, template = effective_num_shots(shots), template_for(spec.template, self.marker)
        prompts, demos = [], []
        for query in batch:
            if rices is not None:
                query_features = self.features.get(query.image, f"sample {query.id}").pooled
                idx = rices.select(query_features, k)[0]
            else:
                idx = random_demo_indices(len(support), k, seed, query.id)
            prompts.append(fewshot_prompt(query, support, shots, template, seed=seed, demo_indices=idx))
            demos.append([support[i].id for i in idx])
        records = [{"id": q.id, "demos": d, "images": count_images(p), "prompt": render_prompt(p)}
                   for q, d, p in zip(batch, demos, prompts)]
        if spec.family == "classification":
            self.classify(spec, batch, prompts, records)
        else:
            inputs = encode_prompts(self.pipe, prompts, self.features)
            tokens = generate_tokens(self.pipe, inputs, self.config.decoding, spec.max_new_tokens, spec.num_beams,
                                     spec.length_penalty, self.stop_ids)
            for record, ids in zip(records, tokens):
                text = self.pipe.detokenize(ids)
                record["output"] = text.split(self.marker, 1)[0]
                record["prediction"] = spec.postprocess(record["output"])
        return records

    def classify(self, spec: TaskSpec, batch: list[EvalSample], prompts: list, records: list[dict]) -> None:
        names = self.classes
        sums, counts = class_log_likelihoods(self.pipe, prompts, names, self.features)
        means = sums / counts  # the reference ranks classes by mean per-token log-probability
        for row, record in enumerate(records):
            best = int(torch.argmax(means[row]))  # ties: the first class
            record["prediction"] = names[best]
            if len(names) <= 20:
                record["class_scores"] = dict(zip(names, means[row].tolist()))
            if spec.metric == "roc_auc":
                record["p_yes"] = yes_probability(float(means[row, names.index("no")]),
                                                  float(means[row, names.index("yes")]))

    def score(self, data: TaskData, queries: list[EvalSample], records: list[dict], support_size: int, shots: int,
              seed: int) -> EvalResult:
        spec = data.spec
        ok = [(q, r) for q, r in zip(queries, records) if "error" not in r]
        errors = [r["error"] for r in records if "error" in r]
        if not ok:
            raise EvalError(f"{spec.name} {shots}-shot seed {seed}: every query failed; first: {errors[:1]}")
        samples = [q for q, _ in ok]
        if spec.family == "classification":
            predictions = [r["p_yes"] if spec.metric == "roc_auc" else r["prediction"] for _, r in ok]
            score = score_predictions(spec, samples, predictions)
        else:
            score = score_predictions(spec, samples, [r["output"] for _, r in ok], vqa_variant=self.config.vqa_variant)
        extra = {"model": self.pipe.name, "selection": self.config.selection, "decoding": self.config.decoding,
                 "num_beams": spec.num_beams if self.config.decoding == "beam" else 1, "marker": self.marker,
                 "support": support_size, "skipped": len(errors),
                 "skipped_at_load": len(data.problems), "problems": (data.problems + errors)[:20]}
        if spec.metric == "vqa_accuracy":
            extra["vqa_variant"] = self.config.vqa_variant
        if self.config.out_dir is not None:
            self.write_predictions(spec, shots, seed, queries, records)
        return EvalResult(spec.name, shots, float(score), len(samples), seed, spec.metric, extra)

    def write_predictions(self, spec: TaskSpec, shots: int, seed: int, queries: list[EvalSample],
                          records: list[dict]) -> None:
        path = Path(self.config.out_dir) / "predictions" / f"{spec.name}-{shots}shot-seed{seed}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for query, record in zip(queries, records):
                # every reference (and, for VQA, the annotators' answer records): the score can be recomputed
                reference = query.label if spec.family == "classification" else list(query.references)
                answers = {"answers": list(query.answer_records)} if query.answer_records else {}
                f.write(json.dumps({**record, "reference": reference, **answers}, ensure_ascii=False) + "\n")


class RunningScore:
    """The score so far on this process's queries, for the progress bar, updated per record (CIDEr: none,
    it needs the whole corpus and a Java tokenizer)."""

    def __init__(self, spec: TaskSpec, variant: VQAVariant) -> None:
        self.spec, self.variant = spec, variant
        self.total, self.count = 0.0, 0
        self.labels: list[str] = []
        self.p_yes: list[float] = []

    def add(self, query: EvalSample, record: dict) -> None:
        if "error" in record or self.spec.metric == "cider":
            return
        self.count += 1
        if self.spec.metric == "vqa_accuracy":
            answers = query.answer_records or query.references
            self.total += 100 * vqa_question_accuracy(record["prediction"], answers, self.variant)
        elif self.spec.metric == "roc_auc":
            self.labels.append(query.label)
            self.p_yes.append(record["p_yes"])
        else:
            self.total += record["prediction"] == query.label

    def value(self) -> float | None:
        if self.count == 0 or self.spec.metric == "cider":
            return None
        if self.spec.metric == "roc_auc":
            if len(set(self.labels)) < 2:
                return None
            return roc_auc(self.labels, self.p_yes)
        return self.total / self.count


def _describe(image: Any) -> str:
    return str(image) if isinstance(image, (str, Path)) else f"<{type(image).__name__}>"
