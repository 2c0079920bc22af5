"""The Idefics2 processor against the reference `Idefics2Processor` (transformers 5.23, PIL image backend):
identical input_ids, attention_mask, pixel_values and pixel_attention_mask, and identical chat-template
rendering. No model is needed here, only the test tokenizer."""

from __future__ import annotations

import base64
import io

import pytest
import torch

from idefics.idefics2.processor import (DEFAULT_CHAT_TEMPLATE, Idefics2ImageSettings, Idefics2Processor,
                                        expand_image_tokens, render_default_chat, resized_size)
from idefics.tokenizer import Tokenizer
from tests.idefics2.test_idefics2 import HUB_CHAT_TEMPLATE, IMAGE_SEQ_LEN, SIZE, make_idefics2_tokenizer, noise_image, \
    reference_processor


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("idefics2_tokenizer")
    make_idefics2_tokenizer(path)
    return path


def ours(folder, splitting: bool) -> Idefics2Processor:
    return Idefics2Processor(Tokenizer.from_folder(folder), Idefics2ImageSettings(do_image_splitting=splitting,
                                                                                  size=dict(SIZE)), IMAGE_SEQ_LEN)


def assert_same(mine: dict, theirs) -> None:
    assert sorted(mine) == sorted(theirs.keys())
    for key in theirs:
        assert mine[key].shape == theirs[key].shape, key
        assert mine[key].dtype == theirs[key].dtype, key
        assert torch.equal(mine[key], theirs[key]), key


IMAGES = {  # width x height: wider than tall, taller than longest_edge, below shortest_edge, odd sizes
    "wide": (70, 40), "tall": (120, 200), "tiny": (15, 10), "square": (25, 25), "odd": (57, 43)}


def image(name: str, mode: str = "RGB"):
    return noise_image(sorted(IMAGES).index(name), *IMAGES[name], mode=mode)


def exif_rotated(name: str):
    """A JPEG whose EXIF orientation (6: rotate 90° clockwise) must be applied before processing."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image(name).save(buffer, format="JPEG", exif=exif)
    return Image.open(io.BytesIO(buffer.getvalue()))


CASES = {
    "batch, several images, sizes differ": (
        ["User:<image>Describe this image.<end_of_utterance>\nAssistant:",
         "The quick<image> brown fox<image><image>jumps"],
        lambda: [[image("wide")], [image("tall"), image("tiny"), image("odd")]]),
    "flat image list shared out over prompts": (
        ["<image>In this image, we can see<image>", "In which city is that bridge located?<image>\n"],
        lambda: [image("square"), image("wide"), image("tall")]),
    "one string, one image": ("Where are the cow and chicken?<image>", lambda: image("odd")),
    "text only": (["Question: How many apples are there?", "A cat"], lambda: None),
    "images only": (None, lambda: [[image("wide"), image("tiny")], [image("tall")]]),
    "alpha, grey and EXIF-rotated images": (
        ["<image>a<image>b<image>"], lambda: [[image("wide", "RGBA"), image("tall", "L"), exif_rotated("odd")]]),
}


@pytest.mark.parametrize("splitting", [False, True], ids=["no-split", "split"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_equal_reference(folder, case, splitting):
    text, make_images = CASES[case]
    images = make_images()
    kwargs = {k: v for k, v in (("text", text), ("images", images)) if v is not None}
    theirs = reference_processor(folder, splitting)(**kwargs, padding=True, return_tensors="pt")
    assert_same(ours(folder, splitting)(**kwargs), theirs)


def test_per_call_options_equal_reference(folder):
    """`size` and `do_image_splitting` per call, as in the model card; splitting set per call changes the
    text layout too (the reference reads it from its image processor, so we build that one split)."""
    texts, images = ["User:<image>What is this?", "<image>Hi"], [[image("tall")], [image("wide")]]
    size = {"shortest_edge": 14, "longest_edge": 35}
    theirs = reference_processor(folder, True)(text=texts, images=images, size=size, padding=True,
                                               return_tensors="pt")
    assert_same(ours(folder, False)(text=texts, images=images, size=size, do_image_splitting=True), theirs)


def test_interleaved_prompts_equal_text_convention(folder):
    processor = ours(folder, True)
    png = io.BytesIO()
    image("odd").save(png, format="PNG")
    data_uri = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    interleaved = processor([["User:", image("wide"), "Describe.", data_uri], ["A cat", image("tiny")]])
    reference_style = processor(text=["User:<image>Describe.<image>", "A cat<image>"],
                                images=[[image("wide"), image("odd")], [image("tiny")]])
    assert_same(interleaved, reference_style)
    assert_same(processor(["A", image("wide")]), processor(text="A<image>", images=image("wide")))


def test_resized_size_by_hand():
    size = {"shortest_edge": 21, "longest_edge": 56}
    assert resized_size(200, 120, size) == (56, 33)  # tall: height to 56, width int(56 * 0.6)
    assert resized_size(40, 70, size) == (32, 56)  # wide: width to 56, height int(56 / 1.75)
    assert resized_size(10, 15, size) == (21, 21)  # small: each side raised to 21
    assert resized_size(30, 300, size) == (21, 56)  # very wide: height int(5.6) = 5, then raised to 21
    assert resized_size(10, 15, {"height": 8, "width": 9}) == (8, 9)


def test_space_after_closing_fake_token_is_pinned():
    fake, img = "<fake_token_around_image>", "<image>"
    one = fake + img * 2 + fake
    assert expand_image_tokens("<image>What", 2, False) == one + " What"  # transformers 5.x
    assert expand_image_tokens("<image>What", 2, False, space_after_image=False) == one + "What"  # 4.4x
    assert expand_image_tokens("<image> What<image>\n", 2, False) == one + " What" + one + "\n"
    assert expand_image_tokens("<image><image>", 1, True) == (fake + img) * 10 + fake


CONVERSATIONS = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What do we see?"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "What is in"}, {"type": "image"},
                                  {"type": "text", "text": "and"}, {"type": "image"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "Two dogs."}]},
     {"role": "user", "content": [{"type": "text", "text": "Where?"}]}],
]


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_chat_template_matches_reference(folder, generation_prompt):
    reference = reference_processor(folder, False)
    processor = ours(folder, False)
    assert processor.chat_template == DEFAULT_CHAT_TEMPLATE == HUB_CHAT_TEMPLATE
    for conversation in CONVERSATIONS:
        expected = reference.apply_chat_template(conversation, add_generation_prompt=generation_prompt)
        assert processor.apply_chat_template(conversation, add_generation_prompt=generation_prompt) == expected
        assert render_default_chat(conversation, generation_prompt) == expected  # the renderer without jinja2
    assert processor.apply_chat_template(CONVERSATIONS, add_generation_prompt=generation_prompt) == [
        reference.apply_chat_template(c, add_generation_prompt=generation_prompt) for c in CONVERSATIONS]


def test_chat_template_documented_example(folder):
    text = ours(folder, False).apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True)
    assert text == "User:<image>What do we see?<end_of_utterance>\nAssistant:"
    plain = ours(folder, False).apply_chat_template([{"role": "user", "content": "Hello"}])
    assert plain == "User: Hello<end_of_utterance>\n"


def test_bad_inputs_give_clear_errors(folder):
    processor = ours(folder, False)
    with pytest.raises(ValueError, match="nothing to process"):
        processor()
    with pytest.raises(TypeError, match="text must be a string"):
        processor(text=[1, 2])
    with pytest.raises(ValueError, match="prompt 0 has 1 <image> markers but 0 images"):
        processor(text="<image>a")
    with pytest.raises(TypeError, match="not a mix"):
        processor(text=["<image>", "<image>"], images=[[image("wide")], image("wide")])
    with pytest.raises(ValueError, match="2 image lists for 1 prompts"):
        processor(text=["<image>"], images=[[image("wide")], [image("wide")]])
    with pytest.raises(ValueError, match="return_tensors"):
        processor(text="a", return_tensors="np")
    with pytest.raises(ValueError, match="unsupported item type"):
        processor(["a", 3.5])
    with pytest.raises(TypeError, match="carry their images inline"):
        processor([["a", image("wide")]], images=[image("wide")])
    with pytest.raises(ValueError, match="chat template: no system"):
        processor.apply_chat_template(CONVERSATIONS[0], chat_template="{{ raise_exception('no system') }}")
    with pytest.raises(ValueError, match="message 0"):
        processor.apply_chat_template([{"content": "no role"}])
    processor.max_length = 5
    with pytest.raises(ValueError, match="at most 5"):
        processor(text="<image>", images=image("wide"))
