"""In-context learning of a new answer format, the check of idefics-mini's few-shot ability.

The prompt holds only images and answers, no question and no instruction:

    <image>Tag: red\n<image>Tag: blue\n<image>Tag:          (2 shots, format "Tag: {x}", label kind colour)

Which property to name (colour, shape, count or digit) and how to write it are given only by the
demonstrations, in a format that never occurs in training (`idefics.data.language.HELD_OUT_FORMATS`). At 0
shots the prompt is the query image and the format's prefix alone, so the model cannot know the task: the
score must rise with shots, as in the Flamingo/IDEFICS tables, if the model learns in context. Queries come
from the synthetic test split, demonstrations from the validation split, drawn at random per query.

A completion is right when its first line, normalised (lower case, punctuation removed), equals the rest of
the formatted answer ("Tag: red" after the prompt "Tag:" is " red"; "<red>" after "<" is "red>").
"""

from __future__ import annotations

import io
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..data.language import HELD_OUT_FORMATS
from ..data.shards import ShardReader, expand_shards

LABEL_KINDS = ("colour", "shape", "count", "digit")
SHOTS = (0, 1, 2, 4)


def label_of(meta: dict, kind: str) -> str | None:
    """The label a sample's ground truth gives for `kind`, or None if the image does not have one (a
    colour or shape needs a single-object scene, a count a scene of copies of one object)."""
    if kind == "digit":
        return str(meta["digit"]) if meta.get("task") == "digit" else None
    if meta.get("task") != "scene":
        return None
    if kind in ("colour", "shape"):
        return meta["objects"][0][kind] if meta.get("mode") == "single" else None
    if kind == "count":
        return str(meta["count"]) if meta.get("mode") == "count" else None
    raise ValueError(f"unknown label kind {kind!r}; expected one of {LABEL_KINDS}")


def prefix_of(fmt: str) -> str:
    """The part of a format before the answer, without trailing spaces: where generation starts."""
    return fmt.split("{x}")[0].rstrip(" ")


def build_prompt(demos: Sequence[tuple[Any, str]], query_image: Any, fmt: str) -> list[Any]:
    """[image, "Tag: red\\n", ..., query image, "Tag:"] for demonstrations (image, label)."""
    items: list[Any] = []
    for image, label in demos:
        items += [image, fmt.format(x=label) + "\n"]
    return items + [query_image, prefix_of(fmt)]


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def is_correct(completion: str, fmt: str, label: str) -> bool:
    """Does the completion write `label` in format `fmt` (first line, normalised)?"""
    expected = fmt.format(x=label)[len(prefix_of(fmt)):]
    first_line = completion.split("\n", 1)[0]
    return _normalise(first_line) == _normalise(expected)


@dataclass
class Item:
    key: str
    image: bytes
    label: str


def load_items(data: Path, split: str, kind: str, limit: int | None = None) -> list[Item]:
    """Images of `split` that have a `kind` label, in shard order."""
    source = "digit_pairs" if kind == "digit" else "scene_pairs"
    items: list[Item] = []
    for sample in ShardReader(expand_shards(str(data / split / f"{source}-*.tar")), decode_images=False):
        label = label_of(sample.meta, kind)
        if label is not None:
            image = next(x for x in sample.items if not isinstance(x, str))
            items.append(Item(sample.key, image, label))
            if limit is not None and len(items) >= limit:
                break
    if not items:
        raise ValueError(f"{data / split}: no {source} samples with a {kind} label (make the data with "
                         "`idefics data make-mini`)")
    return items


def run(generate: Callable[[list[Any]], str], data: Path, *, queries_per_kind: int = 30,
        shots: Sequence[int] = SHOTS, seed: int = 0, progress: bool = True) -> list[dict]:
    """Score every (label kind, shots) cell; query i uses format i mod len(HELD_OUT_FORMATS), and the same
    query sees the same demonstrations (growing with shots: the 2-shot ones are the first 2 of the 4-shot ones).

    `generate(prompt) -> completion`. Returns rows {kind, shots, accuracy (%), n}."""
    from PIL import Image
    from tqdm import tqdm

    def image(data_bytes: bytes) -> Image.Image:
        return Image.open(io.BytesIO(data_bytes))

    rows = []
    for kind in LABEL_KINDS:
        queries = load_items(data, "test", kind, queries_per_kind)
        support = load_items(data, "val", kind)
        right = {k: 0 for k in shots}
        for i, query in enumerate(tqdm(queries, desc=f"few-shot {kind}", leave=False, disable=not progress)):
            fmt = HELD_OUT_FORMATS[i % len(HELD_OUT_FORMATS)]
            chosen = random.Random(f"{seed}:{kind}:{query.key}").sample(support, max(shots))
            demos, query_image = [(image(d.image), d.label) for d in chosen], image(query.image)
            for k in shots:
                right[k] += is_correct(generate(build_prompt(demos[:k], query_image, fmt)), fmt, query.label)
        rows += [{"kind": kind, "shots": k, "accuracy": 100 * right[k] / len(queries), "n": len(queries)}
                 for k in shots]
    return rows


def mean_by_shots(rows: Sequence[dict]) -> dict[int, float]:
    by: dict[int, list[float]] = {}
    for r in rows:
        by.setdefault(r["shots"], []).append(r["accuracy"])
    return {k: sum(v) / len(v) for k, v in sorted(by.items())}


def plot(results: dict[str, Sequence[dict]], path: Path) -> Path:
    """Accuracy vs shots: one line per label kind and the mean, for each model variant (e.g. the model and
    its gates-closed ablation, dashed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    colours = dict(zip(LABEL_KINDS + ("mean",), ("tab:red", "tab:green", "tab:blue", "tab:purple", "black")))
    for variant, (name, rows) in enumerate(results.items()):
        style = "-" if variant == 0 else "--"
        for kind in LABEL_KINDS:
            cells = [r for r in rows if r["kind"] == kind]
            ax.plot([r["shots"] for r in cells], [r["accuracy"] for r in cells], style, marker="o", markersize=3,
                    color=colours[kind], alpha=0.6, label=f"{kind} ({name})" if variant == 0 else None)
        means = mean_by_shots(rows)
        ax.plot(list(means), list(means.values()), style, marker="s", linewidth=2.5, color="black",
                label=f"mean ({name})")
    ax.set_xticks(sorted({r["shots"] for rows in results.values() for r in rows}))
    ax.set_xlabel("shots (demonstrations in the prompt)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("idefics-mini: a new answer format, learned in context")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
