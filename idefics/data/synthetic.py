"""The offline training data of idefics-mini, generated deterministically from a seed.

Sources (each written to `out_dir/{train,val,test}/<source>-%05d.tar`, see docs/data_format.md):

    digit_pairs  scikit-learn handwritten digits upscaled to 224 px, with varied captions
    scene_pairs  PIL-drawn scenes of 1-4 coloured shapes, captioned
    word_pairs   rendered words and numbers, captioned (reading text in images)
    documents    interleaved 2-4 image documents: few-shot formats, descriptions, comparisons, sequences
    chat         instruction-format QA about colour, shape, count, position, digits and words
    text         text-only documents and chats, so the LM keeps its language and format-copying skills

Held out for the test split only: some colour-shape combinations and some words; digit images are split by
index. No image (by pixel hash) appears in two splits. `meta` of every sample holds the ground truth.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import time
from typing import Any, Callable

from tqdm import tqdm

from idefics.data import language as lang
from idefics.data.render import COLOURS, IMAGE_SIZE, POSITIONS, SHAPES, draw_digit, draw_scene, draw_text
from idefics.data.schema import Sample, Turn
from idefics.data.shards import ShardWriter

GENERATOR_VERSION = 3
SPLITS = ("train", "val", "test")
SOURCE_FRACTIONS = {"digit_pairs": 0.15, "scene_pairs": 0.20, "word_pairs": 0.10, "documents": 0.20,
                    "chat": 0.25, "text": 0.10}
N_DIGITS_VAL, N_DIGITS_TEST = 150, 300
N_HELD_OUT_COMBOS, N_HELD_OUT_WORDS = 4, 10


def choose_held_out(seed: int, n_digits: int) -> dict:
    """What the test split has that train and val never see, and the digit indices of each split."""
    rng = random.Random(f"held-out:{seed}")
    colours, shapes = rng.sample(list(COLOURS), len(COLOURS)), rng.sample(SHAPES, len(SHAPES))
    # distinct colours and shapes, so every colour and every shape still occurs in train
    combos = sorted(zip(colours[:N_HELD_OUT_COMBOS], shapes[:N_HELD_OUT_COMBOS]))
    words = sorted(rng.sample(lang.WORDS, N_HELD_OUT_WORDS))
    # the last 300 scikit-learn digits are the real-handwriting test set everywhere (idefics.mini.report):
    # they never enter train or val
    test = list(range(n_digits - N_DIGITS_TEST, n_digits))
    order = rng.sample(range(n_digits - N_DIGITS_TEST), n_digits - N_DIGITS_TEST)
    val, train = order[:N_DIGITS_VAL], order[N_DIGITS_VAL:]
    return {"colour_shape": [list(c) for c in combos], "words": words,
            "digit_indices": {"train": sorted(train), "val": sorted(val), "test": sorted(test)}}


class SplitContext:
    """Everything one split draws from, plus the image-hash registry shared by all splits."""

    def __init__(self, split: str, held_out: dict, digits: Any, registry: dict[bytes, str]):
        self.split, self.digits, self.registry = split, digits, registry
        self.digit_indices = held_out["digit_indices"][split]
        held_combos = {tuple(c) for c in held_out["colour_shape"]}
        self.held_combos = sorted(held_combos)
        self.allowed_combos = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in held_combos]
        self.all_combos = [(c, s) for c in COLOURS for s in SHAPES]
        self.held_words = held_out["words"]
        self.allowed_words = [w for w in lang.WORDS if w not in held_out["words"]]
        self.n_images = 0

    def unique(self, draw: Callable[[], tuple[Any, dict]]) -> tuple[Any, dict]:
        """Draw until the pixels are not already used by another split (a rare collision, e.g. one small shape)."""
        for _ in range(100):
            image, params = draw()
            digest = hashlib.sha1(image.tobytes()).digest()
            if self.registry.setdefault(digest, self.split) == self.split:
                self.n_images += 1
                return image, params
        raise RuntimeError(f"could not draw an image unique to split {self.split!r} in 100 attempts")

    # --- one image with its ground truth -----------------------------------------------------------------

    def digit(self, rng: random.Random) -> tuple[Any, dict]:
        index = rng.choice(self.digit_indices)
        image, params = self.unique(lambda: draw_digit(self.digits.images[index], rng))
        return image, {"task": "digit", "digit": int(self.digits.target[index]), "digit_index": index, **params}

    def scene(self, rng: random.Random, mode: str | None = None, shape: str | None = None,
              count: int | None = None) -> tuple[Any, dict]:
        """Modes: "single" object, "count" (2-4 copies of one colour-shape), "mixed" (2-4 distinct ones)."""
        if count is not None:
            mode = "single" if count == 1 else "count"
        mode = mode or rng.choices(["single", "count", "mixed"], [0.35, 0.3, 0.35])[0]
        n = count or (1 if mode == "single" else rng.randint(2, 4))
        pool = self.allowed_combos
        if shape is not None:
            pool = [c for c in (self.all_combos if self.split == "test" else pool) if c[1] == shape]
        forced = self.split == "test" and shape is None and rng.random() < 0.5
        first = rng.choice(self.held_combos if forced else pool)
        if mode == "mixed":
            rest = [c for c in (self.all_combos if forced else pool) if c != first]
            combos = [first] + rng.sample(rest, n - 1)
        else:
            combos = [first] * n
        positions = rng.sample(POSITIONS, n)
        objects = [{"colour": c, "shape": s, "position": p} for (c, s), p in zip(combos, positions)]
        background = rng.choice(["white", "light grey", "cream"])
        image, placed = self.unique(lambda: draw_scene(objects, background, rng))
        held = any((o["colour"], o["shape"]) in self.held_combos for o in objects)
        return image, {"task": "scene", "mode": mode, "objects": placed, "count": n, "background": background,
                       "held_out": held}

    def word(self, rng: random.Random) -> tuple[Any, dict]:
        if self.split == "test" and rng.random() < 0.4:
            text = rng.choice(self.held_words)
        elif rng.random() < 0.3:
            text = str(rng.choice([rng.randint(0, 9), rng.randint(10, 99), rng.randint(100, 999)]))
        else:
            text = rng.choice(self.allowed_words)
        image, params = self.unique(lambda: draw_text(text, rng))
        return image, {"task": "text", "text": text, "held_out": text in self.held_words, **params}

    def any_image(self, rng: random.Random, task: str | None = None) -> tuple[Any, dict]:
        task = task or rng.choices(["digit", "scene", "text"], [0.3, 0.5, 0.2])[0]
        return {"digit": self.digit, "scene": self.scene, "text": self.word}[task](rng)


# ----------------------------------------------------------------------------------------------------------
# one sample per source


def digit_pair(ctx: SplitContext, rng: random.Random, key: str) -> Sample:
    image, meta = ctx.digit(rng)
    caption = lang.digit_caption(meta, rng)
    return Sample("pair", key, items=[image, caption], meta={**meta, "caption": caption})


def scene_pair(ctx: SplitContext, rng: random.Random, key: str) -> Sample:
    image, meta = ctx.scene(rng)
    caption = lang.scene_caption(meta, rng)
    return Sample("pair", key, items=[image, caption], meta={**meta, "caption": caption})


def word_pair(ctx: SplitContext, rng: random.Random, key: str) -> Sample:
    image, meta = ctx.word(rng)
    caption = lang.word_caption(meta, rng)
    return Sample("pair", key, items=[image, caption], meta={**meta, "caption": caption})


def document(ctx: SplitContext, rng: random.Random, key: str) -> Sample:
    """An interleaved document; each paragraph follows the image it talks about (text sees the last image)."""
    style = rng.choices(["fewshot", "describe", "compare", "sequence"], [0.5, 0.2, 0.15, 0.15])[0]
    n = rng.randint(2, 5 if style == "fewshot" else 4)  # few-shot: up to 4 demonstrations + 1
    if style == "compare":
        shape, counts = rng.choice(SHAPES), rng.sample(range(1, 5), 2)
        drawn = [ctx.scene(rng, shape=shape, count=k) for k in counts]
    elif style == "sequence":
        drawn = [ctx.digit(rng) for _ in range(n)]
    elif style == "describe":
        drawn = [ctx.any_image(rng, "scene" if rng.random() < 0.7 else None) for _ in range(n)]
    else:
        task = rng.choice(["digit", "scene", "text"])
        mode = rng.choice(["single", "count"]) if task == "scene" else None
        drawn = [ctx.scene(rng, mode=mode) if task == "scene" else ctx.any_image(rng, task) for _ in range(n)]
    images, metas = [d[0] for d in drawn], [d[1] for d in drawn]
    paragraphs, doc_meta = lang.document_text(style, metas, rng)
    items: list = [paragraphs[0]] if paragraphs[0] else []
    for image, paragraph in zip(images, paragraphs[1:]):
        items += [image, paragraph]
    return Sample("document", key, items=items, meta={"task": "document", "style": style, "images": metas,
                                                      **doc_meta})


def chat(ctx: SplitContext, rng: random.Random, key: str) -> Sample:
    """1-3 QA turns; a later turn asks about a new image or follows up on the last one, in the same format."""
    answer_format = lang.pick_answer_format(rng)
    turns, qa, metas = [], [], []
    for t in range(rng.choices([1, 2, 3], [0.6, 0.25, 0.15])[0]):
        content: list = []
        if t == 0 or rng.random() < 0.5:
            image, meta = ctx.any_image(rng)
            content.append(image)
            metas.append(meta)
        combos = ctx.all_combos if ctx.split == "test" else ctx.allowed_combos
        question_type, question, answer = lang.question(metas[-1], combos, rng,
                                                        captions=answer_format["name"] == "plain")
        instruction = answer_format["instruction"] if t == 0 else ""
        content.append(question + instruction)
        turns += [Turn("user", content), Turn("assistant", [answer_format["pattern"].format(x=answer)])]
        qa.append({"question_type": question_type, "question": question, "answer": answer,
                   "image": len(metas) - 1})
    meta = {"task": "chat", "answer_format": answer_format["name"], "images": metas, "qa": qa,
            "held_out": any(m.get("held_out", False) for m in metas)}
    return Sample("chat", key, turns=turns, meta=meta)


def text_only(ctx: SplitContext, rng: random.Random, key: str) -> Sample:
    if rng.random() < 0.3:
        question, answer, kind = lang.text_question(rng, ctx.allowed_words)
        return Sample("chat", key, turns=[Turn("user", [question]), Turn("assistant", [answer])],
                      meta={"task": "text_only", "style": kind, "question": question, "answer": answer})
    text, kind = lang.text_document(rng, ctx.allowed_words)
    return Sample("document", key, items=[text], meta={"task": "text_only", "style": kind})


BUILDERS = {"digit_pairs": digit_pair, "scene_pairs": scene_pair, "word_pairs": word_pair,
            "documents": document, "chat": chat, "text": text_only}


# ----------------------------------------------------------------------------------------------------------
# the data set


def source_counts(n: int) -> dict[str, int]:
    """Split n samples over the sources by SOURCE_FRACTIONS (largest remainder, so they sum to n)."""
    exact = {s: n * f for s, f in SOURCE_FRACTIONS.items()}
    counts = {s: int(x) for s, x in exact.items()}
    for s in sorted(exact, key=lambda s: counts[s] - exact[s])[: n - sum(counts.values())]:
        counts[s] += 1
    return counts


def make_mini_data(out_dir: str, seed: int = 0, n_train: int = 20000, n_val: int = 1000, n_test: int = 2000,
                   samples_per_shard: int = 500, overwrite: bool = False, progress: bool = True) -> dict:
    """Generate the idefics-mini data set into `out_dir` and return its manifest (also in manifest.json).

    The output depends only on the arguments (byte-identical shards for the same seed and sizes).
    """
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    manifest_path = os.path.join(out_dir, "manifest.json")
    if os.path.exists(manifest_path) and not overwrite:
        raise FileExistsError(f"{manifest_path} exists; pass overwrite=True (--overwrite) to regenerate")
    digits = load_digits()
    held_out = choose_held_out(seed, len(digits.target))
    registry: dict[bytes, str] = {}
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    splits: dict[str, dict] = {}
    start = time.time()
    # test first, then val, then train: an image drawn again later is redrawn, so the evaluation splits
    # stay the same whatever the size of train
    for split in ("test", "val", "train"):
        split_dir = os.path.join(out_dir, split)
        if os.path.isdir(split_dir):
            for name in os.listdir(split_dir):
                if name.endswith(".tar") and name.split("-")[0] in BUILDERS:
                    os.remove(os.path.join(split_dir, name))
        ctx = SplitContext(split, held_out, digits, registry)
        counts = source_counts(sizes[split])
        shards, held = [], 0
        with tqdm(total=sizes[split], desc=f"{split:5s}", disable=not progress, unit="sample") as bar:
            for source, n in counts.items():
                if n == 0:
                    continue
                with ShardWriter(os.path.join(split_dir, f"{source}-%05d.tar"), max_count=samples_per_shard) as w:
                    for i in range(n):
                        rng = random.Random(f"{seed}:{split}:{source}:{i}")
                        sample = BUILDERS[source](ctx, rng, f"{source}-{split}-{i:07d}")
                        held += bool(sample.meta.get("held_out"))
                        w.write(sample)
                        bar.update()
                shards += [os.path.relpath(p, out_dir) for p in w.shards]
        splits[split] = {"samples": counts, "total": sizes[split], "images": ctx.n_images,
                         "held_out_samples": held, "shards": shards,
                         "bytes": sum(os.path.getsize(os.path.join(out_dir, p)) for p in shards)}
    manifest = {
        "generator": "idefics.data.synthetic", "generator_version": GENERATOR_VERSION, "seed": seed,
        "image_size": IMAGE_SIZE, "source_fractions": SOURCE_FRACTIONS,
        "splits": {s: splits[s] for s in SPLITS}, "held_out": held_out,
        "vocabulary": {"colours": list(COLOURS), "shapes": list(SHAPES), "positions": list(POSITIONS),
                       "words": lang.WORDS},
    }
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1)
    if progress:
        total = sum(s["bytes"] for s in splits.values())
        print(f"wrote {sum(sizes.values())} samples, {total / 1e6:.1f} MB to {out_dir} in {time.time() - start:.0f} s")
    return manifest


# ----------------------------------------------------------------------------------------------------------
# command line: `idefics data make-mini OUT_DIR` and `idefics data show SHARDS`

MAKE_MINI_HELP = """\
Generate the training data of idefics-mini, offline and deterministically for a seed.

Writes OUT_DIR/{train,val,test}/<source>-%05d.tar (WebDataset shards, schema in docs/data_format.md) and
OUT_DIR/manifest.json (sample counts, seed, held-out combinations, generator version).

Sources and their share of each split:
  digit_pairs 15%  scikit-learn handwritten digits (upscaled to 224 px) with captions
  scene_pairs 20%  drawn scenes of 1-4 coloured shapes with captions
  word_pairs  10%  rendered words and numbers with captions
  documents   20%  interleaved 2-4 image documents (few-shot formats, descriptions, comparisons)
  chat        25%  User:<image>question<end_of_utterance> / Assistant: answer chats
  text        10%  text-only documents and chats

The test split alone holds some colour-shape combinations and some words (listed in the manifest); digit
images are split by index; no image appears in two splits. Every sample's meta holds its ground truth.

examples:
  idefics data make-mini data/mini                      # 23000 samples, ~130 MB, ~1 min on 2 cores
  idefics data make-mini /tmp/tiny --n-train 200 --n-val 20 --n-test 20
  idefics data show data/mini/test/chat-00000.tar -n 3  # look at a few samples
"""


def _cmd_make_mini(args: argparse.Namespace) -> int:
    manifest = make_mini_data(args.out_dir, seed=args.seed, n_train=args.n_train, n_val=args.n_val,
                              n_test=args.n_test, samples_per_shard=args.samples_per_shard,
                              overwrite=args.overwrite, progress=not args.quiet)
    if not args.quiet:
        for split, info in manifest["splits"].items():
            print(f"{split:5s}: {info['total']} samples, {info['images']} images, {len(info['shards'])} shards, "
                  f"{info['bytes'] / 1e6:.1f} MB")
    return 0


MAKE_PHOTOS_HELP = """\
Write the real-image training data of idefics-mini (needs Debian's openclipart-png, fonts-noto-color-emoji
and dataset-fashion-mnist):

  names    clip art and emoji carrying made-up ImageNet predictions; the answer names the top class
  fashion  Fashion-MNIST training photos: "What is in this picture?" -> "A sneaker."
  digits   scikit-learn's handwritten digits (never the last 300: the test set)

Writes OUT_DIR/{train,val}/<source>-%05d.tar and OUT_DIR/photos.json.

examples:
  idefics data make-photos data/mini                     # 34000 samples, a few minutes
  idefics data make-photos /tmp/tiny --scale 0.01
"""


def _cmd_make_photos(args: argparse.Namespace) -> int:
    from idefics.data.photos import SIZES, VAL_SIZES, make_photo_data

    scaled = lambda sizes: {k: max(1, round(v * args.scale)) for k, v in sizes.items()}  # noqa: E731
    make_photo_data(args.out_dir, seed=args.seed, sizes=scaled(SIZES), val_sizes=scaled(VAL_SIZES),
                    progress=not args.quiet)
    return 0


def _describe(item: Any) -> str:
    return item if isinstance(item, str) else f"<image {getattr(item, 'size', '')}>"


def _cmd_show(args: argparse.Namespace) -> int:
    from idefics.data.shards import ShardReader

    reader = ShardReader(args.shards, on_error="skip")
    for i, sample in enumerate(reader):
        if i >= args.n:
            break
        print(f"--- {sample.key} ({sample.kind}) from {sample.shard}")
        if sample.kind == "chat":
            for turn in sample.turns:
                print(f"  {turn.role}: " + "".join(map(_describe, turn.content)))
        else:
            print("  " + "".join(map(_describe, sample.items)).replace("\n", "\n  "))
        print(f"  meta: {json.dumps(sample.meta)[:400]}")
    if reader.errors:
        print(f"skipped bad samples: {dict(reader.errors)}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `data` verb (make-mini, show) to the project's command line."""
    data = subparsers.add_parser("data", help="make and inspect training data shards",
                                 description="Make and inspect training data shards (WebDataset tar files).")
    verbs = data.add_subparsers(dest="data_command", metavar="VERB", required=True)
    make = verbs.add_parser("make-mini", help="generate the synthetic idefics-mini data set",
                            description=MAKE_MINI_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    make.add_argument("out_dir", metavar="OUT_DIR", help="output directory (created if missing)")
    make.add_argument("--seed", type=int, default=0, help="random seed: same seed, same bytes (default 0)")
    make.add_argument("--n-train", type=int, default=20000, help="training samples (default 20000)")
    make.add_argument("--n-val", type=int, default=1000, help="validation samples (default 1000)")
    make.add_argument("--n-test", type=int, default=2000, help="test samples (default 2000)")
    make.add_argument("--samples-per-shard", type=int, default=500, help="samples per tar shard (default 500)")
    make.add_argument("--overwrite", action="store_true", help="regenerate if OUT_DIR/manifest.json exists")
    make.add_argument("--quiet", action="store_true", help="no progress bars")
    make.set_defaults(func=_cmd_make_mini)
    photos = verbs.add_parser("make-photos", help="write idefics-mini's real-image training data",
                              description=MAKE_PHOTOS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    photos.add_argument("out_dir", metavar="OUT_DIR", help="output directory (the make-mini one is fine)")
    photos.add_argument("--seed", type=int, default=0, help="random seed: same seed, same bytes (default 0)")
    photos.add_argument("--scale", type=float, default=1.0, help="multiply every source's size (default 1)")
    photos.add_argument("--quiet", action="store_true", help="no progress bars")
    photos.set_defaults(func=_cmd_make_photos)
    show = verbs.add_parser("show", help="print the first samples of shards",
                            description="Print decoded samples (text, <image> placeholders, meta) from shards.")
    show.add_argument("shards", nargs="+", metavar="SHARD", help="tar files, globs or directories")
    show.add_argument("-n", type=int, default=5, help="how many samples (default 5)")
    show.set_defaults(func=_cmd_show)
