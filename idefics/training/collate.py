"""Samples → training tensors. Pure functions, testable without a model.

A sample (`idefics.data.Sample`: a pair, an interleaved document or a chat) becomes one prompt string built by
the processor's own `prompt_text`, so training sees exactly the tokens inference sees:

    pair / document   <bos> item item ... <eos>        images as <fake><image><fake>, text items stripped of
                                                        spaces and joined with no separator (as inference)
    chat              <bos>User:<fake><image><fake>What digit is this?<end_of_utterance>
                      Assistant: seven<end_of_utterance>
                      User: And the colour?<end_of_utterance>
                      Assistant: black<end_of_utterance><eos>

The string is tokenised in one piece; a token is a target (its label is its id) when its first character
lies in a segment that carries loss:

    pair / document   every text token and the final <eos>          (the model learns where text ends)
    chat              assistant answers, with their <end_of_utterance>  (the space after "Assistant:" is
                      part of the answer, so a prompt ending in "Assistant:" continues exactly as trained)
    never             <bos>, <image>, <fake_token_around_image>, the user's turns, role names, padding

Packing puts several encoded samples in one row up to `seq_len`. Every sample ends with <eos>, and the image
mask sends tokens after an <eos> to no image until the next one, so each text attends (by cross-attention)
only to its own images; self-attention is causal over the whole row, and no label crosses a sample boundary
(the first token of a sample, <bos>, is never a target). Rows are right-padded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

from ..data import DataError, Sample
from ..images import ImageError, ImagePolicy, load_image, preprocess
from ..processor import ImageSettings, image_attention_mask, prompt_text
from ..tokenizer import END_OF_UTTERANCE, FAKE_TOKEN, IMAGE_TOKEN, Tokenizer

IGNORE_INDEX = -100
USER, ASSISTANT = "User:", "Assistant:"


@dataclass
class Segment:
    kind: str  # "text" | "image"
    item: Any  # the text, or the image (PIL image / encoded bytes)
    loss: bool = False  # does this segment's text carry loss?


@dataclass
class Encoded:
    """One sample as tokens: `labels[t]` is `input_ids[t]` where token t is a target, else IGNORE_INDEX."""

    input_ids: list[int]
    labels: list[int]
    images: list[torch.Tensor]  # [3, H, W] per `<image>` token, in order
    key: str = ""
    shard: str = ""
    source: str = ""
    # per image: made-up classifier predictions {class id: probability} (meta "class_probs"), or None
    class_probs: list[dict[int, float] | None] = field(default_factory=list)


def sample_segments(sample: Sample) -> list[Segment]:
    """The prompt items of a sample in order, each marked with whether it carries loss (see module doc).
    Text is stripped of spaces at both ends, as the processor does with prompt items."""
    def content(items: list[Any], loss: bool) -> list[Segment]:
        return [Segment("text", x.strip(" "), loss) if isinstance(x, str) else Segment("image", x)
                for x in items]

    if sample.kind in ("pair", "document"):
        return content(sample.items, True)
    if sample.kind != "chat":
        raise DataError(f"unknown sample kind {sample.kind!r}", key=sample.key)
    out: list[Segment] = []
    for i, turn in enumerate(sample.turns):
        answer = turn.role == "assistant"
        if i:
            out.append(Segment("text", "\n"))
        out.append(Segment("text", ASSISTANT if answer else USER))
        parts = content(turn.content, answer)
        if parts and parts[0].kind == "text" and parts[0].item:
            parts[0].item = " " + parts[0].item  # "User: What..." but "User:<image>What..."
        out += parts
        out.append(Segment("text", END_OF_UTTERANCE, answer))
    return out


def segments_text(segments: list[Segment], bos: str, eos: str, eos_loss: bool) -> tuple[str, list[tuple[int, int]]]:
    """The prompt string of `segments` (built by the processor's `prompt_text`, then `eos`) and the character
    spans that carry loss. Each span is measured as the growth of the prompt when its segment is appended,
    which is exact because `prompt_text` only ever appends."""
    kinds = [(s.kind, s.item) for s in segments]
    spans, start = [], len(prompt_text([], bos))
    for i, segment in enumerate(segments):
        end = len(prompt_text(kinds[: i + 1], bos))
        if segment.loss and end > start:
            spans.append((start, end))
        start = end
    text = prompt_text(kinds, bos) + eos
    if eos_loss:
        spans.append((len(text) - len(eos), len(text)))
    return text, spans


def label_tokens(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]],
                 never: set[int]) -> list[int]:
    """labels[t] = ids[t] if token t starts inside a loss span and is not in `never`, else IGNORE_INDEX."""
    labels = []
    for token, (start, _) in zip(ids, offsets):
        inside = any(a <= start < b for a, b in spans)
        labels.append(token if inside and token not in never else IGNORE_INDEX)
    return labels


class SampleEncoder:
    """Sample → `Encoded`. Raises `DataError` (naming the key) for text that contains the image markers, an
    image that fails to decode, or a sample longer than `seq_len` tokens or with more than `max_images`."""

    def __init__(self, tokenizer: Tokenizer, images: ImageSettings, seq_len: int, max_images: int = 8) -> None:
        if tokenizer.eos_token is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token; training packs samples separated by eos")
        self.tokenizer, self.images = tokenizer, images
        self.seq_len, self.max_images = seq_len, max_images
        self.image_token_id = tokenizer.require_id(IMAGE_TOKEN)
        self.fake_token_id = tokenizer.require_id(FAKE_TOKEN)
        self.never = {self.image_token_id, self.fake_token_id}
        if tokenizer.bos_token_id is not None:
            self.never.add(tokenizer.bos_token_id)
        self.policy = ImagePolicy(allow_urls=False)

    def __call__(self, sample: Sample, source: str = "") -> Encoded:
        segments = sample_segments(sample)
        for s in segments:
            if s.kind == "text" and (IMAGE_TOKEN in s.item or FAKE_TOKEN in s.item):
                raise DataError(f"text contains {IMAGE_TOKEN} or {FAKE_TOKEN}; images must be image items",
                                key=sample.key, shard=sample.shard, category="field")
        n_images = sum(s.kind == "image" for s in segments)
        if n_images > self.max_images:
            raise DataError(f"{n_images} images, more than max_images={self.max_images}", key=sample.key,
                            shard=sample.shard, category="too_many_images")
        text, spans = segments_text(segments, self.tokenizer.bos_token or "", self.tokenizer.eos_token,
                                    eos_loss=sample.kind != "chat")
        encoding = self.tokenizer.backend.encode(text, add_special_tokens=False)
        ids = encoding.ids
        if len(ids) > self.seq_len:
            raise DataError(f"{len(ids)} tokens, longer than seq_len={self.seq_len}", key=sample.key,
                            shard=sample.shard, category="too_long")
        labels = label_tokens(ids, encoding.offsets, spans, self.never)
        pixels = []
        for i, s in enumerate(x for x in segments if x.kind == "image"):
            try:
                image = load_image(s.item, f"image {i}", self.policy)
            except ImageError as error:
                raise DataError(str(error), key=sample.key, shard=sample.shard, category="image") from None
            pixels.append(preprocess(image, self.images.size, self.images.mean, self.images.std))
        return Encoded(ids, labels, pixels, sample.key, sample.shard, source,
                       class_probs=self.class_probs(sample, len(pixels)))

    @staticmethod
    def class_probs(sample: Sample, n_images: int) -> list[dict[int, float] | None]:
        given = sample.meta.get("class_probs")
        if given is None:
            return [None] * n_images
        if not isinstance(given, list) or len(given) != n_images:
            raise DataError(f"meta.class_probs must list one entry (or null) per image ({n_images})",
                            key=sample.key, shard=sample.shard, category="field")
        try:
            return [None if g is None else {int(c): float(p) for c, p in g} for g in given]
        except (TypeError, ValueError):
            raise DataError("meta.class_probs entries must be [[class id, probability], ...] or null",
                            key=sample.key, shard=sample.shard, category="field") from None


def pack(encoded: Iterable[Encoded], seq_len: int, max_images: int) -> Iterator[list[Encoded]]:
    """Greedy packing: consecutive samples share a row while the row stays within `seq_len` tokens and
    `max_images` images; a sample that does not fit starts the next row."""
    row: list[Encoded] = []
    tokens = images = 0
    for sample in encoded:
        n, m = len(sample.input_ids), len(sample.images)
        if row and (tokens + n > seq_len or images + m > max_images):
            yield row
            row, tokens, images = [], 0, 0
        row.append(sample)
        tokens, images = tokens + n, images + m
    if row:
        yield row


@dataclass
class Collator:
    """Rows of packed samples → the model's inputs plus `labels`, all [B, T] (images [B, N, 3, H, W])."""

    pad_token_id: int
    image_token_id: int
    eos_token_id: int
    image_size: int
    pad_to: int | None = None  # pad every batch to this length (constant shapes) instead of the longest row
    num_classes: int = 1000  # width of `image_class_probs` (made-up classifier predictions, when a sample has them)
    stats: dict[str, int] = field(default_factory=dict)

    def __call__(self, rows: list[list[Encoded]]) -> dict[str, torch.Tensor]:
        ids = [[t for s in row for t in s.input_ids] for row in rows]
        labels = [[t for s in row for t in s.labels] for row in rows]
        images = [[p for s in row for p in s.images] for row in rows]
        width = max(self.pad_to or 0, max(len(r) for r in ids))
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        label_t = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for b, (row_ids, row_labels) in enumerate(zip(ids, labels)):
            input_ids[b, : len(row_ids)] = torch.tensor(row_ids)
            label_t[b, : len(row_labels)] = torch.tensor(row_labels)
            attention[b, : len(row_ids)] = 1
        n = max(1, max(len(p) for p in images))
        pixel_values = torch.zeros(len(rows), n, 3, self.image_size, self.image_size)
        for b, pixels in enumerate(images):
            if pixels:
                pixel_values[b, : len(pixels)] = torch.stack(pixels)
        mask = image_attention_mask(input_ids, self.image_token_id, self.eos_token_id, n)
        mask = mask * attention[..., None]  # padding sees no image
        batch = {"input_ids": input_ids, "attention_mask": attention, "labels": label_t,
                 "pixel_values": pixel_values, "image_attention_mask": mask}
        given = [[p for s in row for p in (s.class_probs or [None] * len(s.images))] for row in rows]
        if any(p is not None for row in given for p in row):
            probs = torch.full((len(rows), n, self.num_classes), float("nan"))  # NaN: the classifier's own
            for b, row in enumerate(given):
                for i, p in enumerate(row):
                    if p is not None:
                        probs[b, i] = 0.0
                        probs[b, i, list(p)] = torch.tensor(list(p.values()))
            batch["image_class_probs"] = probs
        return batch


def with_blank_image(batch: dict[str, torch.Tensor], image_token_id: int) -> dict[str, torch.Tensor]:
    """A batch in which no token sees an image, plus one padding column: an `<image>` token that sees a blank
    image.

    Under FSDP every process must run the same sharded blocks in the same order and give every trainable
    parameter a gradient, but a text-only batch skips the vision tower, the perceiver, the image projections
    and the new-token embedding rows. The extra column uses them all; it is padding (attention mask 0, no
    label) that no other token attends to, so the losses do not change."""
    if batch["image_attention_mask"].bool().any():
        return batch
    b = batch["input_ids"].shape[0]
    column = lambda t, value: torch.cat([t, torch.full((b, 1), value, dtype=t.dtype)], dim=1)  # noqa: E731
    image_mask = torch.zeros(b, batch["input_ids"].shape[1] + 1, 1, dtype=batch["image_attention_mask"].dtype)
    image_mask[:, -1, 0] = 1
    return {**batch, "input_ids": column(batch["input_ids"], image_token_id),
            "attention_mask": column(batch["attention_mask"], 0), "labels": column(batch["labels"], IGNORE_INDEX),
            "pixel_values": torch.zeros_like(batch["pixel_values"][:, :1]), "image_attention_mask": image_mask}
