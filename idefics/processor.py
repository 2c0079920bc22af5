"""Prompts → model inputs, exactly as the reference `IdeficsProcessor` builds them.

A prompt is a list of items: text (`str`) and images (see `images.py`). A batch is a list of prompts.
Each image becomes `<fake_token_around_image><image><fake_token_around_image>` (consecutive images share
the fake token between them); `<s>` is written as text at the start; text items are stripped of spaces and
joined with no separator; instruct prompts may get `<end_of_utterance>` between consecutive text items.
Every token attends to the most recent preceding image only (`image_attention_mask`).

The pieces are pure functions (`prompt_text`, `image_attention_mask`) so they are testable without a model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .images import CLIP_MEAN, CLIP_STD, ImagePolicy, is_data_uri, is_url, load_image, preprocess
from .tokenizer import END_OF_UTTERANCE, FAKE_TOKEN, IMAGE_TOKEN, Tokenizer


@dataclass
class ImageSettings:
    size: int = 224
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD

    @classmethod
    def from_folder(cls, folder: str | Path, default_size: int = 224) -> "ImageSettings":
        path = Path(folder) / "preprocessor_config.json"
        if not path.exists():
            return cls(size=default_size)
        data = json.loads(path.read_text())
        return cls(size=int(data.get("image_size", default_size)),
                   mean=tuple(data.get("image_mean", CLIP_MEAN)), std=tuple(data.get("image_std", CLIP_STD)))


def is_batch(prompts: Sequence[Any]) -> bool:
    """The reference's rule: a list that contains lists is a batch of prompts."""
    return any(isinstance(p, (list, tuple)) for p in prompts)


def classify_items(prompt: Sequence[Any]) -> list[tuple[str, Any]]:
    """[("text", str) | ("image", item)]: strings that are URLs or data URIs are images."""
    out = []
    for item in prompt:
        if isinstance(item, str):
            stripped = item.strip(" ")
            out.append(("image", stripped) if is_url(stripped) or is_data_uri(stripped) else ("text", stripped))
        else:
            out.append(("image", item))
    return out


def prompt_text(kinds: Sequence[tuple[str, Any]], bos: str, eos: str | None = None,
                add_end_of_utterance_token: bool = False, add_eos_token: bool = False) -> str:
    text = bos or ""
    last_was_image = False
    for i, (kind, item) in enumerate(kinds):
        if kind == "image":
            text += (IMAGE_TOKEN + FAKE_TOKEN) if last_was_image else (FAKE_TOKEN + IMAGE_TOKEN + FAKE_TOKEN)
            last_was_image = True
        else:
            if add_end_of_utterance_token and i > 0 and not last_was_image:
                text += END_OF_UTTERANCE
            text += item
            last_was_image = False
    if add_eos_token and eos:
        text += eos
    return text


def image_attention_mask(input_ids: torch.Tensor, image_token_id: int, eos_token_id: int | None,
                         num_images: int) -> torch.Tensor:
    """[B, T] ids → [B, T, num_images] 0/1: each token sees the most recent `<image>` at or before it;
    after an end-of-sequence token nothing is seen until the next image."""
    is_image = input_ids == image_token_id
    index = is_image.long().cumsum(-1) - 1  # which image is the latest, -1 before the first
    if eos_token_id is not None:
        # positions strictly after an EOS and before the next image see nothing
        is_eos = (input_ids == eos_token_id).long()
        eos_before = torch.nn.functional.pad(is_eos, (1, 0))[:, :-1]
        # count EOS seen since the last image: cumulative EOS minus its value at the latest image
        eos_cum = eos_before.cumsum(-1)
        at_image = torch.where(is_image, eos_cum, torch.zeros_like(eos_cum))
        eos_at_last_image = torch.cummax(at_image, dim=-1).values
        index = index.masked_fill(eos_cum > eos_at_last_image, -1)
    index = index.masked_fill(index >= num_images, -1)
    mask = torch.nn.functional.one_hot(index.clamp(min=0), num_classes=num_images)
    return mask.masked_fill((index < 0)[..., None], 0)


class Processor:
    """`processor(prompts)` → dict with `input_ids`, `attention_mask`, `pixel_values`, `image_attention_mask`."""

    def __init__(self, tokenizer: Tokenizer, images: ImageSettings | None = None,
                 policy: ImagePolicy | None = None, max_length: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.images = images or ImageSettings()
        self.policy = policy or ImagePolicy()
        self.max_length = max_length
        self.image_token_id = tokenizer.require_id(IMAGE_TOKEN)
        self.fake_token_id = tokenizer.require_id(FAKE_TOKEN)

    def __call__(self, prompts: Sequence[Any], add_end_of_utterance_token: bool | None = None,
                 add_eos_token: bool = False) -> dict[str, torch.Tensor]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
            raise TypeError("prompts must be a list of items (one prompt) or a list of such lists (a batch), "
                            f"got {type(prompts).__name__}")
        batch = [list(p) for p in prompts] if is_batch(prompts) else [list(prompts)]
        if add_end_of_utterance_token is None:
            add_end_of_utterance_token = self.tokenizer.has_end_of_utterance
        texts, pixel_lists = [], []
        for b, prompt in enumerate(batch):
            if not isinstance(prompt, list):
                raise TypeError(f"prompt {b}: expected a list of items, got {type(prompt).__name__}")
            kinds = classify_items(prompt)
            texts.append(prompt_text(kinds, self.tokenizer.bos_token or "", self.tokenizer.eos_token,
                                     add_end_of_utterance_token, add_eos_token))
            pixels = []
            for i, (kind, item) in enumerate(kinds):
                if kind == "image":
                    where = f"prompt {b}, item {i}" if len(batch) > 1 else f"item {i}"
                    image = load_image(item, where, self.policy)
                    pixels.append(preprocess(image, self.images.size, self.images.mean, self.images.std))
            pixel_lists.append(pixels)
        return self.encode(texts, pixel_lists)

    def encode(self, texts: list[str], pixel_lists: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Tokenise built prompt strings, left-pad, stack images and build the image mask."""
        ids = self.tokenizer.encode_batch(texts)
        if self.max_length is not None:
            for b, row in enumerate(ids):
                if len(row) > self.max_length:
                    raise ValueError(f"prompt {b} is {len(row)} tokens long; the model accepts at most "
                                     f"{self.max_length} (max_position_embeddings)")
        width = max(len(row) for row in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in ids], dtype=torch.long)
        attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids], dtype=torch.long)
        num_images = max(1, max(len(p) for p in pixel_lists))
        size = self.images.size
        pixel_values = torch.zeros(len(ids), num_images, 3, size, size)
        for b, pixels in enumerate(pixel_lists):
            kept = pixels[: min(len(pixels), int((input_ids[b] == self.image_token_id).sum()))]
            if kept:
                pixel_values[b, : len(kept)] = torch.stack(kept)
        if any(pixel_lists):
            mask = image_attention_mask(input_ids, self.image_token_id, self.tokenizer.eos_token_id, num_images)
        else:
            mask = torch.zeros(len(ids), width, 1, dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                "image_attention_mask": mask}
