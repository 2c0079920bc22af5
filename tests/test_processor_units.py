"""The processor's pure functions on hand-computed vectors, and image items that must fail clearly."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import idefics
from tests.helpers import png_bytes, random_image
from idefics.images import ImageError, ImagePolicy, load_image, preprocess, to_rgb
from idefics.processor import classify_items, image_attention_mask, prompt_text

F, I, E = "<fake_token_around_image>", "<image>", "<end_of_utterance>"


def test_prompt_text_layout():
    kinds = classify_items(["User:", "img-a", "img-b", " Describe. ", "Next", "img-c"])
    kinds = [("image", k[1]) if k[1].startswith("img") else k for k in kinds]
    assert prompt_text(kinds, "<s>") == f"<s>User:{F}{I}{F}{I}{F}Describe.Next{F}{I}{F}"
    assert prompt_text(kinds, "<s>", add_end_of_utterance_token=True) == \
        f"<s>User:{F}{I}{F}{I}{F}Describe.{E}Next{F}{I}{F}"
    assert prompt_text([("text", "hi")], "<s>", "</s>", add_eos_token=True) == "<s>hi</s>"


def test_urls_and_data_uris_are_images_other_strings_are_text():
    kinds = [k for k, _ in classify_items(["a b", "https://x.org/a.png", "data:image/png;base64,AAAA",
                                           "no_scheme.png", "file:///etc/passwd"])]
    assert kinds == ["text", "image", "image", "text", "text"]  # file:/// has no host: text, never read


def test_image_attention_mask_hand_computed():
    # ids: 5 = <image>, 2 = </s>; tokens: t, IMG, t, IMG, t, EOS, t, IMG, t
    ids = torch.tensor([[9, 5, 9, 5, 9, 2, 9, 5, 9]])
    latest = [-1, 0, 0, 1, 1, 1, -1, 2, 2]  # after EOS nothing until the next image; EOS keeps its image
    mask = image_attention_mask(ids, image_token_id=5, eos_token_id=2, num_images=3)
    expected = torch.zeros(1, 9, 3, dtype=torch.long)
    for t, image in enumerate(latest):
        if image >= 0:
            expected[0, t, image] = 1
    assert torch.equal(mask, expected)
    truncated = image_attention_mask(ids, 5, 2, num_images=2)  # image index beyond num_images sees nothing
    assert truncated[0, 7:].sum() == 0


def test_rgba_is_composited_on_white_and_preprocess_normalises():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    pixels = preprocess(Image.new("RGB", (10, 20), (255, 0, 128)), size=8)
    assert pixels.shape == (3, 8, 8)
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    expected = (np.array([1.0, 0.0, 128 / 255]) - mean) / std
    torch.testing.assert_close(pixels[:, 3, 3], torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)


def test_every_supported_image_item_gives_the_same_pixels(tmp_path):
    image = random_image(3)
    data = png_bytes(image)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    reference = preprocess(image)
    for item in (image, data, path, uri):
        assert torch.equal(preprocess(load_image(item)), reference), type(item)


@pytest.mark.parametrize("item, message", [
    (b"not an image at all", "item 1: not a readable image"),
    (png_bytes(random_image(1))[:60], "item 1: .*(corrupt or truncated|not a readable)"),
    ("data:image/png;base64,@@@notbase64", "item 1: invalid base64"),
    (Path("/nonexistent/x.png"), "item 1: cannot read /nonexistent/x.png"),
    (42, "item 1: unsupported item type int"),
    ("ftp://example.com/x.png", "item 1: only http\\(s\\) image URLs"),
])
def test_bad_image_items_name_the_item(reference_checkpoint, item, message):
    folder, _ = reference_checkpoint("small_9b")
    pipe = idefics.load(folder)
    with pytest.raises((ImageError, TypeError), match=message):
        pipe.processor(["text", item, "more text"])


def test_decompression_bomb_refused_before_decoding():
    bomb = Image.new("L", (6000, 6000))
    buffer = io.BytesIO()
    bomb.save(buffer, format="PNG")  # tiny file, 36 megapixels
    assert len(buffer.getvalue()) < 100_000
    with pytest.raises(ImageError, match="over the limit of 1000000 pixels"):
        load_image(buffer.getvalue(), "item 0", ImagePolicy(max_pixels=1_000_000))


def test_urls_refused_when_disabled_or_host_not_allowed():
    with pytest.raises(ImageError, match="remote image URLs are disabled"):
        load_image("http://127.0.0.1:9/x.png", "item 0", ImagePolicy(allow_urls=False))
    with pytest.raises(ImageError, match="not in the allowed hosts"):
        load_image("http://127.0.0.1:9/x.png", "item 0", ImagePolicy(allowed_hosts=("example.org",)))


@pytest.fixture
def image_server(tmp_path):
    """A loopback HTTP server: /a.png (an image), /big.png (over the size limit), /redirect (to elsewhere)."""
    import http.server
    import threading

    image = random_image(9)
    (tmp_path / "a.png").write_bytes(png_bytes(image))
    (tmp_path / "big.png").write_bytes(b"\x89PNG" + b"\x00" * 300_000)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def do_GET(self):
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "http://example.org/a.png")
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", image
    server.shutdown()


def test_http_image_urls_are_fetched_with_limits(image_server):
    base, image = image_server
    fetched = load_image(f"{base}/a.png", "item 0", ImagePolicy())
    assert torch.equal(preprocess(fetched), preprocess(image))
    with pytest.raises(ImageError, match="larger than the limit of 100000 bytes"):
        load_image(f"{base}/big.png", "item 0", ImagePolicy(max_bytes=100_000))
    local = ImagePolicy(allowed_hosts=("127.0.0.1",))
    with pytest.raises(ImageError, match="'example.org' is not in the allowed hosts"):  # redirects are re-checked
        load_image(f"{base}/redirect", "item 0", local)
    with pytest.raises(ImageError, match="HTTP 404"):
        load_image(f"{base}/missing.png", "item 0", ImagePolicy())
