"""The one decoding state every generator shares: `generation.decode` (greedy and sampling), beam search, the
serving engine's continuous batching and the evaluation harness's class scoring.

A `DecodeState` is a batch of rows being decoded together:
  - the model's cache (`DecodeCache`): self-attention keys/values, preallocated, and for IDEFICS the image
    keys/values of every gated cross-attention layer, computed once at prefill;
  - the attention mask over the cached positions (rows are left-padded: positions come from the mask);
  - the inputs every step repeats (IDEFICS: the image each new token sees; Idefics2: none);
  - every row's next-token logits (float32).

`prefill` runs the prompt once; `step` feeds one new token per row; `extend` feeds several (scoring a
continuation); `select` keeps, reorders or repeats rows (finished requests leave, beams follow their parents)
and trims columns that became padding everywhere; `copy_rows` gives an independent state for some rows (every
class name continues its prompt's cache); `join` adds another state's rows (a request joins a running batch).
Nothing else indexes a cache.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from .layers import KVCache


class DecodeState:
    def __init__(self, model: Any, cache: Any, mask: torch.Tensor, step_inputs: dict[str, torch.Tensor],
                 logits: torch.Tensor) -> None:
        self.model, self.cache, self.mask, self.step_inputs, self.logits = model, cache, mask, step_inputs, logits

    @classmethod
    def prefill(cls, model: Any, inputs: dict[str, torch.Tensor], max_new_tokens: int,
                all_logits: bool = False) -> tuple["DecodeState", torch.Tensor | None]:
        """Run the prompts (the processor's output: a left-padded batch; `image_hidden_states` may replace
        `pixel_values`) with room for `max_new_tokens` more positions. Returns the state and, with
        `all_logits`, the logits of every prompt position ([B, T, V], for prompt log-probabilities)."""
        input_ids = inputs["input_ids"].to(model.device)
        mask = inputs["attention_mask"].to(model.device)
        batch, length = input_ids.shape
        limit = model.config.max_position_embeddings
        if length + max_new_tokens > limit:
            raise ValueError(f"prompt ({length} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                             f"max_position_embeddings ({limit})")
        cache = model.new_cache(batch, length + max_new_tokens)
        extra = model.prefill_inputs(inputs)
        logits = model(input_ids, mask, cache=cache, logits_to_keep=0 if all_logits else 1, **extra).logits
        state = cls(model, cache, mask, model.step_inputs(extra), logits[:, -1].float())
        return state, logits if all_logits else None

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ([B]); returns (and keeps) the next-token logits [B, V]."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.batch, 1)], dim=1)
        out = self.model(tokens.reshape(-1, 1).to(self.mask.device), self.mask, cache=self.cache,
                         logits_to_keep=1, **self.step_inputs)
        self.logits = out.logits[:, -1].float()
        return self.logits

    def extend(self, ids: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        """Feed T tokens per row ([B, T], right-padded rows are fine: nothing after them is read); `inputs` are the
        per-position model inputs (IDEFICS: `image_attention_mask` [B, T, N]). Returns the logits [B, T, V]."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.batch, ids.shape[1])], dim=1)
        logits = self.model(ids.to(self.mask.device), self.mask, cache=self.cache, **inputs).logits
        self.logits = logits[:, -1].float()
        return logits

    def select(self, rows: torch.Tensor | list[int]) -> None:
        """Keep the given rows, in that order (repeats allowed: beams copy their parent), then trim the leading
        columns that are padding in every remaining row."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.mask.device)
        kv = self.cache.kv
        kv.select_rows(rows)
        if getattr(self.cache, "cross_kv", None) is not None:
            self.cache.cross_kv = [tuple(t[rows] for t in pair) for pair in self.cache.cross_kv]
        self.step_inputs = {key: value[rows] for key, value in self.step_inputs.items()}
        self.mask, self.logits = self.mask[rows], self.logits[rows]
        lead = int((self.mask.cumsum(1) == 0).sum(1).min()) if len(rows) else 0
        if lead:
            self.mask = self.mask[:, lead:]
            kv.drop_front(lead)

    def copy_rows(self, rows: torch.Tensor | list[int]) -> "DecodeState":
        """An independent state holding the given rows (repeats allowed); this one is unchanged."""
        cache = copy.copy(self.cache)
        cache.kv = copy.copy(self.cache.kv)
        cache.extras = dict(getattr(self.cache, "extras", {}))
        part = DecodeState(self.model, cache, self.mask, dict(self.step_inputs), self.logits)
        part.select(rows)
        return part

    def join(self, other: "DecodeState", room: int) -> None:
        """Append `other`'s rows: the shorter cache and mask are left-padded to the longer length, per-row tensors
        that differ in size (image keys/values, a step's image mask) are zero-padded (a zero in the image mask
        hides the padded image). `room`: positions to keep free after the longest row."""
        old, new = self.cache.kv, other.cache.kv
        length = max(old.length, new.length)
        self.cache.kv = KVCache.joined([old, new], length + room)
        self.mask = torch.cat([F.pad(self.mask, (length - self.mask.shape[1], 0)),
                               F.pad(other.mask, (length - other.mask.shape[1], 0))])
        mine, theirs = getattr(self.cache, "cross_kv", None), getattr(other.cache, "cross_kv", None)
        if mine is not None or theirs is not None:
            mine = mine or [tuple(zero_rows(t, self.batch) for t in pair) for pair in theirs]
            theirs = theirs or [tuple(zero_rows(t, other.batch) for t in pair) for pair in mine]
            self.cache.cross_kv = [tuple(pad_cat(a, b) for a, b in zip(pa, pb)) for pa, pb in zip(mine, theirs)]
        for key in set(self.step_inputs) | set(other.step_inputs):
            a, b = self.step_inputs.get(key), other.step_inputs.get(key)
            a = zero_rows(b, self.batch) if a is None else a
            b = zero_rows(a, other.batch) if b is None else b
            self.step_inputs[key] = pad_cat(a, b)
        self.logits = torch.cat([self.logits, other.logits])


def zero_rows(like: torch.Tensor, rows: int) -> torch.Tensor:
    """Zeros shaped as `rows` rows of `like`."""
    return torch.zeros_like(like[:1]).expand(rows, *like.shape[1:])


def pad_cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 after zero-padding every other dim (at the end) to the larger size."""
    shape = [max(x, y) for x, y in zip(a.shape[1:], b.shape[1:])]

    def grow(t: torch.Tensor) -> torch.Tensor:
        pads = []
        for have, want in reversed(list(zip(t.shape[1:], shape))):
            pads += [0, want - have]
        return F.pad(t, pads) if any(pads) else t

    return torch.cat([grow(a), grow(b)])
