"""Requests of the two HTTP APIs → what the engine needs: request JSON → `GenerationRequest` (prompt items +
sampling settings), problems → `ApiError` naming them; `responses` goes the other way. Nothing here touches the
model, the network or the file system, so every rule is testable on its own.

TGI API (`text-generation` 0.7.0 client): `{"inputs": str, "parameters": {...}, "stream": bool}`, images written
in the prompt as markdown `![](https://...)` or `![](data:image/png;base64,...)`. OpenAI chat: `messages` whose
content is a string or a list of `text` / `image_url` parts, formatted with the IDEFICS instruct chat format
(`User: ...<end_of_utterance>\\nAssistant:`)."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import numpy as np

from ..generation import MIN_TEMPERATURE, REPETITION_PENALTY_RANGE

INVALID = "Input validation error: "


class ApiError(Exception):
    """A request the server refuses: HTTP status, a message naming the problem, and TGI's `error_type`."""

    def __init__(self, status: int, message: str, error_type: str = "validation", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.error_type, self.param = status, message, error_type, param


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(422, INVALID + message, "validation", param)


@dataclass
class Limits:
    """Per-request limits, each with a safe default. Token limits default to the model's context."""

    max_images: int = 4
    max_image_bytes: int = 5 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_input_tokens: int = 1024
    max_total_tokens: int = 2048
    max_new_tokens: int = 512
    default_max_new_tokens: int = 100  # TGI's default when a request names none
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_request_bytes: int = 32 * 2**20


@dataclass
class GenerationRequest:
    """What a request asks for, independent of the model. `items` alternate ("text", str) and ("image", url)."""

    items: list[tuple[str, str]]
    max_new_tokens: int | None = None  # None: as many as the limits allow, up to `default_new_tokens`
    default_new_tokens: int | None = None  # None: the server's max_new_tokens
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    truncate: int | None = None
    top_n_tokens: int = 0
    decoder_input_details: bool = False
    details: bool = False
    return_full_text: bool = False
    stream: bool = False
    prompt: str = ""  # the request's own prompt text (for `return_full_text`)
    include_usage: bool = False  # OpenAI stream_options.include_usage


# ---------------------------------------------------------------------------------------------- images in text

def split_markdown_images(text: str) -> list[tuple[str, str]]:
    """Split a prompt at markdown images `![alt](url "title")` → [("text", ...), ("image", url), ...].

    Same results as TGI's Python `split()` regex on its test vectors (alt text allowed, an optional "title"
    dropped, the URL ends at the first `)`), but written as a linear scan: the regex backtracks
    quadratically on hostile input such as many `![` without a `]`."""
    items: list[tuple[str, str]] = []
    pos = last = 0
    bracket = paren = -1  # cached positions of the next "]" / ")": each is searched for at most once per advance
    while True:
        start = text.find("![", pos)
        if start < 0:
            break
        if bracket < start + 2:
            bracket = text.find("]", start + 2)
            if bracket < 0:
                break
        if not text.startswith("(", bracket + 1):
            pos = start + 2
            continue
        if paren < bracket + 2:
            paren = text.find(")", bracket + 2)
            if paren < 0:
                break
        url = _url_without_title(text[bracket + 2:paren])
        if url is None:
            pos = start + 2
            continue
        if start > last:
            items.append(("text", text[last:start]))
        items.append(("image", url))
        last = pos = paren + 1
    if last < len(text):
        items.append(("text", text[last:]))
    return items


def _url_without_title(content: str) -> str | None:
    """`url`, `url "title"` → url (surrounding whitespace dropped). None if the URL would span a line break."""
    content = content.strip()
    quote = content.find('"')
    if quote >= 0:
        title = content[quote:]
        if len(title) >= 3 and title.endswith('"') and title[-2] != '"':
            content = content[:quote].rstrip()
    return None if "\n" in content else content


def image_source(url: str) -> str:
    """"data" or "remote" for a usable image reference; anything else (file://, paths, ftp...) is refused."""
    if url.startswith("data:"):
        return "data"
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https") and parsed.netloc:
        return "remote"
    if parsed.scheme in ("http", "https"):
        raise invalid(f"invalid image URL {shorten(url)!r}: no host")
    what = f"scheme {parsed.scheme!r}" if parsed.scheme else "a relative reference"
    raise invalid(f"invalid image content: {shorten(url)!r} has {what}; images must be http(s) URLs or "
                  "data:image/...;base64,... URIs")


def decode_data_uri(uri: str, max_bytes: int) -> bytes:
    """`data:<mime>;base64,<payload>` → bytes, strictly as TGI's router: exactly one `;` parameter, which is
    `base64`, and standard base64 (padding required, no whitespace). The size is checked before decoding."""
    head, sep, payload = uri.partition(",")
    parts = head[len("data:"):].split(";")
    if not sep or len(parts) != 2 or parts[1] != "base64":
        raise invalid(f"invalid image content: {shorten(uri)!r} (expected data:<mime>;base64,<data>)")
    if not parts[0].startswith("image/"):
        raise invalid(f"invalid image content: mime type {parts[0]!r} is not an image type")
    if len(payload) // 4 * 3 > max_bytes:
        raise invalid(f"image size about {len(payload) // 4 * 3} bytes exceeds the maximum of {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise invalid(f"base64 encoding is invalid: {error}") from None


def shorten(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[:n] + "..."


# ------------------------------------------------------------------------------------------------ field checks

def _field(data: dict, key: str, kind: str, default: Any, where: str = "") -> Any:
    """Read an optional field: absent or null → default; otherwise it must have the given JSON type."""
    value = data.get(key)
    if value is None:
        return default
    name = f"{where}{key}"
    ok = {"bool": isinstance(value, bool),
          "int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
          "str": isinstance(value, str), "list": isinstance(value, list), "dict": isinstance(value, dict)}[kind]
    if not ok:
        expected = {"bool": "a boolean", "int": "an integer", "float": "a finite number", "str": "a string",
                    "list": "a list", "dict": "an object"}[kind]
        raise invalid(f"`{name}` must be {expected}, got {json.dumps(value)[:40]}", name)
    return float(value) if kind == "float" else value


MAX_JSON_DEPTH = 32  # the deepest request (an OpenAI chat with image parts) nests 6 levels
JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
OPENING, CLOSING = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # the only way a surrogate gets into decoded JSON


def json_depth(raw: bytes | bytearray) -> int:
    """How deeply arrays and objects nest in a JSON text (brackets inside strings do not count), without
    parsing it: the decoder recurses once per level."""
    brackets = np.frombuffer(JSON_STRING.sub(b"", raw), dtype=np.uint8)
    steps = np.isin(brackets, OPENING).astype(np.int32) - np.isin(brackets, CLOSING).astype(np.int32)
    return int(steps.cumsum().max(initial=0))


def parse_json_object(raw: bytes | bytearray) -> dict:
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise ApiError(400, f"the request body nests {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted",
                       "validation")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"Failed to parse the request body as JSON: {error}", "validation") from None
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, got {type(body).__name__}")
    if SURROGATE_ESCAPE.search(raw):  # a pair is text; a lone surrogate ("\ud800") is not
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise invalid("the request contains invalid Unicode (a lone surrogate such as \\ud800)") from None
    return body


def _stop_list(value: Any, limit: int, name: str, allow_string: bool = False) -> list[str]:
    stops = [value] if allow_string and isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid(f"`{name}` must be a list of strings", name)
    if len(stops) > limit:
        raise invalid(f"`{name}` supports up to {limit} stop sequences. Given: {len(stops)}", name)
    return [s for s in stops if s]


# ----------------------------------------------------------------------------------------------- TGI requests

def parse_tgi_request(body: dict, limits: Limits) -> GenerationRequest:
    """TGI `GenerateRequest` / `CompatGenerateRequest` → GenerationRequest, with TGI's defaults: no
    `parameters` at all means sampling with 100 new tokens; `"max_new_tokens": null` means "fill the context";
    any of temperature / top_k / top_p / typical_p set turns sampling on (as TGI's token chooser does)."""
    inputs = body.get("inputs")
    if not isinstance(inputs, str):
        raise invalid("`inputs` is required and must be a string" if inputs is None else
                      f"`inputs` must be a string, got {type(inputs).__name__}", "inputs")
    if not inputs:
        raise invalid("`inputs` cannot be empty", "inputs")
    raw = body.get("parameters")
    if raw is not None and not isinstance(raw, dict):
        raise invalid("`parameters` must be an object", "parameters")
    p = raw if raw is not None else {"do_sample": True}
    req = GenerationRequest(items=split_markdown_images(inputs), prompt=inputs)
    req.stream = _field(body, "stream", "bool", False)
    req.do_sample = _field(p, "do_sample", "bool", False)
    if "max_new_tokens" in p and p["max_new_tokens"] is None:
        req.max_new_tokens = None
    else:
        req.max_new_tokens = _field(p, "max_new_tokens", "int", limits.default_max_new_tokens)
        check_max_new_tokens(req.max_new_tokens, limits)
    temperature = _field(p, "temperature", "float", None)
    top_k = _field(p, "top_k", "int", None)
    top_p = _field(p, "top_p", "float", None)
    typical_p = _field(p, "typical_p", "float", None)
    if temperature is not None and not temperature >= MIN_TEMPERATURE:
        raise invalid(f"`temperature` must be >= {MIN_TEMPERATURE} (smaller values overflow; greedy decoding is "
                      "`do_sample: false`)", "temperature")
    if top_k is not None and top_k <= 0:
        raise invalid("`top_k` must be strictly positive", "top_k")
    for name, value in (("top_p", top_p), ("typical_p", typical_p)):
        if value is not None and not 0 < value < 1:
            raise invalid(f"`{name}` must be > 0.0 and < 1.0", name)
    warped = (temperature not in (None, 1.0)) or top_k is not None or top_p is not None or typical_p is not None
    req.do_sample = req.do_sample or warped
    req.temperature, req.top_k = temperature or 1.0, top_k or 0
    req.top_p, req.typical_p = top_p or 1.0, typical_p or 1.0
    req.repetition_penalty = _field(p, "repetition_penalty", "float", 1.0)
    low, high = REPETITION_PENALTY_RANGE
    if not low <= req.repetition_penalty <= high:
        raise invalid(f"`repetition_penalty` must be >= {low} and <= {high}", "repetition_penalty")
    req.frequency_penalty = _field(p, "frequency_penalty", "float", 0.0)
    if not -2 <= req.frequency_penalty <= 2:
        raise invalid("`frequency_penalty` must be >= -2.0 and <= 2.0", "frequency_penalty")
    req.seed = _field(p, "seed", "int", None)
    if req.seed is not None and not 0 <= req.seed < 2**64:
        raise invalid("`seed` must be an integer in [0, 2^64)", "seed")
    req.stop = _stop_list(p.get("stop") or [], limits.max_stop_sequences, "stop")
    req.truncate = _field(p, "truncate", "int", None)
    if req.truncate is not None and not 0 < req.truncate <= limits.max_input_tokens:
        raise invalid(f"`truncate` must be strictly positive and less than {limits.max_input_tokens}. "
                      f"Given: {req.truncate}", "truncate")
    req.top_n_tokens = _field(p, "top_n_tokens", "int", 0)
    if not 0 <= req.top_n_tokens <= limits.max_top_n_tokens:
        raise invalid(f"`top_n_tokens` must be >= 0 and <= {limits.max_top_n_tokens}. Given: {req.top_n_tokens}",
                      "top_n_tokens")
    req.details = _field(p, "details", "bool", False)
    req.decoder_input_details = _field(p, "decoder_input_details", "bool", False)
    req.return_full_text = _field(p, "return_full_text", "bool", False)
    if _field(p, "best_of", "int", 1) != 1:
        raise invalid("`best_of` != 1 is not allowed for this endpoint", "best_of")
    if _field(p, "watermark", "bool", False):
        raise invalid("`watermark` is not supported by this server", "watermark")
    if p.get("grammar") is not None:
        raise invalid("`grammar` is not supported by this server", "grammar")
    return req


def check_max_new_tokens(value: int | None, limits: Limits, name: str = "max_new_tokens") -> None:
    if value is None:
        return
    if value <= 0:
        raise invalid(f"`{name}` must be strictly positive", name)
    if value > limits.max_new_tokens:
        raise invalid(f"`{name}` must be <= {limits.max_new_tokens}. Given: {value}", name)


# -------------------------------------------------------------------------------------------- OpenAI requests

CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


def chat_items(messages: Any, end_of_turn: str = "<end_of_utterance>") -> list[tuple[str, str]]:
    """OpenAI `messages` → prompt items in the IDEFICS instruct format:
    `User: <text and images><end_of_utterance>\\n` per message, then `Assistant:`. A message that starts with
    an image gets no space after the colon (`User:<image>...`), as in the IDEFICS chat templates. Markdown
    images inside text parts are images too (the only way the TGI client's chat() can send one)."""
    if not isinstance(messages, list) or not messages:
        raise invalid("`messages` must be a non-empty list", "messages")
    items: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"`{where}` must be an object", where)
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise invalid(f"`{where}.role` must be one of {sorted(CHAT_ROLES)}, got {json.dumps(role)[:40]}",
                          f"{where}.role")
        content = message_content(message.get("content"), where)
        starts_with_image = bool(content) and content[0][0] == "image"
        items.append(("text", CHAT_ROLES[role] + (":" if starts_with_image else ": ")))
        items += content
        items.append(("text", end_of_turn + "\n"))
    items.append(("text", "Assistant:"))
    return merge_text(items)


def message_content(content: Any, where: str) -> list[tuple[str, str]]:
    if content is None:
        return []
    if isinstance(content, str):
        return split_markdown_images(content)
    if not isinstance(content, list):
        raise invalid(f"`{where}.content` must be a string or a list of parts", f"{where}.content")
    out: list[tuple[str, str]] = []
    for j, part in enumerate(content):
        name = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out += split_markdown_images(part["text"])
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise invalid(f"`{name}.image_url.url` must be a non-empty string", name)
            out.append(("image", url))
        else:
            raise invalid(f"`{name}` must be a {{\"type\": \"text\", \"text\": ...}} or "
                          f"{{\"type\": \"image_url\", \"image_url\": {{\"url\": ...}}}} part", name)
    return out


def merge_text(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for kind, value in items:
        if kind == "text" and out and out[-1][0] == "text":
            out[-1] = ("text", out[-1][1] + value)
        elif kind != "text" or value:
            out.append((kind, value))
    return out


def parse_chat_request(body: dict, limits: Limits, end_of_turn: str = "<end_of_utterance>") -> GenerationRequest:
    """OpenAI chat completion request → GenerationRequest. `temperature` 0 is greedy; anything else (including
    absent, OpenAI's default of 1) samples. `model` may be any string."""
    req = GenerationRequest(items=chat_items(body.get("messages"), end_of_turn))
    _field(body, "model", "str", None)
    req.stream = _field(body, "stream", "bool", False)
    options = _field(body, "stream_options", "dict", {})
    req.include_usage = bool(options.get("include_usage"))
    max_tokens = _field(body, "max_completion_tokens", "int", None)
    max_tokens = _field(body, "max_tokens", "int", max_tokens)
    check_max_new_tokens(max_tokens, limits, "max_tokens")
    req.max_new_tokens, req.default_new_tokens = max_tokens, limits.default_max_new_tokens
    temperature = _field(body, "temperature", "float", 1.0)
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature <= 2):
        raise invalid(f"`temperature` must be 0 (greedy) or in [{MIN_TEMPERATURE}, 2]", "temperature")
    req.do_sample, req.temperature = temperature > 0, temperature if temperature > 0 else 1.0
    req.top_p = _field(body, "top_p", "float", 1.0)
    if not 0 < req.top_p <= 1:
        raise invalid("`top_p` must be > 0 and <= 1", "top_p")
    req.seed = _field(body, "seed", "int", None)
    if req.seed is not None and not -2**63 <= req.seed < 2**64:
        raise invalid("`seed` is out of range", "seed")
    if req.seed is not None and req.seed < 0:
        req.seed += 2**64  # OpenAI seeds are signed 64-bit integers
    req.stop = _stop_list(body.get("stop") or [], limits.max_stop_sequences, "stop", allow_string=True)
    for name in ("frequency_penalty", "presence_penalty"):
        value = _field(body, name, "float", 0.0)
        if not -2 <= value <= 2:
            raise invalid(f"`{name}` must be >= -2.0 and <= 2.0", name)
        setattr(req, name, value)
    if _field(body, "n", "int", 1) != 1:
        raise invalid("`n` must be 1: this server returns one choice per request", "n")
    if _field(body, "logprobs", "bool", False):
        req.details = True
        req.top_n_tokens = _field(body, "top_logprobs", "int", 0)
        if not 0 <= req.top_n_tokens <= limits.max_top_n_tokens:
            raise invalid(f"`top_logprobs` must be >= 0 and <= {limits.max_top_n_tokens}", "top_logprobs")
    for name in ("tools", "functions", "logit_bias", "response_format"):
        if body.get(name):
            raise invalid(f"`{name}` is not supported by this server", name)
    return req
