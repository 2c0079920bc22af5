"""idefics-mini's real-image training data and the held-out sets it is judged on: the held-out images never
enter training, made-up predictions look like a classifier's, and answers are graded as a person would."""

from __future__ import annotations

import random

import pytest

from idefics.data import photos
from idefics.data.synthetic import choose_held_out
from idefics.mini import heldout

DEBIAN_DATA = photos.CLIPART_DIR.is_dir() and photos.EMOJI_FONT.is_file() and photos.FASHION_DIR.is_dir()
needs_debian_data = pytest.mark.skipif(not DEBIAN_DATA, reason="Debian's openclipart-png, fonts-noto-color-emoji "
                                       "and dataset-fashion-mnist are not installed (.ci/run installs them)")


def test_made_up_predictions_rank_the_named_class_first():
    rng = random.Random(0)
    for _ in range(500):
        prediction = photos.made_up_prediction(rng)
        classes, probs = [c for c, _ in prediction], [p for _, p in prediction]
        assert len(set(classes)) == 5 and all(0 <= c < 1000 for c in classes)
        assert probs[0] == max(probs) and probs[0] > probs[1] and sum(probs) <= 1.0 + 1e-6
        assert 0.15 <= probs[0] <= 0.99
    tops = [photos.made_up_prediction(rng)[0][0] for _ in range(4000)]
    assert len(set(tops)) > 950  # the named class is drawn from all 1000


def test_the_last_300_digits_are_test_only_everywhere():
    last = set(range(1797 - 300, 1797))
    synthetic = choose_held_out(0, 1797)["digit_indices"]
    assert set(synthetic["test"]) == last
    assert not last & (set(synthetic["train"]) | set(synthetic["val"]))
    assert [d for _, d in heldout.real_digits()[:3]] == list(photos.load_digits_cached().target[-300:-297])


@needs_debian_data
def test_real_image_sources_never_use_the_held_out_images(tmp_path):
    indices = photos.split_indices(0)
    assert not set(indices["digits"]["train"]) & set(range(1497, 1797))
    assert not set(indices["digits"]["val"]) & set(indices["digits"]["train"])
    assert not set(indices["fashion"]["val"]) & set(indices["fashion"]["train"])
    manifest = photos.make_photo_data(str(tmp_path), sizes={"names": 6, "fashion": 6, "digits": 6},
                                      val_sizes={"names": 2, "fashion": 2, "digits": 2}, progress=False)
    from idefics.data.shards import ShardReader

    samples = list(ShardReader([str(tmp_path / p) for ps in manifest["shards"].values() for p in ps]))
    assert len(samples) == 24
    for sample in samples:
        task, answer = sample.meta["task"], sample.turns[1].content[0]
        if task == "name":
            assert sample.meta["class_probs"][0][0][0] == sample.meta["class"]
            assert sample.meta["name"].lower() in answer.lower()
        elif task == "fashion":
            assert sample.meta["name"].lower() in answer.lower()
        else:
            assert sample.meta["digit_index"] < 1497
    # the same seed gives the same bytes
    again = photos.make_photo_data(str(tmp_path / "again"), sizes={"names": 6, "fashion": 6, "digits": 6},
                                   val_sizes={"names": 2, "fashion": 2, "digits": 2}, progress=False)
    first = (tmp_path / manifest["shards"]["train/names"][0]).read_bytes()
    assert first == (tmp_path / "again" / again["shards"]["train/names"][0]).read_bytes()


def test_answers_are_graded_by_whole_words():
    assert heldout.mentions("An Egyptian Mau, a kind of cat.", ("cat", "kitten"))
    assert heldout.mentions("Two cats.", ("cat",)) and heldout.mentions("Some boxes", ("box",))
    assert not heldout.mentions("A category.", ("cat",))
    assert not heldout.mentions("A T-shirt.", ("shirt",)) and heldout.mentions("A shirt.", ("shirt",))
    assert heldout.mentions("a colour wheel", ("colour wheel",))
    assert heldout.digit_right(" 7", 7) and heldout.digit_right("seven", 7) and not heldout.digit_right("17", 7)


def test_every_bundled_photo_has_hand_written_truth():
    labels = [label for label, _ in heldout.bundled_photos()]
    assert "skimage chelsea" in labels and "sklearn flower.jpg" in labels
    assert all(label in heldout.PHOTO_TRUTH for label in labels)
