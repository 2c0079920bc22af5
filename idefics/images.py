"""Turning prompt items into images, and images into the pixel tensors the model reads.

Accepted image items: a PIL image, a `pathlib.Path`, raw `bytes`, a `data:image/...;base64,` URI, or an
http(s) URL (fetched with a timeout and a size limit, only when the policy allows it). Every failure raises
`ImageError` naming the item. Decompression bombs are refused from the header, before decoding."""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urljoin, urlparse

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
    the server turns fetching off unless asked, restricts hosts and gives one error text for every failed fetch
    (`detailed_fetch_errors=False`: different errors would let a client map what the server can reach).

    With `allow_internal=False` (the server's setting), a host that resolves to a loopback, private, link-local
    (cloud metadata), multicast or reserved address is refused before any connection, whatever the allow-list,
    unless it is named in `allowed_hosts` itself. The connection goes to the address that was checked, and
    every redirect is checked the same way."""

    allow_urls: bool = True
    allowed_hosts: tuple[str, ...] | None = None  # None: any host
    max_bytes: int = 20 * 2**20
    max_pixels: int = 50_000_000
    timeout: float = 10.0
    fetch_headers: dict[str, str] = field(default_factory=lambda: {"User-Agent": "idefics"})
    detailed_fetch_errors: bool = True
    allow_internal: bool = True
    resolve: Callable[..., list] = socket.getaddrinfo  # host name → addresses (replaceable in tests)


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


MAX_REDIRECTS = 3


class FetchRefused(Exception):
    """Why a URL was not fetched (shown only where the policy gives detailed errors)."""


def fetch_url(url: str, what: str, policy: ImagePolicy) -> bytes:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https"):
        raise ImageError(f"{what}: only http(s) image URLs are supported, got {parsed.scheme!r}")
    if not policy.allow_urls:
        raise ImageError(f"{what}: remote image URLs are disabled")
    try:
        return fetch_checked(url, policy)
    except FetchRefused as reason:
        detail = f" ({reason})" if policy.detailed_fetch_errors else ""
        raise ImageError(f"{what}: cannot fetch the image at {url}{detail}") from None


def fetch_checked(url: str, policy: ImagePolicy) -> bytes:
    """The body of `url`, following at most MAX_REDIRECTS redirects, each to a checked address."""
    import httpx

    for _ in range(MAX_REDIRECTS + 1):
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise FetchRefused(f"not an http(s) URL: {url}")
        address = checked_address(parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80), policy)
        host = f"[{address}]" if ":" in address else address
        pinned = parsed._replace(netloc=host + (f":{parsed.port}" if parsed.port else "")).geturl()
        headers = {**policy.fetch_headers, "Host": parsed.netloc.rsplit("@", 1)[-1]}
        try:
            with httpx.Client(timeout=policy.timeout, follow_redirects=False) as client:
                # connect to the checked address; TLS still verifies the certificate for the host name
                request = client.build_request("GET", pinned, headers=headers,
                                               extensions={"sni_hostname": parsed.hostname})
                response = client.send(request, stream=True)
                try:
                    if response.is_redirect and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise FetchRefused(f"HTTP {response.status_code}")
                    chunks, size = [], 0
                    for chunk in response.iter_bytes():
                        size += len(chunk)
                        if size > policy.max_bytes:
                            raise FetchRefused(f"larger than the limit of {policy.max_bytes} bytes")
                        chunks.append(chunk)
                    return b"".join(chunks)
                finally:
                    response.close()
        except httpx.HTTPError as error:
            raise FetchRefused(f"{type(error).__name__}: {error}") from None
    raise FetchRefused(f"more than {MAX_REDIRECTS} redirects")


def checked_address(hostname: str, port: int, policy: ImagePolicy) -> str:
    """The address to connect to for `hostname`, after the allow-list and the internal-address rule."""
    named = policy.allowed_hosts is not None and hostname in policy.allowed_hosts
    if policy.allowed_hosts is not None and not named:
        raise FetchRefused(f"host {hostname!r} is not in the allowed hosts")
    try:
        literal = ipaddress.ip_address(hostname.strip("[]"))
        addresses = [literal]
    except ValueError:
        try:
            found = policy.resolve(hostname, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as error:
            raise FetchRefused(f"cannot resolve {hostname!r} ({error})") from None
        addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in found]
    if not addresses:
        raise FetchRefused(f"{hostname!r} resolves to no address")
    internal = [a for a in addresses if is_internal(a)]
    if internal and not (named or policy.allow_internal):
        raise FetchRefused(f"{hostname!r} resolves to an internal address ({internal[0]}); name the host in "
                           "the allowed hosts to reach it")
    return str(addresses[0])


def is_internal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Loopback, private, link-local (169.254.169.254 serves cloud metadata), multicast, reserved or unspecified."""
    mapped = getattr(address, "ipv4_mapped", None)
    address = mapped or address
    return (address.is_loopback or address.is_private or address.is_link_local or address.is_multicast
            or address.is_reserved or address.is_unspecified)


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
            data = fetch_url(text, what, policy)
            try:
                return decode_image_bytes(data, what, policy)
            except ImageError:
                if policy.detailed_fetch_errors:
                    raise
                raise ImageError(f"{what}: cannot fetch the image at {text}") from None
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
