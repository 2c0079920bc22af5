"""`idefics demo`: the embedded idefics-mini answering questions about bundled images.

The images come with installed packages: real photos (scikit-image, scikit-learn, matplotlib — never used in
training, so what it says about them shows what a model trained only on synthetic scenes and digits does with
natural images) and held-out test-split kinds it was trained for (a digit image never seen in training, a scene
with a colour–shape pair never seen in training, a word never seen in training)."""

from __future__ import annotations

import argparse
import random
import time
from typing import Any

from PIL import Image

EPILOG = """\
examples:
  idefics demo                         # idefics-mini, greedy answers, one line per image
  idefics demo --model ./my-export     # the same questions to another checkpoint
  idefics demo --max-new-tokens 40
"""


def photos() -> list[tuple[str, Image.Image]]:
    """Real photos shipped inside installed packages (kept out of training)."""
    out = []
    try:
        import skimage.data as data

        for name in ("chelsea", "coffee", "astronaut", "rocket", "text"):
            out.append((f"skimage {name}", Image.fromarray(getattr(data, name)()).convert("RGB")))
    except Exception:  # an optional extra; the demo still runs without it
        pass
    try:
        from sklearn.datasets import load_sample_image

        for name in ("china.jpg", "flower.jpg"):
            out.append((f"sklearn {name}", Image.fromarray(load_sample_image(name))))
    except Exception:
        pass
    try:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            out.append(("matplotlib grace_hopper.jpg", Image.open(f).convert("RGB")))
    except Exception:
        pass
    return out


def held_out_examples(seed: int = 0) -> list[tuple[str, Image.Image, str, str]]:
    """(label, image, question, expected answer) of test-split kinds the model never saw in training."""
    from sklearn.datasets import load_digits

    from ..data.render import draw_digit, draw_scene, draw_text
    from ..data.synthetic import choose_held_out

    digits = load_digits()
    held = choose_held_out(seed, len(digits.images))
    rng = random.Random(f"demo:{seed}")
    out = []
    for index in held["digit_indices"]["test"][:2]:
        image, _ = draw_digit(digits.images[index], rng)
        out.append((f"held-out digit #{index}", image, "What digit is this?", str(digits.target[index])))
    colour, shape = held["colour_shape"][0]
    scene, _ = draw_scene([{"colour": colour, "shape": shape, "position": "center"}], "white", rng)
    out.append((f"scene with an unseen pair ({colour} {shape})", scene, f"What colour is the {shape}?", colour))
    out.append((f"scene with an unseen pair ({colour} {shape})", scene, f"What shape is the {colour} object?", shape))
    word = held["words"][0]
    image, _ = draw_text(word, rng)
    out.append((f"unseen word '{word}'", image, "What word is written in the image?", word))
    return out


def chat(image: Image.Image, question: str) -> list[Any]:
    return ["User:", image, f"{question}<end_of_utterance>", "\nAssistant:"]


def run_demo(args: argparse.Namespace) -> int:
    import idefics

    start = time.time()
    pipe = idefics.load(args.model)
    print(f"loaded {pipe.name} in {time.time() - start:.1f} s\n")
    for label, image, question, expected in held_out_examples():
        answer = pipe.generate(chat(image, question), max_new_tokens=args.max_new_tokens,
                               add_end_of_utterance_token=False)[0].strip()
        mark = "right" if answer.lower().strip(" .") == expected.lower() else f"expected {expected!r}"
        print(f"[{label}] {question}\n  -> {answer}   ({mark})")
    print("\nReal photos (never in training; idefics-mini only saw synthetic scenes, digits and words):")
    for label, image in photos():
        answer = pipe.generate(chat(image, "Describe the picture."), max_new_tokens=args.max_new_tokens,
                               add_end_of_utterance_token=False)[0].strip()
        print(f"[{label}] Describe the picture.\n  -> {answer}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser("demo", help="idefics-mini answering questions about bundled images",
                                 description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_argument("--model", default=None, help="checkpoint folder (default: the embedded idefics-mini)")
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.set_defaults(func=run_demo)
