"""Training data as WebDataset tar shards: a validating `ShardWriter` and a streaming `ShardReader` that splits
shards across ranks and DataLoader workers, shuffles deterministically, resumes and handles bad data.

The sample schema (`Sample`, `Turn`, encoding and decoding) is in schema.py and docs/data_format.md.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import tarfile
from collections import Counter
from typing import Any, Iterable, Iterator, Literal, Sequence

import braceexpand
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from idefics.data.schema import (  # noqa: F401  (re-exported: the schema is part of this module's API)
    IMAGE_EXTENSIONS,
    DataError,
    Sample,
    Turn,
    decode_sample,
    encode_sample,
    validate_sample,
)

log = logging.getLogger(__name__)

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


def _tar_members(path: str) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files of a tar, streamed. Python's tarfile silently stops at a truncated
    header or member, so check the sizes and, for plain .tar files, the end-of-archive marker."""
    with open(path, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if not info.isreg():
                continue
            data = tar.extractfile(info).read()
            if len(data) != info.size:
                raise tarfile.ReadError(f"member {info.name!r} is truncated ({len(data)} of {info.size} bytes)")
            yield info.name, data
        end = tar.offset
    if path.endswith(".tar") and os.path.getsize(path) < end + 2 * tarfile.BLOCKSIZE:
        raise tarfile.ReadError("the file ends without the end-of-archive marker (truncated?)")


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
        if rank is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
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
                for name, data in _tar_members(shard):
                    base, ext = base_plus_ext(name)
                    base, ext = (base, ext) if base is not None else (name, "")
                    if base != key and key is not None:
                        yield shard, key, members
                        members = {}
                    key = base
                    members[ext] = data
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
