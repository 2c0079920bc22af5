"""Serving IDEFICS over HTTP: TGI- and OpenAI-compatible APIs with continuous batching.

    from idefics.serving import create_app, ServerSettings
    app = create_app(idefics.load(path), ServerSettings(max_batch_size=8))   # run with uvicorn

`idefics serve --help` starts it from the command line."""

from .engine import Engine, Job
from .protocol import ApiError, GenerationRequest, Limits
from .server import ServerSettings, create_app, register, serve

__all__ = ["ApiError", "Engine", "GenerationRequest", "Job", "Limits", "ServerSettings", "create_app", "register",
           "serve"]
