"""Fault injection against a live server on 127.0.0.1: one request's failure never reaches another, every
limit is enforced before the expensive work, slow or vanishing clients cost one log line, and the API
details clients rely on (OpenAI stop text, error types, the schema behind the key)."""

from __future__ import annotations

import logging
import socket
import threading
import time

import httpx
import pytest
import torch

from idefics.generation import GenerationParams, choose
from tests.serving.helpers import (alone, card_prompt, data_uri, hold, live_server, one_thread, pipe,  # noqa: F401
                                   server_full, wait_for)

openai = pytest.importorskip("openai")
text_generation = pytest.importorskip("text_generation")


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def raw_request(url: str, head: bytes, body: bytes = b"", close: bool = False) -> socket.socket:
    """A connection that sent `head` (request line and headers) and `body`, and is left open (or closed)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(head + b"\r\n" + body)
    if close:
        sock.close()
    return sock


def test_a_request_failing_in_the_engine_fails_alone(pipe, images):
    """A fault in one request's token choice (injected: the engine's sampling raises for seed 666) answers that
    request with its error while three others in the same batch finish with their answers alone."""
    questions = ["Describe this image.", "What color is it?", "Is there a cat?"]
    expected = [alone(pipe, images[i], q, max_new_tokens=8).text for i, q in enumerate(questions)]
    with live_server(pipe, max_batch_size=4) as (url, engine):
        original = engine.next_token

        def faulty(row, logits):
            if row.job.params.seed == 666:
                raise FloatingPointError("injected fault")
            return original(row, logits)

        engine.next_token = faulty
        gate = threading.Event()
        hold(engine, gate=gate)  # the four requests join one batch before the first step
        client = text_generation.Client(url, timeout=120)
        answers: dict[int, object] = {}

        def ask(i: int, question: str, **settings) -> None:
            try:
                answers[i] = client.generate(card_prompt(data_uri(images[i]), question), max_new_tokens=8,
                                             **settings).generated_text
            except Exception as error:  # the faulty request's error, as its client sees it
                answers[i] = error

        threads = [threading.Thread(target=ask, args=(i, q)) for i, q in enumerate(questions)]
        threads.append(threading.Thread(target=ask, args=(3, "Describe this image."),
                                        kwargs={"do_sample": True, "seed": 666}))
        for t in threads:
            t.start()
        wait_for(lambda: engine.in_flight == 4)
        gate.set()
        for t in threads:
            t.join(timeout=120)
        assert isinstance(answers[3], text_generation.errors.GenerationError) and "injected fault" in str(answers[3])
        assert [answers[i] for i in range(3)] == expected
        # settings that would make the sampling distribution NaN are refused before the request is queued
        with pytest.raises(text_generation.errors.ValidationError, match="temperature"):
            client.generate(card_prompt(data_uri(images[0])), max_new_tokens=2, do_sample=True, temperature=1e-300)
        assert httpx.get(f"{url}/health").status_code == 200


def test_sampling_refuses_a_distribution_that_is_not_one():
    params = GenerationParams(do_sample=True)
    with pytest.raises(ValueError, match="no valid next-token distribution"):
        choose(torch.full((1, 5), float("-inf")), params, None)
    assert choose(torch.tensor([[0.0, 3.0, -1.0]]), GenerationParams(), None).item() == 1


def test_bad_json_bodies_get_4xx_not_500(pipe):
    with live_server(pipe) as (url, _):
        nested = b'{"inputs": "hi", "x": ' + b"[" * 1000 + b"]" * 1000 + b"}"
        response = httpx.post(f"{url}/generate", content=nested, headers={"Content-Type": "application/json"})
        assert response.status_code == 400 and "nests" in response.json()["error"]
        response = httpx.post(f"{url}/generate", content=b'{"inputs": "\\ud800 hi"}',
                              headers={"Content-Type": "application/json"})
        assert response.status_code == 422 and "surrogate" in response.json()["error"]
        response = httpx.post(f"{url}/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": '
                              b'"\\udfff"}]}', headers={"Content-Type": "application/json"})
        assert response.status_code == 422 and response.json()["error"]["type"] == "invalid_request_error"


def test_a_huge_prompt_is_refused_before_tokenizing(pipe):
    with live_server(pipe) as (url, _):
        def body():  # 30 MB streamed, so the measurement sees the server's memory, not the client's
            yield b'{"parameters": {"max_new_tokens": 2}, "inputs": "'
            for _ in range(250):
                yield b"lorem ipsum " * 10_000
            yield b'"}'

        before = resident_bytes()
        start = time.monotonic()
        response = httpx.post(f"{url}/generate", content=body(), headers={"Content-Type": "application/json"},
                              timeout=60)
        took = time.monotonic() - start
        assert response.status_code == 422 and "characters" in response.json()["error"]
        assert took < 10, f"a 30 MB prompt took {took:.1f} s to refuse"
        assert resident_bytes() - before < 100 * 2**20
        small = httpx.post(f"{url}/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}}, timeout=60)
        assert small.status_code == 200


def test_tokenize_has_the_same_limits_and_leaves_the_event_loop_free(pipe):
    with live_server(pipe) as (url, _):
        too_many = httpx.post(f"{url}/tokenize", json={"inputs": "word " * 100_000}, timeout=60)
        assert too_many.status_code == 422
        limit = pipe.config.max_position_embeddings
        done = threading.Event()

        def tokenize_often():
            while not done.is_set():
                httpx.post(f"{url}/tokenize", json={"inputs": "a b " * (limit // 4)}, timeout=60)

        worker = threading.Thread(target=tokenize_often)
        worker.start()
        try:
            worst = 0.0
            for _ in range(20):
                start = time.monotonic()
                assert httpx.get(f"{url}/health", timeout=10).status_code == 200
                worst = max(worst, time.monotonic() - start)
            assert worst < 0.5, f"/health took {worst:.2f} s while /tokenize worked"
        finally:
            done.set()
            worker.join(timeout=60)
        ok = httpx.post(f"{url}/tokenize", json={"inputs": "hello world"}, timeout=10)
        assert ok.status_code == 200 and "".join(t["text"] for t in ok.json()).endswith("hello world")


def test_full_server_refuses_before_reading_the_body(pipe):
    with live_server(pipe, max_batch_size=1, max_queue=0) as (url, engine), server_full(url, engine):
        # a body announced but never sent: the refusal cannot have waited for it
        sock = raw_request(url, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                b"Content-Length: 1000000\r\n")
        reply = sock.recv(4096).decode()
        sock.close()
        assert reply.startswith("HTTP/1.1 429") and "retry-after: 1" in reply.lower()


def test_slow_and_vanishing_bodies(pipe, caplog):
    with live_server(pipe, body_timeout=1.0) as (url, _):
        start = time.monotonic()
        sock = raw_request(url, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n", b'{"inputs"')
        reply = sock.recv(4096).decode()
        sock.close()
        assert reply.startswith("HTTP/1.1 408") and time.monotonic() - start < 10
        with caplog.at_level(logging.INFO, logger="idefics.serve"):
            for _ in range(20):
                raw_request(url, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n", b'{"in',
                            close=True)
            wait_for(lambda: len([r for r in caplog.records if "disconnected" in r.getMessage()]) == 20)
        gone = [r for r in caplog.records if "disconnected" in r.getMessage()]
        assert all(r.exc_info is None and "\n" not in r.getMessage() for r in gone)  # one line each
        assert not [r for r in caplog.records if r.exc_info]
        assert httpx.get(f"{url}/health").status_code == 200


def test_connections_without_complete_headers_are_closed(pipe):
    with live_server(pipe, header_timeout=1.0) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        start = time.monotonic()
        silent = socket.create_connection((host, int(port)), timeout=10)  # connects, sends nothing
        slow = socket.create_connection((host, int(port)), timeout=10)
        slow.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n")  # the headers never end
        for sock in (silent, slow):
            assert sock.recv(100) == b""  # closed by the server
            sock.close()
        assert time.monotonic() - start < 8
        assert httpx.get(f"{url}/health").status_code == 200


def test_openapi_schema_is_behind_the_key(pipe):
    with live_server(pipe, api_key="k") as (url, _):
        assert httpx.get(f"{url}/openapi.json").status_code == 401
        schema = httpx.get(f"{url}/openapi.json", headers={"Authorization": "Bearer k"})
        assert schema.status_code == 200 and "/v1/chat/completions" in schema.json()["paths"]
        assert httpx.get(f"{url}/docs").status_code == 404


def test_openai_answers_end_before_the_stop_text(pipe, images):
    full = alone(pipe, images[0], "What is in the image?", max_new_tokens=12).text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop and stop.strip(), f"no stop text to cut {full!r} at"
    expected = full[:full.find(stop)]
    with live_server(pipe) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0)
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(images[0])}},
                                                 {"type": "text", "text": "What is in the image?"}]}]
        answer = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=12,
                                                stop=[stop])
        assert answer.choices[0].message.content == expected and answer.choices[0].finish_reason == "stop"
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="m", messages=messages, temperature=0, max_tokens=12, stop=[stop], stream=True) if c.choices]
        assert "".join(pieces) == expected
