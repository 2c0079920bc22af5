"""Writing evaluation results: JSON, a markdown table, and a PNG plot of score vs number of shots."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class EvalResult:
    task: str
    shots: int
    score: float  # in the task's reported unit (VQA %, CIDEr x100, AUC / accuracy in [0, 1])
    n: int  # number of evaluated samples
    seed: int
    metric: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. model, selection method, vqa variant


def _check(results: Sequence[EvalResult]) -> None:
    for i, r in enumerate(results):
        if not isinstance(r, EvalResult):
            raise ValueError(f"result #{i} is a {type(r).__name__}, not an EvalResult")


def aggregate_by_shots(results: Sequence[EvalResult]) -> dict[str, list[dict[str, float]]]:
    """Per task, per shot count (ascending): mean and population std over seeds (NaN scores ignored, as the
    reference harness's nanmean/nanstd), and the number of seeds."""
    _check(results)
    grouped: dict[str, dict[int, list[float]]] = {}
    for r in results:
        grouped.setdefault(r.task, {}).setdefault(r.shots, []).append(r.score)
    table = {}
    for task, by_shots in grouped.items():
        rows = []
        for shots in sorted(by_shots):
            scores = np.asarray(by_shots[shots], dtype=np.float64)
            finite = scores[~np.isnan(scores)]
            mean = float(finite.mean()) if finite.size else math.nan
            std = float(finite.std()) if finite.size else math.nan
            rows.append({"shots": shots, "mean": mean, "std": std, "seeds": int(scores.size)})
        table[task] = rows
    return table


def write_results_json(results: Sequence[EvalResult], path: str | Path) -> Path:
    """All runs plus the per-task, per-shot aggregate. NaN scores are written as null (valid JSON)."""
    _check(results)
    doc = {"results": [asdict(r) for r in results], "summary": aggregate_by_shots(results)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_nan_to_none(doc), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def read_results_json(path: str | Path) -> list[EvalResult]:
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    return [EvalResult(**{**r, "score": math.nan if r["score"] is None else r["score"]}) for r in doc["results"]]


def markdown_table(results: Sequence[EvalResult], digits: int = 2) -> str:
    """A markdown table with one row per run: task, shots, score, n, seed (sorted by task, shots, seed)."""
    _check(results)
    lines = ["| task | shots | score | n | seed |", "|---|---:|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: (r.task, r.shots, r.seed)):
        score = "nan" if math.isnan(r.score) else f"{r.score:.{digits}f}"
        lines.append(f"| {r.task} | {r.shots} | {score} | {r.n} | {r.seed} |")
    return "\n".join(lines) + "\n"


def write_markdown(results: Sequence[EvalResult], path: str | Path, digits: int = 2) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown_table(results, digits), encoding="utf-8")
    return path


def plot_score_vs_shots(results: Sequence[EvalResult], path: str | Path) -> Path:
    """One panel per task (units differ between tasks): mean score vs shots, with the std over seeds as
    error bars. Draws on an Agg canvas without pyplot: no display, no global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    summary = aggregate_by_shots(results)
    if not summary:
        raise ValueError("no results to plot")
    units = {r.task: r.metric for r in results}
    fig = Figure(figsize=(3.6 * len(summary), 3.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(summary), squeeze=False)
    for ax, (task, rows) in zip(axes[0], sorted(summary.items())):
        shots = [row["shots"] for row in rows]
        ax.errorbar(shots, [row["mean"] for row in rows], yerr=[row["std"] for row in rows],
                    marker="o", capsize=3)
        ax.set_xticks(shots)
        ax.set_title(task)
        ax.set_xlabel("shots")
        ax.set_ylabel(units[task] or "score")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def write_report(results: Sequence[EvalResult], out_dir: str | Path, stem: str = "results") -> dict[str, Path]:
    """results.json, results.md and results.png in `out_dir`."""
    _check(results)
    if not results:
        raise ValueError("no results to report")
    out_dir = Path(out_dir)
    return {
        "json": write_results_json(results, out_dir / f"{stem}.json"),
        "markdown": write_markdown(results, out_dir / f"{stem}.md"),
        "plot": plot_score_vs_shots(results, out_dir / f"{stem}.png"),
    }
