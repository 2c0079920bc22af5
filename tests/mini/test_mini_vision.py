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
from idefics.backbones.imagenet import (class_table, describe, name_embeddings, with_article, word_embeddings,
                                        word_token_ids)
from idefics.cross_attention import WORD_NORM, GatedCrossAttentionLayer
from idefics.data import Sample, Turn
from idefics.training.collate import Collator, Encoded, SampleEncoder
from idefics.vision import EfficientNetEncoder


def encoder(label_tokens: int = 3, width: int = 16, position_code: bool = True,
            label_words: int = 0) -> EfficientNetEncoder:
    torch.manual_seed(0)
    net = EfficientNetLite0().eval()
    enc = EfficientNetEncoder(net, label_tokens=label_tokens, label_width=width, position_code=position_code,
                              label_words=label_words)
    if label_tokens:
        enc.class_names.copy_(torch.randn(1000, width))
    if label_words:
        enc.class_words.copy_(torch.randn(1000, width))
        enc.class_word_ids.copy_(torch.randint(0, 49152, (1000, label_words)))
        enc.class_word_ids[::3, -1] = -1  # some classes have no kind
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


@torch.no_grad()
def test_label_words_ride_in_the_label_tokens_and_come_back_as_embeddings():
    enc = encoder(label_words=3)
    pixels = torch.rand(2, 3, 224, 224) * 2 - 1
    given = torch.zeros(2, 1000)
    given[:, 285], given[:, 281], given[:, 6] = 0.7, 0.2, 0.05
    tokens = enc(pixels, given)
    offset = 16 + 3 + 3  # name | probability, log-probability | rank one-hot | flag
    assert enc.word_offset == offset and enc.ids_offset == offset + 16
    for rank, cls in enumerate((285, 281, 6)):
        torch.testing.assert_close(tokens[:, 49 + rank, offset:offset + 16], enc.class_words[cls].expand(2, -1))
    assert not tokens[:, 49:, offset + 16 + 6:].any()
    embed = torch.nn.Embedding(49152, 16)
    for dtype in (torch.float32, torch.bfloat16):  # ids survive the model's dtype
        states = torch.cat([torch.randn(2, 4, 1280), tokens[:, 49:]], dim=1)[:, None].expand(2, 2, -1, -1)
        words = enc.words(states.to(dtype), embed)
        assert words.shape == (2, 2 * 7, 3, 16)
        for image in range(2):
            block = words[:, image * 7:(image + 1) * 7]
            assert not block[:, :4].any()  # latents carry no word
            for rank, cls in enumerate((285, 281, 6)):
                for slot, token in enumerate(enc.class_word_ids[cls].tolist()):
                    if token < 0:
                        assert not block[:, 4 + rank, slot].any()
                    else:
                        row = embed.weight[token]
                        torch.testing.assert_close(block[0, 4 + rank, slot], row / row.norm())
    with pytest.raises(ValueError, match="label_width"):
        EfficientNetEncoder(enc.net, label_tokens=5, label_width=700, label_words=2)


@torch.no_grad()
def test_word_path_adds_the_chosen_attended_word_at_the_gate_and_nothing_when_closed():
    """By hand: each head's slice of a slot's word is that head's softmax-weighted sum over the image tokens;
    the slots are mixed by `word_select`'s softmax (its first entry, "none", adds nothing)."""
    torch.manual_seed(0)
    dim, heads, image_dim, n, slots = 32, 4, 24, 6, 3
    layer = GatedCrossAttentionLayer(dim, 64, image_dim, heads, qk_norms=True, eps=1e-5, dense_needs_image=True,
                                     word_slots=slots)
    images = torch.randn(1, n, image_dim)
    words = torch.zeros(1, n, slots, dim)
    words[0, 4:] = torch.randn(2, slots, dim)  # the last two tokens carry words
    kv = layer.cross_attn.project_images(images, words)
    assert kv[1].shape == (1, heads, n, (1 + slots) * dim // heads)
    x = torch.randn(1, 3, dim)
    mask, gate = torch.zeros(1, 1, 3, n), torch.tensor([[1.0, 1.0, 0.0]])  # the last token sees no image
    torch.testing.assert_close(layer(x, kv, mask, gate), x)  # all gates closed: the identity
    layer.alpha_word.fill_(0.3)
    layer.word_select.weight.normal_()
    out = layer(x, kv, mask, gate)
    attn, hd = layer.cross_attn, dim // heads
    normed = layer.input_layernorm(x)
    q = attn.q_layer_norm(attn.q_proj(normed).view(1, 3, heads, hd)).double()
    k = attn.k_layer_norm(attn.k_proj(images).view(1, n, heads, hd)).double()
    weights = torch.einsum("bthd,bshd->bhts", q, k).div(hd ** 0.5).softmax(-1)
    per_slot = torch.einsum("bhts,bsjhd->btjhd", weights, words.double().view(1, n, slots, heads, hd))
    choice = layer.word_select(normed).double().softmax(-1)[..., 1:]
    word = torch.einsum("btj,btjd->btd", choice, per_slot.reshape(1, 3, slots, dim))
    expected = x.double() + WORD_NORM * math.tanh(0.3) * word * gate[..., None]
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(out[:, 2], x[:, 2])  # no image seen: untouched


def test_word_ids_are_the_name_tokens_then_the_kind():
    words = sorted({w for c in class_table() for w in f"{c['name']} {c['kind']}".split()} | {"A", "a", "An", "an"})
    vocab = {w: i for i, w in enumerate(["[UNK]"] + words)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    ids = word_token_ids(tokenizer, 4)
    assert ids.shape == (1000, 4)
    assert ids[285].tolist() == [vocab["Egyptian"], vocab["Mau"], -1, vocab["cat"]]  # an Egyptian Mau, a cat
    assert ids[281].tolist() == [vocab["tabby"], vocab["cat"], -1, -1]  # the kind is already in the name
    with_articles = word_token_ids(tokenizer, 6)  # then the article, capitalised and not
    assert with_articles[285].tolist() == [vocab["Egyptian"], vocab["Mau"], -1, vocab["cat"], vocab["An"], vocab["an"]]
    assert with_articles[872].tolist()[-2:] == [vocab["A"], vocab["a"]]  # a tripod
    weight = torch.randn(len(vocab), 8, generator=torch.Generator().manual_seed(0))
    table = word_embeddings(weight, tokenizer)
    expected = weight[vocab["Egyptian"]]
    torch.testing.assert_close(table[285], expected / expected.norm())
    torch.testing.assert_close(table.norm(dim=-1), torch.ones(1000))
