"""The real server on loopback, driven by the real clients: `text_generation.Client` (the IDEFICS model card's
snippet: greedy, top-p sampling, stop sequences, streaming) and `openai.OpenAI` (non-streaming, streaming, an
image as a base64 data URL). Greedy answers must equal `pipe.generate` on the same input. Then every kind of bad
input must get a 4xx naming the problem while the server keeps serving; remote image URLs, authentication,
overload (429), client disconnects and timeouts."""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import sys
import threading
import time
import zlib
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import torch

import idefics
from conftest import png_bytes, random_image
from idefics.serving.protocol import Limits
from idefics.serving.server import ServerSettings, create_app

text_generation = pytest.importorskip("text_generation")
openai = pytest.importorskip("openai")
STOPS = ["<end_of_utterance>", "\nUser:"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; two threads on a shared 2-core machine mostly spin
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe(reference_checkpoint):
    folder, _ = reference_checkpoint("small_instruct")
    return idefics.load(folder)


@contextmanager
def live_server(pipe, **settings):
    """A uvicorn server in a thread on a free loopback port; yields (base URL, engine)."""
    import uvicorn

    settings.setdefault("limits", Limits(max_images=2))
    app = create_app(pipe, ServerSettings(model_name="idefics-test", **settings))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app.state.service.engine
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def server(pipe):
    with live_server(pipe) as (url, engine):
        yield url, engine


def data_uri(image, fmt="PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def card_prompt(image_ref: str, question: str = "Describe this image.") -> str:
    return f"User:![]({image_ref}){question}<end_of_utterance>\nAssistant:"


def alone(pipe, image, question="Describe this image.", **kwargs):
    return pipe.generate_detailed([["User:", image, f"{question}<end_of_utterance>\nAssistant:"]], **kwargs)[0]


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


@pytest.fixture(scope="module")
def image_host():
    """A loopback HTTP server with /cat.png, /redirect (to the same file under the name `localhost`)."""
    picture = png_bytes(random_image(6, (36, 28)))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/cat.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(picture)))
                self.end_headers()
                self.wfile.write(picture)
            else:
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{self.server.server_address[1]}/cat.png")
                self.end_headers()

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{httpd.server_address[1]}", picture
    httpd.shutdown()


def test_remote_image_urls_only_from_allowed_hosts(pipe, image_host):
    host, picture = image_host
    with live_server(pipe, image_hosts=("127.0.0.1",)) as (url, _):
        client = text_generation.Client(url, timeout=60)
        response = client.generate(card_prompt(f"http://{host}/cat.png"), max_new_tokens=6)
        from PIL import Image
        assert response.generated_text == alone(pipe, Image.open(io.BytesIO(picture)), max_new_tokens=6).text
        port = host.split(":")[1]
        refused = {f"http://localhost:{port}/cat.png": "not in the allowed hosts",  # loopback, other name
                   f"http://{host}/redirect": "HTTP 302",  # redirects are not followed
                   f"ftp://{host}/cat.png": "scheme 'ftp'"}
        for image_url, words in refused.items():
            with pytest.raises(text_generation.errors.ValidationError, match=words):
                client.generate(card_prompt(image_url), max_new_tokens=2)
        assert httpx.get(f"{url}/health").status_code == 200


def test_api_key(pipe):
    with live_server(pipe, api_key="s3cret") as (url, _):
        response = httpx.post(f"{url}/generate", json={"inputs": "hi"}, timeout=10)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert "API key" in response.json()["error"]
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        right = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert right.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=2, temperature=0).usage.completion_tokens >= 1
        client = text_generation.Client(url, headers={"Authorization": "Bearer s3cret"}, timeout=60)
        assert len(client.generate("hi", max_new_tokens=2).details.tokens) >= 1
        assert httpx.get(f"{url}/health").status_code == 200  # liveness probes need no key
        assert httpx.get(f"{url}/metrics").status_code == 401


def hold(engine, delay: float = 0.0, gate: threading.Event | None = None) -> None:
    """Test control: make every decoding step wait for `gate` and/or sleep `delay` seconds."""
    original = engine.step

    def step():
        if gate is not None:
            gate.wait(timeout=60)
        time.sleep(delay)
        original()

    engine.step = step


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_overloaded_server_answers_429(pipe):
    with live_server(pipe, max_batch_size=1, max_queue=0) as (url, engine):
        gate = threading.Event()
        hold(engine, gate=gate)
        first = threading.Thread(target=lambda: httpx.post(f"{url}/generate", json={
            "inputs": "hi", "parameters": {"max_new_tokens": 3}}, timeout=60))
        first.start()
        wait_for(lambda: engine.in_flight == 1)
        with pytest.raises(text_generation.errors.OverloadedError):
            text_generation.Client(url).generate("hi", max_new_tokens=2)
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0).chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        gate.set()
        first.join(timeout=60)
        wait_for(lambda: engine.in_flight == 0)
        assert text_generation.Client(url, timeout=60).generate("hi", max_new_tokens=2).generated_text is not None


def test_disconnected_clients_are_dropped_at_the_next_step(pipe):
    with live_server(pipe, request_timeout=60.0) as (url, engine):
        hold(engine, delay=0.02)  # 200 steps would take at least 4 s
        body = {"inputs": "hi", "parameters": {"max_new_tokens": 200, "stop": ["never"]}}
        steps_before = engine.steps
        with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=30) as response:
            for n, line in enumerate(line for line in response.iter_lines() if line):
                if n == 1:
                    break  # the client goes away after two tokens
        wait_for(lambda: engine.in_flight == 0 and not engine.rows)
        assert engine.steps - steps_before < 100
        steps_before = engine.steps
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
            httpx.post(f"{url}/generate", json=body, timeout=0.3)
        wait_for(lambda: engine.in_flight == 0 and not engine.rows)
        assert engine.steps - steps_before < 100
        assert httpx.get(f"{url}/health").status_code == 200


def test_request_timeout_is_answered_with_504(pipe):
    with live_server(pipe, request_timeout=0.5) as (url, engine):
        hold(engine, delay=0.02)
        with pytest.raises(text_generation.errors.ShardTimeoutError, match="timed out"):
            text_generation.Client(url, timeout=30).generate("hi", max_new_tokens=200, stop_sequences=["never"])
        events = [json.loads(line[5:]) for line in httpx.post(f"{url}/generate_stream", json={
            "inputs": "hi", "parameters": {"max_new_tokens": 200, "stop": ["never"]}}, timeout=30).text.splitlines()
            if line.startswith("data:")]
        assert events[-1]["error_type"] == "timeout" and "index" in events[0]
        wait_for(lambda: engine.in_flight == 0)
        assert httpx.get(f"{url}/health").status_code == 200


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


def load_test_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "load_test.py"
    spec = importlib.util.spec_from_file_location("load_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["load_test"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_load_test_script_counts_successes_and_rejections(pipe):
    load_test = load_test_module()
    with live_server(pipe, api_key="k") as (url, engine):
        report = load_test.run_load(url, clients=4, requests=8, duration=120, max_new_tokens=6, api_key="k")
        assert (report["ok"], report["failed"], report["lost"], report["rejected"]) == (8, 0, 0, 0), report
        assert report["p50_latency_s"] <= report["p99_latency_s"]
    with live_server(pipe, api_key="k", max_batch_size=1, max_queue=1) as (url, engine):
        hold(engine, delay=0.05)  # requests overlap: 6 clients, room for 2
        report = load_test.run_load(url, clients=6, requests=6, duration=120, max_new_tokens=6, api_key="k")
        assert report["failed"] == report["lost"] == 0 and report["ok"] + report["rejected"] == 6, report
        assert report["rejected"] >= 1 and report["ok"] >= 2
