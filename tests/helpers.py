"""Plain helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
VECTORS = Path(__file__).parent / "vectors"  # outputs of the reference implementations


def random_image(seed: int, size: tuple[int, int] = (50, 40), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_with_logits(model, inputs, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding of processor outputs: the tokens [B, steps] and, in float32, the last position's logits of
    every forward [B, steps, V] (the prefill's first, then each decoding step's)."""
    from idefics.generation import GenerationParams, decode

    seen = []
    forward = model.forward
    model.forward = lambda *a, **k: seen.append(forward(*a, **k)) or seen[-1]
    try:
        params = GenerationParams(max_new_tokens=max_new_tokens, stop_token_ids=[])
        steps = list(decode(model, inputs, params, pad_token_id=0))
    finally:
        del model.forward
    return torch.stack([s.tokens for s in steps], 1), torch.stack([o.logits[:, -1].float() for o in seen], 1)
