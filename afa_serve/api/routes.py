"""The HTTP routes: health, models, completions, chat completions and metrics."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from afa_serve.api.errors import from_engine_error, model_not_found
from afa_serve.api.logprobs import LogprobFormatter
from afa_serve.api.prompt_size import check_prompt_size
from afa_serve.api.prompting import Plan, plan_chat, plan_completion
from afa_serve.api.responses import (
    ResponseAccount,
    ResponseContext,
    UsageInStream,
    chat_body,
    chat_events,
    collect,
    completion_body,
    completion_events,
    now_unix,
)
from afa_serve.api.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    SamplingFields,
)
from afa_serve.api.sse import EventStreamResponse
from afa_serve.api.state import ServerState
from afa_serve.api.streams import ChoiceStreams, ClientDisconnected
from afa_serve.engine.base import EngineClosedError, InvalidRequestError, QueueFullError
from afa_serve.metrics import CONTENT_TYPE

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left; it never reaches anyone

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(_state)]

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Invalid request: the message says what, `param` names the parameter.",
        401: "Missing or wrong API key (when the server has one).",
        404: "Unknown model.",
        413: "Request body too large.",
        429: "Queue full; retry after Retry-After seconds.",
        503: "Shutting down; retry elsewhere after Retry-After seconds.",
    }.items()
}
# One server-sent event: `data` holds a JSON chunk, or `[DONE]` last.
_SSE_EVENT = {"type": "object", "required": ["data"],
              "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}
_STREAM = {200: {"content": {"text/event-stream": {"schema": _SSE_EVENT}},
                 "description": "JSON, or with `stream: true` server-sent events."}}


@router.get("/health", response_model=Health, responses={503: _ERRORS[503]})
async def health(state: State) -> Any:
    if state.draining:
        return JSONResponse({"status": "draining"}, status_code=503, headers={"Retry-After": "1"})
    return Health()


def _model_card(state: ServerState) -> ModelCard:
    info = state.engine.info
    return ModelCard(id=info.name, created=state.started_at, root=info.target,
                     max_model_len=info.max_model_len, draft=info.draft,
                     num_speculative_tokens=info.num_speculative_tokens)


@router.get("/v1/models", response_model=ModelList)
async def list_models(state: State) -> ModelList:
    return ModelList(data=[_model_card(state)])


@router.get("/v1/models/{model:path}", response_model=ModelCard, responses={404: _ERRORS[404]})
async def retrieve_model(model: str, state: State) -> ModelCard:
    if model != state.engine.info.name:
        raise model_not_found(model)
    return _model_card(state)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}})
async def metrics(state: State) -> Response:
    assert state.metrics is not None, "metrics exist once the engine has started"
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


Planner = Callable[..., Awaitable[Plan]]
BodyBuilder = Callable[[ResponseContext, ResponseAccount], BaseModel]
EventsBuilder = Callable[[ResponseContext, ChoiceStreams, ResponseAccount, UsageInStream],
                         AsyncGenerator[bytes, None]]


async def _generate(
    request: Request,
    state: ServerState,
    body: SamplingFields,
    id_prefix: str,
    plan: Planner,
    build_body: BodyBuilder,
    build_events: EventsBuilder,
    param_names: dict[str, str],
) -> Any:
    """The flow both generation endpoints share: plan, start, then stream or collect."""
    received = time.monotonic()
    engine, metrics = state.engine, state.metrics
    info = engine.info
    if body.model != info.name:
        raise model_not_found(body.model)
    check_prompt_size(body, state.max_prompt_chars, info.max_model_len)
    response_id = f"{id_prefix}-{uuid.uuid4().hex}"
    planned = await plan(body, engine.tokenizer, info, response_id, received)
    reservation = state.admission.reserve(len(planned.choices))
    observers = {c.request.request_id: metrics.observer() for c in planned.choices}
    streams = ChoiceStreams(engine, planned.choices, request.receive,
                            observe=lambda delta: observers[delta.request_id].observe(delta),
                            cut=state.cut, release=reservation.release)
    try:
        await streams.start()
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except (InvalidRequestError, QueueFullError, EngineClosedError) as error:
        raise from_engine_error(error, param_names) from None
    context = ResponseContext(response_id, now_unix(), info.name, info.num_speculative_tokens,
                              LogprobFormatter(engine.tokenizer))
    account = ResponseAccount(planned)
    if body.stream:
        return EventStreamResponse(
            build_events(context, streams, account, UsageInStream(*body.usage_in_stream)),
            on_close=streams.aclose)
    try:
        await collect(streams, account)
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        await streams.aclose()
    return build_body(context, account)


@router.post("/v1/completions", response_model=CompletionResponse,
             responses={**_STREAM, **_ERRORS})
async def create_completion(body: CompletionRequest, request: Request, state: State) -> Any:
    return await _generate(request, state, body, "cmpl", plan_completion, completion_body,
                           completion_events, param_names={})


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses={**_STREAM, **_ERRORS})
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, state: State
) -> Any:
    return await _generate(
        request, state, body, "chatcmpl", plan_chat, chat_body, chat_events,
        param_names={"prompt": "messages", "max_tokens": body.max_output_tokens_param},
    )
