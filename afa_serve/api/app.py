"""The app factory: an OpenAI-compatible FastAPI app over any `Engine`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.middleware.cors import CORSMiddleware

from afa_serve import __version__
from afa_serve.api.admission import Admission
from afa_serve.api.errors import install_error_handlers
from afa_serve.api.middleware import (
    CountRequests,
    LimitBodySize,
    RefuseWhileDraining,
    RequireApiKey,
)
from afa_serve.api.prompt_size import max_prompt_chars
from afa_serve.api.routes import router
from afa_serve.api.state import ApiOptions, ServerState
from afa_serve.api.tokenization import router as tokenization_router
from afa_serve.engine.base import Engine
from afa_serve.metrics import ServerMetrics

_ERROR_SCHEMA_REF = {"$ref": "#/components/schemas/ErrorResponse"}


def _openapi_without_422(app: FastAPI) -> dict[str, Any]:
    """FastAPI documents validation errors as 422; this server answers them with 400."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description,
                             routes=app.routes)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                responses = operation.get("responses", {})
                if responses.pop("422", None) is not None:
                    responses.setdefault("400", {
                        "description": "Invalid request",
                        "content": {"application/json": {"schema": _ERROR_SCHEMA_REF}},
                    })
        components = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(engine: Engine, options: ApiOptions | None = None) -> FastAPI:
    """The app; its lifespan starts the engine (if not started) and shuts it down."""
    state = ServerState(engine=engine, options=options or ApiOptions())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        state.metrics = ServerMetrics(engine)
        state.admission = Admission(engine.config.max_num_seqs + engine.config.max_queue)
        state.max_prompt_chars = max_prompt_chars(engine.tokenizer, engine.info.max_model_len)
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(
        title="afa-serve",
        version=__version__,  # also when run from a checkout, not installed
        description="OpenAI-compatible completions and chat completions, decoded speculatively.",
        lifespan=lifespan,
    )
    app.state.server = state
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(tokenization_router)
    # add_middleware wraps: the last added runs first.
    app.add_middleware(LimitBodySize, max_bytes=state.options.max_body_bytes)
    app.add_middleware(RefuseWhileDraining, state=state)
    app.add_middleware(RequireApiKey, api_key=state.options.api_key)
    app.add_middleware(CountRequests, metrics=lambda: state.metrics)
    if state.options.allowed_origins:  # outermost: a browser's preflight carries no API key
        app.add_middleware(CORSMiddleware, allow_origins=list(state.options.allowed_origins),
                           allow_methods=["*"], allow_headers=["*"])
    app.openapi = lambda: _openapi_without_422(app)  # type: ignore[method-assign]
    return app
