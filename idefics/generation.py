"""Autoregressive decoding with the two caches: self-attention keys/values (preallocated) and the image
keys/values of every cross-attention layer (computed once at prefill). The vision encoder and perceiver run
once per prompt.

Logit processing follows the reference order: repetition penalty → banned tokens → temperature → top-k →
top-p. Rows of a batch stop independently (stop token ids, stop sequences, or `max_new_tokens`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from .decoding import DecodeState
from .model import Idefics


# Sampling settings outside these ranges overflow float32 (logits / 1e-300 is inf, and inf - inf is NaN).
MIN_TEMPERATURE = 1e-3
REPETITION_PENALTY_RANGE = (1e-2, 1e2)


@dataclass
class GenerationParams:
    max_new_tokens: int = 50
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop_sequences: list[str] = field(default_factory=list)
    banned_token_ids: list[int] = field(default_factory=list)

    def validate(self) -> None:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature >= MIN_TEMPERATURE:
            problems.append(f"temperature must be >= {MIN_TEMPERATURE} when sampling (greedy decoding is "
                            f"do_sample=False), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        low, high = REPETITION_PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:
            problems.append(f"repetition_penalty must be in [{low}, {high}], got {self.repetition_penalty}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class Step:
    """One decoding step: the token chosen for every row (pad for rows already finished)."""

    tokens: torch.Tensor  # [B]
    logprobs: torch.Tensor  # [B] log-probability of the chosen token under the model
    active: torch.Tensor  # [B] bool: rows that produced a real token this step
    finished: torch.Tensor  # [B] bool: rows that are done after this step
    reasons: list[str | None]  # per row: "length" | "eos_token" | "stop_sequence" once finished


def process_logits(logits: torch.Tensor, seen: torch.Tensor, params: GenerationParams) -> torch.Tensor:
    """[B, V] float32 logits → processed scores (the model's distribution after penalties and warping)."""
    scores = logits.clone()
    if params.repetition_penalty != 1.0:
        picked = scores.gather(1, seen)
        picked = torch.where(picked < 0, picked * params.repetition_penalty, picked / params.repetition_penalty)
        scores.scatter_(1, seen, picked)
    if params.banned_token_ids:
        scores[:, params.banned_token_ids] = float("-inf")
    if not params.do_sample:
        return scores
    if params.temperature != 1.0:
        scores = scores / params.temperature
    if params.top_k > 0:
        kth = torch.topk(scores, min(params.top_k, scores.shape[-1])).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=False)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove = cumulative <= (1 - params.top_p)
        remove[:, -1] = False  # always keep the most likely token
        scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return scores


def choose(scores: torch.Tensor, params: GenerationParams, generator: torch.Generator | None) -> torch.Tensor:
    if not params.do_sample:
        return scores.argmax(-1)
    probs = scores.softmax(-1)
    if not bool(torch.isfinite(probs).all()):  # e.g. every token banned or penalised to -inf
        raise ValueError("sampling found no valid next-token distribution (all scores are -inf or NaN)")
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def stop_reason(params: GenerationParams, token: int, generated: list[int], detokenize=None) -> str | None:
    """Why a row stops after choosing `token` (`generated` ends with it): a stop token → "eos_token", a stop
    sequence in the text → "stop_sequence", the token budget spent → "length"; None: it goes on."""
    if token in params.stop_token_ids:
        return "eos_token"
    if params.stop_sequences and detokenize is not None:
        text = detokenize(generated)
        if any(s and s in text for s in params.stop_sequences):
            return "stop_sequence"
    if len(generated) >= params.max_new_tokens:
        return "length"
    return None


@torch.inference_mode()
def decode(model: Idefics, inputs: dict[str, torch.Tensor], params: GenerationParams, pad_token_id: int,
           detokenize=None) -> Iterator[Step]:
    """Yield one `Step` per generated position until every row has stopped. `detokenize(ids) -> str` is
    needed only for stop sequences."""
    params.validate()
    state, _ = DecodeState.prefill(model, inputs, params.max_new_tokens)
    device = state.mask.device
    b = state.batch
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    seen = inputs["input_ids"].to(device)
    generated: list[list[int]] = [[] for _ in range(b)]
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    while True:
        logits = state.logits
        tokens = choose(process_logits(logits, seen, params), params, generator)
        logprobs = logits.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
        active = ~finished
        tokens = torch.where(active, tokens, torch.full_like(tokens, pad_token_id))
        reasons: list[str | None] = [None] * b
        for row in range(b):
            if active[row]:
                generated[row].append(int(tokens[row]))
                reasons[row] = stop_reason(params, int(tokens[row]), generated[row], detokenize)
        finished = finished | torch.tensor([r is not None for r in reasons], device=device)
        yield Step(tokens, logprobs, active, finished.clone(), reasons)
        if bool(finished.all()):
            return
        seen = torch.cat([seen, tokens[:, None]], dim=1)
        state.step(tokens)


class TextStream:
    """Incremental detokenisation: feed token ids, get the new text. Text ending in an incomplete UTF-8
    sequence is held back until the next token completes it."""

    def __init__(self, detokenize) -> None:
        self.detokenize = detokenize
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.detokenize(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece

    def flush(self) -> str:
        text = self.detokenize(self.ids)
        piece = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return piece
