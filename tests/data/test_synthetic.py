"""The synthetic idefics-mini generator: determinism, split hygiene, ground truth that matches the pixels."""

import argparse
import hashlib
import json
import os
import re
from collections import Counter

import numpy as np
import pytest
from skimage.measure import label as connected_components
from sklearn.datasets import load_digits

from idefics.data import ShardReader
from idefics.data.render import BACKGROUNDS, COLOURS, IMAGE_SIZE, POSITIONS
from idefics.data.synthetic import make_mini_data, register, source_counts

SIZES = {"n_train": 150, "n_val": 40, "n_test": 80}


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mini"))
    manifest = make_mini_data(out, seed=0, samples_per_shard=20, progress=False, **SIZES)
    samples = {split: list(ShardReader(os.path.join(out, split))) for split in ("train", "val", "test")}
    return out, manifest, samples


def file_hashes(root: str) -> dict[str, str]:
    hashes = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            hashes[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return hashes


def image_metas(sample) -> list[dict]:
    """The ground truth of every image of a sample, whatever its kind."""
    return sample.meta["images"] if "images" in sample.meta else [sample.meta] if sample.images else []


def test_same_seed_same_bytes_other_seed_other_bytes(mini, tmp_path):
    out, manifest, _ = mini
    again = make_mini_data(str(tmp_path / "again"), seed=0, samples_per_shard=20, progress=False, **SIZES)
    assert again == manifest
    assert file_hashes(str(tmp_path / "again")) == file_hashes(out)
    other = make_mini_data(str(tmp_path / "other"), seed=1, n_train=30, n_val=10, n_test=10, progress=False)
    assert other["held_out"] != manifest["held_out"]
    first = lambda h: {k: v for k, v in h.items() if k.startswith("train/digit_pairs")}  # noqa: E731
    assert first(file_hashes(str(tmp_path / "other"))) != first(file_hashes(out))


def test_manifest_counts_match_the_shards(mini):
    out, manifest, samples = mini
    for split, info in manifest["splits"].items():
        assert info["total"] == SIZES[f"n_{split}"] == len(samples[split])
        by_source = Counter(s.key.split("-")[0] for s in samples[split])
        assert by_source == {k: v for k, v in info["samples"].items() if v}
        assert sorted(info["shards"]) == sorted(os.path.relpath(p, out) for p in {s.shard for s in samples[split]})
        assert info["images"] >= sum(len(s.images) for s in samples[split]) > 0
    assert json.load(open(os.path.join(out, "manifest.json"))) == manifest
    assert sum(source_counts(997).values()) == 997


def test_no_image_in_two_splits(mini):
    _, _, samples = mini
    owner: dict[str, str] = {}
    for split, split_samples in samples.items():
        for sample in split_samples:
            for image in sample.images:
                digest = hashlib.sha1(np.asarray(image).tobytes()).hexdigest()
                assert owner.setdefault(digest, split) == split, f"{sample.key} reuses an image of {owner[digest]}"


def test_digit_images_are_split_by_index(mini):
    _, manifest, samples = mini
    indices = manifest["held_out"]["digit_indices"]
    assert not set(indices["train"]) & set(indices["test"]) and not set(indices["val"]) & set(indices["test"])
    assert not set(indices["train"]) & set(indices["val"])
    targets = load_digits().target
    for split, split_samples in samples.items():
        used = [m for s in split_samples for m in image_metas(s) if m["task"] == "digit"]
        assert used, split
        for m in used:
            assert m["digit_index"] in indices[split] and m["digit"] == targets[m["digit_index"]]


def test_held_out_combinations_and_words_only_in_test(mini):
    _, manifest, samples = mini
    combos = {tuple(c) for c in manifest["held_out"]["colour_shape"]}
    words = set(manifest["held_out"]["words"])
    assert len({c for c, _ in combos}) == len(combos) == len({s for _, s in combos})  # colours, shapes stay seen

    def seen(split):
        metas = [m for s in samples[split] for m in image_metas(s)]
        objects = {(o["colour"], o["shape"]) for m in metas if m["task"] == "scene" for o in m["objects"]}
        texts = {m["text"] for m in metas if m["task"] == "text"}
        return objects, texts

    for split in ("train", "val"):
        objects, texts = seen(split)
        assert not objects & combos and not texts & words
        all_text = " ".join(x for s in samples[split] for x in s.items + [c for t in s.turns for c in t.content]
                            if isinstance(x, str))
        assert not [w for w in words if re.search(rf"\b{w}\b", all_text, re.IGNORECASE)]
    objects, texts = seen("test")
    assert objects & combos and texts & words
    assert manifest["splits"]["test"]["held_out_samples"] > 0 == manifest["splits"]["train"]["held_out_samples"]


def cell_of(x: float, y: float) -> str:
    return POSITIONS[int(y // (IMAGE_SIZE / 3)) * 3 + int(x // (IMAGE_SIZE / 3))]


def test_scene_meta_matches_pixels(mini):
    _, _, samples = mini
    scenes = [s for s in samples["train"] + samples["test"] if s.kind == "pair" and s.meta["task"] == "scene"]
    assert len(scenes) >= 20 and {s.meta["mode"] for s in scenes} == {"single", "count", "mixed"}
    for sample in scenes:
        pixels = np.asarray(sample.images[0])
        background = np.all(pixels == BACKGROUNDS[sample.meta["background"]], axis=-1)
        colours = Counter(o["colour"] for o in sample.meta["objects"])
        assert background.mean() > 0.5
        for colour, rgb in COLOURS.items():
            mask = np.all(pixels == rgb, axis=-1)
            components, n = connected_components(mask, return_num=True, connectivity=2)
            assert n == colours[colour], (sample.key, colour)  # one blob per object of that colour, none else
            blobs = [np.argwhere(components == i + 1).mean(axis=0) for i in range(n)]
            expected = sorted(o["position"] for o in sample.meta["objects"] if o["colour"] == colour)
            assert sorted(cell_of(x, y) for y, x in blobs) == expected, sample.key
        palette = np.array([BACKGROUNDS[sample.meta["background"]], *COLOURS.values()])
        assert (pixels[:, :, None, :] == palette).all(-1).any(-1).all()  # no other colour: no anti-aliasing


def test_digit_meta_matches_pixels(mini):
    _, _, samples = mini
    digits = load_digits()
    checked = 0
    for sample in samples["train"]:
        if sample.kind != "pair" or sample.meta["task"] != "digit" or sample.meta["interpolation"] != "nearest":
            continue
        x, y, size = sample.meta["digit_box"]
        grey = np.asarray(sample.images[0])[..., 0].astype(int)
        cell = size // 8  # sample the centre of each upscaled 8x8 cell
        small = grey[y + cell // 2: y + size: cell, x + cell // 2: x + size: cell]
        if sample.meta["polarity"] == "black on white":
            small = 255 - small
        expected = np.round(digits.images[sample.meta["digit_index"]] * 255 / 16)
        assert np.array_equal(small, expected), sample.key
        checked += 1
    assert checked >= 3


def test_chat_samples_follow_the_instruct_format(mini):
    _, _, samples = mini
    chats = [s for s in samples["train"] if s.kind == "chat" and s.meta["task"] == "chat"]
    assert chats
    for sample in chats:
        roles = [t.role for t in sample.turns]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert not isinstance(sample.turns[0].content[0], str)  # the image comes first in the first user turn
        for qa, answer_turn in zip(sample.meta["qa"], sample.turns[1::2]):
            assert qa["answer"] in answer_turn.content[0]
            image_meta = sample.meta["images"][qa["image"]]
            if qa["question_type"] == "count" and qa["question"].startswith(("How many objects", "Count")):
                assert qa["answer"] == str(len(image_meta["objects"]))
            if qa["question_type"] in ("digit", "read"):
                assert qa["answer"] == str(image_meta.get("digit", image_meta.get("text")))
    text_only = [s for s in samples["train"] if s.meta["task"] == "text_only"]
    assert text_only and all(not s.images for s in text_only)


def test_cli_verb(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="idefics")
    register(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "make-mini", "--help"])
    assert "held" in capsys.readouterr().out
    args = parser.parse_args(["data", "make-mini", str(tmp_path), "--n-train", "12", "--n-val", "6", "--n-test", "6",
                              "--quiet"])
    assert args.func(args) == 0
    assert json.load(open(tmp_path / "manifest.json"))["splits"]["train"]["total"] == 12
    with pytest.raises(FileExistsError, match="overwrite"):
        args.func(args)
    args = parser.parse_args(["data", "show", str(tmp_path / "train"), "-n", "2"])
    assert args.func(args) == 0 and capsys.readouterr().out.count("--- ") == 2


def test_an_image_already_in_another_split_is_redrawn():
    from PIL import Image

    from idefics.data.synthetic import SplitContext, choose_held_out

    first, second = Image.new("RGB", (4, 4), "red"), Image.new("RGB", (4, 4), "blue")
    registry = {hashlib.sha1(first.tobytes()).digest(): "test"}
    ctx = SplitContext("train", choose_held_out(0, 1797), load_digits(), registry)
    draws = iter([(first, {"n": 1}), (second, {"n": 2})])
    image, params = ctx.unique(lambda: next(draws))
    assert params == {"n": 2} and registry[hashlib.sha1(second.tobytes()).digest()] == "train"
    assert ctx.unique(lambda: (second, {"n": 3}))[1] == {"n": 3}  # reuse inside one split is fine
