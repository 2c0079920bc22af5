"""`idefics serve`: an HTTP server that speaks TGI's API (as the `text-generation` client uses it) and OpenAI's
chat completions API (as the `openai` client uses it), on top of the continuous-batching engine.

Every request is parsed and checked (JSON, types, limits, images) before it is queued, so a bad request gets a
4xx naming the problem and never disturbs the batch. Errors use TGI's JSON (`error`, `error_type`) on TGI
routes and OpenAI's (`{"error": {"message", "type", "param", "code"}}`) under `/v1`."""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import __version__
from ..model_options import add_model_options, load_from_args
from .engine import Engine, ErrorEvent, Job, Overloaded
from .inputs import image_policy, overloaded, prepare, tokenize
from .metrics import ServerMetrics
from .protocol import (ApiError, GenerationRequest, GenerationResult, Limits, StopTextFilter, chat_chunk,
                       chat_completion, openai_error, openai_logprobs, parse_chat_request, parse_json_object,
                       parse_tgi_request, sse, tgi_error, tgi_response, tgi_stream_event, usage)

API_KEY_ENV = "IDEFICS_API_KEY"
log = logging.getLogger("idefics.serve")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class ServerSettings:
    model_name: str = "idefics"
    limits: Limits = field(default_factory=Limits)
    max_batch_size: int = 8
    max_queue: int = 32  # requests waiting beyond a full batch; more get 429
    request_timeout: float = 120.0  # seconds from arrival to the last token
    image_hosts: tuple[str, ...] | None = None  # None: remote image URLs off; ("*",): any host
    image_fetch_timeout: float = 5.0
    api_key: str | None = None
    validation_workers: int = 2  # requests whose text and images are checked at the same time
    body_timeout: float = 30.0  # seconds to receive a whole request body


def fit_limits(limits: Limits, context: int) -> Limits:
    """Clamp token limits to the model's context (max_position_embeddings)."""
    total = min(limits.max_total_tokens, context)
    return replace(limits, max_total_tokens=total, max_input_tokens=min(limits.max_input_tokens, total - 1),
                   max_new_tokens=min(limits.max_new_tokens, total - 1),
                   default_max_new_tokens=min(limits.default_max_new_tokens, total - 1))


class ClientGone(Exception):
    """The client went away before its request was read: nothing to answer, one log line."""


class Service:
    """What the routes share: the pipeline, the engine, the limits and the counters."""

    def __init__(self, pipe, settings: ServerSettings) -> None:
        self.pipe, self.settings = pipe, settings
        self.limits = fit_limits(settings.limits, pipe.config.max_position_embeddings)
        self.policy = image_policy(self.limits, settings.image_hosts, settings.image_fetch_timeout)
        self.engine = Engine(pipe, settings.max_batch_size, settings.max_queue)
        self.metrics = ServerMetrics()
        self.validating = 0
        self.gate: asyncio.Semaphore | None = None
        self.end_of_turn = "<end_of_utterance>" if pipe.tokenizer.has_end_of_utterance else ""
        self.fingerprint = f"idefics-{__version__}"

    def refuse_if_full(self) -> None:
        """429 before the body is read or parsed: refusing must cost far less than serving."""
        if self.engine.in_flight + self.validating >= self.engine.capacity:
            raise overloaded()

    async def read_json(self, request: Request) -> dict:
        """The body as a JSON object: size-limited, received within `body_timeout`, parsed off the event loop."""
        limit = self.limits.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body ({declared} bytes) is larger than the limit of {limit} bytes")
        raw = bytearray()  # one buffer, no list of chunks and no joined copy
        try:
            async with asyncio.timeout(self.settings.body_timeout):
                async for chunk in request.stream():
                    if len(raw) + len(chunk) > limit:
                        raise ApiError(413, f"the request body is larger than the limit of {limit} bytes")
                    raw += chunk
        except TimeoutError:
            raise ApiError(408, f"the request body was not received within {self.settings.body_timeout:g} s",
                           "timeout") from None
        except ClientDisconnect:
            raise ClientGone() from None
        return parse_json_object(raw) if len(raw) < 2**16 else await self.in_worker(parse_json_object, raw)

    async def in_worker(self, function, *args):
        """Run CPU-heavy request work (parsing, tokenizing, image decoding) in a worker thread, at most
        `validation_workers` at a time, so the event loop keeps answering."""
        self.gate = self.gate or asyncio.Semaphore(self.settings.validation_workers)
        self.validating += 1
        try:
            async with self.gate:
                return await asyncio.to_thread(function, *args)
        finally:
            self.validating -= 1

    async def submit(self, req: GenerationRequest) -> tuple[Job, asyncio.Queue]:
        """Check and prepare the request in a worker thread, then queue it (429 when the server is full)."""
        self.refuse_if_full()
        arrived = time.monotonic()
        prepared = await self.in_worker(prepare, self.pipe, req, self.limits, self.policy)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(prepared.inputs, prepared.params, lambda event: loop.call_soon_threadsafe(queue.put_nowait, event),
                  req.frequency_penalty, req.presence_penalty, req.typical_p, req.top_n_tokens,
                  req.decoder_input_details, deadline=arrived + self.settings.request_timeout)
        try:
            self.engine.submit(job)
        except Overloaded as error:
            raise ApiError(429, str(error), "overloaded") from None
        return job, queue

    async def next_event(self, job: Job, queue: asyncio.Queue, request: Request | None = None):
        """The engine's next event for this job, or None once the client is gone. For non-streaming requests
        (`request` given) the client connection is checked every half second, events or not (a streaming
        response notices a disconnect by itself); queued requests past their deadline are answered too."""
        getter = asyncio.ensure_future(queue.get())
        try:
            while True:
                done, _ = await asyncio.wait({getter}, timeout=0.5)
                if request is not None and time.monotonic() - job.checked_at > 0.5:
                    job.checked_at = time.monotonic()
                    if await request.is_disconnected():
                        job.cancel()
                        return None
                if done:
                    return getter.result()
                if time.monotonic() > job.deadline + 1.0:
                    job.cancel()
                    return ErrorEvent("Request timed out while waiting in the queue", "timeout", 504)
        finally:
            getter.cancel()

    async def result(self, job: Job, queue: asyncio.Queue, request: Request) -> GenerationResult | None:
        try:
            while True:
                event = await self.next_event(job, queue, request)
                if event is None:
                    self.metrics.failure("dropped")
                    return None
                if isinstance(event, ErrorEvent):
                    self.metrics.failure(event.error_type)
                    raise ApiError(event.status, event.message, event.error_type)
                if event.done is not None:
                    self.metrics.success(job, event.done)
                    return event.done
        finally:
            job.cancel()


def create_app(pipe, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI application serving `pipe` (an `idefics.Pipeline`)."""
    settings = settings or ServerSettings(model_name=pipe.name)
    service = Service(pipe, settings)
    limits = service.limits

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.engine.start()
        yield
        service.engine.stop()

    app = FastAPI(title="idefics", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)  # the schema is served below, behind the API key
    app.state.service = service

    def error_response(request: Request, error: ApiError) -> JSONResponse:
        openai_route = request.url.path.startswith("/v1")
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
        if error.status == 429:
            headers["Retry-After"] = "1"
        if error.status in (424, 504):
            headers["x-should-retry"] = "false"  # retrying the same request would fail the same way
        body = openai_error(error) if openai_route else tgi_error(error)
        return JSONResponse(body, status_code=error.status, headers=headers)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, error: ApiError):
        if error.status in (400, 413, 422):
            service.metrics.failure("validation")
        return error_response(request, error)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http")
        return error_response(request, ApiError(error.status_code, f"{request.method} {request.url.path}: "
                                                f"{error.detail}", kind))

    @app.exception_handler(ClientGone)
    async def on_client_gone(request: Request, error: ClientGone):
        log.info("%s %s: the client disconnected while sending the request body", request.method, request.url.path)
        service.metrics.failure("dropped")
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, error: Exception):
        return error_response(request, ApiError(500, f"internal error: {type(error).__name__}", "internal"))

    async def authorized(request: Request) -> None:
        if not settings.api_key:
            return
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), settings.api_key.encode()):
            raise ApiError(401, "missing or invalid API key: send `Authorization: Bearer <key>`", "authentication")

    guarded = [Depends(authorized)]

    # ------------------------------------------------------------------------------------------- TGI routes
    async def tgi_generate(request: Request, stream: bool | None):
        service.refuse_if_full()
        req = parse_tgi_request(await service.read_json(request), limits)
        job, queue = await service.submit(req)
        if stream if stream is not None else req.stream:
            return StreamingResponse(tgi_events(job, queue, req), media_type="text/event-stream",
                                     headers=SSE_HEADERS, background=BackgroundTask(job.cancel))
        result = await service.result(job, queue, request)
        if result is None:
            return Response(status_code=499)
        body = tgi_response(result, req)
        headers = {"x-prompt-tokens": str(result.prompt_tokens), "x-generated-tokens": str(len(result.tokens))}
        return JSONResponse([body] if stream is None else body, headers=headers)

    async def tgi_events(job: Job, queue: asyncio.Queue, req: GenerationRequest):
        answered = False
        try:
            while True:
                event = await service.next_event(job, queue)
                if isinstance(event, ErrorEvent):
                    answered = True
                    service.metrics.failure(event.error_type)
                    yield sse(tgi_error(ApiError(event.status, event.message, event.error_type)), space=False)
                    return
                if event.done is not None:
                    answered = True
                    service.metrics.success(job, event.done)
                yield sse(tgi_stream_event(event.index, event.token, event.top_tokens, req, event.done), space=False)
                if event.done is not None:
                    return
        finally:
            dropped(job, answered)

    def dropped(job: Job, answered: bool) -> None:
        """A stream ended: if the client left before its answer, the engine drops the request at its next step."""
        if not answered:
            service.metrics.failure("dropped")
        job.cancel()

    @app.post("/", dependencies=guarded)
    async def compat(request: Request):
        return await tgi_generate(request, None)

    @app.post("/generate", dependencies=guarded)
    async def generate(request: Request):
        return await tgi_generate(request, False)

    @app.post("/generate_stream", dependencies=guarded)
    async def generate_stream(request: Request):
        return await tgi_generate(request, True)

    @app.post("/tokenize", dependencies=guarded)
    async def tokenize_route(request: Request):
        req = parse_tgi_request(await service.read_json(request), limits)
        return JSONResponse(await service.in_worker(tokenize, pipe, req, limits))

    @app.get("/info", dependencies=guarded)
    async def info():
        config = pipe.config
        return {"model_id": settings.model_name, "model_sha": None, "model_dtype": str(pipe.model.dtype),
                "model_device_type": pipe.model.device.type, "model_pipeline_tag": "image-text-to-text",
                "max_concurrent_requests": service.engine.capacity, "max_best_of": 1,
                "max_stop_sequences": limits.max_stop_sequences, "max_input_length": limits.max_input_tokens,
                "max_total_tokens": limits.max_total_tokens, "max_new_tokens": limits.max_new_tokens,
                "max_images": limits.max_images, "max_image_bytes": limits.max_image_bytes,
                "max_image_pixels": limits.max_image_pixels, "remote_image_urls": settings.image_hosts is not None,
                "waiting_served_ratio": None, "max_batch_total_tokens": None, "max_waiting_tokens": None,
                "max_batch_size": settings.max_batch_size, "validation_workers": settings.validation_workers,
                "max_client_batch_size": 1, "router": "idefics", "version": __version__, "sha": None,
                "docker_label": None, "max_position_embeddings": config.max_position_embeddings}

    @app.get("/health")
    @app.get("/")
    async def health():
        if not service.engine.alive:
            raise ApiError(503, "unhealthy", "healthcheck")
        return Response(status_code=200)

    @app.get("/openapi.json", dependencies=guarded)
    async def openapi_schema():
        return app.openapi()

    @app.get("/metrics", dependencies=guarded)
    async def metrics():
        return PlainTextResponse(service.metrics.render(service.engine.stats()),
                                 media_type="text/plain; version=0.0.4")

    # ---------------------------------------------------------------------------------------- OpenAI routes
    @app.get("/v1/models", dependencies=guarded)
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "idefics"}]}

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat(request: Request):
        service.refuse_if_full()
        req = parse_chat_request(await service.read_json(request), limits, service.end_of_turn)
        job, queue = await service.submit(req)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return StreamingResponse(chat_events(job, queue, req, completion_id, created),
                                     media_type="text/event-stream", headers=SSE_HEADERS,
                                     background=BackgroundTask(job.cancel))
        result = await service.result(job, queue, request)
        if result is None:
            return Response(status_code=499)
        return chat_completion(result, req, settings.model_name, completion_id, created, service.fingerprint)

    async def chat_events(job: Job, queue: asyncio.Queue, req: GenerationRequest, completion_id: str, created: int):
        def chunk(delta: dict, finish: str | None = None, logprobs: dict | None = None) -> str:
            return sse(chat_chunk(completion_id, created, settings.model_name, service.fingerprint, delta, finish,
                                  logprobs))

        answered = False
        text = StopTextFilter(req.stop)  # OpenAI answers end before the stop sequence
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                event = await service.next_event(job, queue)
                if isinstance(event, ErrorEvent):
                    answered = True
                    service.metrics.failure(event.error_type)
                    yield sse(openai_error(ApiError(event.status, event.message, event.error_type)))
                    return
                token = event.token
                piece = text.push(token.text) if not token.special else ""
                if event.done is not None:
                    piece += text.flush()
                if piece:
                    logprobs = openai_logprobs([token], [event.top_tokens]) if req.details else None
                    yield chunk({"content": piece}, logprobs=logprobs)
                if event.done is not None:
                    answered = True
                    service.metrics.success(job, event.done)
                    yield chunk({}, "length" if event.done.finish_reason == "length" else "stop")
                    if req.include_usage:
                        yield sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                   "model": settings.model_name, "choices": [], "usage": usage(event.done)})
                    yield sse("[DONE]")
                    return
        finally:
            dropped(job, answered)

    return app


# ------------------------------------------------------------------------------------------------------- CLI

EPILOG = """examples:
  idefics serve                                   # the embedded idefics-mini on http://127.0.0.1:8080
  idefics serve --model ./idefics-9b-instruct --dtype bfloat16 --port 8000
  idefics serve --api-key secret --max-batch-size 16 --max-queue 64
  idefics serve --allow-image-urls upload.example.com images.example.com

then, with TGI's client (images as markdown inside the prompt):
  from text_generation import Client
  client = Client("http://127.0.0.1:8080")
  client.generate("User:![](data:image/png;base64,...)Describe it.<end_of_utterance>\\nAssistant:",
                  max_new_tokens=50, stop_sequences=["<end_of_utterance>", "\\nUser:"]).generated_text

or with OpenAI's client (base_url must end in /v1):
  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="-")
  client.chat.completions.create(model="idefics", temperature=0, messages=[{"role": "user", "content": [
      {"type": "text", "text": "What is in this image?"},
      {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}])

endpoints: POST / /generate /generate_stream /tokenize /v1/chat/completions; GET /info /health /metrics
/v1/models. Remote image URLs are off unless --allow-image-urls names the hosts ("*" = any host); local
files can never be read. The API key can also come from the IDEFICS_API_KEY environment variable."""


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `serve` sub-command to an argparse subparsers object."""
    p = subparsers.add_parser("serve", help="serve a model over HTTP (TGI and OpenAI APIs)",
                              description="Serve an IDEFICS model over HTTP, compatible with TGI's "
                                          "`text-generation` client and OpenAI's chat completions API, with "
                                          "continuous batching.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Limits()
    add_model_options(p)
    p.add_argument("--name", default=None, help="model name reported by /info and /v1/models")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="port (default: %(default)s)")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=32, help="requests waiting beyond a full batch before "
                   "answering 429 (default: %(default)s)")
    p.add_argument("--max-images", type=int, default=d.max_images, help="images per request (default: %(default)s)")
    p.add_argument("--max-image-bytes", type=int, default=d.max_image_bytes, help="encoded size of one image "
                   "(default: %(default)s)")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, help="width x height of one image, "
                   "checked before decoding (default: %(default)s)")
    p.add_argument("--max-input-tokens", type=int, default=d.max_input_tokens, help="prompt tokens (default: "
                   "%(default)s, capped by the model's context)")
    p.add_argument("--max-total-tokens", type=int, default=d.max_total_tokens, help="prompt + new tokens "
                   "(default: %(default)s, capped by the model's context)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="new tokens per request "
                   "(default: %(default)s)")
    p.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes, help="request body size "
                   "(default: %(default)s)")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds from arrival to the last token "
                   "(default: %(default)s)")
    p.add_argument("--allow-image-urls", nargs="+", metavar="HOST", default=None, help="fetch http(s) image URLs "
                   "from these hosts only ('*': any host); off by default")
    p.add_argument("--image-fetch-timeout", type=float, default=5.0, help="seconds (default: %(default)s)")
    p.add_argument("--api-key", default=None, help=f"require `Authorization: Bearer KEY` (or set {API_KEY_ENV})")
    p.add_argument("--log-level", default="info", help="uvicorn log level (default: %(default)s)")
    p.set_defaults(func=serve)
    return p


def settings_from_args(args: argparse.Namespace, model_name: str) -> ServerSettings:
    limits = Limits(max_images=args.max_images, max_image_bytes=args.max_image_bytes,
                    max_image_pixels=args.max_image_pixels, max_input_tokens=args.max_input_tokens,
                    max_total_tokens=args.max_total_tokens, max_new_tokens=args.max_new_tokens,
                    max_request_bytes=args.max_request_bytes)
    return ServerSettings(model_name=args.name or model_name, limits=limits, max_batch_size=args.max_batch_size,
                          max_queue=args.max_queue, request_timeout=args.request_timeout,
                          image_hosts=tuple(args.allow_image_urls) if args.allow_image_urls else None,
                          image_fetch_timeout=args.image_fetch_timeout,
                          api_key=args.api_key or os.environ.get(API_KEY_ENV) or None)


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    pipe = load_from_args(args)
    settings = settings_from_args(args, pipe.name)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        print(f"warning: listening on {args.host} without an API key (--api-key or {API_KEY_ENV})")
    uvicorn.run(create_app(pipe, settings), host=args.host, port=args.port, log_level=args.log_level)


def main(argv: list[str] | None = None) -> None:
    """`python -m idefics.serving.server serve ...` (the same as `idefics serve ...`)."""
    parser = argparse.ArgumentParser(prog="idefics")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
