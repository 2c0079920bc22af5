"""Training data as WebDataset tar shards: one sample schema for image-text pairs, documents and chats.

A sample is a group of tar members sharing a key (the webdataset convention):

    <key>.json       {"version": 1, "kind": "pair", "items": [...], "meta": {...}}
    <key>.img0.png   images, referenced by name ("img0.png") from the JSON

Decoded, a sample is a `Sample` whose `items` (pair, document) or `turns` (chat) hold `str` for text and a PIL
image (or the encoded bytes, with `decode_images=False`) for images, in reading order. docs/data_format.md
describes the schema; `ShardWriter` writes it, `ShardReader` streams it back for training.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import random
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Literal, Sequence

import braceexpand
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext, tar_file_iterator

log = logging.getLogger(__name__)

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


# ----------------------------------------------------------------------------------------------------------
# writing


class ShardWriter:
    """Validate samples and write them to shards `pattern % i`, starting a new shard every `max_count` samples.

    Uses `webdataset.ShardWriter` with a fixed mtime, so the same samples give byte-identical shards.
    """

    def __init__(self, pattern: str, max_count: int = 1000, image_format: str = "png"):
        if "%" not in pattern:
            raise ValueError(f"shard pattern {pattern!r} needs a %d-style field, e.g. 'out/train-%05d.tar'")
        if image_format not in IMAGE_EXTENSIONS:
            raise ValueError(f"image_format {image_format!r} must be one of {sorted(IMAGE_EXTENSIONS)}")
        os.makedirs(os.path.dirname(pattern) or ".", exist_ok=True)
        self.pattern, self.max_count, self.image_format = pattern, max_count, image_format
        self.shards: list[str] = []  # paths written so far
        self.count = 0
        self._keys: set[str] = set()
        self._writer: wds.ShardWriter | None = None  # opened on the first write: no empty shards

    def write(self, sample: Sample) -> None:
        validate_sample(sample)
        if sample.key in self._keys:
            raise DataError("duplicate key in this writer", key=sample.key, category="key")
        members = encode_sample(sample, self.image_format)
        if self._writer is None:
            self._writer = wds.ShardWriter(self.pattern, maxcount=self.max_count, verbose=0, encoder=False, mtime=0)
        self._writer.write({"__key__": sample.key, **members})
        self._keys.add(sample.key)
        self.count += 1
        if not self.shards or self.shards[-1] != self._writer.fname:
            self.shards.append(self._writer.fname)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------------
# reading


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Shard paths from a path, a glob ("data/train/*.tar"), a brace pattern ("s-{00000..00009}.tar"), a
    directory (all its .tar files) or a list of those; sorted within each pattern."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    shards: list[str] = []
    for one in map(str, specs):
        for pattern in braceexpand.braceexpand(one):
            if os.path.isdir(pattern):
                pattern = os.path.join(pattern, "*.tar")
            found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            if not found or not os.path.exists(found[0]):
                raise FileNotFoundError(f"no shards match {pattern!r}")
            shards.extend(found)
    return shards


def assign_shards(
    shards: Sequence[str], *, seed: int, epoch: int, shuffle: bool, rank: int, world_size: int,
    worker_id: int, num_workers: int,
) -> list[str]:
    """The shards one DataLoader worker of one rank reads: every (rank, worker) slot takes every n-th shard of
    the same (seeded, per-epoch) shard order, so the slots partition the shards."""
    order = list(shards)
    if shuffle:
        random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    slot, n_slots = rank * num_workers + worker_id, world_size * num_workers
    return order[slot::n_slots]


def _shuffled(groups: Iterable, buffer_size: int, rng: random.Random) -> Iterator:
    """Buffer shuffle: fill a buffer, then emit a random element for every new one."""
    buffer: list = []
    for group in groups:
        buffer.append(group)
        if len(buffer) >= buffer_size:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


class ShardReader(IterableDataset):
    """Stream decoded `Sample`s from shards, split by shard across distributed ranks and DataLoader workers.

    Determinism: with `shuffle=True` the shard order depends on (seed, epoch) and the sample order within a
    worker on (seed, epoch, rank, worker); call `set_epoch(epoch)` before each epoch.

    Resume: `position` counts the samples yielded per shard in this epoch; `state_dict()` saves it and, after
    `load_state_dict()`, iteration replays the epoch and drops the first `position[shard]` samples of each shard,
    which is exactly the unseen rest if seed, shards, world size and worker count are unchanged (with
    `shuffle=False` any worker count works). With DataLoader workers each worker counts in its own copy, so the
    main process must call `record(sample.shard ...)` for the samples it consumed.

    Bad data: `on_error="skip"` logs a warning and counts it in `errors` (by category: tar, json, field, kind,
    image; counts made inside DataLoader workers stay in the workers); `on_error="raise"` raises `DataError`
    naming the shard and the key.
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        *,
        shuffle: bool = False,
        seed: int = 0,
        shuffle_buffer: int = 256,
        rank: int | None = None,
        world_size: int | None = None,
        on_error: Literal["skip", "raise"] = "skip",
        decode_images: bool = True,
        image_mode: str | None = "RGB",
    ):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank and world_size, or neither (then torch.distributed decides)")
        self.shards = expand_shards(shards)
        self.shuffle, self.seed, self.shuffle_buffer = shuffle, seed, shuffle_buffer
        self.rank, self.world_size = rank, world_size
        self.on_error, self.decode_images, self.image_mode = on_error, decode_images, image_mode
        self.epoch = 0
        self.position: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self._resume_from: Counter[str] = Counter()

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position, self._resume_from = epoch, Counter(), Counter()

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": dict(self.position)}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"state was saved with seed {state['seed']}, this reader has seed {self.seed}")
        unknown = set(state["position"]) - set(self.shards)
        if unknown:
            raise ValueError(f"state names shards this reader does not read: {sorted(unknown)[:3]}")
        self.epoch = state["epoch"]
        self.position, self._resume_from = Counter(state["position"]), Counter(state["position"])

    def record(self, shards: str | Iterable[str]) -> None:
        """Count consumed samples by their `sample.shard` (only needed when reading through DataLoader workers)."""
        self.position.update([shards] if isinstance(shards, str) else shards)

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.rank is not None:
            return self.rank, self.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _handle(self, error: DataError) -> None:
        if self.on_error == "raise":
            raise error
        self.errors[error.category] += 1
        log.warning("skipping bad data (%d skipped so far): %s", sum(self.errors.values()), error)

    def _raw_samples(self, shards: list[str]) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        """(shard, key, members) per sample, undecoded; consecutive members with one key form a sample."""
        for shard in shards:
            key, members = None, {}
            try:
                with open(shard, "rb") as stream:
                    for member in tar_file_iterator(stream):
                        base, ext = base_plus_ext(member["fname"])
                        base, ext = (base, ext) if base is not None else (member["fname"], "")
                        if base != key and key is not None:
                            yield shard, key, members
                            members = {}
                        key = base
                        members[ext] = member["data"]
            except (OSError, tarfile.TarError) as e:
                self._handle(DataError(f"unreadable tar after key {key!r}: {e}", shard=shard, category="tar"))
                continue  # the partly read sample is dropped with the rest of the shard
            if key is not None:
                yield shard, key, members

    def __iter__(self) -> Iterator[Sample]:
        rank, world_size = self._rank_and_world_size()
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        if len(self.shards) < world_size * num_workers:
            log.warning("%d shards for %d ranks x %d workers: some workers get no data",
                        len(self.shards), world_size, num_workers)
        mine = assign_shards(self.shards, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle, rank=rank,
                             world_size=world_size, worker_id=worker_id, num_workers=num_workers)
        raw = self._raw_samples(mine)
        if self.shuffle and self.shuffle_buffer > 1:
            slot_rng = random.Random(f"samples:{self.seed}:{self.epoch}:{rank}:{worker_id}")
            raw = _shuffled(raw, self.shuffle_buffer, slot_rng)
        to_skip = Counter(self._resume_from)
        self.position = Counter(self._resume_from)
        for shard, key, members in raw:
            try:
                sample = decode_sample(key, members, shard=shard, decode_images=self.decode_images,
                                       image_mode=self.image_mode)
            except DataError as e:
                self._handle(e.at(shard))
                continue
            if to_skip[shard] > 0:  # already consumed before the resume
                to_skip[shard] -= 1
                continue
            self.position[shard] += 1
            yield sample
