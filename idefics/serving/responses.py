"""Results → JSON: what the engine reports (`TokenInfo`, `GenerationResult`) as TGI's responses and stream events
and OpenAI's chat completions and chunks, errors in either API's JSON, server-sent events. Pure functions, like
`protocol` for requests."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from .protocol import ApiError, GenerationRequest


@dataclass
class TokenInfo:
    id: int
    text: str
    logprob: float | None
    special: bool = False


@dataclass
class GenerationResult:
    generated_text: str
    tokens: list[TokenInfo]
    finish_reason: str  # "length" | "eos_token" | "stop_sequence"
    prompt_tokens: int
    seed: int | None = None
    prefill: list[TokenInfo] = field(default_factory=list)
    top_tokens: list[list[TokenInfo]] = field(default_factory=list)


def _logprob(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value


def tgi_token(token: TokenInfo) -> dict:
    return {"id": token.id, "text": token.text, "logprob": _logprob(token.logprob), "special": token.special}


def tgi_response(result: GenerationResult, req: GenerationRequest) -> dict:
    text = (req.prompt + result.generated_text) if req.return_full_text else result.generated_text
    out: dict[str, Any] = {"generated_text": text}
    if req.details:
        details: dict[str, Any] = {
            "finish_reason": result.finish_reason, "generated_tokens": len(result.tokens), "seed": result.seed,
            "prefill": [{"id": t.id, "text": t.text, "logprob": _logprob(t.logprob)} for t in result.prefill],
            "tokens": [tgi_token(t) for t in result.tokens]}
        if req.top_n_tokens:
            details["top_tokens"] = [[tgi_token(t) for t in step] for step in result.top_tokens]
        out["details"] = details
    return out


def tgi_stream_event(index: int, token: TokenInfo, top_tokens: list[TokenInfo], req: GenerationRequest,
                     result: GenerationResult | None = None) -> dict:
    """One `/generate_stream` event; the last one (with `result`) carries the full text and the details."""
    event: dict[str, Any] = {"index": index, "token": tgi_token(token)}
    if top_tokens:
        event["top_tokens"] = [tgi_token(t) for t in top_tokens]
    event["generated_text"] = None
    event["details"] = None
    if result is not None:
        event["generated_text"] = (req.prompt if req.return_full_text else "") + result.generated_text
        if req.details:
            event["details"] = {"finish_reason": result.finish_reason, "generated_tokens": len(result.tokens),
                                "seed": result.seed}
    return event


def openai_finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def usage(result: GenerationResult) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.tokens),
            "total_tokens": result.prompt_tokens + len(result.tokens)}


def openai_logprobs(tokens: list[TokenInfo], top_tokens: list[list[TokenInfo]]) -> dict:
    def entry(t: TokenInfo) -> dict:
        return {"token": t.text, "logprob": _logprob(t.logprob) or -9999.0, "bytes": list(t.text.encode())}
    steps = top_tokens or [[] for _ in tokens]
    return {"content": [{**entry(t), "top_logprobs": [entry(x) for x in top]} for t, top in zip(tokens, steps)]}


class StopTextFilter:
    """OpenAI's answers end before a stop sequence (TGI's include it). Streamed text that could be the start of
    a stop sequence is held back until the next pieces show whether it is."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.pending, self.stopped = [s for s in stops if s], "", False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self.pending += text
        cut = min((i for s in self.stops if (i := self.pending.find(s)) >= 0), default=-1)
        if cut >= 0:
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def without_stop_text(text: str, stops: list[str]) -> str:
    filter_ = StopTextFilter(stops)
    return filter_.push(text) + filter_.flush()


def chat_completion(result: GenerationResult, req: GenerationRequest, model: str, completion_id: str,
                    created: int, fingerprint: str) -> dict:
    logprobs = openai_logprobs(result.tokens, result.top_tokens) if req.details else None
    text = without_stop_text(result.generated_text, req.stop)
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": fingerprint,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": logprobs, "finish_reason": openai_finish_reason(result.finish_reason)}],
            "usage": usage(result)}


def chat_chunk(completion_id: str, created: int, model: str, fingerprint: str, delta: dict,
               finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": fingerprint,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def tgi_error(error: ApiError) -> dict:
    return {"error": error.message, "error_type": error.error_type}


OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                429: "rate_limit_error", 424: "server_error", 504: "server_error"}


def openai_error(error: ApiError) -> dict:
    """OpenAI's error body. The type follows the status: a request the server refuses is an
    `invalid_request_error`, a generation that failed or timed out a `server_error`."""
    kind = OPENAI_TYPES.get(error.status, "server_error" if error.status >= 500 else "invalid_request_error")
    return {"error": {"message": error.message, "type": kind, "param": error.param, "code": error.error_type}}


def sse(data: dict | str, space: bool = True) -> str:
    """A server-sent event. TGI writes `data:{...}` (no space); OpenAI streams use `data: {...}`."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return ("data: " if space else "data:") + payload + "\n\n"
