"""vLLM's server utilities: POST /tokenize (a prompt, or chat messages through the chat
template), POST /detokenize and GET /version, in the shapes vLLM's OpenAI server gives them.

The tokens are the target's, as the generation endpoints count them: /tokenize of a prompt
gives the ids /v1/completions generates from, and of messages those /v1/chat/completions does.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Discriminator, Field, Tag, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from afa_serve import __version__
from afa_serve.api.errors import invalid_request, model_not_found
from afa_serve.api.prompting import chat_prompt_ids
from afa_serve.api.schemas import ChatMessage, ErrorResponse, PromptText, StrictModel, Text, TokenId
from afa_serve.api.state import ServerState

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request; `param` names the parameter."},
    404: {"model": ErrorResponse, "description": "Unknown model."},
}
_RETURN_TOKEN_STRS = "Also return each token's string (the tokenizer's own form)."


class TokenizeCompletionRequest(StrictModel):
    model: Text | None = Field(None, description="The served model name, if given.")
    prompt: PromptText
    add_special_tokens: bool = Field(
        True, description="Add the tokenizer's special tokens (BOS), as completions do.")
    return_token_strs: bool | None = Field(False, description=_RETURN_TOKEN_STRS)


class TokenizeChatRequest(StrictModel):
    model: Text | None = Field(None, description="The served model name, if given.")
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool | None = Field(
        None, description="End with the assistant's turn opening, as chat completions do "
        "(default: true, unless continue_final_message).")
    continue_final_message: bool = Field(
        False, description="Leave the last message open, to be continued.")
    add_special_tokens: bool = Field(
        False, description="Add special tokens besides those the chat template writes.")
    return_token_strs: bool | None = Field(False, description=_RETURN_TOKEN_STRS)
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Variables for the chat template.")

    @field_validator("continue_final_message")
    @classmethod
    def _one_ending(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("add_generation_prompt"):
            raise PydanticCustomError(
                "conflicting_parameters",
                "'continue_final_message' and 'add_generation_prompt' cannot both be true")
        return value


def _request_kind(body: Any) -> str | None:
    if isinstance(body, dict):
        if "messages" in body:
            return "TokenizeChatRequest"
        if "prompt" in body:
            return "TokenizeCompletionRequest"
    return None


TokenizeRequest = Annotated[
    Annotated[TokenizeCompletionRequest, Tag("TokenizeCompletionRequest")]
    | Annotated[TokenizeChatRequest, Tag("TokenizeChatRequest")],
    Discriminator(_request_kind, custom_error_type="prompt_or_messages",
                  custom_error_message="a tokenize request holds `prompt` or `messages`"),
]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(StrictModel):
    model: Text | None = Field(None, description="The served model name, if given.")
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


class Version(BaseModel):
    version: str


def _state(request: Request, model: str | None) -> ServerState:
    state: ServerState = request.app.state.server
    if model is not None and model != state.engine.info.name:
        raise model_not_found(model)
    return state


def _tokenize(tokenizer: Any, body: TokenizeCompletionRequest | TokenizeChatRequest) -> list[int]:
    if isinstance(body, TokenizeCompletionRequest):
        return tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]
    add_generation_prompt = body.add_generation_prompt
    if add_generation_prompt is None:
        add_generation_prompt = not body.continue_final_message
    return chat_prompt_ids(tokenizer, body.messages, body.chat_template_kwargs,
                           add_generation_prompt, body.continue_final_message,
                           body.add_special_tokens)


@router.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    state = _state(request, body.model)
    tokenizer = state.engine.tokenizer
    tokens = await asyncio.to_thread(_tokenize, tokenizer, body)
    return TokenizeResponse(
        count=len(tokens), max_model_len=state.engine.info.max_model_len, tokens=tokens,
        token_strs=tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None,
    )


@router.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    tokenizer = _state(request, body.model).engine.tokenizer
    if any(token >= len(tokenizer) for token in body.tokens):
        raise invalid_request(
            f"token ids must be below the vocabulary size {len(tokenizer)}", "tokens")
    return DetokenizeResponse(prompt=await asyncio.to_thread(tokenizer.decode, body.tokens))


@router.get("/version", response_model=Version)
async def version() -> Version:
    return Version(version=__version__)
