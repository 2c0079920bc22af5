"""Prompts → Idefics2 model inputs, as the reference `Idefics2Processor` (transformers 5.23, PIL image backend)
builds them.

Two calling conventions:
* the reference's: `processor(text=["User:<image>What is this?"], images=[[img]])` — strings with `<image>`
  markers plus images (one image, a flat list shared out in marker order, or a list per prompt);
* the IDEFICS one: `processor(["User:", img, "What is this?"])` — a prompt is a list of text and image items
  (a batch is a list of such lists); items are joined as they are, each image becoming an `<image>` marker.

Images keep their aspect ratio: optionally split into 4 quadrant crops + the whole image, each resized so its
longest side is at most `longest_edge` and each side at least `shortest_edge`, then padded (bottom/right) to the
batch's largest, with `pixel_attention_mask` marking real pixels. In the text every `<image>` becomes
`<fake_token_around_image>` + `<image>` × `image_seq_len` + `<fake_token_around_image>` (× 5 with splitting,
adjacent fake tokens merged). Rows are left-padded (generation appends to the right of every row).

Pinned reference behaviour (transformers 5.23): a space is inserted after a closing `<fake_token_around_image>`
that is directly followed by a character other than whitespace or `<` (`space_after_image=True`); releases up to
4.4x did not do this, so token ids differ there. Set `space_after_image=False` to reproduce those.
Deliberate difference: `do_image_splitting=` given per call changes both the pixels and the text layout (the
reference expands the text by its image processor's setting only, so the two can disagree)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from ..config import read_json
from ..images import ImagePolicy, is_image_item, load_image
from ..tokenizer import END_OF_UTTERANCE, FAKE_TOKEN, IMAGE_TOKEN, Tokenizer

# The template of the idefics2-8b processor (`chat_template` in its processor config).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


@dataclass
class Idefics2ImageSettings:
    """`preprocessor_config.json` of an Idefics2 checkpoint. Defaults are the reference class defaults
    (idefics2-8b's file turns splitting on)."""

    do_image_splitting: bool = False
    size: dict[str, int] = field(default_factory=lambda: {"shortest_edge": 378, "longest_edge": 980})
    do_resize: bool = True
    resample: int = 2  # PIL code: 2 = bilinear
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Idefics2ImageSettings":
        """From `preprocessor_config.json` (hub layout) or the `image_processor` entry of `processor_config.json`
        (the single file transformers 5 writes)."""
        data = read_json(Path(folder) / "preprocessor_config.json", required=False)
        if not data:
            data = read_json(Path(folder) / "processor_config.json", required=False).get("image_processor") or {}
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        for key in ("image_mean", "image_std"):
            if key in known:
                known[key] = tuple(known[key])
        settings = cls(**known)
        validate_size(settings.size)
        return settings


def validate_size(size: dict[str, int]) -> None:
    if not isinstance(size, dict) or not ({"shortest_edge", "longest_edge"} <= size.keys()
                                          or {"height", "width"} <= size.keys()):
        raise ValueError(f"size must be {{'shortest_edge': int, 'longest_edge': int}} or "
                         f"{{'height': int, 'width': int}}, got {size!r}")
    if any(not isinstance(v, int) or v < 1 for v in size.values()):
        raise ValueError(f"size values must be positive integers, got {size!r}")


def resized_size(height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
    """The reference's rule: scale the longest side down to `longest_edge` if it is longer (keeping the aspect
    ratio, truncating), then raise each side to at least `shortest_edge` independently."""
    if "height" in size and "shortest_edge" not in size:
        return size["height"], size["width"]
    shortest, longest = size["shortest_edge"], size["longest_edge"]
    aspect = width / height
    if width >= height and width > longest:
        width, height = longest, int(longest / aspect)
    elif height > width and height > longest:
        height, width = longest, int(longest * aspect)
    return max(height, shortest), max(width, shortest)


def split_image(image: np.ndarray) -> list[np.ndarray]:
    """[H, W, C] → the 4 quadrants (top-left, top-right, bottom-left, bottom-right) and the whole image."""
    h, w = image.shape[:2]
    mh, mw = h // 2, w // 2
    return [image[:mh, :mw], image[:mh, mw:], image[mh:, :mw], image[mh:, mw:], image]


def upright_rgb(image: Image.Image) -> Image.Image:
    """What the reference processor does to every image before its image processor sees it: apply the EXIF
    orientation, then a plain `convert("RGB")`. Transparency is therefore dropped (transparent pixels keep their
    stored colour), not composited on white as IDEFICS v1 and the image processor alone would do."""
    return ImageOps.exif_transpose(image).convert("RGB")


def process_image(image: Image.Image, settings: Idefics2ImageSettings, do_image_splitting: bool,
                  size: dict[str, int]) -> list[np.ndarray]:
    """One image → its crops as [3, h, w] float32 arrays: split, PIL resize on uint8, rescale, normalise."""
    array = np.asarray(upright_rgb(image))
    crops = split_image(array) if do_image_splitting else [array]
    out = []
    for crop in crops:
        if settings.do_resize:
            h, w = resized_size(crop.shape[0], crop.shape[1], size)
            crop = np.asarray(Image.fromarray(crop).resize((w, h), resample=Image.Resampling(settings.resample)))
        pixels = crop.astype(np.float32)
        if settings.do_rescale:  # float64 product then float32, as the reference
            pixels = (crop.astype(np.float64) * settings.rescale_factor).astype(np.float32)
        if settings.do_normalize:
            pixels = (pixels - np.asarray(settings.image_mean, dtype=np.float32)) / np.asarray(
                settings.image_std, dtype=np.float32)
        out.append(pixels.transpose(2, 0, 1))
    return out


def pad_images(batch: list[list[np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt lists of [3, h, w] → pixel_values [B, N, 3, H, W] (zeros beyond each image) and
    pixel_attention_mask [B, N, H, W] (1 on real pixels); N, H, W are the batch maxima."""
    images = [img for row in batch for img in row]
    n = max(len(row) for row in batch)
    h, w = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    pixel_values = torch.zeros(len(batch), n, images[0].shape[0], h, w)
    mask = torch.zeros(len(batch), n, h, w, dtype=torch.long)
    for b, row in enumerate(batch):
        for i, img in enumerate(row):
            pixel_values[b, i, :, : img.shape[1], : img.shape[2]] = torch.from_numpy(np.ascontiguousarray(img))
            mask[b, i, : img.shape[1], : img.shape[2]] = 1
    return pixel_values, mask


def expand_image_tokens(text: str, image_seq_len: int, do_image_splitting: bool,
                        space_after_image: bool = True) -> str:
    """Replace each `<image>` marker by the token layout the model reads."""
    one = FAKE_TOKEN + IMAGE_TOKEN * image_seq_len + FAKE_TOKEN
    text = text.replace(IMAGE_TOKEN, one * 5 if do_image_splitting else one)
    text = text.replace(FAKE_TOKEN + FAKE_TOKEN, FAKE_TOKEN)  # adjacent images share their fake token
    if space_after_image:
        text = re.sub(re.escape(FAKE_TOKEN) + r"(?=[^\s<])", FAKE_TOKEN + " ", text)
    return text


def interleaved_prompt(prompt: Sequence[Any], add_end_of_utterance_token: bool = False) -> tuple[str, list[Any]]:
    """An IDEFICS-style prompt (text and image items) → (text with `<image>` markers, its images). Text items
    are kept as they are and joined with nothing between them."""
    text, images, last_was_text = "", [], False
    for item in prompt:
        if is_image_item(item) or not isinstance(item, str):
            text += IMAGE_TOKEN
            images.append(item.strip(" ") if isinstance(item, str) else item)
            last_was_text = False
        else:
            if add_end_of_utterance_token and last_was_text:
                text += END_OF_UTTERANCE
            text += item
            last_was_text = True
    return text, images


def render_default_chat(messages: Sequence[dict], add_generation_prompt: bool) -> str:
    """The idefics2-8b chat template without jinja2."""
    out = ""
    for message in messages:
        content = message["content"]
        out += message["role"].capitalize() + (":" if content and content[0]["type"] == "image" else ": ")
        for part in content:
            if part["type"] == "text":
                out += part["text"]
            elif part["type"] == "image":
                out += IMAGE_TOKEN
        out += END_OF_UTTERANCE + "\n"
    return out + ("Assistant:" if add_generation_prompt else "")


def raise_template_error(message: str) -> None:
    """`raise_exception(...)`, which chat templates call to reject a conversation."""
    raise ValueError(f"chat template: {message}")


def read_chat_template(folder: Path) -> str | None:
    """The processor's chat template from a checkpoint folder (the files transformers 4.4x and 5 write)."""
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "processor_config.json"):
        template = read_json(folder / name, required=False).get("chat_template")
        if template:
            return template
    return None


class Idefics2Processor:
    """`processor(text=..., images=...)` or `processor(prompts)` → dict with `input_ids`, `attention_mask` and,
    when there are images, `pixel_values` and `pixel_attention_mask`."""

    def __init__(self, tokenizer: Tokenizer, images: Idefics2ImageSettings | None = None, image_seq_len: int = 64,
                 policy: ImagePolicy | None = None, max_length: int | None = None, chat_template: str | None = None,
                 space_after_image: bool = True) -> None:
        self.tokenizer = tokenizer
        self.images = images or Idefics2ImageSettings()
        self.image_seq_len = image_seq_len
        self.policy = policy or ImagePolicy()
        self.max_length = max_length
        tokenizer_template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
        self.chat_template = chat_template or tokenizer_template or DEFAULT_CHAT_TEMPLATE
        self.space_after_image = space_after_image
        self.image_token_id = tokenizer.require_id(IMAGE_TOKEN)
        self.fake_token_id = tokenizer.require_id(FAKE_TOKEN)

    @classmethod
    def from_folder(cls, folder: str | Path, tokenizer: Tokenizer, image_seq_len: int = 64,
                    policy: ImagePolicy | None = None, max_length: int | None = None) -> "Idefics2Processor":
        """Settings from `preprocessor_config.json` and `processor_config.json` (whose `image_seq_len` wins over
        the `image_seq_len` argument, normally the model's perceiver latents)."""
        folder = Path(folder)
        image_seq_len = int(read_json(folder / "processor_config.json", required=False).get("image_seq_len", image_seq_len))
        return cls(tokenizer, Idefics2ImageSettings.from_folder(folder), image_seq_len, policy, max_length,
                   read_chat_template(folder))

    # -- chat template ------------------------------------------------------------------------------------------
    def apply_chat_template(self, conversation: Sequence[dict] | Sequence[Sequence[dict]],
                            add_generation_prompt: bool = False, chat_template: str | None = None) -> str | list[str]:
        """Messages `[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ...}]}, ...]` → the
        prompt string with `<image>` markers (a list of strings for a list of conversations)."""
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise ValueError("conversation must be a non-empty list of messages (or a list of conversations)")
        if isinstance(conversation[0], (list, tuple)):
            return [self.apply_chat_template(c, add_generation_prompt, chat_template) for c in conversation]
        messages = [normalize_message(m, i) for i, m in enumerate(conversation)]
        template = chat_template or self.chat_template
        try:
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            if template != DEFAULT_CHAT_TEMPLATE:
                raise ImportError("this checkpoint's chat template needs jinja2 (pip install jinja2)") from None
            return render_default_chat(messages, add_generation_prompt)
        # The environment transformers renders chat templates with.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.globals["raise_exception"] = raise_template_error
        specials = {"bos_token": self.tokenizer.bos_token, "eos_token": self.tokenizer.eos_token,
                    "unk_token": self.tokenizer.unk_token, "pad_token": self.tokenizer.pad_token}
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **specials)

    # -- inputs -------------------------------------------------------------------------------------------------
    def __call__(self, prompts: Any = None, *, text: str | Sequence[str] | None = None, images: Any = None,
                 do_image_splitting: bool | None = None, size: dict[str, int] | None = None,
                 add_end_of_utterance_token: bool | None = None, padding: bool | str = True,
                 return_tensors: str | None = "pt") -> dict[str, torch.Tensor]:
        """`padding` and `return_tensors` are accepted for drop-in use with reference code: rows are always
        left-padded into tensors. `add_end_of_utterance_token` (IDEFICS prompts only) puts `<end_of_utterance>`
        between consecutive text items; off by default (Idefics2 prompts carry it through the chat template)."""
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors={return_tensors!r}: only PyTorch tensors ('pt') are produced")
        splitting = self.images.do_image_splitting if do_image_splitting is None else bool(do_image_splitting)
        size = self.images.size if size is None else size
        validate_size(size)
        if text is None and prompts is not None:
            if isinstance(prompts, str) or (images is not None and isinstance(prompts, (list, tuple))
                                            and all(isinstance(p, str) for p in prompts)):
                text = prompts  # reference convention given positionally
            elif images is not None:
                raise TypeError("images= goes with text prompts that hold <image> markers; IDEFICS-style prompts "
                                "(lists of items) carry their images inline")
            else:
                texts, image_lists = self.split_interleaved(prompts, bool(add_end_of_utterance_token))
                return self.encode(texts, image_lists, splitting, size)
        elif text is not None and prompts is not None:
            raise TypeError("pass prompts either positionally or as text=, not both")
        if text is None:
            if images is None:
                raise ValueError("nothing to process: pass text= (with <image> markers) and/or images=")
            return self.encode(None, nest_images(images, None), splitting, size)
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a non-empty list of strings")
        counts = [t.count(IMAGE_TOKEN) for t in texts]
        image_lists = nest_images(images, counts) if images is not None else [[] for _ in texts]
        for i, (count, row) in enumerate(zip(counts, image_lists)):
            if count != len(row):
                raise ValueError(f"prompt {i} has {count} {IMAGE_TOKEN} markers but {len(row)} images")
        return self.encode(texts, image_lists, splitting, size)

    def split_interleaved(self, prompts: Any, add_eou: bool) -> tuple[list[str], list[list[Any]]]:
        if not isinstance(prompts, (list, tuple)):
            raise TypeError("prompts must be a list of items (one prompt) or a list of such lists (a batch), "
                            f"got {type(prompts).__name__}")
        batch = prompts if any(isinstance(p, (list, tuple)) for p in prompts) else [prompts]
        texts, image_lists = [], []
        for b, prompt in enumerate(batch):
            if not isinstance(prompt, (list, tuple)):
                raise TypeError(f"prompt {b}: expected a list of items, got {type(prompt).__name__}")
            prompt_text, prompt_images = interleaved_prompt(prompt, add_eou)
            texts.append(prompt_text)
            image_lists.append(prompt_images)
        return texts, image_lists

    def expand(self, texts: list[str], do_image_splitting: bool | None = None) -> list[str]:
        """Prompt strings with each `<image>` marker written out as the model's image tokens (what is
        tokenised, with `<s>` from the tokenizer)."""
        splitting = self.images.do_image_splitting if do_image_splitting is None else do_image_splitting
        return [expand_image_tokens(t, self.image_seq_len, splitting, self.space_after_image) for t in texts]

    def encode(self, texts: list[str] | None, image_lists: list[list[Any]], do_image_splitting: bool,
               size: dict[str, int]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if texts is not None:
            ids = self.tokenizer.encode_batch(self.expand(texts, do_image_splitting), add_special_tokens=True)
            for b, row in enumerate(ids):
                if self.max_length is not None and len(row) > self.max_length:
                    raise ValueError(f"prompt {b} is {len(row)} tokens long (images included); the model accepts "
                                     f"at most {self.max_length} (max_position_embeddings)")
            width = max(len(row) for row in ids)
            pad = self.tokenizer.pad_token_id
            out["input_ids"] = torch.tensor([[pad] * (width - len(r)) + r for r in ids], dtype=torch.long)
            out["attention_mask"] = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids],
                                                 dtype=torch.long)
        if any(image_lists):
            crops = []
            for b, row in enumerate(image_lists):
                row_crops = []
                for i, item in enumerate(row):
                    where = f"prompt {b}, image {i}" if len(image_lists) > 1 else f"image {i}"
                    row_crops += process_image(load_image(item, where, self.policy), self.images,
                                               do_image_splitting, size)
                crops.append(row_crops)
            out["pixel_values"], out["pixel_attention_mask"] = pad_images(crops)
        return out


def nest_images(images: Any, counts: list[int] | None) -> list[list[Any]]:
    """The reference's image nesting: one image → [[image]]; a flat list → shared out over the prompts in marker
    order (or one prompt's images when there is no text); a list of lists → as given."""
    if not isinstance(images, (list, tuple)):
        return [[images]]
    if not images:
        raise ValueError("images is an empty list")
    if any(isinstance(i, (list, tuple)) for i in images):
        if not all(isinstance(i, (list, tuple)) for i in images):
            raise TypeError("images must be an image, a list of images, or a list of lists of images (one per "
                            "prompt), not a mix")
        if counts is not None and len(images) != len(counts):
            raise ValueError(f"{len(images)} image lists for {len(counts)} prompts")
        return [list(i) for i in images]
    if counts is None:
        return [list(images)]
    if sum(counts) != len(images):
        raise ValueError(f"the prompts have {sum(counts)} {IMAGE_TOKEN} markers in total but {len(images)} images "
                         "were given")
    starts = np.cumsum([0] + counts)
    return [list(images[starts[i]:starts[i + 1]]) for i in range(len(counts))]


def normalize_message(message: Any, index: int) -> dict:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise ValueError(f"message {index}: expected a dict with 'role' and 'content', got {message!r}")
    content = message["content"]
    if isinstance(content, str):  # plain text content: one text part
        content = [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(p, dict) and "type" in p for p in content):
        raise ValueError(f"message {index}: content must be a string or a list of parts like "
                         "{'type': 'text', 'text': ...} / {'type': 'image'}")
    return {**message, "content": content}
