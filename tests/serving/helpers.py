"""Shared pieces of the server tests: a live uvicorn server on a free loopback port (in a thread), the test
model, image helpers, and hooks that hold or slow the engine's decoding steps."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from contextlib import contextmanager

import pytest
import torch

import idefics
from idefics.serving.protocol import Limits
from idefics.serving.server import create_app, http_protocol
from idefics.serving.service import ServerSettings


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
    header_timeout = app.state.service.settings.header_timeout
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", http=http_protocol(header_timeout)))
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


def data_uri(image, fmt="PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def hold(engine, delay: float = 0.0, gate: threading.Event | None = None) -> None:
    """Test control: make every decoding step wait for `gate` and/or sleep `delay` seconds."""
    original = engine.step

    def step():
        if gate is not None:
            gate.wait(timeout=60)
        time.sleep(delay)
        original()

    engine.step = step


@contextmanager
def server_full(url: str, engine):
    """With max_batch_size=1 and max_queue=0: one request holds the only slot (its steps wait) until the block
    ends, so every other request meets a full server."""
    import httpx

    gate = threading.Event()
    hold(engine, gate=gate)
    first = threading.Thread(target=lambda: httpx.post(f"{url}/generate", json={
        "inputs": "hi", "parameters": {"max_new_tokens": 3}}, timeout=60))
    first.start()
    wait_for(lambda: engine.in_flight == 1)
    try:
        yield
    finally:
        gate.set()
        first.join(timeout=60)
        wait_for(lambda: engine.in_flight == 0)


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def card_prompt(image_ref: str, question: str = "Describe this image.") -> str:
    return f"User:![]({image_ref}){question}<end_of_utterance>\nAssistant:"


def alone(pipe, image, question="Describe this image.", **kwargs):
    return pipe.generate_detailed([["User:", image, f"{question}<end_of_utterance>\nAssistant:"]], **kwargs)[0]
