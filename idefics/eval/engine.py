"""The model side of the evaluation harness: image features cached by content, prompts encoded against
those cached features, generation (beam or greedy), and class-name log-likelihoods that reuse the prompt's
KV cache.

What is computed once:
  - every distinct image (by the SHA-1 of its bytes) goes through the vision encoder and perceiver once per
    process, however many prompts show it as a demonstration; prompts then pass `image_hidden_states`;
  - classification encodes each prompt once and copies its KV cache to every class name (OpenFlamingo's
    "use the cache of the context"), instead of re-encoding prompt + class name per class;
  - beam search encodes each prompt once and copies its cache to the beams (`decoding.DecodeState`).
Demonstrations differ per query (random or RICES), so queries of a batch share no prefix beyond `<s>`.

Images are encoded one at a time (as `Pipeline.image_features` does): a matrix product's rounding can
depend on how many rows it has, so encoding alone keeps an image's features bit-identical whichever batch
or process first needs it (runs then match exactly across batchings and process counts).

Both generations run: IDEFICS reads an image's latents through cross-attention (`image_hidden_states`
[B, N, latents, D] + `image_attention_mask`); Idefics2 puts them at its `<image>` token positions
(`image_hidden_states` [crops of all images in order, latents, D], crops when the processor splits images).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from PIL import Image

from idefics.beam_search import beam_search
from idefics.decoding import DecodeState
from idefics.generation import GenerationParams, decode
from idefics.images import ImageError, load_image
from idefics.processor import classify_items, image_attention_mask, prompt_text
from idefics.tokenizer import END_OF_UTTERANCE

Decoding = Literal["beam", "greedy"]


def image_bytes(item: Any, what: str) -> bytes:
    """The bytes that identify an image item's content (the file's bytes for a path)."""
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, Path):
        try:
            return item.read_bytes()
        except OSError as error:
            raise ImageError(f"{what}: cannot read {item} ({error.strerror or error})") from None
    if isinstance(item, Image.Image):
        return f"{item.mode}{item.size}".encode() + item.tobytes()
    if isinstance(item, str):
        return item.strip(" ").encode()  # URL or data URI
    raise ImageError(f"{what}: unsupported image item {type(item).__name__}")


@dataclass
class ImageFeatures:
    pooled: torch.Tensor  # [D] float32 mean over the latents: `Pipeline.image_features`, what RICES compares
    latents: torch.Tensor  # [latents, D] the perceiver output, what the cross-attention layers read


class ImageFeatureStore:
    """Image features per distinct image content, least recently used dropped beyond `max_items`."""

    def __init__(self, pipe: Any, max_items: int = 4096) -> None:
        self.pipe, self.max_items = pipe, max_items
        self.items: OrderedDict[str, ImageFeatures] = OrderedDict()
        self.hits = self.misses = 0

    @torch.inference_mode()
    def get(self, item: Any, what: str = "image") -> ImageFeatures:
        data = image_bytes(item, what)
        key = hashlib.sha1(data).hexdigest()
        if key in self.items:
            self.hits += 1
            self.items.move_to_end(key)
            return self.items[key]
        self.misses += 1
        model = self.pipe.model
        source = item if isinstance(item, (Image.Image, str)) else data
        image = load_image(source, f"{what} ({item})" if isinstance(item, Path) else what, self.pipe.processor.policy)
        if self.pipe.family.images_in_sequence:  # [crops, latents, D]
            inputs = self.pipe.processor(images=[[image]])
            latents = model.model.encode_images(inputs["pixel_values"].to(model.device, model.dtype),
                                                inputs["pixel_attention_mask"].to(model.device))
            pooled = latents.float().flatten(0, 1).mean(0)
        else:  # [latents, D]
            pixels = self.pipe.processor([image])["pixel_values"]  # [1, 1, 3, H, W]
            latents = model.model.encode_images(pixels.to(model.device, model.dtype))[0, 0]
            pooled = latents.float().mean(0)
        features = ImageFeatures(pooled, latents)
        self.items[key] = features
        if len(self.items) > self.max_items:
            self.items.popitem(last=False)
        return features

    def pooled(self, items: Sequence[Any], names: Sequence[str] | None = None) -> torch.Tensor:
        """[N, D] pooled features of `items` (for RICES)."""
        names = names or [f"image {i}" for i in range(len(items))]
        return torch.stack([self.get(item, name).pooled for item, name in zip(items, names)])


def prompt_texts(pipe: Any, prompts: Sequence[Sequence[Any]]) -> tuple[list[str], list[list[Any]]]:
    """The processor's prompt strings (no `<end_of_utterance>` added; image tokens written out) and each
    prompt's image items. `tokenize` turns the strings into the processor's token ids."""
    if pipe.family.images_in_sequence:
        texts, images = pipe.processor.split_interleaved([list(p) for p in prompts], add_eou=False)
        return pipe.processor.expand(texts), images
    texts, images = [], []
    for prompt in prompts:
        kinds = classify_items(list(prompt))
        texts.append(prompt_text(kinds, pipe.tokenizer.bos_token or ""))
        images.append([item for kind, item in kinds if kind == "image"])
    return texts, images


def tokenize(pipe: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of `prompt_texts` strings (Idefics2's `<s>` comes from the tokenizer, IDEFICS's is in the text)."""
    return pipe.tokenizer.encode_batch(list(texts), add_special_tokens=pipe.family.tokenizer_adds_bos)


def encode_prompts(pipe: Any, prompts: Sequence[Sequence[Any]], features: ImageFeatureStore) -> dict[str, torch.Tensor]:
    """Model inputs for a batch of prompts, as `pipe.processor(prompts, add_end_of_utterance_token=False)`
    builds them, but with `image_hidden_states` from the cache instead of `pixel_values`."""
    tokenizer, processor = pipe.tokenizer, pipe.processor
    texts, items = prompt_texts(pipe, prompts)
    images = [[features.get(item, f"prompt {b}, image {i}").latents for i, item in enumerate(row)]
              for b, row in enumerate(items)]
    ids = tokenize(pipe, texts)
    limit = processor.max_length
    for b, row in enumerate(ids):
        if limit is not None and len(row) > limit:
            raise ValueError(f"prompt {b} is {len(row)} tokens long; the model accepts at most {limit}")
    width, pad = max(map(len, ids)), tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in ids])
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids])
    if pipe.family.images_in_sequence:  # every image's crops, in batch order: they fill the <image> positions
        flat = [crops for row in images for crops in row]
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        if flat:
            out["image_hidden_states"] = torch.cat(flat).to(pipe.model.device, pipe.model.dtype)
        return out
    num_images = max(1, max(map(len, images)))
    latents, dim = pipe.model.model.latents_per_image, pipe.model.config.vision_config.embed_dim
    hidden = torch.zeros(len(ids), num_images, latents, dim, dtype=pipe.model.dtype, device=pipe.model.device)
    for b, row in enumerate(images):
        if row:
            hidden[b, :len(row)] = torch.stack(row)
    mask = image_attention_mask(input_ids, processor.image_token_id, tokenizer.eos_token_id, num_images)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "image_attention_mask": mask,
            "image_hidden_states": hidden}


def end_of_demo_marker(pipe: Any) -> tuple[str, list[int]]:
    """The text that ends every demonstration, and the token ids that end a generation.

    OpenFlamingo ends demonstrations with its `<|endofchunk|>` token and stops generating on it. IDEFICS
    tokenizers have no such token: instruct models have `<end_of_utterance>`, which ends every turn in their
    training data, so it is the marker; base models get "\n", and every token whose text holds a newline
    stops generation. End of sequence stops generation in both cases."""
    stops = list(pipe.stop_token_ids())
    width = pipe.config.vocab_size + getattr(pipe.config, "additional_vocab_size", 0)
    eou = pipe.tokenizer.token_to_id(END_OF_UTTERANCE)
    if eou is not None and eou < width:
        return END_OF_UTTERANCE, sorted(set(stops) | {eou})
    decode_one = pipe.tokenizer.backend.decode
    newline = [i for i in range(min(width, pipe.tokenizer.vocab_size))
               if "\n" in decode_one([i], skip_special_tokens=False)]
    return "\n", sorted(set(stops) | set(newline))


@torch.inference_mode()
def generate_tokens(pipe: Any, inputs: dict[str, torch.Tensor], decoding: Decoding, max_new_tokens: int,
                    num_beams: int, length_penalty: float, stop_token_ids: Sequence[int]) -> list[list[int]]:
    """New tokens of each prompt row: beam search (the reference harness) or greedy decoding."""
    banned, pad = pipe.banned_token_ids(), pipe.tokenizer.pad_token_id
    if decoding == "beam":
        return beam_search(pipe.model, inputs, num_beams, max_new_tokens, length_penalty, stop_token_ids, banned, pad)
    if decoding != "greedy":
        raise ValueError(f"decoding must be 'beam' or 'greedy', got {decoding!r}")
    params = GenerationParams(max_new_tokens=max_new_tokens, stop_token_ids=list(stop_token_ids),
                              banned_token_ids=banned)
    rows = inputs["input_ids"].shape[0]
    out: list[list[int]] = [[] for _ in range(rows)]
    for step in decode(pipe.model, inputs, params, pad):
        for row in range(rows):
            if step.active[row]:
                out[row].append(int(step.tokens[row]))
    return out


@torch.inference_mode()
def class_log_likelihoods(pipe: Any, prompts: Sequence[Sequence[Any]], class_names: Sequence[str],
                          features: ImageFeatureStore, max_rows: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probs [P, C], token counts [P, C]) of each class name's tokens after each prompt.

    A class name's tokens are those the tokenised prompt + name has beyond the prompt alone (as
    `Pipeline.log_likelihood`). Each prompt is encoded once, up to the longest token prefix it shares with
    all its continuations; then each (prompt, class) row continues from a copy of that cache, `max_rows`
    rows at a time."""
    n_prompts, n_classes = len(prompts), len(class_names)
    model, tok, pad = pipe.model, pipe.tokenizer, pipe.tokenizer.pad_token_id
    alone = encode_prompts(pipe, prompts, features)
    # IDEFICS: which image each position sees (cross-attention); Idefics2: the images are prompt positions,
    # all in the shared prefix, so the class-name suffixes need no image input
    cross = not pipe.family.images_in_sequence
    num_images = alone["image_hidden_states"].shape[1] if cross else 1
    prompt_ids = [row[mask.bool()].tolist() for row, mask in zip(alone["input_ids"], alone["attention_mask"])]
    texts, _ = prompt_texts(pipe, prompts)
    # a class name is one more text item: stripped of spaces and joined to the prompt with nothing between
    full_texts = [texts[p] + name.strip(" ") for name in class_names for p in range(n_prompts)]
    encoded = tokenize(pipe, full_texts)
    full_ids = [encoded[c * n_prompts:(c + 1) * n_prompts] for c in range(n_classes)]  # [class][prompt]
    image_token, eos = pipe.processor.image_token_id, tok.eos_token_id
    full_masks = [[image_attention_mask(torch.tensor([ids]), image_token, eos, num_images)[0] for ids in row]
                  for row in full_ids]
    shared = []
    for p in range(n_prompts):
        common = len(prompt_ids[p])
        for c in range(n_classes):
            ids = full_ids[c][p]
            if len(ids) <= len(prompt_ids[p]):
                raise ValueError(f"class name {class_names[c]!r} adds no tokens to prompt {p}")
            same = next((i for i, (x, y) in enumerate(zip(ids, prompt_ids[p])) if x != y), len(prompt_ids[p]))
            common = min(common, same)
        shared.append(max(1, common))

    # 1. the shared prefix of every prompt, left-padded, once
    width = max(shared)
    suffix_len = max(len(full_ids[c][p]) - shared[p] for p in range(n_prompts) for c in range(n_classes))
    prefix_ids = torch.full((n_prompts, width), pad)
    prefix_mask = torch.zeros(n_prompts, width, dtype=torch.long)
    prefix_images = torch.zeros(n_prompts, width, num_images, dtype=torch.long)
    for p in range(n_prompts):
        n = shared[p]
        prefix_ids[p, width - n:] = torch.tensor(full_ids[0][p][:n])
        prefix_mask[p, width - n:] = 1
        prefix_images[p, width - n:] = full_masks[0][p][:n, :num_images]
    device = model.device
    prefix = {"input_ids": prefix_ids, "attention_mask": prefix_mask,
              "image_hidden_states": alone.get("image_hidden_states")}
    if cross:
        prefix["image_attention_mask"] = prefix_images
    state, _ = DecodeState.prefill(model, prefix, suffix_len)
    first_logprobs = state.logits.log_softmax(-1)  # predicts the first token after each prefix

    # 2. every (prompt, class) suffix, right-padded, from a copy of its prompt's cache
    sums = torch.zeros(n_prompts, n_classes, dtype=torch.float64)
    counts = torch.zeros(n_prompts, n_classes, dtype=torch.long)
    pairs = [(p, c) for p in range(n_prompts) for c in range(n_classes)]
    for start in range(0, len(pairs), max_rows):
        chunk = pairs[start:start + max_rows]
        rows = torch.tensor([p for p, _ in chunk], device=device)
        part = state.copy_rows(rows)
        ids = torch.full((len(chunk), suffix_len), pad)
        images = torch.zeros(len(chunk), suffix_len, num_images, dtype=torch.long)
        for r, (p, c) in enumerate(chunk):
            tail = full_ids[c][p][shared[p]:]
            ids[r, :len(tail)] = torch.tensor(tail)
            images[r, :len(tail)] = full_masks[c][p][shared[p]:, :num_images]
        images_in = {"image_attention_mask": images.to(device)} if cross else {}
        logits = part.extend(ids, **images_in)
        logprobs = logits.float().log_softmax(-1)
        for r, (p, c) in enumerate(chunk):
            tail = full_ids[c][p][shared[p]:]
            n = len(full_ids[c][p]) - len(prompt_ids[p])  # the class name's own tokens: the last n
            # position j of the tail is predicted by the prefix's last logits (j=0) or by tail position j-1
            predicted = torch.cat([first_logprobs[p:p + 1], logprobs[r, :len(tail) - 1]])
            picked = predicted.gather(1, torch.tensor(tail, device=device)[:, None]).squeeze(1)
            sums[p, c] = float(picked[-n:].double().sum())
            counts[p, c] = n
    return sums, counts
