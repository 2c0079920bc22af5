"""OpenAI's routes (`openai` client): `GET /v1/models`, `POST /v1/chat/completions`, plain and streamed. Errors are
OpenAI's JSON (`{"error": {"message", "type", "param", "code"}}`); answers end before a stop sequence."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from .engine import ErrorEvent, Job
from .protocol import ApiError, GenerationRequest, parse_chat_request
from .responses import StopTextFilter, chat_chunk, chat_completion, openai_error, openai_logprobs, sse, usage
from .service import Service, authorized, dropped, service_of
from .tgi_routes import SSE_HEADERS

router = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])


@router.get("/models")
async def models(request: Request):
    return {"object": "list", "data": [{"id": service_of(request).settings.model_name, "object": "model",
                                        "created": 0, "owned_by": "idefics"}]}


@router.post("/chat/completions")
async def chat(request: Request):
    service = service_of(request)
    await service.refuse_if_full()
    req = parse_chat_request(await service.read_json(request), service.limits, service.end_of_turn)
    job, queue = await service.submit(req)
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if req.stream:
        return StreamingResponse(chat_events(service, job, queue, req, completion_id, created),
                                 media_type="text/event-stream", headers=SSE_HEADERS,
                                 background=BackgroundTask(job.cancel))
    result = await service.result(job, queue, request)
    if result is None:
        return Response(status_code=499)
    return chat_completion(result, req, service.settings.model_name, completion_id, created, service.fingerprint)


async def chat_events(service: Service, job: Job, queue: asyncio.Queue, req: GenerationRequest, completion_id: str,
                      created: int):
    model = service.settings.model_name

    def chunk(delta: dict, finish: str | None = None, logprobs: dict | None = None) -> str:
        return sse(chat_chunk(completion_id, created, model, service.fingerprint, delta, finish, logprobs))

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
            piece = (text.push(token.text) if not token.special else "") + (text.flush() if event.done else "")
            if piece:
                logprobs = openai_logprobs([token], [event.top_tokens]) if req.details else None
                yield chunk({"content": piece}, logprobs=logprobs)
            if event.done is not None:
                answered = True
                service.metrics.success(job, event.done)
                yield chunk({}, "length" if event.done.finish_reason == "length" else "stop")
                if req.include_usage:
                    yield sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                               "model": model, "choices": [], "usage": usage(event.done)})
                yield sse("[DONE]")
                return
    finally:
        dropped(service, job, answered)
