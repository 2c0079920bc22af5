"""Mix several named data sources with fixed proportions and per-source epoch counts, resumably.

IDEFICS pretraining mixed its sources like this (weights are sampling proportions, epochs the passes made
over each source):

    Mixture([
        Source("obelics",   obelics_reader,   weight=0.7385, epochs=1),
        Source("wikipedia", wikipedia_reader, weight=0.0615, epochs=3),
        Source("laion",     laion_reader,     weight=0.1718, epochs=1),
        Source("pmd",       pmd_reader,       weight=0.0282, epochs=3),
    ], seed=0)

At every step one source is drawn with probability proportional to its weight among the sources that still
have data; a source that finishes its last epoch drops out (`epochs=None` cycles it forever). The draw at
step t depends only on (seed, t, the set of live sources), so the sequence is deterministic for a seed and a
saved `state_dict()` continues it exactly.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Sequence


@dataclass
class Source:
    """One named source. `data` is a `ShardReader` (anything with `set_epoch` and `__iter__`), a function
    `epoch -> iterable`, or a re-iterable collection (read in the same order every epoch)."""

    name: str
    data: Any
    weight: float
    epochs: int | None = 1  # passes before the source is exhausted; None: cycle forever


class Mixture:
    """Iterate `(source_name, sample)` pairs drawn from `sources` (see the module docstring).

    stop="all": run until every source has finished its epochs; stop="first": end as soon as one has.
    """

    def __init__(self, sources: Sequence[Source], *, seed: int = 0, stop: Literal["all", "first"] = "all"):
        if not sources:
            raise ValueError("a mixture needs at least one source")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        for s in sources:
            if not s.weight > 0:
                raise ValueError(f"source {s.name!r}: weight must be > 0, got {s.weight}")
            if s.epochs is not None and s.epochs < 1:
                raise ValueError(f"source {s.name!r}: epochs must be >= 1 or None, got {s.epochs}")
        if stop not in ("all", "first"):
            raise ValueError(f"stop must be 'all' or 'first', got {stop!r}")
        self.sources = {s.name: s for s in sources}
        self.seed, self.stop = seed, stop
        self.step = 0
        # per source: current epoch, samples taken in it, total taken, finished all its epochs
        self.epoch = {n: 0 for n in names}
        self.taken_in_epoch = {n: 0 for n in names}
        self.taken = {n: 0 for n in names}
        self.exhausted = {n: False for n in names}
        self._iterators: dict[str, Iterator] = {}
        self._resume_states: dict[str, Any] = {}

    @property
    def proportions(self) -> dict[str, float]:
        """The configured weights, normalised to sum to 1."""
        total = sum(s.weight for s in self.sources.values())
        return {n: s.weight / total for n, s in self.sources.items()}

    def _open(self, name: str) -> Iterator:
        """An iterator over the current epoch of a source, positioned after the samples already taken."""
        data, epoch = self.sources[name].data, self.epoch[name]
        skip = self.taken_in_epoch[name]
        if hasattr(data, "set_epoch"):
            if name in self._resume_states:  # a stateful reader (ShardReader) skips cheaply by itself
                data.load_state_dict(self._resume_states.pop(name))
                skip = 0
            data.set_epoch(epoch)
            iterator = iter(data)
        elif callable(data):
            iterator = iter(data(epoch))
        else:
            iterator = iter(data)
        return itertools.islice(iterator, skip, None)

    def _pick(self, live: list[str]) -> str:
        weights = [self.sources[n].weight for n in live]
        u = random.Random(f"mixture:{self.seed}:{self.step}").random() * sum(weights)
        for name, w in zip(live, weights):
            u -= w
            if u < 0:
                return name
        return live[-1]

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        while True:
            if self.stop == "first" and any(self.exhausted.values()):
                return
            live = [n for n in self.sources if not self.exhausted[n]]
            if not live:
                return
            name = self._pick(live)
            if name not in self._iterators:
                self._iterators[name] = self._open(name)
            sample = next(self._iterators[name], _END)
            if sample is _END:
                self._end_epoch(name)
                continue  # redraw at the same step among the sources left
            self.taken_in_epoch[name] += 1
            self.taken[name] += 1
            self.step += 1
            yield name, sample

    def _end_epoch(self, name: str) -> None:
        if self.taken_in_epoch[name] == 0:
            raise ValueError(f"source {name!r} yielded no samples in epoch {self.epoch[name]}")
        del self._iterators[name]
        self.epoch[name] += 1
        self.taken_in_epoch[name] = 0
        epochs = self.sources[name].epochs
        self.exhausted[name] = epochs is not None and self.epoch[name] >= epochs

    def state_dict(self) -> dict:
        """Everything needed to continue the sequence exactly; JSON-serialisable if the readers' states are."""
        readers = {n: s.data.state_dict() for n, s in self.sources.items() if hasattr(s.data, "state_dict")}
        return {"seed": self.seed, "step": self.step, "epoch": dict(self.epoch),
                "taken_in_epoch": dict(self.taken_in_epoch), "taken": dict(self.taken),
                "exhausted": dict(self.exhausted), "readers": readers}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"state was saved with seed {state['seed']}, this mixture has seed {self.seed}")
        if set(state["epoch"]) != set(self.sources):
            raise ValueError(f"state has sources {sorted(state['epoch'])}, mixture has {sorted(self.sources)}")
        self.step = state["step"]
        self.epoch, self.taken_in_epoch = dict(state["epoch"]), dict(state["taken_in_epoch"])
        self.taken, self.exhausted = dict(state["taken"]), dict(state["exhausted"])
        self._iterators = {}
        self._resume_states = dict(state.get("readers", {}))


_END = object()
