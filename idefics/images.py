"""Turning prompt items into images, and images into the pixel tensors the model reads.

Accepted image items: a PIL image, a `pathlib.Path`, raw `bytes`, a `data:image/...;base64,` URI, or an
http(s) URL (fetched with a timeout and a size limit, only when the policy allows it). Every failure raises
`ImageError` naming the item. Decompression bombs are refused from the header, before decoding."""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageError(ValueError):
    """An image item that cannot be used; the message names the item."""


@dataclass
class ImagePolicy:
    """Limits on what an image item may be. The library default fetches URLs (as the reference does);
    the server turns fetching off unless asked, and restricts hosts."""

    allow_urls: bool = True
    allowed_hosts: tuple[str, ...] | None = None  # None: any host
    max_bytes: int = 20 * 2**20
    max_pixels: int = 50_000_000
    timeout: float = 10.0
    fetch_headers: dict[str, str] = field(default_factory=lambda: {"User-Agent": "idefics"})


def is_url(text: str) -> bool:
    """The reference's rule: a string without spaces that parses with a scheme and a host is an image URL."""
    if " " in text:
        return False
    parsed = urlparse(text)
    return bool(parsed.scheme and parsed.netloc)


def is_data_uri(text: str) -> bool:
    return text.startswith("data:image/") and ";base64," in text[:100] and " " not in text


def is_image_item(item: Any) -> bool:
    if isinstance(item, str):
        stripped = item.strip(" ")
        return is_url(stripped) or is_data_uri(stripped)
    return isinstance(item, (Image.Image, Path, bytes, bytearray))


def decode_image_bytes(data: bytes, what: str, policy: ImagePolicy) -> Image.Image:
    if len(data) > policy.max_bytes:
        raise ImageError(f"{what}: {len(data)} bytes is over the limit of {policy.max_bytes} bytes")
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as error:  # PIL raises UnidentifiedImageError, OSError, SyntaxError...
        raise ImageError(f"{what}: not a readable image ({type(error).__name__}: {error})") from None
    return checked_load(image, what, policy)


def checked_load(image: Image.Image, what: str, policy: ImagePolicy) -> Image.Image:
    width, height = image.size
    if width * height > policy.max_pixels:
        raise ImageError(f"{what}: {width}x{height} = {width * height} pixels is over the limit of "
                         f"{policy.max_pixels} pixels (refused before decoding)")
    try:
        image.load()
    except Exception as error:
        raise ImageError(f"{what}: image data is corrupt or truncated ({type(error).__name__}: {error})") from None
    return image


def fetch_url(url: str, what: str, policy: ImagePolicy) -> bytes:
    import httpx

    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https"):
        raise ImageError(f"{what}: only http(s) image URLs are supported, got {parsed.scheme!r}")
    if not policy.allow_urls:
        raise ImageError(f"{what}: remote image URLs are disabled")
    if policy.allowed_hosts is not None and parsed.hostname not in policy.allowed_hosts:
        raise ImageError(f"{what}: host {parsed.hostname!r} is not in the allowed hosts")
    try:
        # No redirects: a redirect could lead to a host that the allow-list would refuse.
        with httpx.stream("GET", url, timeout=policy.timeout, follow_redirects=False,
                          headers=policy.fetch_headers) as response:
            if response.status_code != 200:
                raise ImageError(f"{what}: fetching {url} returned HTTP {response.status_code}")
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > policy.max_bytes:
                    raise ImageError(f"{what}: {url} is larger than the limit of {policy.max_bytes} bytes")
                chunks.append(chunk)
    except httpx.HTTPError as error:
        raise ImageError(f"{what}: cannot fetch {url} ({type(error).__name__}: {error})") from None
    return b"".join(chunks)


def load_image(item: Any, what: str = "image", policy: ImagePolicy | None = None) -> Image.Image:
    policy = policy or ImagePolicy()
    if isinstance(item, Image.Image):
        return checked_load(item, what, policy)
    if isinstance(item, (bytes, bytearray)):
        return decode_image_bytes(bytes(item), what, policy)
    if isinstance(item, Path):
        try:
            data = item.read_bytes()
        except OSError as error:
            raise ImageError(f"{what}: cannot read {item} ({error.strerror or error})") from None
        return decode_image_bytes(data, f"{what} ({item})", policy)
    if isinstance(item, str):
        text = item.strip(" ")
        if is_data_uri(text):
            try:
                data = base64.b64decode(text.split(";base64,", 1)[1], validate=True)
            except (binascii.Error, ValueError) as error:
                raise ImageError(f"{what}: invalid base64 in data URI ({error})") from None
            return decode_image_bytes(data, what, policy)
        if is_url(text):
            return decode_image_bytes(fetch_url(text, what, policy), what, policy)
    raise ImageError(f"{what}: unsupported item type {type(item).__name__}; use text (str), a PIL image, "
                     "a pathlib.Path, bytes, a data: URI or an http(s) URL")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited on white (as the reference's convert_to_rgb)."""
    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def preprocess(image: Image.Image, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """The reference's PIL path: RGB → bicubic resize to size×size (aspect not kept, no crop) → /255 →
    normalise → [3, size, size] float32."""
    image = to_rgb(image).resize((size, size), resample=Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32) * np.float32(1 / 255)
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())
