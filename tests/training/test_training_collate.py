"""Samples → tokens, labels, packing and image masks, checked token by token against hand-written sequences."""

from __future__ import annotations

import pytest
import torch

from idefics.data import DataError, Sample, Turn
from idefics.processor import ImageSettings, Processor
from idefics.training.collate import IGNORE_INDEX, Collator, SampleEncoder, pack
from tests.training.fixtures import image, word_tokenizer

FAKE, IMG, EOU = "<fake_token_around_image>", "<image>", "<end_of_utterance>"


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer("the picture shows a red cat what is in this image User Assistant blue dog".split())[0]


def encoder(tok, seq_len=64, max_images=4):
    return SampleEncoder(tok, ImageSettings(size=28), seq_len, max_images)


def spell(tok, ids):
    return [tok.id_to_token(i) for i in ids]


def targets(tok, enc):
    return [tok.id_to_token(t) for t in enc.labels if t != IGNORE_INDEX]


def test_pair_trains_caption_and_eos_only(tok):
    enc = encoder(tok)(Sample("pair", "k", items=[image(0), "a red cat."]))
    assert spell(tok, enc.input_ids) == ["<s>", FAKE, IMG, FAKE, "a", "red", "cat", ".", "</s>"]
    assert targets(tok, enc) == ["a", "red", "cat", ".", "</s>"]
    assert [lab == IGNORE_INDEX for lab in enc.labels] == [True] * 4 + [False] * 5
    assert len(enc.images) == 1 and enc.images[0].shape == (3, 28, 28)


def test_document_interleaves_and_shares_fake_tokens_between_consecutive_images(tok):
    items = ["the picture", image(0), image(1), "shows a cat", image(2), "a dog"]
    enc = encoder(tok)(Sample("document", "k", items=items))
    assert spell(tok, enc.input_ids) == ["<s>", "the", "picture", FAKE, IMG, FAKE, IMG, FAKE, "shows", "a", "cat",
                                         FAKE, IMG, FAKE, "a", "dog", "</s>"]
    assert targets(tok, enc) == ["the", "picture", "shows", "a", "cat", "a", "dog", "</s>"]
    assert len(enc.images) == 3


def test_chat_trains_assistant_turns_only(tok):
    sample = Sample("chat", "k", turns=[Turn("user", [image(0), "what is in this image?"]),
                                        Turn("assistant", ["a red cat."]),
                                        Turn("user", ["what is this?"]),
                                        Turn("assistant", ["a dog"])])
    enc = encoder(tok)(sample)
    assert spell(tok, enc.input_ids) == [
        "<s>", "User", ":", FAKE, IMG, FAKE, "what", "is", "in", "this", "image", "?", EOU,
        "Assistant", ":", "a", "red", "cat", ".", EOU,
        "User", ":", "what", "is", "this", "?", EOU,
        "Assistant", ":", "a", "dog", EOU, "</s>"]
    labelled = [(tok.id_to_token(i), lab != IGNORE_INDEX) for i, lab in zip(enc.input_ids, enc.labels)]
    assert [t for t, on in labelled if on] == ["a", "red", "cat", ".", EOU, "a", "dog", EOU]
    # the user's EOU tokens and the final eos are not targets
    assert [on for t, on in labelled if t == EOU] == [False, True, False, True]
    assert labelled[-1] == ("</s>", False)


def test_chat_text_is_what_inference_builds(tok):
    """The training string's prompt part is exactly what the processor builds for the same conversation."""
    processor = Processor(tok, ImageSettings(size=28))
    enc = encoder(tok)(Sample("chat", "k", turns=[Turn("user", [image(0), "what is this?"]),
                                                  Turn("assistant", ["a cat"])]))
    prompt = processor([["User:", image(0), f"what is this?{EOU}\nAssistant:"]], add_end_of_utterance_token=False)
    n = prompt["input_ids"].shape[1]
    assert enc.input_ids[:n] == prompt["input_ids"][0].tolist()
    assert all(lab == IGNORE_INDEX for lab in enc.labels[:n])
    assert torch.equal(enc.images[0], prompt["pixel_values"][0, 0])


def test_packing_keeps_each_text_on_its_own_image(tok):
    enc = encoder(tok, seq_len=20)
    samples = [enc(Sample("pair", f"k{i}", items=[image(i), text])) for i, text in
               enumerate(["a red cat", "a blue dog", "the tree"])]
    rows = list(pack(samples, seq_len=20, max_images=4))
    assert [len(r) for r in rows] == [2, 1]  # 8 + 8 tokens fit in 20, the third does not
    batch = Collator(tok.pad_token_id, tok.require_id(IMG), tok.eos_token_id, 28)(rows)
    row = spell(tok, batch["input_ids"][0].tolist())
    assert row[:16] == ["<s>", FAKE, IMG, FAKE, "a", "red", "cat", "</s>",
                        "<s>", FAKE, IMG, FAKE, "a", "blue", "dog", "</s>"]
    mask = batch["image_attention_mask"][0]  # [T, N]
    sees = [int(m.argmax()) if m.any() else None for m in mask]
    assert sees[:16] == [None, None, 0, 0, 0, 0, 0, 0, None, None, 1, 1, 1, 1, 1, 1]
    assert all(s is None for s in sees[16:])  # padding
    labels = batch["labels"][0]
    # the second sample's first token is not a target: nothing is predicted across the boundary
    assert labels[8] == IGNORE_INDEX and labels[7] == tok.eos_token_id
    assert batch["attention_mask"][0].tolist() == [1] * 16
    assert batch["attention_mask"][1].tolist() == [1] * 7 + [0] * 9
    assert (batch["labels"][1, 7:] == IGNORE_INDEX).all()
    assert batch["pixel_values"].shape == (2, 2, 3, 28, 28)
    assert torch.equal(batch["pixel_values"][0, 1], samples[1].images[0])
    assert not batch["pixel_values"][1, 1].any()  # image slot padding


def test_pack_respects_image_limit(tok):
    enc = encoder(tok, seq_len=100)
    samples = [enc(Sample("pair", f"k{i}", items=[image(i), "a cat"])) for i in range(5)]
    assert [len(r) for r in pack(samples, seq_len=100, max_images=2)] == [2, 2, 1]


def test_bad_samples_raise_data_errors_naming_the_key(tok):
    enc = encoder(tok, seq_len=8)
    with pytest.raises(DataError, match="longer than seq_len=8") as error:
        enc(Sample("pair", "long", items=[image(0), "a red cat the red cat"], shard="s.tar"))
    assert error.value.key == "long" and error.value.category == "too_long"
    with pytest.raises(DataError, match="failed|not a readable image") as error:
        encoder(tok)(Sample("pair", "broken", items=[b"\x89PNG\r\n\x1a\nnot really", "a cat"]))
    assert error.value.key == "broken" and error.value.category == "image"
    with pytest.raises(DataError, match="images must be image items"):
        encoder(tok)(Sample("pair", "marker", items=[image(0), f"a {IMG} cat"]))
    with pytest.raises(DataError, match="more than max_images=1"):
        encoder(tok, max_images=1)(Sample("document", "many", items=[image(0), "a", image(1), "b"]))


def test_ids_match_processor_with_a_bpe_tokenizer(tmp_path):
    """With a real BPE tokenizer, a pair's tokens equal the processor's for the same items, plus eos."""
    from tests.reference_checkpoints import make_tokenizer

    from idefics.tokenizer import Tokenizer

    make_tokenizer(tmp_path, 400, instruct=True)
    bpe = Tokenizer.from_folder(tmp_path)
    enc = encoder(bpe)(Sample("pair", "k", items=[image(3), "The quick brown fox jumps over the lazy dog"]))
    prompt = Processor(bpe, ImageSettings(size=28))([[image(3), "The quick brown fox jumps over the lazy dog"]])
    assert enc.input_ids == prompt["input_ids"][0].tolist() + [bpe.eos_token_id]
    n_prompt_marker = 4  # <s> <fake> <image> <fake>
    assert all(lab == IGNORE_INDEX for lab in enc.labels[:n_prompt_marker])
    assert enc.labels[n_prompt_marker:] == enc.input_ids[n_prompt_marker:]
