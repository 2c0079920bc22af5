"""Load test for `idefics serve`: N concurrent clients mixing the TGI API (`text_generation.Client`, plain and
streaming) and the OpenAI chat API (`openai.OpenAI`, plain and streaming), half of the requests with an image.
Bounded in requests and in time, loopback only. Reports throughput, p50/p99 latency and the number of failed,
lost (no complete answer) and rejected (429) requests.

    # against a running server
    python benchmarks/load_test.py --url http://127.0.0.1:8080 --clients 8 --requests 32

    # start the server itself (a subprocess on a free loopback port), and compare continuous batching with
    # one-at-a-time serving (--max-batch-size 1) on the same workload
    python benchmarks/load_test.py --model CHECKPOINT --compare --clients 8 --requests 32

    # a random-weight checkpoint shaped like idefics-mini (SmolLM2-135M-sized decoder) to test with
    python benchmarks/load_test.py --make-random-model /tmp/mini-like --preset mini-like

    # soak: 32 clients, then 64 clients retrying at once on 429 (no backoff), 2 minutes each, on a fixed set of
    # greedy prompts whose answers are known from an idle server; reports goodput of both phases, wrong answers
    # and the server's memory before and after
    python benchmarks/load_test.py --model CHECKPOINT --soak 120
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import io
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

KINDS = ("tgi", "tgi_stream", "openai", "openai_stream")


@dataclass
class Outcome:
    kind: str
    latency: float
    tokens: int = 0
    status: str = "ok"  # ok | failed | lost | rejected
    error: str = ""
    prompt: int = 0
    text: str = ""


SOAK_PROMPTS = 8  # distinct prompts in a soak run: every answer is checked against the idle server's


def image_uri(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def one_request(url: str, i: int, max_new_tokens: int, api_key: str, prompts: int | None = None) -> Outcome:
    """Request number i: the kind and the image alternate with i; with `prompts`, the question and image repeat
    every `prompts` requests of a kind."""
    from openai import OpenAI, RateLimitError
    from text_generation import Client
    from text_generation.errors import OverloadedError

    kind = KINDS[i % len(KINDS)]
    p = i // len(KINDS) % prompts if prompts else i
    with_image = p % 2 == 0
    question = f"Question {p}: what is in this picture? Describe it."
    start = time.perf_counter()
    try:
        if kind.startswith("tgi"):
            client = Client(url, headers={"Authorization": f"Bearer {api_key}"}, timeout=600)
            prompt = f"User:{'![](' + image_uri(p) + ')' if with_image else ' '}{question}<end_of_utterance>\nAssistant:"
            if kind == "tgi":
                response = client.generate(prompt, max_new_tokens=max_new_tokens)
                tokens, complete = response.details.generated_tokens, response.details.finish_reason is not None
                text = response.generated_text
            else:
                events = list(client.generate_stream(prompt, max_new_tokens=max_new_tokens))
                tokens = len(events)
                complete = bool(events) and events[-1].details is not None
                text = events[-1].generated_text if complete else ""
        else:
            client = OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=600)
            content = [{"type": "text", "text": question}]
            if with_image:
                content.insert(0, {"type": "image_url", "image_url": {"url": image_uri(p)}})
            request = dict(model="idefics", messages=[{"role": "user", "content": content}],
                           max_tokens=max_new_tokens, temperature=0)
            if kind == "openai":
                completion = client.chat.completions.create(**request)
                tokens, complete = completion.usage.completion_tokens, completion.choices[0].finish_reason is not None
                text = completion.choices[0].message.content
            else:
                chunks = list(client.chat.completions.create(**request, stream=True,
                                                             stream_options={"include_usage": True}))
                finished = [c for c in chunks if c.choices and c.choices[0].finish_reason]
                tokens = chunks[-1].usage.completion_tokens if chunks and chunks[-1].usage else 0
                complete = bool(finished)
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return Outcome(kind, time.perf_counter() - start, tokens, "ok" if complete else "lost", prompt=p, text=text)
    except (OverloadedError, RateLimitError) as error:
        return Outcome(kind, time.perf_counter() - start, status="rejected", error=str(error)[:200], prompt=p)
    except Exception as error:  # anything else is a failed request, reported with its message
        return Outcome(kind, time.perf_counter() - start, status="failed", prompt=p,
                       error=f"{type(error).__name__}: {error}"[:200])


def run_load(url: str, clients: int, requests: int, duration: float, max_new_tokens: int, api_key: str,
             expected: dict | None = None) -> dict:
    """`clients` threads take request numbers from a shared counter until `requests` are done or `duration`
    seconds have passed (no new request starts after that); a rejected request is followed at once by the
    next one (no backoff). With `expected` ({(kind, prompt): text}), prompts repeat and every answer is checked."""
    counter = iter(range(requests))
    lock = threading.Lock()
    outcomes: list[Outcome] = []
    stop_at = time.monotonic() + duration

    def worker() -> None:
        while time.monotonic() < stop_at:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            outcome = one_request(url, i, max_new_tokens, api_key, SOAK_PROMPTS if expected else None)
            with lock:
                outcomes.append(outcome)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    ok = [o for o in outcomes if o.status == "ok"]
    latencies = sorted(o.latency for o in ok)
    count = {s: sum(o.status == s for o in outcomes) for s in ("ok", "failed", "lost", "rejected")}
    return {"clients": clients, "requests": len(outcomes), **count, "seconds": round(elapsed, 2),
            "requests_per_s": round(len(ok) / elapsed, 3), "tokens_per_s": round(sum(o.tokens for o in ok) / elapsed, 1),
            "p50_latency_s": round(statistics.median(latencies), 3) if latencies else None,
            "p99_latency_s": round(float(np.percentile(latencies, 99)), 3) if latencies else None,
            "errors": sorted({o.error for o in outcomes if o.error})[:5],
            **({"wrong": sum(o.text != expected[o.kind, o.prompt] for o in ok)} if expected else {})}


def known_answers(url: str, max_new_tokens: int, api_key: str) -> dict:
    """The answer to every soak prompt of every kind, one request at a time on an idle server."""
    answers = {}
    for i in range(len(KINDS) * SOAK_PROMPTS):
        outcome = one_request(url, i, max_new_tokens, api_key, SOAK_PROMPTS)
        if outcome.status != "ok":
            raise RuntimeError(f"request {i} failed on the idle server: {outcome.error}")
        answers[outcome.kind, outcome.prompt] = outcome.text
    return answers


def soak(server: "ServerProcess", seconds: float, max_new_tokens: int, api_key: str) -> dict:
    """32 clients, then 64 without backoff, `seconds` each; goodput ratio, wrong answers, memory."""
    expected = known_answers(server.url, max_new_tokens, api_key)
    start_memory = server.resident_mb()
    phases = {n: run_load(server.url, n, 10**9, seconds, max_new_tokens, api_key, expected) for n in (32, 64)}
    time.sleep(10)  # let the last answers go and memory settle
    end_memory = server.resident_mb()
    return {"goodput_32": phases[32]["requests_per_s"], "goodput_64": phases[64]["requests_per_s"],
            "goodput_ratio_64_to_32": round(phases[64]["requests_per_s"] / max(phases[32]["requests_per_s"], 1e-9), 3),
            "wrong_answers": phases[32]["wrong"] + phases[64]["wrong"],
            "rejected_64": phases[64]["rejected"], "failed": phases[32]["failed"] + phases[64]["failed"],
            "memory_mb_before": start_memory, "memory_mb_after": end_memory,
            "memory_change": round(end_memory / start_memory - 1, 3), "phases": phases}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m idefics.cli serve ...` (`idefics serve`) on a free loopback port, stopped by its own pid."""

    def __init__(self, model: str, batch_size: int, queue: int, threads: int | None, api_key: str,
                 dtype: str | None = None) -> None:
        self.port = free_port()
        command = [sys.executable, "-m", "idefics.cli", "serve", "--model", model, "--host", "127.0.0.1",
                   "--port", str(self.port), "--max-batch-size", str(batch_size), "--max-queue", str(queue),
                   "--api-key", api_key, "--log-level", "warning"]
        if threads:
            command += ["--threads", str(threads)]
        if dtype:
            command += ["--dtype", dtype]
        self.process = subprocess.Popen(command)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 300
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.process.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not become healthy in 300 s")
            time.sleep(0.5)

    def resident_mb(self) -> float:
        with open(f"/proc/{self.process.pid}/statm") as f:
            return round(int(f.read().split()[1]) * 4096 / 2**20, 1)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def make_random_model(folder: Path, preset: str) -> None:
    """A random-weight IDEFICS checkpoint written with the package's own code (and a small trained tokenizer)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from reference_checkpoints import SMALL_INSTRUCT, make_tokenizer  # only `tokenizers`, no transformers

    from idefics import Idefics, IdeficsConfig
    from idefics.checkpoint import save_model

    shapes = dict(SMALL_INSTRUCT)
    if preset == "mini-like":  # the decoder of SmolLM2-135M, a small ViT, 32 latents, cross-attention every 4
        shapes.update(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                      cross_layer_interval=4,
                      perceiver_config=dict(use_resampler=True, resampler_n_latents=32, resampler_depth=2,
                                            resampler_n_heads=8, resampler_head_dim=64,
                                            qk_layer_norms_perceiver=True),
                      vision_config=dict(embed_dim=256, image_size=224, intermediate_size=512, patch_size=32,
                                         num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu"))
    torch.manual_seed(0)
    model = Idefics(IdeficsConfig.from_dict(shapes))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.dim() == 1 and "alpha" not in name else 0.02 * torch.randn_like(p))
    save_model(model, folder)
    make_tokenizer(folder, shapes["vocab_size"], instruct=True)
    size = shapes["vision_config"]["image_size"]
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_size": size}))
    print(f"wrote {folder} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (else --model starts one)")
    parser.add_argument("--model", help="checkpoint folder for the server this script starts")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32, help="total requests (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=600, help="no new request after this many seconds")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the started server")
    parser.add_argument("--dtype", default=None, help="dtype of the started server (float32, bfloat16)")
    parser.add_argument("--api-key", default="load-test")
    parser.add_argument("--compare", action="store_true", help="also run with --max-batch-size 1 and report the "
                        "speed-up of continuous batching")
    parser.add_argument("--make-random-model", type=Path, help="write a random checkpoint here and exit")
    parser.add_argument("--preset", choices=("small", "mini-like"), default="mini-like")
    parser.add_argument("--soak", type=float, metavar="SECONDS", help="soak test (with --model): 32 then 64 "
                        "clients without backoff, SECONDS each")
    args = parser.parse_args()

    if args.make_random_model:
        return make_random_model(args.make_random_model, args.preset)
    missing = [name for name in ("text_generation", "openai") if importlib.util.find_spec(name) is None]
    if missing:
        parser.error(f"the load test drives the real clients; install {' and '.join(missing)} "
                     "(pip install -e '.[test]' and text-generation==0.7.0 --no-deps)")
    if args.soak:
        if not args.model:
            parser.error("--soak starts its own server: give --model")
        server = ServerProcess(args.model, args.max_batch_size, args.max_queue, args.threads, args.api_key, args.dtype)
        try:
            one_request(server.url, 10**6, 2, args.api_key)  # warm-up
            report = soak(server, args.soak, args.max_new_tokens, args.api_key)
        finally:
            server.stop()
        print(json.dumps(report, indent=2))
        return
    if args.url:
        host = httpx.URL(args.url).host
        if host not in ("127.0.0.1", "localhost", "::1"):
            parser.error("the load test only targets loopback servers")
        report = run_load(args.url, args.clients, args.requests, args.duration, args.max_new_tokens, args.api_key)
        print(json.dumps(report, indent=2))
        return
    if not args.model:
        parser.error("give --url or --model")
    reports = {}
    for batch in ([1, args.max_batch_size] if args.compare else [args.max_batch_size]):
        server = ServerProcess(args.model, batch, args.max_queue, args.threads, args.api_key, args.dtype)
        try:
            one_request(server.url, 10**6, 2, args.api_key)  # warm-up
            reports[batch] = run_load(server.url, args.clients, args.requests, args.duration, args.max_new_tokens,
                                      args.api_key)
        finally:
            server.stop()
        print(f"max_batch_size={batch}: " + json.dumps(reports[batch]), flush=True)
    if args.compare:
        speedup = reports[args.max_batch_size]["requests_per_s"] / max(reports[1]["requests_per_s"], 1e-9)
        print(f"continuous batching speed-up at {args.clients} clients: {speedup:.2f}x "
              f"({reports[1]['requests_per_s']} -> {reports[args.max_batch_size]['requests_per_s']} requests/s)")


if __name__ == "__main__":
    main()
