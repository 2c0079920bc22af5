"""The training data stream: a mixture of shard sources → encoded samples → packed rows → one optimizer
step's rows, resumable exactly.

Resume: before each sample is drawn the mixture's state is noted. When a step's rows are complete, the
saved position is the state before the first sample not yet in a row (the one that did not fit and waits
to start the next row), so a resumed run draws that sample again and builds the same rows.

Distributed: `split="shards"` (default) gives every process its own shards (the readers split by rank), so
processes read disjoint data; `split="batch"` makes every process read the whole stream and keep its share
of each step's rows, which reproduces a one-process run's batches exactly (small runs and tests).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

from ..data import DataError, Mixture, ShardReader, Source
from .collate import Encoded, SampleEncoder

log = logging.getLogger(__name__)


@dataclass
class SourceSpec:
    """One entry of `data.train`: shards (path, glob, brace pattern or directory), mixture weight, epochs
    (None: cycle forever)."""

    name: str
    shards: Any
    weight: float = 1.0
    epochs: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SourceSpec":
        unknown = sorted(set(data) - {"name", "shards", "weight", "epochs"})
        if unknown or "shards" not in data:
            raise ValueError(f"data source {data!r}: needs 'shards' (and name, weight, epochs); unknown {unknown}")
        return cls(data.get("name") or str(data["shards"]), data["shards"], float(data.get("weight", 1.0)),
                   data.get("epochs"))


class BatchStream:
    """`next_rows()` → this process's rows for one optimizer step (None when every source is exhausted)."""

    def __init__(self, sources: list[SourceSpec], encoder: SampleEncoder, *, rows_per_step: int, pack: bool = True,
                 rank: int = 0, world_size: int = 1, split: str = "shards", seed: int = 0, shuffle: bool = True,
                 shuffle_buffer: int = 256, on_error: str = "skip") -> None:
        if split not in ("shards", "batch"):
            raise ValueError(f"data.split must be 'shards' or 'batch', got {split!r}")
        if on_error not in ("skip", "raise"):
            raise ValueError(f"data.on_error must be 'skip' or 'raise', got {on_error!r}")
        self.encoder, self.pack, self.on_error = encoder, pack, on_error
        self.rank, self.world_size, self.split = rank, world_size, split
        # with split="batch" every process draws the global step and keeps rows rank::world_size
        self.draw_rows = rows_per_step * (world_size if split == "batch" else 1)
        reader_rank, reader_world = (rank, world_size) if split == "shards" else (0, 1)
        self.readers = {s.name: ShardReader(s.shards, shuffle=shuffle, seed=seed, shuffle_buffer=shuffle_buffer,
                                            rank=reader_rank, world_size=reader_world, on_error=on_error)
                        for s in sources}
        self.mixture = Mixture([Source(s.name, self.readers[s.name], s.weight, s.epochs) for s in sources], seed=seed)
        self.skipped: Counter[str] = Counter()  # encoding errors (the readers count their own)
        self._rows: Iterator[tuple[list[Encoded], dict]] | None = None
        self._position: dict | None = None  # mixture state after the last step returned

    @property
    def errors(self) -> dict[str, int]:
        total = Counter(self.skipped)
        for reader in self.readers.values():
            total.update(reader.errors)
        return dict(total)

    def _encoded(self) -> Iterator[tuple[Encoded, dict]]:
        """(encoded sample, mixture state before it was drawn)."""
        samples = iter(self.mixture)
        while True:
            before = self.mixture.state_dict()
            item = next(samples, None)
            if item is None:
                return
            source, sample = item
            try:
                yield self.encoder(sample, source), before
            except DataError as error:
                if self.on_error == "raise":
                    raise
                self.skipped[error.category] += 1
                log.warning("skipping sample (%d skipped so far): %s", sum(self.errors.values()), error)

    def _packed(self) -> Iterator[tuple[list[Encoded], dict]]:
        """(row, position after the row): the state from which the next row's first sample is drawn."""
        row: list[Encoded] = []
        tokens = images = 0
        seq_len, max_images = self.encoder.seq_len, self.encoder.max_images
        for sample, before in self._encoded():
            n, m = len(sample.input_ids), len(sample.images)
            if row and (not self.pack or tokens + n > seq_len or images + m > max_images):
                yield row, before
                row, tokens, images = [], 0, 0
            row.append(sample)
            tokens, images = tokens + n, images + m
        if row:
            yield row, self.mixture.state_dict()

    def next_rows(self) -> list[list[Encoded]] | None:
        if self._rows is None:
            self._rows = self._packed()
        rows, position = [], None
        for row, position in self._rows:
            rows.append(row)
            if len(rows) == self.draw_rows:
                break
        if len(rows) < self.draw_rows:
            return None  # the data ran out: a partial step would change the loss scale
        self._position = position
        if self.split == "batch":
            rows = rows[self.rank::self.world_size]
        return rows

    def state_dict(self) -> dict:
        """The position after the last step returned by `next_rows`."""
        position = self._position or self.mixture.state_dict()
        return {"mixture": position, "skipped": dict(self.skipped),
                "reader_errors": {n: dict(r.errors) for n, r in self.readers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.mixture.load_state_dict(state["mixture"])
        self.skipped = Counter(state.get("skipped", {}))
        for name, errors in state.get("reader_errors", {}).items():
            if name in self.readers:
                self.readers[name].errors = Counter(errors)
        self._rows = None
        self._position = state["mixture"]
