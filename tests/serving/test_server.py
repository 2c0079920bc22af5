"""The real server on loopback, driven by the real clients: `text_generation.Client` (the IDEFICS model card's
snippet: greedy, top-p sampling, stop sequences, streaming) and `openai.OpenAI` (non-streaming, streaming, an
image as a base64 data URL). Greedy answers must equal `pipe.generate` on the same input. Every kind of bad input
gets a 4xx naming the problem while the server keeps serving. (Safety and load: test_server_limits.py.)"""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import zlib

import httpx
import pytest

from tests.helpers import png_bytes, random_image
from tests.serving.helpers import alone, card_prompt, data_uri, live_server, one_thread, pipe  # noqa: F401 (fixtures)

text_generation = pytest.importorskip("text_generation")
openai = pytest.importorskip("openai")
STOPS = ["<end_of_utterance>", "\nUser:"]


@pytest.fixture(scope="module")
def server(pipe):
    with live_server(pipe) as (url, engine):
        yield url, engine


def test_text_generation_client_model_card_snippet(server, pipe):
    url, _ = server
    client = text_generation.Client(url, timeout=60)
    image = random_image(1, (40, 30))
    response = client.generate(prompt=card_prompt(data_uri(image)), max_new_tokens=12, stop_sequences=STOPS)
    expected = alone(pipe, image, max_new_tokens=12, stop_sequences=STOPS)
    assert response.generated_text == expected.text
    assert [t.id for t in response.details.tokens] == expected.token_ids
    assert response.details.finish_reason.value == expected.finish_reason
    assert response.details.seed is None and response.details.prefill == []

    sampled = [client.generate(prompt=card_prompt(data_uri(image)), max_new_tokens=10, do_sample=True, top_p=0.9,
                               seed=7) for _ in range(2)]
    reference = alone(pipe, image, max_new_tokens=10, do_sample=True, top_p=0.9, seed=7)
    assert sampled[0].generated_text == sampled[1].generated_text == reference.text
    assert sampled[0].details.seed == 7

    events = list(client.generate_stream(prompt=card_prompt(data_uri(image)), max_new_tokens=12,
                                         stop_sequences=STOPS))
    assert "".join(e.token.text for e in events if not e.token.special) == expected.text
    assert [e.token.id for e in events] == expected.token_ids
    assert all(e.generated_text is None for e in events[:-1]) and events[-1].generated_text == expected.text
    assert events[-1].details.generated_tokens == len(expected.token_ids)


def test_generate_routes_and_details(server, pipe):
    url, _ = server
    body = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 6, "details": True,
                                                            "decoder_input_details": True, "top_n_tokens": 2}}
    expected = pipe.generate_detailed(["The quick brown fox"], max_new_tokens=6)[0]
    single = httpx.post(f"{url}/generate", json=body, timeout=60).json()  # a bare object, not a list
    assert single["generated_text"] == expected.text
    prefill = single["details"]["prefill"]
    assert len(prefill) == expected.prompt_tokens and prefill[0]["logprob"] is None
    assert all(p["logprob"] <= 0 for p in prefill[1:])
    assert [len(step) for step in single["details"]["top_tokens"]] == [2] * 6
    logprobs = [t["logprob"] for t in single["details"]["tokens"]]
    assert logprobs == pytest.approx(expected.logprobs, abs=1e-4)
    with httpx.stream("POST", f"{url}/generate_stream", json={**body, "parameters": {"max_new_tokens": 3}},
                      timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert len(lines) == 3 and all(line.startswith("data:{") for line in lines)  # TGI style, no [DONE]
    assert [json.loads(line[5:])["index"] for line in lines] == [1, 2, 3]


def test_openai_client_chat_with_image(server, pipe):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)
    image = random_image(2, (30, 45))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(image, "JPEG")}},
                                             {"type": "text", "text": "What is in this image?"}]}]
    completion = client.chat.completions.create(model="whatever", messages=messages, max_tokens=10, temperature=0)
    jpeg = __import__("PIL.Image", fromlist=["Image"]).open(io.BytesIO(base64.b64decode(
        data_uri(image, "JPEG").split(",", 1)[1])))
    expected = alone(pipe, jpeg, "What is in this image?", max_new_tokens=10)
    assert completion.choices[0].message.content == expected.text
    assert completion.usage.completion_tokens == len(expected.token_ids)
    assert completion.usage.prompt_tokens == expected.prompt_tokens
    assert completion.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")

    stream = client.chat.completions.create(model="idefics-test", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)
    assert [m.id for m in client.models.list().data] == ["idefics-test"]


def test_concurrent_clients_are_batched_and_each_gets_its_own_answer(server, pipe):
    url, engine = server
    prompts = [f"User: {q}<end_of_utterance>\nAssistant:" for q in
               ("What is in this image?", "Tell me a very short story.", "How many apples are there?",
                "Where are the cow and chicken?", "Describe this image.", "The quick brown fox")]
    steps_before = engine.steps
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        if i % 2:
            answers[i] = text_generation.Client(url, timeout=60).generate(prompts[i], max_new_tokens=24).generated_text
        else:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)
            question = prompts[i][len("User: "):-len("<end_of_utterance>\nAssistant:")]
            answers[i] = client.chat.completions.create(model="m", max_tokens=24, temperature=0, messages=[
                {"role": "user", "content": question}]).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    generated = 0
    for i, prompt in enumerate(prompts):
        expected = pipe.generate_detailed([prompt], max_new_tokens=24)[0]
        assert answers[i] == expected.text, i
        generated += len(expected.token_ids)
    assert engine.steps - steps_before < generated  # decoding steps were shared between requests


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge image (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
            + chunk(b"IEND", b""))


def b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


GOOD_IMAGE = b64(png_bytes(random_image(3, (20, 20))))
BAD_INPUTS = {
    "malformed json": (b'{"inputs": "hi", ', 400, "parse the request body as JSON"),
    "not an object": (b'["hi"]', 422, "JSON object"),
    "wrong type": ({"inputs": "hi", "parameters": {"max_new_tokens": "ten"}}, 422, "`max_new_tokens` must be an integer"),
    "missing inputs": ({"parameters": {}}, 422, "`inputs` is required"),
    "corrupt image bytes": ({"inputs": f"![]({b64(b'this is not an image')})hi"}, 422, "not a readable image"),
    "truncated image": ({"inputs": f"![]({b64(png_bytes(random_image(4, (64, 64)))[:600])})hi"}, 422, "truncated"),
    "invalid base64": ({"inputs": "![](data:image/png;base64,iVBORw0KGgo=!!)hi"}, 422, "base64"),
    "image bomb": ({"inputs": f"![]({b64(png_claiming_size(5000, 5000))})hi"}, 422, "refused before decoding"),
    "huge bomb": ({"inputs": f"![]({b64(png_claiming_size(40000, 40000))})hi"}, 422, "image"),
    "too many images": ({"inputs": f"![]({GOOD_IMAGE})![]({GOOD_IMAGE})![]({GOOD_IMAGE})hi"}, 422, "at most 2"),
    "over-long prompt": ({"inputs": "The quick brown fox " * 80}, 422, "tokens"),
    "remote url off": ({"inputs": "![](https://example.com/cat.png)hi"}, 422, "remote image URLs are disabled"),
    "file url": ({"inputs": "![](file:///etc/passwd)hi"}, 422, "scheme 'file'"),
    "local path": ({"inputs": "![](/etc/passwd)hi"}, 422, "images must be http(s) URLs"),
    "too many new tokens": ({"inputs": "hi", "parameters": {"max_new_tokens": 100000}}, 422, "max_new_tokens"),
    "bad top_p": ({"inputs": "hi", "parameters": {"top_p": 1.5}}, 422, "`top_p`"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_gets_a_4xx_naming_the_problem_and_the_server_keeps_serving(server, name):
    url, engine = server
    body, status, words = BAD_INPUTS[name]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    for route in ("/generate", "/generate_stream"):
        response = httpx.post(url + route, content=content, headers={"content-type": "application/json"},
                              timeout=30)
        assert response.status_code == status, (route, response.text)
        error = response.json()
        assert error["error_type"] == "validation" and words in error["error"], error
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    assert engine.alive and engine.in_flight == 0


def test_bad_inputs_through_the_clients(server):
    url, _ = server
    with pytest.raises(text_generation.errors.ValidationError, match="base64"):
        text_generation.Client(url).generate("![](data:image/png;base64,@@@@)hi", max_new_tokens=2)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError) as error:
        client.chat.completions.create(model="m", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}])
    assert "scheme 'file'" in error.value.body["message"]
    response = httpx.post(f"{url}/v1/chat/completions", content=b"{oops", timeout=10)
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{url}/nothing-here", timeout=10).status_code == 404


def test_info_metrics_tokenize(server, pipe):
    url, _ = server
    info = httpx.get(f"{url}/info").json()
    assert info["model_id"] == "idefics-test" and info["max_total_tokens"] == pipe.config.max_position_embeddings
    metrics = httpx.get(f"{url}/metrics").text
    assert "tgi_request_success " in metrics and "tgi_queue_size 0" in metrics
    tokens = httpx.post(f"{url}/tokenize", json={"inputs": f"![]({GOOD_IMAGE})Hello"}).json()
    text = "".join(t["text"] for t in tokens)
    assert text.startswith("<s><fake_token_around_image><image><fake_token_around_image>") and text.endswith("Hello")
    ids = pipe.processor([GOOD_IMAGE, "Hello"])["input_ids"][0].tolist()
    assert [t["id"] for t in tokens] == ids


def test_serve_command_line(monkeypatch):
    import argparse

    from idefics.serving.server import register, settings_from_args

    parser = argparse.ArgumentParser(prog="idefics")
    register(parser.add_subparsers(dest="command"))
    help_text = parser._subparsers._group_actions[0].choices["serve"].format_help()
    assert "examples:" in help_text and "--allow-image-urls" in help_text and "Client(" in help_text
    monkeypatch.setenv("IDEFICS_API_KEY", "from-env")
    args = parser.parse_args(["serve", "--model", "ckpt", "--port", "9000", "--max-images", "3",
                              "--allow-image-urls", "a.example", "b.example"])
    settings = settings_from_args(args, "ckpt")
    assert args.func.__name__ == "serve" and args.port == 9000 and args.host == "127.0.0.1"
    assert settings.limits.max_images == 3 and settings.image_hosts == ("a.example", "b.example")
    assert settings.api_key == "from-env" and settings.model_name == "ckpt"
    defaults = settings_from_args(parser.parse_args(["serve"]), "m")
    assert defaults.image_hosts is None  # remote image URLs are off unless asked for


def test_text_generation_chat_sends_explicit_nulls_and_parses_the_answer(server, pipe):
    from text_generation.types import Message

    url, _ = server
    client = text_generation.Client(url, timeout=60)
    answer = client.chat(messages=[Message(role="user", content="Tell me a very short story.")], max_tokens=8,
                         temperature=None, seed=3)  # the client sends every field, mostly null
    expected = pipe.generate_detailed(["User: Tell me a very short story.<end_of_utterance>\nAssistant:"],
                                      max_new_tokens=8, do_sample=True, seed=3)[0]
    assert answer.choices[0].message.content == expected.text  # temperature null samples, as TGI does
    assert answer.usage["completion_tokens"] == len(expected.token_ids)


def test_idefics2_model_behind_the_same_server(tmp_path_factory):
    """A model without cross-attention: items → its own processor, images loaded under the server's policy."""
    import idefics
    from tests.idefics2.test_idefics2 import build_reference_idefics2, noise_image

    folder = tmp_path_factory.mktemp("idefics2-server")
    build_reference_idefics2(folder, splitting=False)
    pipe2 = idefics.load(folder)
    image = noise_image(7, 40, 30)
    prompt = f"User:![]({data_uri(image)})Describe this image.<end_of_utterance>\nAssistant:"
    with live_server(pipe2) as (url, _):
        client = text_generation.Client(url, timeout=60)
        answers = [None, None]

        def ask(i: int) -> None:
            answers[i] = client.generate(prompt if i == 0 else "The quick brown fox", max_new_tokens=6 + i)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        expected = pipe2.generate_detailed([["User:", image, "Describe this image.<end_of_utterance>\nAssistant:"]],
                                           max_new_tokens=6)[0]
        assert answers[0].generated_text == expected.text
        assert answers[1].generated_text == pipe2.generate(["The quick brown fox"], max_new_tokens=7)[0]
        with pytest.raises(text_generation.errors.ValidationError, match="would be read as an image"):
            client.generate(f"![]({data_uri(image)})https://example.com/x.png", max_new_tokens=2)
