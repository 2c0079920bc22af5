"""From a parsed request to engine inputs: check the token limits on the text first (cheap), then load and
check the images (data URIs decoded strictly; remote URLs only when the server allows them, only to allowed
hosts, without redirects), then build the model inputs exactly as the processor does for the same prompt items.
Everything here runs in a worker thread, before the request is queued, so a bad request never reaches the
batch and is answered with a 422 naming the problem."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from ..generation import GenerationParams
from ..images import ImageError, ImagePolicy, decode_image_bytes, is_image_item, load_image, preprocess
from ..processor import prompt_text
from .protocol import ApiError, GenerationRequest, Limits, decode_data_uri, image_source, invalid, shorten


@dataclass
class Prepared:
    inputs: dict[str, torch.Tensor]
    params: GenerationParams
    prompt_tokens: int


def model_text(pipe, items: list[tuple[str, str]]) -> str:
    """The processor's prompt string for these items (BOS, image placeholders, texts stripped of spaces)."""
    kinds = [("text", value.strip(" ")) if kind == "text" else ("image", None) for kind, value in items]
    return prompt_text(kinds, pipe.tokenizer.bos_token or "", pipe.tokenizer.eos_token)


def count_images(items: list[tuple[str, str]], limits: Limits) -> int:
    n = sum(kind == "image" for kind, _ in items)
    if n > limits.max_images:
        raise invalid(f"the prompt has {n} images; this server accepts at most {limits.max_images} per request")
    return n


def check_text_size(pipe, items: list[tuple[str, str]], limits: Limits) -> None:
    """Refuse, before tokenizing, a prompt whose text cannot fit in the token limit: no token covers more
    characters than the vocabulary's longest entry (huge prompts would otherwise be tokenized in full first)."""
    chars = sum(len(value) for kind, value in items if kind == "text")
    most = limits.max_total_tokens * pipe.tokenizer.longest_token
    if chars > most:
        raise invalid(f"the prompt has {chars} characters, more than {limits.max_total_tokens} tokens can hold "
                      f"({most} characters at most)", "inputs")


def load_request_image(url: str, where: str, limits: Limits, policy: ImagePolicy) -> Image.Image:
    try:
        if image_source(url) == "data":
            return decode_image_bytes(decode_data_uri(url, limits.max_image_bytes), where, policy)
        if not policy.allow_urls:
            raise invalid(f"{where}: remote image URLs are disabled on this server; send the image inline as "
                          "data:image/...;base64,... (or start the server with --allow-image-urls HOST)")
        return load_image(url, where, policy)
    except ImageError as error:
        raise invalid(f"invalid image: {error}") from None


def token_budget(n_input: int, max_new: int | None, limits: Limits, default: int | None = None) -> int:
    """TGI's checks, total first: input + max_new_tokens <= max_total_tokens, input <= max_input_tokens.
    No max_new_tokens → as many as the context allows, up to `default` (else the server's cap)."""
    if max_new is None:
        max_new = min(default or limits.max_new_tokens, limits.max_new_tokens, limits.max_total_tokens - n_input)
        if max_new < 1:
            raise invalid(f"`inputs` tokens ({n_input}) leave no room for new tokens: the total limit is "
                          f"{limits.max_total_tokens}")
    if n_input + max_new > limits.max_total_tokens:
        raise invalid(f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
                      f"Given: {n_input} `inputs` tokens and {max_new} `max_new_tokens`")
    if n_input > limits.max_input_tokens:
        raise invalid(f"`inputs` must have less than {limits.max_input_tokens} tokens. Given: {n_input}")
    return max_new


def prepare(pipe, req: GenerationRequest, limits: Limits, policy: ImagePolicy) -> Prepared:
    """Request → model inputs (a batch of one) and decoding parameters, or ApiError."""
    count_images(req.items, limits)
    check_text_size(pipe, req.items, limits)
    if pipe.family.images_in_sequence:
        inputs, max_new = generic_inputs(pipe, req, limits, policy)
    else:
        inputs, max_new = idefics_inputs(pipe, req, limits, policy)
    try:
        params = pipe.params(max_new_tokens=max_new, do_sample=req.do_sample, temperature=req.temperature,
                             top_k=req.top_k, top_p=req.top_p, repetition_penalty=req.repetition_penalty,
                             seed=req.seed, stop_sequences=req.stop)
        params.validate()
    except ValueError as error:
        raise invalid(str(error)) from None
    return Prepared(inputs, params, int(inputs["attention_mask"].sum()))


def idefics_inputs(pipe, req: GenerationRequest, limits: Limits, policy: ImagePolicy):
    """IDEFICS v1: the token count does not depend on the images, so the limits are checked before any
    image is decoded; then the inputs are built as `Processor` builds them for the same items."""
    text = model_text(pipe, req.items)
    n_text = len(pipe.tokenizer.encode(text))
    max_new = token_budget(min(n_text, req.truncate) if req.truncate else n_text, req.max_new_tokens, limits,
                           req.default_new_tokens)
    images = [url for kind, url in req.items if kind == "image"]
    settings = pipe.processor.images
    pixels = [preprocess(load_request_image(url, f"image {i + 1}", limits, policy), settings.size, settings.mean,
                         settings.std) for i, url in enumerate(images)]
    try:
        inputs = pipe.processor.encode([text], [pixels])
    except ValueError as error:
        raise invalid(str(error)) from None
    if req.truncate and inputs["input_ids"].shape[1] > req.truncate:  # keep the last `truncate` tokens (TGI)
        for key in ("input_ids", "attention_mask", "image_attention_mask"):
            inputs[key] = inputs[key][:, -req.truncate:]
    return inputs, max_new


def generic_inputs(pipe, req: GenerationRequest, limits: Limits, policy: ImagePolicy):
    """Other models (Idefics2): the processor takes the prompt as items (text, PIL images); images are loaded
    here under the server's policy, and text that the processor would mistake for an image is refused."""
    if req.truncate:
        raise invalid("`truncate` is not supported for this model")
    prompt, n = [], 0
    for kind, value in req.items:
        if kind == "image":
            n += 1
            prompt.append(load_request_image(value, f"image {n}", limits, policy))
        elif is_image_item(value):
            raise invalid(f"the text {shorten(value)!r} would be read as an image; write images as ![](url)")
        else:
            prompt.append(value)
    try:
        inputs = pipe.processor(prompt)
    except (ValueError, ImageError) as error:
        raise invalid(str(error)) from None
    return inputs, token_budget(inputs["input_ids"].shape[1], req.max_new_tokens, limits, req.default_new_tokens)


def image_policy(limits: Limits, hosts: tuple[str, ...] | None, timeout: float) -> ImagePolicy:
    """hosts None: remote URLs off; ("*",): any http(s) host; otherwise only those host names."""
    return ImagePolicy(allow_urls=hosts is not None,
                       allowed_hosts=None if hosts is not None and "*" in hosts else tuple(hosts or ()),
                       max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels, timeout=timeout,
                       detailed_fetch_errors=False, allow_internal=False)


def tokenize(pipe, req: GenerationRequest, limits: Limits) -> list[dict]:
    """TGI `/tokenize`: the tokens of the model's prompt string (images as their placeholder tokens), with
    character offsets into that string, under the same limits as generation (the text size before tokenizing,
    then the input tokens). No image is loaded."""
    count_images(req.items, limits)
    check_text_size(pipe, req.items, limits)
    if pipe.family.images_in_sequence:  # the prompt as written, images as `<image>` markers
        text, special = "".join(v if k == "text" else "<image>" for k, v in req.items), True
    else:
        text, special = model_text(pipe, req.items), False
    encoding = pipe.tokenizer.backend.encode(text, add_special_tokens=special)
    if len(encoding.ids) > limits.max_input_tokens:
        raise invalid(f"`inputs` must have less than {limits.max_input_tokens} tokens. Given: {len(encoding.ids)}")
    return [{"id": i, "text": text[a:b], "start": a, "stop": b} for i, (a, b) in zip(encoding.ids, encoding.offsets)]


def overloaded() -> ApiError:
    return ApiError(429, "Model is overloaded", "overloaded")
