"""What every route shares: the settings, the pipeline, the engine, the limits and the counters (`Service`), and
the steps every generation request takes: the API key, the body read under its limits, the request checked and
prepared off the event loop, queued, and its events awaited."""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass, field, replace

from fastapi import Request
from starlette.requests import ClientDisconnect

from .. import __version__
from .engine import Engine, ErrorEvent, Job, Overloaded
from .inputs import image_policy, overloaded, prepare
from .metrics import ServerMetrics
from .protocol import ApiError, GenerationRequest, Limits, parse_json_object
from .responses import GenerationResult


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
    header_timeout: float = 10.0  # seconds a new connection has to send its request headers
    overload_delay: float = 1.0  # seconds a 429 is held (its Retry-After)


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

    async def refuse_if_full(self) -> None:
        """429 before the body is read or parsed, held for `overload_delay` seconds first: a client that retries
        at once without backoff then waits as `Retry-After` asks, instead of turning refusals into a flood that
        takes the CPU from the requests being served."""
        if self.engine.in_flight + self.validating >= self.engine.capacity:
            await asyncio.sleep(self.settings.overload_delay)
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
        await self.refuse_if_full()
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


def service_of(request: Request) -> Service:
    return request.app.state.service


async def authorized(request: Request) -> None:
    """The route dependency that checks `Authorization: Bearer KEY` when the server has a key."""
    key = service_of(request).settings.api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else ""
    if not hmac.compare_digest(token.encode(), key.encode()):
        raise ApiError(401, "missing or invalid API key: send `Authorization: Bearer <key>`", "authentication")


def dropped(service: Service, job: Job, answered: bool) -> None:
    """A stream ended: if the client left before its answer, the engine drops the request at its next step."""
    if not answered:
        service.metrics.failure("dropped")
    job.cancel()
