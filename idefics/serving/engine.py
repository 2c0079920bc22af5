"""Continuous batching: one background thread runs the model for every request at once, and requests join and
leave the running batch between decoding steps (no request waits for the slowest one).

A new request is prefilled alone (its own small cache: vision encoder, perceiver and image keys/values run once
for it), then merged into the batch: the shorter self-attention cache and attention mask are left-padded to the
longer length (positions come from the attention mask, so left padding changes nothing), per-request tensors
that differ in size (the image keys/values of each cross-attention layer, the image mask of a decoding step)
are zero-padded (a zero in the image mask hides the padded image), and everything is concatenated along the
batch. A finished, timed-out or cancelled request leaves by index-selecting the other rows, and leading columns
that became padding in every row are trimmed. Sampling settings are per request (each row has its own seed).

The batch is one `decoding.DecodeState` (prefill, join, select, step), so a model without cross-attention
(Idefics2: no image keys/values, empty step inputs) batches the same way."""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..decoding import DecodeState
from ..generation import GenerationParams, TextStream, choose, process_logits, stop_reason
from ..image_cache import with_cached_images
from .responses import GenerationResult, TokenInfo


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
        self.state: DecodeState | None = None  # the running batch's caches, mask and next-token logits
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
            failure = request_failed(error)
            for job in joining:
                self.finish_job(job, failure)
            self.fail_all(failure.message)

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
        self.rows, self.state = [], None

    def admit(self, job: Job) -> None:
        if job.cancelled:
            return self.finish_job(job)
        if time.monotonic() > job.deadline:
            return self.finish_job(job, timeout_event())
        job.started_at = time.monotonic()
        try:
            row, state = self.prefill(job)
        except Exception as error:
            return self.finish_job(job, request_failed(error))
        if not self.rows:
            self.rows, self.state = [row], state
            return
        try:
            self.rows.append(row)
            self.state.join(state, room=max(r.remaining for r in self.rows))
        except Exception:
            self.finish_job(job, ErrorEvent("Request failed during generation: could not join the batch",
                                            "generation", 424))
            raise  # the batch may be half-merged: iterate() fails and resets it

    def prefill(self, job: Job):
        model, params = self.model, job.params
        # an image seen before (a chat client resends the whole conversation each turn) skips the vision
        # encoder and perceiver: the pipeline's image-feature cache, as for `pipe.generate`
        inputs = with_cached_images(model, job.inputs, getattr(self.pipe, "image_cache", None))
        state, logits = DecodeState.prefill(model, inputs, params.max_new_tokens, all_logits=job.prefill_details)
        input_ids = inputs["input_ids"].to(model.device)
        prefill = []
        if job.prefill_details:
            logprobs = logits[0, :-1].float().log_softmax(-1).gather(1, input_ids[0, 1:, None])[:, 0]
            ids = input_ids[0].tolist()
            prefill = [TokenInfo(i, self.tokenizer.decode([i], skip_special_tokens=False),
                                 None if k == 0 else float(logprobs[k - 1])) for k, i in enumerate(ids)]
        seed = params.seed
        if params.do_sample and seed is None:
            seed = random.getrandbits(63)  # reported back, so a sampled answer can be reproduced
        generator = torch.Generator(device=model.device).manual_seed(seed) if params.do_sample else None
        counts = None
        if job.frequency_penalty or job.presence_penalty:
            counts = torch.zeros(state.logits.shape[-1], device=model.device)
        row = Row(job, seed if params.do_sample else None, generator, input_ids, int(state.mask.sum()), prefill,
                  TextStream(self.pipe.detokenize), counts)
        return row, state

    def step(self) -> None:
        """Choose every row's next token, report it, drop the rows that are done, run the model once."""
        self.steps += 1
        logits = self.state.logits
        logprobs = logits.log_softmax(-1)
        tokens, failed = [], set()
        for i, row in enumerate(self.rows):
            try:  # one request's settings (penalties, sampling) must not fail the others
                tokens.append(self.next_token(row, logits[i:i + 1]))
            except Exception as error:
                tokens.append(0)
                failed.add(i)
                self.finish_job(row.job, request_failed(error))
        chosen = torch.tensor(tokens, device=logits.device)
        picked = logprobs.gather(1, chosen[:, None])[:, 0].tolist()
        keep = []
        now = time.monotonic()
        for i, row in enumerate(self.rows):
            if i in failed:
                continue
            try:
                finished = self.record(row, tokens[i], picked[i], logprobs[i])
            except Exception as error:
                self.finish_job(row.job, request_failed(error))
                continue
            if finished:
                continue
            if row.job.cancelled:
                self.finish_job(row.job)
            elif now > row.job.deadline:
                self.finish_job(row.job, timeout_event())
            else:
                keep.append(i)
        if len(keep) < len(self.rows):
            self.rows = [self.rows[i] for i in keep]
            if not keep:
                self.state = None
                return
            self.state.select(keep)
            chosen = chosen[keep]
        self.state.step(chosen)

    def next_token(self, row: Row, logits: torch.Tensor) -> int:
        job, params = row.job, row.job.params
        if row.counts is not None:
            logits = logits - job.frequency_penalty * row.counts - job.presence_penalty * (row.counts > 0).float()
        scores = process_logits(logits, row.seen, params)
        if params.do_sample and job.typical_p < 1.0:
            scores = typical_filter(scores, job.typical_p)
        return int(choose(scores, params, row.generator)[0])

    def record(self, row: Row, token: int, logprob: float, logprobs: torch.Tensor) -> bool:
        """Report one token; True (and the request finished) if it was the last one (`generation.stop_reason`)."""
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
        reason = stop_reason(params, token, ids, self.pipe.detokenize)
        done = None
        if reason is not None:
            info.text += "" if special else row.text.flush()  # text held back for an incomplete character
            done = GenerationResult(self.pipe.detokenize(ids), row.tokens, reason, row.prompt_tokens, row.seed,
                                    row.prefill, row.top_tokens)
        safe_emit(row.job, TokenEvent(info, top, len(row.tokens), done))
        if done is not None:
            self.finish_job(row.job)
        return done is not None


def typical_filter(scores: torch.Tensor, mass: float) -> torch.Tensor:
    """Typical decoding: keep the tokens whose surprisal is closest to the entropy, up to `mass` probability."""
    logp = scores.log_softmax(-1)
    entropy = -(logp.exp() * logp).nan_to_num().sum(-1, keepdim=True)
    order = (-logp - entropy).abs().argsort(-1)
    cumulative = logp.gather(-1, order).exp().cumsum(-1)
    last = (cumulative < mass).sum(-1, keepdim=True).clamp(max=scores.shape[-1] - 1)
    remove = torch.arange(scores.shape[-1], device=scores.device)[None] > last
    return scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))


def request_failed(error: Exception) -> ErrorEvent:
    return ErrorEvent(f"Request failed during generation: {type(error).__name__}: {error}", "generation", 424)


def timeout_event() -> ErrorEvent:
    return ErrorEvent("Request timed out: it took longer than the server's request timeout", "timeout", 504)


def safe_emit(job: Job, event: Any) -> None:
    try:
        job.emit(event)
    except Exception:  # the receiving side is gone (event loop closed): nothing to tell
        pass
