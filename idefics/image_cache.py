"""A bounded LRU cache of perceiver outputs, keyed by the content of each preprocessed image.

The vision encoder + perceiver are the most expensive part of a prompt's prefill, and the same image is often
seen again: the next turn of a chat resends the whole conversation, few-shot evaluation reuses its
demonstrations. The key is a hash of the pixel values the processor produced (so the same picture loaded from
a file, a URL or bytes hits the same entry) plus the dtype; the value is that image's [latents, dim] features.
Entries are evicted least-recently-used first once the stored tensors exceed `max_bytes`."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

from .family import family_of

DEFAULT_MAX_BYTES = 256 * 2**20


def image_key(pixels: torch.Tensor, dtype: torch.dtype) -> str:
    """Content hash of one preprocessed image [3, H, W] (shape and dtype included)."""
    data = pixels.detach().contiguous().cpu()
    digest = hashlib.blake2b(data.view(torch.uint8).numpy().tobytes() if data.dtype == torch.bfloat16
                             else data.numpy().tobytes(), digest_size=20)
    digest.update(f"{tuple(data.shape)}:{data.dtype}:{dtype}".encode())
    return digest.hexdigest()


class ImageFeatureCache:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str) -> torch.Tensor | None:
        value = self.entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().clone()  # own storage: a view would keep its whole batch alive
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        if key in self.entries:
            old = self.entries.pop(key)
            self.bytes -= old.numel() * old.element_size()
        self.entries[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    @torch.inference_mode()
    def encode(self, model, pixel_values: torch.Tensor, image_attention_mask: torch.Tensor | None) -> torch.Tensor:
        """`model.model.encode_images(pixel_values, image_attention_mask)`, reusing cached images: [B, N, 3, H, W]
        → [B, N, latents, dim]. Images no token attends to stay zero, as there; only misses are encoded (in one
        batch)."""
        inner = model.model
        b, n = pixel_values.shape[:2]
        flat = pixel_values.reshape(b * n, *pixel_values.shape[2:])
        used = torch.ones(b * n, dtype=torch.bool)
        if image_attention_mask is not None:
            used = image_attention_mask.bool().any(1).reshape(b * n).cpu()
        dtype = model.dtype
        out = torch.zeros(b * n, inner.latents_per_image, inner.config.vision_config.embed_dim, dtype=dtype,
                          device=model.device)
        missing: dict[str, list[int]] = {}
        for i in torch.nonzero(used).flatten().tolist():
            key = image_key(flat[i], dtype)
            cached = self.get(key) if key not in missing else None
            if cached is not None:
                out[i] = cached
            else:
                missing.setdefault(key, []).append(i)
        if missing:
            first = [rows[0] for rows in missing.values()]
            pixels = flat[first].to(model.device, dtype)[None]
            features = inner.encode_images(pixels)[0]
            for (key, rows), feature in zip(missing.items(), features):
                out[rows] = feature
                self.put(key, feature)
        return out.view(b, n, *out.shape[1:])


def with_cached_images(model, inputs: dict[str, torch.Tensor], cache: ImageFeatureCache | None) -> dict:
    """Processor outputs + `image_hidden_states` from the cache (models whose images reach the text through
    cross-attention, with images); the model then skips the vision encoder and perceiver."""
    if (cache is None or inputs.get("pixel_values") is None or inputs.get("image_hidden_states") is not None
            or family_of(model.config).images_in_sequence or not hasattr(model.model, "encode_images")):
        return inputs
    mask = inputs.get("image_attention_mask")
    if mask is None or not bool(mask.bool().any()):
        return inputs
    return {**inputs, "image_hidden_states": cache.encode(model, inputs["pixel_values"], mask)}
