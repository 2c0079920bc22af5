"""Continuous batching: one background thread runs the model for every request at once, and requests join and
leave the running batch between decoding steps (no request waits for the slowest one).

A new request is prefilled alone (its own small cache: vision encoder, perceiver and image keys/values run once
for it), then merged into the batch: the shorter self-attention cache and attention mask are left-padded to the
longer length (positions come from the attention mask, so left padding changes nothing), per-request tensors
that differ in size (the image keys/values of each cross-attention layer, the image mask of a decoding step)
are zero-padded (a zero in the image mask hides the padded image), and everything is concatenated along the
batch. A finished, timed-out or cancelled request leaves by index-selecting the other rows, and leading columns
that became padding in every row are trimmed. Sampling settings are per request (each row has its own seed).

The engine only relies on the model's generation interface (`new_cache`, `prefill_inputs`, `step_inputs`,
`forward(..., cache=, logits_to_keep=)`, a cache with `kv` and optional `cross_kv`), so a model without
cross-attention (no `cross_kv`, empty step inputs) batches the same way."""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..generation import GenerationParams, TextStream, choose, process_logits
from ..image_cache import with_cached_images
from ..layers import KVCache
from .protocol import GenerationResult, TokenInfo


@dataclass
class Job:
    """One request for the engine: model inputs for one prompt (batch of 1) and how to decode them.
    `emit(event)` is called from the engine thread with `TokenEvent`s, then a final one or an `ErrorEvent`."""

    inputs: dict[str, torch.Tensor]
    params: GenerationParams
    emit: Callable[[Any], None]
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    typical_p: float = 1.0
    top_n_tokens: int = 0
    prefill_details: bool = False
    deadline: float = float("inf")  # time.monotonic() after which the request is dropped
    cancelled: bool = False  # set by the server when the client goes away; honoured at the next step
    submitted_at: float = 0.0
    started_at: float = 0.0
    checked_at: float = 0.0  # last time the server checked that the client is still connected
    finished: bool = False  # the engine is done with it (answered, failed or dropped)

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class TokenEvent:
    token: TokenInfo
    top_tokens: list[TokenInfo]
    index: int  # 1-based position in the generated text
    done: GenerationResult | None = None  # set on the request's last token


@dataclass
class ErrorEvent:
    message: str
    error_type: str  # TGI error_type: "generation", "timeout", "overloaded"...
    status: int


class Overloaded(Exception):
    pass


@dataclass
class Row:
    """A request inside the running batch."""

    job: Job
    seed: int | None
    generator: torch.Generator | None
    seen: torch.Tensor  # [1, n] prompt + generated ids (repetition penalty)
    prompt_tokens: int
    prefill: list[TokenInfo]
    text: TextStream
    counts: torch.Tensor | None = None  # [V] generated-token counts (frequency / presence penalties)
    tokens: list[TokenInfo] = field(default_factory=list)
    top_tokens: list[list[TokenInfo]] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return self.job.params.max_new_tokens - len(self.tokens)


class Engine:
    """`submit(job)` from any thread; results arrive through `job.emit`. `max_batch_size` = 1 serves one
    request at a time (the baseline continuous batching is measured against)."""

    def __init__(self, pipe, max_batch_size: int = 8, max_queue: int = 32) -> None:
        self.pipe, self.model, self.tokenizer = pipe, pipe.model, pipe.tokenizer
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.waiting: deque[Job] = deque()
        self.rows: list[Row] = []
        self.cache = None  # the batch's decode cache
        self.mask: torch.Tensor | None = None  # [B, S] attention mask over cached positions
        self.step_extra: dict[str, torch.Tensor] = {}
        self.logits: torch.Tensor | None = None  # [B, V] next-token logits of every row
        self.in_flight = 0  # submitted and not yet finished
        self.steps = 0
        self.lock = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------ public side
    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="idefics-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    @property
    def capacity(self) -> int:
        return self.max_batch_size + self.max_queue

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.in_flight >= self.capacity:
                raise Overloaded("Model is overloaded")
            if self.stopping:
                raise Overloaded("the server is shutting down")
            self.in_flight += 1
            job.submitted_at = time.monotonic()
            self.waiting.append(job)
            self.lock.notify_all()

    def stats(self) -> dict[str, int]:
        return {"queue_size": len(self.waiting), "batch_size": len(self.rows), "in_flight": self.in_flight,
                "steps": self.steps}

    # ------------------------------------------------------------------------------------------ engine thread
    def run(self) -> None:
        while True:
            with self.lock:
                while not self.stopping and not self.waiting and not self.rows:
                    self.lock.wait()
                if self.stopping:
                    break
            self.iterate()
        self.fail_all("the server is shutting down")
        with self.lock:
            while self.waiting:
                self.finish_job(self.waiting.popleft(), ErrorEvent("the server is shutting down", "generation", 503))

    def iterate(self) -> None:
        """One round: waiting requests join (as many as the batch has room for), then one decoding step.
        An unexpected error fails the requests involved and resets the batch; the engine keeps running."""
        with self.lock:
            free = self.max_batch_size - len(self.rows)
            joining = deque(self.waiting.popleft() for _ in range(min(free, len(self.waiting))))
        try:
            with torch.inference_mode():
                while joining:
                    self.admit(joining.popleft())
                if self.rows:
                    self.step()
        except Exception as error:  # a failed batch step fails its requests, not the server
            message = f"Request failed during generation: {type(error).__name__}: {error}"
            for job in joining:
                self.finish_job(job, ErrorEvent(message, "generation", 424))
            self.fail_all(message)

    def finish_job(self, job: Job, event: Any = None) -> None:
        if job.finished:
            return
        job.finished = True
        if event is not None:
            safe_emit(job, event)
        with self.lock:
            self.in_flight -= 1

    def fail_all(self, message: str) -> None:
        for row in self.rows:
            self.finish_job(row.job, ErrorEvent(message, "generation", 424))
        self.rows, self.cache, self.mask, self.step_extra, self.logits = [], None, None, {}, None

    def admit(self, job: Job) -> None:
        if job.cancelled:
            return self.finish_job(job)
        if time.monotonic() > job.deadline:
            return self.finish_job(job, timeout_event())
        job.started_at = time.monotonic()
        try:
            row, cache, mask, step_extra, logits = self.prefill(job)
        except Exception as error:
            return self.finish_job(job, ErrorEvent(f"Request failed during generation: {type(error).__name__}: "
                                                   f"{error}", "generation", 424))
        if not self.rows:
            self.rows, self.cache, self.mask, self.step_extra, self.logits = [row], cache, mask, step_extra, logits
            return
        try:
            self.merge(row, cache, mask, step_extra, logits)
        except Exception:
            self.finish_job(job, ErrorEvent("Request failed during generation: could not join the batch",
                                            "generation", 424))
            raise  # the batch may be half-merged: iterate() fails and resets it

    def prefill(self, job: Job):
        model, params = self.model, job.params
        # an image seen before (a chat client resends the whole conversation each turn) skips the vision
        # encoder and perceiver: the pipeline's image-feature cache, as for `pipe.generate`
        inputs = with_cached_images(model, job.inputs, getattr(self.pipe, "image_cache", None))
        input_ids = inputs["input_ids"].to(model.device)
        mask = inputs["attention_mask"].to(model.device)
        t = input_ids.shape[1]
        cache = model.new_cache(1, t + params.max_new_tokens)
        extra = model.prefill_inputs(inputs)
        out = model(input_ids, mask, cache=cache, logits_to_keep=0 if job.prefill_details else 1, **extra)
        prefill = []
        if job.prefill_details:
            logprobs = out.logits[0, :-1].float().log_softmax(-1).gather(1, input_ids[0, 1:, None])[:, 0]
            ids = input_ids[0].tolist()
            prefill = [TokenInfo(i, self.tokenizer.decode([i], skip_special_tokens=False),
                                 None if k == 0 else float(logprobs[k - 1])) for k, i in enumerate(ids)]
        seed = params.seed
        if params.do_sample and seed is None:
            seed = random.getrandbits(63)  # reported back, so a sampled answer can be reproduced
        generator = torch.Generator(device=model.device).manual_seed(seed) if params.do_sample else None
        counts = None
        if job.frequency_penalty or job.presence_penalty:
            counts = torch.zeros(out.logits.shape[-1], device=model.device)
        row = Row(job, seed if params.do_sample else None, generator, input_ids, int(mask.sum()), prefill,
                  TextStream(self.pipe.detokenize), counts)
        return row, cache, mask, model.step_inputs(extra), out.logits[:, -1].float()

    def merge(self, row: Row, cache, mask: torch.Tensor, step_extra: dict, logits: torch.Tensor) -> None:
        """Add a prefilled request (batch of 1) to the running batch."""
        old, new = self.cache.kv, cache.kv
        length = max(old.length, new.length)
        rows = self.rows + [row]
        capacity = length + max(r.remaining for r in rows)
        self.cache.kv = KVCache.joined([old, new], capacity)  # the shorter cache left-padded
        self.mask = torch.cat([F.pad(self.mask, (length - self.mask.shape[1], 0)),
                               F.pad(mask, (length - mask.shape[1], 0))])
        old_cross, new_cross = getattr(self.cache, "cross_kv", None), getattr(cache, "cross_kv", None)
        if old_cross is not None or new_cross is not None:
            old_cross = old_cross or [tuple(torch.zeros_like(t[:1]).expand(len(self.rows), -1, -1, -1) for t in kv)
                                      for kv in new_cross]
            new_cross = new_cross or [tuple(torch.zeros_like(t[:1]) for t in kv) for kv in old_cross]
            self.cache.cross_kv = [(pad_cat(ka, kb), pad_cat(va, vb))
                                   for (ka, va), (kb, vb) in zip(old_cross, new_cross)]
        for key in set(self.step_extra) | set(step_extra):
            a = self.step_extra.get(key)
            b = step_extra.get(key)
            a = torch.zeros_like(b[:1]).expand(len(self.rows), *b.shape[1:]) if a is None else a
            b = torch.zeros_like(a[:1]) if b is None else b
            self.step_extra[key] = pad_cat(a, b)
        self.logits = torch.cat([self.logits, logits])
        self.rows = rows

    def step(self) -> None:
        """Choose every row's next token, report it, drop the rows that are done, run the model once."""
        self.steps += 1
        logprobs = self.logits.log_softmax(-1)
        tokens = []
        for i, row in enumerate(self.rows):
            tokens.append(self.next_token(row, self.logits[i:i + 1]))
        chosen = torch.tensor(tokens, device=self.logits.device)
        picked = logprobs.gather(1, chosen[:, None])[:, 0].tolist()
        keep = []
        now = time.monotonic()
        for i, row in enumerate(self.rows):
            finished = self.record(row, tokens[i], picked[i], logprobs[i])
            if finished:
                continue
            if row.job.cancelled:
                self.finish_job(row.job)
            elif now > row.job.deadline:
                self.finish_job(row.job, timeout_event())
            else:
                keep.append(i)
        if len(keep) < len(self.rows):
            self.select(keep)
        if not self.rows:
            return
        new_tokens = chosen[keep][:, None] if len(keep) < len(chosen) else chosen[:, None]
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        out = self.model(new_tokens, self.mask, cache=self.cache, logits_to_keep=1, **self.step_extra)
        self.logits = out.logits[:, -1].float()

    def next_token(self, row: Row, logits: torch.Tensor) -> int:
        job, params = row.job, row.job.params
        if row.counts is not None:
            logits = logits - job.frequency_penalty * row.counts - job.presence_penalty * (row.counts > 0).float()
        scores = process_logits(logits, row.seen, params)
        if params.do_sample and job.typical_p < 1.0:
            scores = typical_filter(scores, job.typical_p)
        return int(choose(scores, params, row.generator)[0])

    def record(self, row: Row, token: int, logprob: float, logprobs: torch.Tensor) -> bool:
        """Report one token; True (and the request finished) if it was the last one. Stop rules as in
        `generation.decode`: stop token → "eos_token", stop sequence → "stop_sequence", budget → "length"."""
        params = row.job.params
        special = self.tokenizer.is_special(token)
        piece = row.text.push(token)
        text = (self.tokenizer.id_to_token(token) or "") if special else piece
        info = TokenInfo(token, text, logprob, special)
        row.tokens.append(info)
        row.seen = torch.cat([row.seen, row.seen.new_tensor([[token]])], dim=1)
        if row.counts is not None:
            row.counts[token] += 1
        top: list[TokenInfo] = []
        if row.job.top_n_tokens:
            values, ids = logprobs.topk(row.job.top_n_tokens)
            top = [TokenInfo(i, self.tokenizer.decode([i], skip_special_tokens=False), v, self.tokenizer.is_special(i))
                   for v, i in zip(values.tolist(), ids.tolist())]
            row.top_tokens.append(top)
        ids = [t.id for t in row.tokens]
        reason = None
        if token in params.stop_token_ids:
            reason = "eos_token"
        elif params.stop_sequences and any(s and s in self.pipe.detokenize(ids) for s in params.stop_sequences):
            reason = "stop_sequence"
        elif row.remaining <= 0:
            reason = "length"
        done = None
        if reason is not None:
            info.text += "" if special else row.text.flush()  # text held back for an incomplete character
            done = GenerationResult(self.pipe.detokenize(ids), row.tokens, reason, row.prompt_tokens, row.seed,
                                    row.prefill, row.top_tokens)
        safe_emit(row.job, TokenEvent(info, top, len(row.tokens), done))
        if done is not None:
            self.finish_job(row.job)
        return done is not None

    def select(self, keep: list[int]) -> None:
        """Keep only some rows of the batch, then trim the columns that are padding in every remaining row."""
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.mask, self.step_extra, self.logits = None, None, {}, None
            return
        index = torch.tensor(keep, device=self.mask.device)
        kv = self.cache.kv
        kv.keys, kv.values = kv.keys[:, index], kv.values[:, index]
        if getattr(self.cache, "cross_kv", None) is not None:
            self.cache.cross_kv = [(k[index], v[index]) for k, v in self.cache.cross_kv]
        self.step_extra = {key: value[index] for key, value in self.step_extra.items()}
        self.mask, self.logits = self.mask[index], self.logits[index]
        lead = int((self.mask.cumsum(1) == 0).sum(1).min())
        if lead:
            self.mask = self.mask[:, lead:]
            kv.drop_front(lead)


def pad_cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 after zero-padding every other dim (at the end) to the larger size."""
    shape = [max(x, y) for x, y in zip(a.shape[1:], b.shape[1:])]

    def grow(t: torch.Tensor) -> torch.Tensor:
        pads = []
        for have, want in reversed(list(zip(t.shape[1:], shape))):
            pads += [0, want - have]
        return F.pad(t, pads) if any(pads) else t

    return torch.cat([grow(a), grow(b)])


def typical_filter(scores: torch.Tensor, mass: float) -> torch.Tensor:
    """Typical decoding: keep the tokens whose surprisal is closest to the entropy, up to `mass` probability."""
    logp = scores.log_softmax(-1)
    entropy = -(logp.exp() * logp).nan_to_num().sum(-1, keepdim=True)
    order = (-logp - entropy).abs().argsort(-1)
    cumulative = logp.gather(-1, order).exp().cumsum(-1)
    last = (cumulative < mass).sum(-1, keepdim=True).clamp(max=scores.shape[-1] - 1)
    remove = torch.arange(scores.shape[-1], device=scores.device)[None] > last
    return scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))


def timeout_event() -> ErrorEvent:
    return ErrorEvent("Request timed out: it took longer than the server's request timeout", "timeout", 504)


def safe_emit(job: Job, event: Any) -> None:
    try:
        job.emit(event)
    except Exception:  # the receiving side is gone (event loop closed): nothing to tell
        pass
