"""TGI's routes (`text-generation` client): `POST /`, `/generate`, `/generate_stream`, `/tokenize`; and the
server's own `GET /info`, `/health`, `/metrics`, `/openapi.json`. Errors are TGI's JSON (`error`,
`error_type`)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from .. import __version__
from .engine import ErrorEvent, Job
from .inputs import tokenize
from .protocol import ApiError, GenerationRequest, parse_tgi_request
from .responses import sse, tgi_error, tgi_response, tgi_stream_event
from .service import Service, authorized, dropped, service_of

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
router = APIRouter()
guarded = [Depends(authorized)]


async def tgi_generate(request: Request, stream: bool | None):
    """`stream` None: the compat route `/`, whose body says whether to stream and whose answer is a list."""
    service = service_of(request)
    await service.refuse_if_full()
    req = parse_tgi_request(await service.read_json(request), service.limits)
    job, queue = await service.submit(req)
    if stream if stream is not None else req.stream:
        return StreamingResponse(tgi_events(service, job, queue, req), media_type="text/event-stream",
                                 headers=SSE_HEADERS, background=BackgroundTask(job.cancel))
    result = await service.result(job, queue, request)
    if result is None:
        return Response(status_code=499)
    body = tgi_response(result, req)
    headers = {"x-prompt-tokens": str(result.prompt_tokens), "x-generated-tokens": str(len(result.tokens))}
    return JSONResponse([body] if stream is None else body, headers=headers)


async def tgi_events(service: Service, job: Job, queue: asyncio.Queue, req: GenerationRequest):
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
        dropped(service, job, answered)


@router.post("/", dependencies=guarded)
async def compat(request: Request):
    return await tgi_generate(request, None)


@router.post("/generate", dependencies=guarded)
async def generate(request: Request):
    return await tgi_generate(request, False)


@router.post("/generate_stream", dependencies=guarded)
async def generate_stream(request: Request):
    return await tgi_generate(request, True)


@router.post("/tokenize", dependencies=guarded)
async def tokenize_route(request: Request):
    service = service_of(request)
    req = parse_tgi_request(await service.read_json(request), service.limits)
    return JSONResponse(await service.in_worker(tokenize, service.pipe, req, service.limits))


@router.get("/info", dependencies=guarded)
async def info(request: Request):
    service = service_of(request)
    pipe, settings, limits = service.pipe, service.settings, service.limits
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
            "docker_label": None, "max_position_embeddings": pipe.config.max_position_embeddings}


@router.get("/health")
@router.get("/")
async def health(request: Request):
    if not service_of(request).engine.alive:
        raise ApiError(503, "unhealthy", "healthcheck")
    return Response(status_code=200)


@router.get("/openapi.json", dependencies=guarded)
async def openapi_schema(request: Request):
    return request.app.openapi()


@router.get("/metrics", dependencies=guarded)
async def metrics(request: Request):
    service = service_of(request)
    return PlainTextResponse(service.metrics.render(service.engine.stats()), media_type="text/plain; version=0.0.4")
