"""Real-image training data of idefics-mini: naming things, real clothes, real handwriting.

Sources (each written to `out_dir/{train,val}/<source>-%05d.tar`, chats in the schema of docs/data_format.md):

    names     clip art (Debian `openclipart-png`) and colour emoji (`fonts-noto-color-emoji`) carrying *made-up*
              predictions of the frozen ImageNet classifier (`meta.class_probs`: a top class drawn uniformly
              from all 1000, its probability, four runners-up); the answer names the top class. The vision
              encoder turns predictions into class-name tokens (`vision.EfficientNetEncoder`), so this teaches
              the new blocks to say what the classifier sees, for every class, without a photo of each.
    fashion   Fashion-MNIST training photos (Debian `dataset-fashion-mnist`), "What is in this picture?" and
              similar questions answered with the garment.
    digits    scikit-learn's handwritten digits, upscaled, "What digit is this?" and similar.

Never used here (the real-photo test set of `idefics.mini.report`): the sample photos bundled with
scikit-image, scikit-learn and matplotlib, the Fashion-MNIST test split and the last 300 scikit-learn digits.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import time
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from idefics.backbones.imagenet import NUM_CLASSES, class_names, describe, with_article
from idefics.data.language import NUMBER_WORDS
from idefics.data.render import IMAGE_SIZE, draw_digit
from idefics.data.schema import Sample, Turn
from idefics.data.shards import ShardWriter

GENERATOR_VERSION = 1
CLIPART_DIR = Path("/usr/share/openclipart/png")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_NAMES = ("T-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                 "ankle boot")
N_DIGITS_TEST = 300  # the last 300 scikit-learn digits: test only
N_DIGITS_VAL = 150
NAME_QUESTIONS = ("What is in this picture?", "What is this?", "What is shown in the image?",
                  "Name the main object in the picture.", "What object is this?", "What is in the image?")
NAME_ANSWERS = ("{A}.", "{A}.", "{A}.", "This is {a}.", "It is {a}.")
DIGIT_QUESTIONS = (("What digit is this?", "digit"), ("Which number is written here?", "digit"),
                   ("What number is shown? Answer with a word.", "word"), ("Read the handwritten digit.", "digit"))
SIZES = {"names": 16000, "fashion": 12000, "digits": 6000}
VAL_SIZES = {"names": 200, "fashion": 200, "digits": 150}


def require(path: Path, package: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: install Debian's {package} (apt-get install {package})")
    return path


# ----------------------------------------------------------------------------------------------------------
# the real images


def read_idx(path: Path) -> np.ndarray:
    """An idx-ubyte(.gz) array (the MNIST file format)."""
    with gzip.open(path) as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


@lru_cache(maxsize=2)
def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 28, 28] uint8, labels [N]) of Fashion-MNIST's "train" (60 000) or "test" (10 000) split."""
    prefix = {"train": "train", "test": "t10k"}[split]
    folder = require(FASHION_DIR, "dataset-fashion-mnist")
    return (read_idx(folder / f"{prefix}-images-idx3-ubyte.gz"), read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz"))


@lru_cache(maxsize=1)
def clipart_files() -> tuple[Path, ...]:
    """The clip-art PNGs of at most 1 MB (the few larger ones are posters of up to 170 megapixels)."""
    files = require(CLIPART_DIR, "openclipart-png").rglob("*.png")
    return tuple(sorted(p for p in files if p.stat().st_size <= 1_000_000))


@lru_cache(maxsize=1)
def emoji_characters() -> tuple[str, ...]:
    """Pictographic emoji the colour font draws (the symbol, food, animal and object blocks)."""
    font = emoji_font()
    chars = []
    for cp in list(range(0x1F300, 0x1F650)) + list(range(0x1F680, 0x1F6D0)) + list(range(0x1F900, 0x1FA00)):
        char = chr(cp)
        if unicodedata.name(char, "") and font.getmask(char).getbbox():
            chars.append(char)
    return tuple(chars)


@lru_cache(maxsize=1)
def emoji_font() -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(require(EMOJI_FONT, "fonts-noto-color-emoji")), 109)  # its one bitmap size


def on_canvas(picture: Image.Image, rng: random.Random) -> Image.Image:
    """A drawing (RGBA) scaled to 40-95% of a 224 px canvas of a light random colour, at a random place."""
    picture = picture.convert("RGBA")
    scale = rng.uniform(0.4, 0.95) * IMAGE_SIZE / max(picture.size)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    picture = picture.resize(size, Image.BICUBIC)
    background = tuple(rng.randint(200, 255) for _ in range(3))
    canvas = Image.new("RGBA", (IMAGE_SIZE, IMAGE_SIZE), background + (255,))
    canvas.alpha_composite(picture, (rng.randint(0, IMAGE_SIZE - size[0]), rng.randint(0, IMAGE_SIZE - size[1])))
    return canvas.convert("RGB")


def carrier_image(rng: random.Random) -> tuple[Image.Image, dict]:
    """A clip-art drawing or an emoji: an image to carry made-up classifier predictions."""
    if rng.random() < 0.7:
        path = rng.choice(clipart_files())
        with Image.open(path) as picture:
            picture.thumbnail((2 * IMAGE_SIZE, 2 * IMAGE_SIZE))
            return on_canvas(picture, rng), {"carrier": str(path.relative_to(CLIPART_DIR))}
    char = rng.choice(emoji_characters())
    glyph = Image.new("RGBA", (136, 128), (0, 0, 0, 0))
    ImageDraw.Draw(glyph).text((0, 0), char, font=emoji_font(), embedded_color=True)
    return on_canvas(glyph.crop(glyph.getbbox()), rng), {"carrier": unicodedata.name(char).lower()}


def made_up_prediction(rng: random.Random) -> list[list[float]]:
    """[[class, probability], ...] for 5 classes: a top class drawn uniformly, with the confidence spread a
    real classifier shows (0.15-0.99), and runners-up that are often its neighbours in the class order
    (ImageNet orders related classes together: the cat breeds are 281-285)."""
    top = rng.randrange(NUM_CLASSES)
    p_top = rng.uniform(0.15, 0.99)
    others: list[int] = []
    while len(others) < 4:
        c = top + rng.choice([-3, -2, -1, 1, 2, 3]) if rng.random() < 0.5 else rng.randrange(NUM_CLASSES)
        if 0 <= c < NUM_CLASSES and c != top and c not in others:
            others.append(c)
    weights = sorted((rng.random() for _ in others), reverse=True)
    rest = (1 - p_top) * rng.uniform(0.5, 1.0)  # the other 995 classes keep the remainder
    probs = [min(rest * w / sum(weights), 0.95 * p_top) for w in weights]
    return [[top, round(p_top, 4)]] + [[c, round(p, 4)] for c, p in zip(others, probs)]


def answer_text(phrase: str, rng: random.Random) -> str:
    """"An espresso, a kind of coffee." or "This is a sneaker." for a phrase with its article."""
    return rng.choice(NAME_ANSWERS).format(A=phrase[0].upper() + phrase[1:], a=phrase)


# ----------------------------------------------------------------------------------------------------------
# one sample per source


def chat_sample(key: str, image: Image.Image, question: str, answer: str, meta: dict) -> Sample:
    return Sample("chat", key, turns=[Turn("user", [image, question]), Turn("assistant", [answer])], meta=meta)


def names_sample(rng: random.Random, key: str, split: str, _: Any) -> Sample:
    image, carrier = carrier_image(rng)
    prediction = made_up_prediction(rng)
    name = class_names()[prediction[0][0]]
    return chat_sample(key, image, rng.choice(NAME_QUESTIONS), answer_text(describe(prediction[0][0]), rng),
                       {"task": "name", "class": prediction[0][0], "name": name, "class_probs": [prediction],
                        **carrier})


def fashion_sample(rng: random.Random, key: str, split: str, indices: dict) -> Sample:
    images, labels = fashion_mnist("train")
    index = rng.choice(indices["fashion"][split])
    name = FASHION_NAMES[int(labels[index])]
    image = Image.fromarray(images[index], mode="L")
    return chat_sample(key, image, rng.choice(NAME_QUESTIONS), answer_text(with_article(name), rng),
                       {"task": "fashion", "label": int(labels[index]), "name": name, "index": int(index)})


def digits_sample(rng: random.Random, key: str, split: str, indices: dict) -> Sample:
    digits = load_digits_cached()
    index = rng.choice(indices["digits"][split])
    d = int(digits.target[index])
    if rng.random() < 0.5:  # the whole frame, as a user would upscale it
        image = upscale_digit(digits.images[index], rng.choice(["nearest", "bilinear", "bicubic"]),
                              rng.random() < 0.5)
    else:
        image, _ = draw_digit(digits.images[index], rng)
    question, kind = rng.choice(DIGIT_QUESTIONS)
    answer = NUMBER_WORDS[d] if kind == "word" else str(d)
    return chat_sample(key, image, question, answer, {"task": "digit", "digit": d, "digit_index": int(index)})


def upscale_digit(pixels: np.ndarray, interpolation: str = "bilinear", dark_on_light: bool = False) -> Image.Image:
    """One 8×8 scikit-learn digit (0..16) as a 224 px RGB image."""
    grey = Image.fromarray(np.round(pixels * (255 / 16)).astype(np.uint8), mode="L")
    resample = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interpolation]
    image = grey.resize((IMAGE_SIZE, IMAGE_SIZE), resample)
    if dark_on_light:
        image = Image.fromarray(255 - np.asarray(image))
    return image.convert("RGB")


@lru_cache(maxsize=1)
def load_digits_cached():
    from sklearn.datasets import load_digits

    return load_digits()


BUILDERS: dict[str, Callable[..., Sample]] = {"names": names_sample, "fashion": fashion_sample,
                                              "digits": digits_sample}


def split_indices(seed: int) -> dict:
    """Training and validation indices of Fashion-MNIST's training split and of the digits before the last
    300 (the test digits)."""
    rng = random.Random(f"photos:{seed}")
    n_fashion = len(fashion_mnist("train")[1])
    fashion = rng.sample(range(n_fashion), n_fashion)
    n_digits = len(load_digits_cached().target) - N_DIGITS_TEST
    digits = rng.sample(range(n_digits), n_digits)
    return {"fashion": {"val": sorted(fashion[:1000]), "train": sorted(fashion[1000:])},
            "digits": {"val": sorted(digits[:N_DIGITS_VAL]), "train": sorted(digits[N_DIGITS_VAL:])}}


def make_photo_data(out_dir: str, seed: int = 0, sizes: dict[str, int] | None = None,
                    val_sizes: dict[str, int] | None = None, samples_per_shard: int = 1000,
                    progress: bool = True) -> dict:
    """Write the real-image sources into `out_dir/{train,val}` and `out_dir/photos.json`; deterministic."""
    sizes, val_sizes = sizes or SIZES, val_sizes or VAL_SIZES
    indices = split_indices(seed)
    start, written = time.time(), {}
    for split, counts in (("val", val_sizes), ("train", sizes)):
        for source, n in counts.items():
            pattern = os.path.join(out_dir, split, f"{source}-%05d.tar")
            with ShardWriter(pattern, max_count=samples_per_shard) as writer:
                for i in tqdm(range(n), desc=f"{split} {source}", disable=not progress, unit="sample"):
                    rng = random.Random(f"{seed}:{split}:{source}:{i}")
                    writer.write(BUILDERS[source](rng, f"{source}-{split}-{i:07d}", split, indices))
            written[f"{split}/{source}"] = [os.path.relpath(p, out_dir) for p in writer.shards]
    manifest = {"generator": "idefics.data.photos", "generator_version": GENERATOR_VERSION, "seed": seed,
                "sizes": sizes, "val_sizes": val_sizes, "shards": written,
                "digits_test": f"the last {N_DIGITS_TEST} scikit-learn digits (never written)"}
    Path(out_dir, "photos.json").write_text(json.dumps(manifest, indent=1))
    if progress:
        print(f"wrote {sum(sizes.values()) + sum(val_sizes.values())} samples to {out_dir} in "
              f"{time.time() - start:.0f} s")
    return manifest
