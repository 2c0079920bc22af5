"""Server safety and load: remote image URLs only from allowed hosts, bearer-token authentication, 429 when
full, client disconnects dropped at the next step, request timeouts, and the load-test script."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from idefics.images import ImageError, ImagePolicy, load_image
from tests.helpers import png_bytes, random_image
from tests.serving.helpers import (alone, card_prompt, hold, live_server, one_thread, pipe, server_full,  # noqa: F401
                                   wait_for)
from tests.helpers import REPO

text_generation = pytest.importorskip("text_generation")
openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def image_host():
    """A loopback HTTP server with /cat.png, /notes.txt (not an image), /forbidden (403), /redirect (to
    /cat.png under the name `localhost`) and /here (to /cat.png on the same address)."""
    picture = png_bytes(random_image(6, (36, 28)))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            port = self.server.server_address[1]
            if self.path in ("/cat.png", "/notes.txt"):
                body = picture if self.path == "/cat.png" else b"not an image"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.path == "/forbidden":
                self.send_response(403)
                self.end_headers()
            else:
                self.send_response(302)
                target = "localhost" if self.path == "/redirect" else "127.0.0.1"
                self.send_header("Location", f"http://{target}:{port}/cat.png")
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
        # a redirect to an allowed host is followed (and checked again)
        assert client.generate(card_prompt(f"http://{host}/here"), max_new_tokens=6).generated_text == \
            response.generated_text
        port = host.split(":")[1]
        # refused host, redirect to a refused host, 403, not an image: one message, nothing to map services by
        for image_url in (f"http://localhost:{port}/cat.png", f"http://{host}/redirect", f"http://{host}/forbidden",
                          f"http://{host}/notes.txt"):
            with pytest.raises(text_generation.errors.ValidationError) as refused:
                client.generate(card_prompt(image_url), max_new_tokens=2)
            assert str(refused.value) == f"Input validation error: invalid image: image 1: cannot fetch the image " \
                                         f"at {image_url}"
        with pytest.raises(text_generation.errors.ValidationError, match="scheme 'ftp'"):
            client.generate(card_prompt(f"ftp://{host}/cat.png"), max_new_tokens=2)
        assert httpx.get(f"{url}/health").status_code == 200
    with live_server(pipe, image_hosts=("images.example.com",)) as (url, _):
        with pytest.raises(text_generation.errors.ValidationError, match="cannot fetch the image"):
            text_generation.Client(url).generate(card_prompt(f"http://{host}/cat.png"), max_new_tokens=2)
        assert httpx.get(f"{url}/health").status_code == 200


def test_any_host_still_refuses_internal_addresses_before_connecting(pipe, image_host, monkeypatch):
    """`--allow-image-urls '*'`: names that resolve (here through a stub resolver) to loopback, private,
    link-local or metadata addresses are refused before any connection is made."""
    import socket

    def stub_resolver(answers):
        def resolve(host, port, type=0):
            return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                    for a in answers[host]]
        return resolve

    def no_connection(*args, **kwargs):
        raise AssertionError(f"a connection was attempted: {args}")

    answers = {"metadata.example.com": ["169.254.169.254"], "intranet.example.com": ["10.0.0.7"],
               "mixed.example.com": ["93.184.216.34", "192.168.1.2"], "v6.example.com": ["::1"],
               "mapped.example.com": ["::ffff:127.0.0.1"]}
    policy = ImagePolicy(allowed_hosts=None, allow_internal=False, resolve=stub_resolver(answers))
    monkeypatch.setattr(httpx.Client, "send", no_connection)
    for name in answers:
        with pytest.raises(ImageError, match="internal address"):
            load_image(f"http://{name}/x.png", "image 1", policy)
    for literal in ("http://127.0.0.1:9/x.png", "http://[::1]/x.png", "http://169.254.169.254/latest/meta-data"):
        with pytest.raises(ImageError, match="internal address"):
            load_image(literal, "image 1", policy)
    monkeypatch.undo()
    host, _ = image_host
    with live_server(pipe, image_hosts=("*",)) as (url, _):  # the server's own message names nothing
        with pytest.raises(text_generation.errors.ValidationError) as refused:
            text_generation.Client(url).generate(card_prompt(f"http://{host}/cat.png"), max_new_tokens=2)
        assert str(refused.value).endswith(f"cannot fetch the image at http://{host}/cat.png")


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


def test_overloaded_server_answers_429(pipe):
    with live_server(pipe, max_batch_size=1, max_queue=0) as (url, engine):
        with server_full(url, engine):
            with pytest.raises(text_generation.errors.OverloadedError):
                text_generation.Client(url).generate("hi", max_new_tokens=2)
            with pytest.raises(openai.RateLimitError):
                openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0).chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
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


def load_test_module():
    import importlib.util
    from pathlib import Path

    path = REPO / "benchmarks" / "load_test.py"
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


def test_load_test_checks_answers_and_refuses_to_run_without_the_clients(pipe, monkeypatch):
    load_test = load_test_module()
    with live_server(pipe, api_key="k") as (url, _):
        expected = load_test.known_answers(url, max_new_tokens=4, api_key="k")
        assert len(expected) == len(load_test.KINDS) * load_test.SOAK_PROMPTS
        report = load_test.run_load(url, clients=4, requests=12, duration=120, max_new_tokens=4, api_key="k",
                                    expected=expected)
        assert report["ok"] == 12 and report["wrong"] == 0, report  # the same answers under load
        tampered = {key: text + "!" if key[1] == 0 else text for key, text in expected.items()}
        report = load_test.run_load(url, clients=2, requests=8, duration=120, max_new_tokens=4, api_key="k",
                                    expected=tampered)
        assert report["wrong"] == 4, report  # requests 0..3 ask prompt 0 (one per kind), 4..7 prompt 1
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "text_generation" else real_find_spec(name, *a))
    monkeypatch.setattr(sys, "argv", ["load_test.py", "--url", "http://127.0.0.1:9"])
    with pytest.raises(SystemExit) as exit_:
        load_test.main()
    assert exit_.value.code == 2
