"""`idefics serve`: an HTTP server that speaks TGI's API (as the `text-generation` client uses it) and OpenAI's
chat completions API (as the `openai` client uses it), on top of the continuous-batching engine.

Every request is parsed and checked (JSON, types, limits, images) before it is queued, so a bad request gets a
4xx naming the problem and never disturbs the batch. Errors use TGI's JSON (`error`, `error_type`) on TGI
routes (`tgi_routes`) and OpenAI's (`{"error": {"message", "type", "param", "code"}}`) under `/v1`
(`openai_routes`); what the routes share is `service.Service`."""

from __future__ import annotations

import argparse
import logging
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..model_options import add_model_options, load_from_args
from . import openai_routes, tgi_routes
from .protocol import ApiError, Limits
from .responses import openai_error, tgi_error
from .service import ClientGone, ServerSettings, Service

API_KEY_ENV = "IDEFICS_API_KEY"
log = logging.getLogger("idefics.serve")


def create_app(pipe, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI application serving `pipe` (an `idefics.Pipeline`)."""
    service = Service(pipe, settings or ServerSettings(model_name=pipe.name))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.engine.start()
        yield
        service.engine.stop()

    app = FastAPI(title="idefics", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)  # the schema is served at /openapi.json behind the API key
    app.state.service = service
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(ClientGone, on_client_gone)
    app.add_exception_handler(Exception, on_unexpected)
    app.include_router(tgi_routes.router)
    app.include_router(openai_routes.router)
    return app


def error_response(request: Request, error: ApiError) -> JSONResponse:
    """The error in the JSON of the route's API, with the headers clients act on."""
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
    if error.status == 429:
        headers["Retry-After"] = f"{max(1, round(request.app.state.service.settings.overload_delay))}"
    if error.status in (424, 504):
        headers["x-should-retry"] = "false"  # retrying the same request would fail the same way
    body = openai_error(error) if request.url.path.startswith("/v1") else tgi_error(error)
    return JSONResponse(body, status_code=error.status, headers=headers)


async def on_api_error(request: Request, error: ApiError):
    if error.status in (400, 413, 422):
        request.app.state.service.metrics.failure("validation")
    return error_response(request, error)


async def on_http_error(request: Request, error: StarletteHTTPException):
    kind = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http")
    return error_response(request, ApiError(error.status_code, f"{request.method} {request.url.path}: "
                                            f"{error.detail}", kind))


async def on_client_gone(request: Request, error: ClientGone):
    log.info("%s %s: the client disconnected while sending the request body", request.method, request.url.path)
    request.app.state.service.metrics.failure("dropped")
    return Response(status_code=499)


async def on_unexpected(request: Request, error: Exception):
    return error_response(request, ApiError(500, f"internal error: {type(error).__name__}", "internal"))


def http_protocol(header_timeout: float) -> type:
    """uvicorn's HTTP/1.1 protocol, closing a connection whose first request's headers have not all arrived within
    `header_timeout` seconds (uvicorn itself waits forever, so slow clients could hold any number of connections
    open). Bodies have their own limit (`ServerSettings.body_timeout`)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.header_deadline = self.loop.call_later(header_timeout, self.headers_overdue)

        def headers_overdue(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                log.info("closing a connection that sent no complete request headers in %g s", header_timeout)
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self.header_deadline.cancel()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


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
    d_settings = ServerSettings()
    p.add_argument("--header-timeout", type=float, default=d_settings.header_timeout, help="seconds a new connection "
                   "has to send its request headers (default: %(default)s)")
    p.add_argument("--body-timeout", type=float, default=d_settings.body_timeout, help="seconds to receive a "
                   "request body (default: %(default)s)")
    p.add_argument("--overload-delay", type=float, default=d_settings.overload_delay, help="seconds a 429 (server "
                   "full) is held before it is sent, so clients that retry at once do not flood the server "
                   "(default: %(default)s)")
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
                          image_fetch_timeout=args.image_fetch_timeout, body_timeout=args.body_timeout,
                          header_timeout=args.header_timeout, overload_delay=args.overload_delay,
                          api_key=args.api_key or os.environ.get(API_KEY_ENV) or None)


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    pipe = load_from_args(args)
    settings = settings_from_args(args, pipe.name)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        print(f"warning: listening on {args.host} without an API key (--api-key or {API_KEY_ENV})")
    uvicorn.run(create_app(pipe, settings), host=args.host, port=args.port, log_level=args.log_level,
                http=http_protocol(settings.header_timeout))
