"""Test helpers for the training tests: a word-level tokenizer whose tokens are known by hand, tiny shards,
and the tiny training config (configs/tiny.yaml) pointed at them."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image

from tests.helpers import REPO  # noqa: E402
SPECIALS = ["<unk>", "<s>", "</s>"]
IDEFICS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
WORDS = "cat dog tree red blue green apples picture park the a shows what is in this image user assistant".split()


def word_tokenizer(words: list[str]):
    """A WordLevel tokenizer: every word and punctuation mark is one token, so tests can spell the exact
    token sequence. Base vocabulary = specials + words (+ punctuation); IDEFICS tokens come right after."""
    from tokenizers import AddedToken, Tokenizer as RustTokenizer, models, pre_tokenizers

    from idefics.tokenizer import Tokenizer

    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(set(words) | set(".,:?!")))}
    rust = RustTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    rust.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS + IDEFICS])
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    return Tokenizer(rust, special, IDEFICS), len(vocab)


def image(seed: int, size: int = 20) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def caption(i: int) -> str:
    rng = random.Random(i)
    # a learnable pattern: the caption names the image's index parity, plus noise words
    return ("red cat" if i % 2 else "blue dog") + " " + " ".join(rng.choices(WORDS[:10], k=2))


def write_shards(folder: Path, n: int = 48, per_shard: int = 16, kinds: str = "pdc", start: int = 0) -> Path:
    """Shards of pairs (p), documents (d), chats (c) and text-only documents (t), cycling through `kinds`."""
    from idefics.data import Sample, ShardWriter, Turn

    folder.mkdir(parents=True, exist_ok=True)
    with ShardWriter(str(folder / "part-%05d.tar"), max_count=per_shard) as writer:
        for i in range(start, start + n):
            kind = kinds[i % len(kinds)]
            if kind == "t":  # text only
                writer.write(Sample("document", f"t{i}", items=[caption(i) + " " + caption(i + 1)]))
            elif kind == "p":
                writer.write(Sample("pair", f"p{i}", items=[image(i), caption(i)]))
            elif kind == "d":
                writer.write(Sample("document", f"d{i}", items=["the picture", image(i), caption(i),
                                                                 image(i + 7), caption(i + 7)]))
            else:
                writer.write(Sample("chat", f"c{i}", turns=[Turn("user", [image(i), "what is in this image?"]),
                                                            Turn("assistant", [caption(i)])]))
    return folder


def tiny_setup(root: Path) -> tuple[Path, Path]:
    """(tokenizer folder, shard folder) for configs/tiny.yaml, built once per folder."""
    from tests.reference_checkpoints import make_tokenizer

    tok, data = root / "tok", root / "data"
    if not (tok / "tokenizer.json").exists():
        make_tokenizer(tok, 400, instruct=True)
    if not data.exists():
        write_shards(data)
    return tok, data


def tiny_overrides(root: Path, out: Path, *extra: str) -> list[str]:
    tok, data = tiny_setup(root)
    return [f"model.tokenizer={tok}", f"data.train=[{{shards: {data}}}]", f"out_dir={out}", *extra]


TINY = REPO / "configs" / "tiny.yaml"


def tiny_config(root: Path, out: Path, *extra: str):
    """configs/tiny.yaml pointed at the tiny tokenizer and shards under `root`, writing to `out`."""
    from idefics.training.config import load_config

    return load_config(TINY, tiny_overrides(root, out, *extra))


def losses(out: Path, split: str = "train") -> list[float]:
    """The losses a run logged in metrics.jsonl, in order."""
    import json

    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["split"] == split]
