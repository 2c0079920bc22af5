"""The real images idefics-mini is judged on, none of which is ever in its training data, and how answers about
them are graded.

- `bundled_photos()`: the sample photos that ship inside scikit-image, scikit-learn and matplotlib, each with
  the words a person would accept for its main object (hand-written here: "cat", "kitten" for the cat photo).
- `fashion_test(n)`: the first n photos of Fashion-MNIST's test split (Debian `dataset-fashion-mnist`).
- `real_digits()`: the last 300 of scikit-learn's handwritten digits, upscaled to 224 px.
- `classifier`: the frozen EfficientNet-Lite0 head (its top-1 class, and whether that names the photo), and a
  logistic-regression probe on its pooled features: what the vision backbone alone knows.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable

import numpy as np
import torch
from PIL import Image

from ..backbones.imagenet import class_table
from ..data.language import NUMBER_WORDS
from ..data.photos import FASHION_NAMES, N_DIGITS_TEST, fashion_mnist, load_digits_cached, upscale_digit

# photo -> what its main object may be called (synonyms and hypernyms included)
PHOTO_TRUTH: dict[str, tuple[str, ...]] = {
    "skimage astronaut": ("astronaut", "woman", "person", "spacesuit", "space suit", "people"),
    "skimage camera": ("man", "person", "camera", "tripod", "photographer", "cameraman"),
    "skimage chelsea": ("cat", "kitten", "tabby"),
    "skimage coffee": ("coffee", "espresso", "cup", "mug", "cappuccino"),
    "skimage rocket": ("rocket", "space shuttle", "missile", "launch pad"),
    "skimage coins": ("coin", "money"),
    "skimage moon": ("moon", "crater"),
    "skimage page": ("page", "text", "book", "paper", "newspaper", "document"),
    "skimage text": ("text", "letter", "sign", "writing", "words"),
    "skimage clock": ("clock",),
    "skimage horse": ("horse", "silhouette"),
    "skimage stereo_motorcycle": ("motorcycle", "motorbike", "moped", "scooter"),
    "skimage hubble_deep_field": ("galaxy", "galaxies", "star", "space", "sky", "universe"),
    "skimage immunohistochemistry": ("cell", "tissue", "stain", "microscope"),
    "skimage retina": ("retina", "eye", "fundus"),
    "skimage colorwheel": ("colour wheel", "color wheel", "color", "colour", "rainbow", "spectrum"),
    "skimage brick": ("brick", "wall"),
    "skimage grass": ("grass", "lawn"),
    "skimage gravel": ("gravel", "stone", "rock", "pebble"),
    "skimage cell": ("cell", "microscope"),
    "sklearn china.jpg": ("temple", "palace", "building", "pagoda", "monastery", "church", "roof", "shrine", "tower"),
    "sklearn flower.jpg": ("flower", "daisy", "blossom"),
    "matplotlib grace_hopper.jpg": ("woman", "person", "uniform", "officer", "admiral", "lady"),
    "matplotlib Minduka_Present_Blue_Pack.png": ("present", "gift", "box", "package", "parcel"),
}
FASHION_WORDS = {"T-shirt": ("t-shirt", "tshirt", "tee", "top"), "trousers": ("trousers", "trouser", "pants", "jeans"),
                 "pullover": ("pullover", "sweater", "jumper"), "dress": ("dress",), "coat": ("coat", "jacket"),
                 "sandal": ("sandal",), "shirt": ("shirt",), "sneaker": ("sneaker", "trainer"), "bag": ("bag", "handbag", "purse"),
                 "ankle boot": ("boot",)}


def mentions(text: str, words: Iterable[str]) -> bool:
    """Does `text` contain one of `words` as a whole word (plural allowed; "shirt" is not in "T-shirt")?"""
    text = text.lower()
    return any(re.search(rf"(?<![\w-]){re.escape(w.lower())}(e?s)?(?![\w-])", text) for w in words)


def class_words(index: int) -> tuple[str, ...]:
    entry = class_table()[index]
    return (entry["name"], *entry["synonyms"], *((entry["kind"],) if entry["kind"] else ()))


def bundled_photos() -> list[tuple[str, Image.Image]]:
    """(label, RGB image) of every sample photo the installed packages bundle (those that load offline)."""
    out = []
    try:
        import skimage.data as data

        for name in ("chelsea", "coffee", "astronaut", "camera", "rocket", "clock", "coins", "moon", "page", "text",
                     "horse", "stereo_motorcycle", "hubble_deep_field", "immunohistochemistry", "retina",
                     "colorwheel", "brick", "grass", "gravel", "cell"):
            try:
                pixels = getattr(data, name)()
            except Exception:  # some need a download: not available offline
                continue
            pixels = pixels[0] if isinstance(pixels, tuple) else pixels
            if pixels.dtype == bool:
                pixels = pixels.astype(np.uint8) * 255
            out.append((f"skimage {name}", Image.fromarray(pixels).convert("RGB")))
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_image

        for name in ("china.jpg", "flower.jpg"):
            out.append((f"sklearn {name}", Image.fromarray(load_sample_image(name))))
    except ImportError:
        pass
    try:
        import matplotlib.cbook

        for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"):
            with matplotlib.cbook.get_sample_data(name) as f:
                out.append((f"matplotlib {name}", Image.open(f).convert("RGB")))
    except (ImportError, OSError):
        pass
    return out


def fashion_test(n: int) -> list[tuple[Image.Image, str]]:
    images, labels = fashion_mnist("test")
    return [(Image.fromarray(images[i], mode="L"), FASHION_NAMES[int(labels[i])]) for i in range(min(n, len(labels)))]


def real_digits() -> list[tuple[Image.Image, int]]:
    digits = load_digits_cached()
    first = len(digits.target) - N_DIGITS_TEST
    return [(upscale_digit(digits.images[i], "bilinear"), int(digits.target[i])) for i in range(first, len(digits.target))]


def digit_right(answer: str, digit: int) -> bool:
    return mentions(answer, (str(digit), NUMBER_WORDS[digit]))


# ----------------------------------------------------------------------------------------------------------
# the frozen vision backbone alone


@lru_cache(maxsize=1)
def classifier():
    from ..backbones import load_efficientnet_lite0

    return load_efficientnet_lite0()


@torch.no_grad()
def pooled_features(images: list[Image.Image], batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(pooled 1280-d features, ImageNet probabilities) of the frozen EfficientNet-Lite0."""
    from ..backbones import efficientnet_preprocess

    net = classifier()
    feats, probs = [], []
    for start in range(0, len(images), batch):
        x = torch.stack([efficientnet_preprocess(im) for im in images[start:start + batch]])
        pooled = net.forward_features(x).mean(dim=1)
        feats.append(pooled.numpy())
        probs.append(net._fc(pooled).softmax(-1).numpy())
    return np.concatenate(feats), np.concatenate(probs)


def head_top1(image: Image.Image) -> tuple[int, float]:
    _, probs = pooled_features([image])
    return int(probs[0].argmax()), float(probs[0].max())


def linear_probe(train: list[Image.Image], train_labels: list, test: list[Image.Image], test_labels: list) -> float:
    """Accuracy (%) of a logistic regression on the frozen pooled features."""
    from sklearn.linear_model import LogisticRegression

    x_train, _ = pooled_features(train)
    x_test, _ = pooled_features(test)
    probe = LogisticRegression(max_iter=2000, C=1.0).fit(x_train, train_labels)
    return 100.0 * float((probe.predict(x_test) == np.asarray(test_labels)).mean())


def fashion_probe(n_train: int, test: list[tuple[Image.Image, str]]) -> float:
    images, labels = fashion_mnist("train")
    train = [Image.fromarray(images[i], mode="L") for i in range(n_train)]
    return linear_probe(train, [FASHION_NAMES[int(y)] for y in labels[:n_train]], [im for im, _ in test],
                        [y for _, y in test])


def digits_probe() -> float:
    digits = load_digits_cached()
    first = len(digits.target) - N_DIGITS_TEST
    train = [upscale_digit(digits.images[i], "bilinear") for i in range(first)]
    test = real_digits()
    return linear_probe(train, list(digits.target[:first]), [im for im, _ in test], [d for _, d in test])
