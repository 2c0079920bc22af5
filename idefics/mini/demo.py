"""`idefics demo`: the embedded idefics-mini answering questions about bundled images.

The images come with installed packages and were never used in training: the sample photos of scikit-image,
scikit-learn and matplotlib (asked what they show, beside what the frozen ImageNet classifier alone says), a
Fashion-MNIST test photo, the last scikit-learn digits, and synthetic test-split kinds (a colour-shape pair
and a word never seen in training)."""

from __future__ import annotations

import argparse
import random
import time

from PIL import Image

from ..model_options import add_model_options, load_from_args

EPILOG = """\
examples:
  idefics demo                         # idefics-mini, greedy answers, one line per image
  idefics demo --model ./my-export     # the same questions to another checkpoint
  idefics demo --max-new-tokens 40
"""


def held_out_examples(seed: int = 0) -> list[tuple[str, Image.Image, str, str]]:
    """(label, image, question, expected answer) of kinds the model never saw in training."""
    from ..data.render import draw_scene, draw_text
    from ..data.synthetic import choose_held_out
    from .heldout import fashion_test, real_digits

    held = choose_held_out(seed, 1797)
    rng = random.Random(f"demo:{seed}")
    out = [(f"real handwritten digit (test #{i})", image, "What digit is this?", str(digit))
           for i, (image, digit) in enumerate(real_digits()[:2])]
    try:
        image, name = fashion_test(1)[0]
        out.append(("Fashion-MNIST test photo", image, "What is in this picture?", name))
    except FileNotFoundError:  # Debian's dataset-fashion-mnist is optional for the demo
        pass
    colour, shape = held["colour_shape"][0]
    scene, _ = draw_scene([{"colour": colour, "shape": shape, "position": "center"}], "white", rng)
    out.append((f"scene with an unseen pair ({colour} {shape})", scene, f"What colour is the {shape}?", colour))
    word = held["words"][0]
    image, _ = draw_text(word, rng)
    out.append((f"unseen word '{word}'", image, "What word is written in the image?", word))
    return out


def run_demo(args: argparse.Namespace) -> int:
    from ..backbones.imagenet import class_table
    from .heldout import PHOTO_TRUTH, bundled_photos, class_words, head_top1, mentions
    from .realworld import chat

    start = time.time()
    pipe = load_from_args(args)
    print(f"loaded {pipe.name} in {time.time() - start:.1f} s\n")
    print("Real photos bundled with scikit-image, scikit-learn and matplotlib (never in training):")
    for label, image in bundled_photos():
        answer = pipe.generate(chat(image, "What is in this picture?"), max_new_tokens=args.max_new_tokens,
                               add_end_of_utterance_token=False)[0].strip()
        top, p = head_top1(image)
        truth = PHOTO_TRUTH.get(label, ())
        mark = "" if not truth else ("  (right)" if mentions(answer, truth) else "  (wrong)" if mentions(
            " ".join(class_words(top)), truth) else "  (the classifier is wrong too)")
        print(f"[{label}] What is in this picture?\n  -> {answer}{mark}\n"
              f"     frozen ImageNet classifier alone: {class_table()[top]['name']} ({p:.2f})")
    print("\nOther images never used in training:")
    for label, image, question, expected in held_out_examples():
        answer = pipe.generate(chat(image, question), max_new_tokens=args.max_new_tokens,
                               add_end_of_utterance_token=False)[0].strip()
        mark = "right" if mentions(answer, (expected,)) else f"expected {expected!r}"
        print(f"[{label}] {question}\n  -> {answer}   ({mark})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser("demo", help="idefics-mini answering questions about bundled images",
                                 description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(demo)
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.set_defaults(func=run_demo)
