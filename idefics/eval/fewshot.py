"""Choosing in-context demonstrations and building the interleaved few-shot prompt.

A prompt is the project's prompt format: a list whose items are `str` (text) or images (PIL.Image.Image,
pathlib.Path, bytes). Here images are the samples' file paths; the pipeline opens them.

Protocol (Flamingo / OpenFlamingo): demonstrations are drawn at random from a support set, or by RICES (the
support images most similar to the query, most similar LAST, i.e. next to the query); "0-shot" means two
demonstrations shown as text only, hinting the answer format without showing any image but the query's.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from idefics.eval.annotations import EvalSample
from idefics.eval.tasks import PromptTemplate

PromptItem = str | Image.Image | Path | bytes
Prompt = list[PromptItem]
ZERO_SHOT_TEXT_DEMOS = 2


def effective_num_shots(num_shots: int, zero_shot_demos: int = ZERO_SHOT_TEXT_DEMOS) -> int:
    """How many demonstrations a `num_shots` run shows: 0-shot still shows `zero_shot_demos`, text-only."""
    if num_shots < 0:
        raise ValueError(f"num_shots must be >= 0, got {num_shots}")
    return num_shots if num_shots > 0 else zero_shot_demos


def support_subset(num_items: int, size: int, seed: int) -> list[int]:
    """Indices (sorted) of a random support set of `size` items out of `num_items` training items.

    The reference protocol draws 2048 training items (IDEFICS: 1K or 5K for ImageNet); all items if
    size >= num_items.
    """
    if size >= num_items:
        return list(range(num_items))
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(num_items, size=size, replace=False))


def random_demo_indices(support_size: int, k: int, seed: int, query_id: str) -> list[int]:
    """k distinct support indices drawn at random for one query.

    The draw depends only on (seed, query_id, support_size, k), not on the order or batching of queries, so
    runs are reproducible when sharded. (The reference harness draws from one stream in evaluation order;
    its exact choices are not reproduced.)
    """
    if k > support_size:
        raise ValueError(f"cannot draw {k} demonstrations from a support set of {support_size}")
    rng = random.Random(f"{seed}/{query_id}")  # str seeds are hashed with sha512: stable across processes
    return rng.sample(range(support_size), k)


class RICES:
    """Retrieval-based In-Context Example Selection over fixed support-set image features [N, D]."""

    def __init__(self, support_features: torch.Tensor):
        if support_features.ndim != 2 or support_features.shape[0] == 0:
            raise ValueError(f"support features must be a non-empty [N, D] tensor, got {tuple(support_features.shape)}")
        self.support = _l2_normalize(support_features.float())

    def __len__(self) -> int:
        return self.support.shape[0]

    def similarities(self, query_features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity [Q, N] of each query to each support item."""
        query = query_features.float().reshape(-1, query_features.shape[-1])
        if query.shape[1] != self.support.shape[1]:
            raise ValueError(f"query features have dimension {query.shape[1]}, support {self.support.shape[1]}")
        return _l2_normalize(query) @ self.support.T

    def select(self, query_features: torch.Tensor, k: int) -> list[list[int]]:
        """Per query ([D] or [Q, D]), the k most similar support indices ordered so the most similar is LAST.

        Ties keep the lower support index as the more similar (stable sort), so the result is deterministic.
        """
        if not 1 <= k <= len(self):
            raise ValueError(f"k={k} must be between 1 and the support-set size {len(self)}")
        order = torch.sort(self.similarities(query_features), dim=1, descending=True, stable=True).indices
        return [row[:k].flip(0).tolist() for row in order]


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    norms = x.norm(dim=-1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("a feature vector is all zeros: cosine similarity is undefined")
    return x / norms


def build_prompt(
    query: EvalSample, demos: Sequence[EvalSample], template: PromptTemplate, *, demo_images: bool = True
) -> Prompt:
    """The interleaved prompt: each demonstration (its image if `demo_images`, then its text with the
    answer), then the query image and the query text, which ends where the model's answer starts.

    Pure function: images are the samples' paths; adjacent text pieces are merged into one str.
    """
    items: Prompt = []
    for demo in demos:
        if demo_images:
            items.append(demo.image)
        items.append(template.demo_text(demo))
    items += [query.image, template.query_text(query)]
    return _merge_text(items)


def fewshot_prompt(
    query: EvalSample,
    support: Sequence[EvalSample],
    num_shots: int,
    template: PromptTemplate,
    *,
    seed: int = 42,
    demo_indices: Sequence[int] | None = None,
) -> Prompt:
    """The prompt of one query in a `num_shots` run: random demonstrations (or `demo_indices`, e.g. from
    RICES.select, most similar last), with the 0-shot trick of two text-only demonstrations."""
    k = effective_num_shots(num_shots)
    if demo_indices is None:
        demo_indices = random_demo_indices(len(support), k, seed, query.id)
    elif len(demo_indices) != k:
        raise ValueError(f"a {num_shots}-shot prompt shows {k} demonstrations, got {len(demo_indices)} indices")
    return build_prompt(query, [support[i] for i in demo_indices], template, demo_images=num_shots > 0)


def _merge_text(items: Sequence[PromptItem]) -> Prompt:
    merged: Prompt = []
    for item in items:
        if isinstance(item, str) and merged and isinstance(merged[-1], str):
            merged[-1] += item
        elif not (isinstance(item, str) and item == ""):
            merged.append(item)
    return merged


def render_prompt(prompt: Sequence[PromptItem], image_token: str = "<image>") -> str:
    """The prompt as one string with `image_token` for each image (for logs and comparison with the
    reference harness, whose prompts are strings with "<image>")."""
    return "".join(item if isinstance(item, str) else image_token for item in prompt)


def count_images(prompt: Sequence[PromptItem]) -> int:
    return sum(not isinstance(item, str) for item in prompt)
