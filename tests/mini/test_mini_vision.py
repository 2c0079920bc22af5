"""idefics-mini's vision encoder: class-name tokens from the frozen classifier, the position code, made-up
predictions through training batches, and the ImageNet class table they speak."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from idefics.backbones.efficientnet import EfficientNetLite0
from idefics.backbones.imagenet import class_table, describe, name_embeddings, with_article
from idefics.data import Sample, Turn
from idefics.training.collate import Collator, Encoded, SampleEncoder
from idefics.vision import EfficientNetEncoder


def encoder(label_tokens: int = 3, width: int = 16, position_code: bool = True) -> EfficientNetEncoder:
    torch.manual_seed(0)
    net = EfficientNetLite0().eval()
    enc = EfficientNetEncoder(net, label_tokens=label_tokens, label_width=width, position_code=position_code)
    if label_tokens:
        enc.class_names.copy_(torch.randn(1000, width))
    return enc.eval()


@torch.no_grad()
def test_label_tokens_carry_the_classifiers_top_classes():
    enc = encoder()
    pixels = torch.rand(2, 3, 224, 224) * 2 - 1
    tokens = enc(pixels)
    assert tokens.shape == (2, 49 + 3, 1280) and enc.num_tokens == 52
    features = enc.net.forward_features(pixels)
    probs = enc.net._fc(features.mean(1)).softmax(-1)
    top = probs.topk(3, dim=-1)
    for image in range(2):
        for rank in range(3):
            token = tokens[image, 49 + rank]
            torch.testing.assert_close(token[:16], enc.class_names[top.indices[image, rank]])
            assert token[16].item() == pytest.approx(top.values[image, rank].item(), rel=1e-5)
            assert token[16 + 1].item() == pytest.approx(math.log(top.values[image, rank].item()) / 10, rel=1e-4)
            assert token[18:21].tolist() == [float(r == rank) for r in range(3)] and token[21].item() == 1.0
            assert not token[22:].any()


@torch.no_grad()
def test_made_up_predictions_replace_the_classifiers_where_given():
    enc = encoder()
    pixels = torch.rand(2, 3, 224, 224) * 2 - 1
    own = enc(pixels)
    given = torch.full((2, 1000), float("nan"))
    given[1] = 0.0
    given[1, 285], given[1, 281], given[1, 7] = 0.7, 0.2, 0.05
    tokens = enc(pixels, given)
    torch.testing.assert_close(tokens[0], own[0])  # a NaN row keeps the classifier's prediction
    torch.testing.assert_close(tokens[1, :49], own[1, :49])  # features untouched
    assert [tokens[1, 49 + r, 16].item() for r in range(3)] == pytest.approx([0.7, 0.2, 0.05])
    torch.testing.assert_close(tokens[1, 49, :16], enc.class_names[285])


@torch.no_grad()
def test_position_code_tells_grid_cells_apart_and_is_added_to_the_features():
    code = EfficientNetEncoder.sinusoidal_grid()
    assert code.shape == (49, 1280) and code.abs().max() <= EfficientNetEncoder.POSITION_AMPLITUDE + 1e-6
    distances = torch.cdist(code, code) + torch.eye(49) * 1e9
    assert distances.min() > 1.0  # every cell has its own code
    # even channels follow the row only: cells in one row share them
    torch.testing.assert_close(code[0, 0::2], code[6, 0::2])
    enc = encoder(label_tokens=0, position_code=True)
    pixels = torch.rand(1, 3, 224, 224) * 2 - 1
    torch.testing.assert_close(enc(pixels), enc.net.forward_features(pixels) + code)


def test_class_table_names_everyday_kinds_from_wordnet():
    table = class_table()
    assert len(table) == 1000
    assert table[281]["name"] == "tabby cat" and table[281]["kind"] == "cat"
    assert describe(285) == "an Egyptian Mau, a kind of cat"  # ImageNet's "Egyptian cat"
    assert "Egyptian cat" in table[285]["synonyms"]
    assert describe(967) == "an espresso, a kind of coffee"
    assert describe(207).endswith("a kind of dog")  # golden retriever
    assert describe(954) == "a banana, a kind of fruit"
    assert describe(281) == "a tabby cat"  # the kind is already in the name
    assert with_article("trousers") == "trousers" and with_article("apple") == "an apple"


def test_name_embeddings_average_the_name_and_kind_tokens_at_unit_rms():
    words = sorted({w for c in class_table() for w in f"{c['name']} {c['kind']}".split()})
    vocab = {w: i for i, w in enumerate(["[UNK]"] + words)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    weight = torch.randn(len(vocab), 8, generator=torch.Generator().manual_seed(0))
    table = name_embeddings(weight, tokenizer)
    assert table.shape == (1000, 8)
    expected = weight[[vocab["Egyptian"], vocab["Mau"], vocab["cat"]]].mean(0)  # "Egyptian Mau" + kind "cat"
    torch.testing.assert_close(table[285], expected / expected.square().mean().sqrt())
    torch.testing.assert_close(table.square().mean(-1), torch.ones(1000))


def test_batches_carry_made_up_predictions_per_image():
    from idefics.processor import ImageSettings
    from tests.training.fixtures import image, word_tokenizer

    tok = word_tokenizer("what a cat".split())[0]
    enc = SampleEncoder(tok, ImageSettings(size=28), seq_len=64)
    chat = lambda key, meta: Sample("chat", key, turns=[Turn("user", [image(1), "What?"]),  # noqa: E731
                                                       Turn("assistant", ["A cat."])], meta=meta)
    given = enc(chat("a", {"class_probs": [[[285, 0.7], [281, 0.2]]]}))
    plain = enc(chat("b", {}))
    assert given.class_probs == [{285: 0.7, 281: 0.2}] and plain.class_probs == [None]
    collate = Collator(tok.pad_token_id, enc.image_token_id, tok.eos_token_id, 28)
    batch = collate([[plain, given], [plain]])
    probs = batch["image_class_probs"]
    assert probs.shape == (2, 2, 1000)
    assert probs[0, 0].isnan().all() and probs[1].isnan().all()  # images without: the classifier's own
    assert probs[0, 1, 285].item() == pytest.approx(0.7) and probs[0, 1].nansum().item() == pytest.approx(0.9)
    assert "image_class_probs" not in collate([[plain]])
    with pytest.raises(ValueError, match="class_probs"):
        enc(chat("c", {"class_probs": [[285, 0.7]]}))  # not one list per image


def test_encoded_defaults_keep_positional_fields():
    e = Encoded([1], [1], [], "k", "s", "src")
    assert (e.key, e.shard, e.source, e.class_probs) == ("k", "s", "src", [])
