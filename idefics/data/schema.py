"""The sample schema of the training data: one format for image-text pairs, documents and chats.

A sample is a group of tar members sharing a key (the webdataset convention):

    <key>.json       {"version": 1, "kind": "pair", "items": [...], "meta": {...}}
    <key>.img0.png   images, referenced by name ("img0.png") from the JSON

Decoded, a sample is a `Sample` whose `items` (pair, document) or `turns` (chat) hold `str` for text and a PIL
image (or the encoded bytes) for images, in reading order. docs/data_format.md describes the schema; the
functions here validate, encode and decode it, `shards.py` writes and streams shards of it.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

SCHEMA_VERSION = 1
KINDS = ("pair", "document", "chat")
ROLES = ("user", "assistant")
IMAGE_EXTENSIONS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}
# Keys become tar member prefixes; webdataset splits a member name at the first dot, so keys cannot contain one.
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")

Item = Any  # str (text) | PIL.Image.Image | bytes (an encoded PNG/JPEG)


@dataclass
class Turn:
    role: str  # "user" | "assistant"
    content: list[Item]


@dataclass
class Sample:
    kind: str  # "pair" | "document" | "chat"
    key: str
    items: list[Item] = field(default_factory=list)  # pair and document
    turns: list[Turn] = field(default_factory=list)  # chat
    meta: dict = field(default_factory=dict)
    shard: str = ""  # filled in by the reader

    @property
    def images(self) -> list[Item]:
        """All images of the sample in reading order."""
        parts = self.items if self.kind != "chat" else [x for turn in self.turns for x in turn.content]
        return [x for x in parts if not isinstance(x, str)]


class DataError(ValueError):
    """Bad data, named by shard and key; `category` groups the error counters of `ShardReader`."""

    def __init__(self, message: str, *, key: str | None = None, shard: str | None = None, category: str = "field"):
        self.message, self.key, self.shard, self.category = message, key, shard, category
        where = ", ".join(f"{name} {value!r}" for name, value in (("shard", shard), ("key", key)) if value)
        super().__init__(f"{where}: {message}" if where else message)

    def at(self, shard: str) -> "DataError":
        return DataError(self.message, key=self.key, shard=shard, category=self.category)


# ----------------------------------------------------------------------------------------------------------
# validation, shared by the writer (Python objects) and the reader (after decoding)


def _check_content(content: Any, where: str, key: str) -> None:
    if not isinstance(content, list) or not content:
        raise DataError(f"{where} must be a non-empty list of text and images", key=key)
    for i, item in enumerate(content):
        if isinstance(item, str):
            continue
        if isinstance(item, Image.Image):
            continue
        if isinstance(item, (bytes, bytearray)):
            if _sniff_format(bytes(item)) is None:
                raise DataError(f"{where}[{i}] holds bytes that are not a PNG or JPEG image", key=key, category="image")
            continue
        raise DataError(f"{where}[{i}] is a {type(item).__name__}; expected str, PIL image or PNG/JPEG bytes", key=key)


def validate_sample(sample: Sample) -> None:
    """Raise `DataError` naming the key and the field if `sample` does not follow the schema."""
    key = sample.key
    if not isinstance(key, str) or not KEY_PATTERN.match(key):
        raise DataError(f"key {key!r} must be non-empty and use only letters, digits, '_' and '-'", category="key")
    if sample.kind not in KINDS:
        raise DataError(f"unknown kind {sample.kind!r}; expected one of {KINDS}", key=key, category="kind")
    if not isinstance(sample.meta, dict):
        raise DataError(f"meta must be a dict, got {type(sample.meta).__name__}", key=key)
    if sample.kind == "chat":
        if sample.items:
            raise DataError("a chat sample keeps its content in turns; items must be empty", key=key)
        if not isinstance(sample.turns, list) or not sample.turns:
            raise DataError("a chat sample needs at least one turn", key=key)
        for i, turn in enumerate(sample.turns):
            if not isinstance(turn, Turn) or turn.role not in ROLES:
                raise DataError(f"turns[{i}] must be a Turn with role in {ROLES}", key=key)
            _check_content(turn.content, f"turns[{i}].content", key)
        return
    if sample.turns:
        raise DataError(f"a {sample.kind} sample keeps its content in items; turns must be empty", key=key)
    _check_content(sample.items, "items", key)
    if sample.kind == "pair":
        n_images = sum(not isinstance(x, str) for x in sample.items)
        if n_images != 1 or len(sample.items) < 2:
            raise DataError(f"a pair needs exactly one image and some text, got {n_images} images", key=key)


# ----------------------------------------------------------------------------------------------------------
# encoding and decoding (pure functions)


def _sniff_format(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    return None


def encode_image(image: Image.Image, image_format: str = "png") -> bytes:
    """PNG (lossless, deterministic) or JPEG (quality 90) bytes of a PIL image."""
    buffer = io.BytesIO()
    if IMAGE_EXTENSIONS[image_format] == "JPEG":
        image.convert("RGB").save(buffer, format="JPEG", quality=90)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_sample(sample: Sample, image_format: str = "png") -> dict[str, bytes]:
    """Tar members of a sample, keyed by extension ("json", "img0.png", ...); images are named in reading order."""
    members: dict[str, bytes] = {}

    def encode_content(content: list[Item]) -> list[dict]:
        out = []
        for item in content:
            if isinstance(item, str):
                out.append({"type": "text", "text": item})
                continue
            data = bytes(item) if isinstance(item, (bytes, bytearray)) else encode_image(item, image_format)
            ext = _sniff_format(data) if isinstance(item, (bytes, bytearray)) else image_format
            name = f"img{len(members)}.{ext}"  # the json member is added last
            members[name] = data
            out.append({"type": "image", "image": name})
        return out

    record: dict[str, Any] = {"version": SCHEMA_VERSION, "kind": sample.kind}
    if sample.kind == "chat":
        record["turns"] = [{"role": t.role, "content": encode_content(t.content)} for t in sample.turns]
    else:
        record["items"] = encode_content(sample.items)
    record["meta"] = sample.meta
    try:
        members["json"] = json.dumps(record, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()
    except (TypeError, ValueError) as e:
        raise DataError(f"meta is not JSON-serialisable: {e}", key=sample.key) from None
    return members


def _decode_image(name: str, data: bytes, key: str, image_mode: str | None) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        raise DataError(f"image {name!r} failed to decode: {e}", key=key, category="image") from None
    return image.convert(image_mode) if image_mode and image.mode != image_mode else image


def decode_sample(
    key: str, members: dict[str, bytes], *, shard: str = "", decode_images: bool = True, image_mode: str | None = "RGB"
) -> Sample:
    """Build a `Sample` from the tar members of one key; raise `DataError` naming the field on bad data."""
    if "json" not in members:
        raise DataError(f"no .json member (members: {sorted(members)})", key=key, category="json")
    try:
        record = json.loads(members["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"malformed JSON: {e}", key=key, category="json") from None
    if not isinstance(record, dict):
        raise DataError(f"the JSON member must be an object, got {type(record).__name__}", key=key, category="json")
    kind = record.get("kind")
    if kind not in KINDS:
        raise DataError(f"unknown kind {kind!r}; expected one of {KINDS}", key=key, category="kind")

    def decode_content(content: Any, where: str) -> list[Item]:
        if not isinstance(content, list):
            raise DataError(f"field {where!r} must be a list, got {type(content).__name__}", key=key)
        out: list[Item] = []
        for i, item in enumerate(content):
            kind_of = item.get("type") if isinstance(item, dict) else None
            if kind_of == "text" and isinstance(item.get("text"), str):
                out.append(item["text"])
            elif kind_of == "image" and isinstance(item.get("image"), str):
                name = item["image"]
                if name not in members:
                    raise DataError(f"{where}[{i}] references image {name!r} but there is no member "
                                    f"'{key}.{name}'", key=key, category="image")
                out.append(_decode_image(name, members[name], key, image_mode) if decode_images else members[name])
            else:
                raise DataError(f"{where}[{i}] must be {{'type': 'text', 'text': str}} or "
                                f"{{'type': 'image', 'image': name}}, got {item!r:.80}", key=key)
        return out

    items: list[Item] = []
    turns: list[Turn] = []
    if kind == "chat":
        if not isinstance(record.get("turns"), list):
            raise DataError("a chat sample needs a 'turns' list", key=key)
        for i, turn in enumerate(record["turns"]):
            if not isinstance(turn, dict) or turn.get("role") not in ROLES:
                raise DataError(f"turns[{i}] must be an object with role in {ROLES}", key=key)
            turns.append(Turn(turn["role"], decode_content(turn.get("content"), f"turns[{i}].content")))
    else:
        items = decode_content(record.get("items"), "items")
    sample = Sample(kind=kind, key=key, items=items, turns=turns, meta=record.get("meta", {}), shard=shard)
    validate_sample(sample)
    return sample
