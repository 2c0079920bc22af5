"""Pure drawing functions for the synthetic idefics-mini data: shape scenes, handwritten digits, rendered words.

Every function takes its randomness from the `random.Random` it is given, so a seed reproduces the pixels.
Shapes are drawn without anti-aliasing, so each object's pixels have exactly its palette colour (tests and
evaluation can count them).
"""

from __future__ import annotations

import math
import os
import random
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 224

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond")
# A 3x3 grid of cells, one object per cell, so objects never touch and each has one position name.
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
BACKGROUNDS = {"white": (255, 255, 255), "light grey": (222, 222, 222), "cream": (250, 240, 212)}
INK = {"black": (20, 20, 20), "dark blue": (25, 35, 120), "dark red": (125, 20, 25), "dark green": (20, 85, 35)}
FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "pillow-default")


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.85  # same visual weight as a circle of radius r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        angles = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
        return [(cx + (r if k % 2 == 0 else 0.45 * r) * math.cos(a), cy + (r if k % 2 == 0 else 0.45 * r) * math.sin(a))
                for k, a in enumerate(angles)]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def draw_scene(objects: list[dict], background: str, rng: random.Random) -> tuple[Image.Image, list[dict]]:
    """Draw objects given as {"colour", "shape", "position"} (distinct positions) on a 224x224 background.

    Size and placement inside each object's grid cell are random; returns the image and the objects with
    their centre (`x`, `y`) and radius (`size`) added.
    """
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    cell = IMAGE_SIZE / 3
    placed = []
    for obj in objects:
        row, col = divmod(POSITIONS.index(obj["position"]), 3)
        r = rng.randint(16, 28)
        margin = r + 3  # keep every shape inside its own cell
        cx = round(col * cell + margin + rng.random() * (cell - 2 * margin))
        cy = round(row * cell + margin + rng.random() * (cell - 2 * margin))
        colour = COLOURS[obj["colour"]]
        if obj["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon(_polygon(obj["shape"], cx, cy, r), fill=colour)
        placed.append({**obj, "x": cx, "y": cy, "size": r})
    return image, placed


def draw_digit(pixels: np.ndarray, rng: random.Random) -> tuple[Image.Image, dict]:
    """Upscale one 8x8 scikit-learn digit (values 0..16) into a 224x224 image.

    Random: nearest or bilinear upscaling, white-on-black or black-on-white, digit size 150..224 px and its
    offset. Returns the image and those render parameters.
    """
    grey = Image.fromarray(np.round(pixels * (255 / 16)).astype(np.uint8), mode="L")
    interpolation = rng.choice(["nearest", "bilinear"])
    size = rng.choice(range(152, IMAGE_SIZE + 1, 8))  # a multiple of 8: nearest keeps square 8x8 cells
    digit = grey.resize((size, size), Image.NEAREST if interpolation == "nearest" else Image.BILINEAR)
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    x, y = rng.randint(0, IMAGE_SIZE - size), rng.randint(0, IMAGE_SIZE - size)
    canvas.paste(digit, (x, y))
    polarity = rng.choice(["white on black", "black on white"])
    if polarity == "black on white":
        canvas = Image.fromarray(255 - np.asarray(canvas))
    params = {"interpolation": interpolation, "polarity": polarity, "digit_box": [x, y, size]}
    return canvas.convert("RGB"), params


@lru_cache(maxsize=64)
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    if name == "pillow-default":
        return ImageFont.load_default(size=size)
    import matplotlib  # only for the path of its bundled DejaVu fonts

    return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", name), size)


def draw_text(text: str, rng: random.Random) -> tuple[Image.Image, dict]:
    """Render a short word or number in a random font, size, ink and background; it always fits the image."""
    background, ink, font_name = rng.choice(list(BACKGROUNDS)), rng.choice(list(INK)), rng.choice(FONTS)
    size = rng.randint(30, 64)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    while True:
        font = _font(font_name, size)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        if right - left <= IMAGE_SIZE - 16 or size <= 12:
            break
        size -= 4
    x = rng.randint(8, max(8, IMAGE_SIZE - 8 - (right - left))) - left
    y = rng.randint(8, max(8, IMAGE_SIZE - 8 - (bottom - top))) - top
    draw.text((x, y), text, fill=INK[ink], font=font)
    return image, {"font": font_name, "font_size": size, "ink": ink, "background": background}
