"""From a validated OpenAI request to engine requests: prompt token ids and sampling settings.

Tokenizing (and rendering the chat template) runs in a worker thread so a long prompt does
not stall the event loop. The context limit is checked here, against `ModelInfo`, so every
engine refuses an over-long request the same way and with OpenAI's parameter names.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from dataclasses import dataclass
from typing import Any

from afa_serve.api.errors import invalid_request
from afa_serve.api.schemas import (
    MAX_CHOICES,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingFields,
)
from afa_serve.engine.base import GenerationRequest, ModelInfo, SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
GREEDY_BELOW_TEMPERATURE = 1e-5  # as vLLM: smaller temperatures are greedy (and would overflow)


@dataclass(frozen=True)
class Choice:
    """One engine request behind one choice of a response."""

    index: int
    prompt_index: int
    request: GenerationRequest


@dataclass(frozen=True)
class Plan:
    """The engine requests one HTTP request becomes."""

    choices: list[Choice]
    prompt_lengths: list[int]  # per distinct prompt, for usage.prompt_tokens
    echo: list[str] | None = None  # per prompt: its text, put before each of its choices' text
    # max_tokens 0 with echo: the engine generates one token (it scores the prompt on the way),
    # which the response leaves out, as vLLM's server does
    echo_only: bool = False

    @property
    def num_prompt_tokens(self) -> int:
        return sum(self.prompt_lengths)


def chat_prompt_ids(
    tokenizer, messages: list[ChatMessage], variables: dict[str, Any] | None,
    add_generation_prompt: bool = True, continue_final_message: bool = False,
    add_special_tokens: bool = False,
) -> list[int]:
    """The messages rendered by the chat template, as token ids; a 400 naming `messages` or
    `chat_template_kwargs` where they cannot be rendered."""
    if not getattr(tokenizer, "chat_template", None):
        raise invalid_request(
            "This model has no chat template; use /v1/completions.", param="messages"
        )
    conversation = [
        # OpenAI's `developer` role is the `system` role of chat templates.
        {"role": "system" if m.role == "developer" else m.role, "content": m.text}
        for m in messages
    ]
    variables = variables or {}
    arguments = inspect.signature(tokenizer.apply_chat_template).parameters
    reserved = sorted(variables.keys() & arguments.keys())
    if reserved:
        raise invalid_request(
            f"chat_template_kwargs may hold template variables only, not {', '.join(reserved)}",
            param="chat_template_kwargs")
    try:
        text = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, tokenize=False, **variables
        )
    except Exception as error:  # noqa: BLE001 - any error the template itself raises
        # (its own checks, e.g. alternating roles) is the client's messages' fault
        logger.info("chat template refused the messages: %s", error)
        raise invalid_request(
            f"The chat template cannot render these messages: {error}", param="messages"
        ) from None
    # The template already holds the special tokens (BOS, role markers).
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def _completion_prompt_ids(tokenizer, prompts: list[str] | list[list[int]]) -> list[list[int]]:
    return [
        list(prompt) if isinstance(prompt, list) else tokenizer(prompt)["input_ids"]
        for prompt in prompts
    ]


def _check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    if any(token >= vocab_size for token in ids):
        raise invalid_request(f"token ids must be below the vocabulary size {vocab_size}", param)


def _max_tokens(
    requested: int | None, default: int | None, prompt_length: int, info: ModelInfo,
    prompt_param: str, max_tokens_param: str,
) -> int:
    """The output budget; refuses a prompt (plus output) that does not fit the context."""
    limit = info.max_model_len
    if prompt_length == 0:
        raise invalid_request("The prompt is empty.", prompt_param)
    if prompt_length >= limit:
        raise invalid_request(
            f"This model's maximum context length is {limit} tokens. However, your "
            f"{prompt_param} resulted in {prompt_length} tokens, which leaves no room for output.",
            prompt_param,
        )
    max_tokens = requested if requested is not None else default
    if max_tokens is None:
        return limit - prompt_length
    if prompt_length + max_tokens > limit:
        raise invalid_request(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_length + max_tokens} tokens ({prompt_length} in the {prompt_param}, "
            f"{max_tokens} for the output). Lower {max_tokens_param} to at most "
            f"{limit - prompt_length}.",
            max_tokens_param,
        )
    return max_tokens


def _sampling(
    fields: SamplingFields, max_tokens: int, seed_offset: int, logprobs: int | None,
    prompt_logprobs: int | None,
) -> SamplingParams:
    temperature = 1.0 if fields.temperature is None else fields.temperature

    def given(value, default):
        return default if value is None else value

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0 if temperature < GREEDY_BELOW_TEMPERATURE else temperature,
        top_p=1.0 if fields.top_p is None else fields.top_p,
        top_k=0 if fields.top_k is None else fields.top_k,
        seed=None if fields.seed is None else fields.seed + seed_offset,
        stop=fields.stop_sequences,
        stop_token_ids=tuple(fields.stop_token_ids or ()),
        ignore_eos=bool(fields.ignore_eos),
        min_p=given(fields.min_p, 0.0),
        repetition_penalty=given(fields.repetition_penalty, 1.0),
        presence_penalty=given(fields.presence_penalty, 0.0),
        frequency_penalty=given(fields.frequency_penalty, 0.0),
        logit_bias=tuple((int(token), bias) for token, bias in (fields.logit_bias or {}).items()),
        min_tokens=given(fields.min_tokens, 0),
        skip_special_tokens=given(fields.skip_special_tokens, True),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )


def _plan(
    fields: SamplingFields,
    prompts: list[list[int]],
    budgets: list[int],
    response_id: str,
    arrival_time: float,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    echo: list[str] | None = None,
    echo_only: bool = False,
) -> Plan:
    n = fields.num_choices
    if len(prompts) * n > MAX_CHOICES:
        raise invalid_request(
            f"{len(prompts)} prompts times n={n} asks for more than {MAX_CHOICES} choices", "n"
        )
    choices = []
    for prompt_index, (prompt, budget) in enumerate(zip(prompts, budgets, strict=True)):
        for sample in range(n):
            index = prompt_index * n + sample
            request = GenerationRequest(
                request_id=f"{response_id}-{index}",
                prompt_token_ids=tuple(prompt),
                params=_sampling(fields, budget, sample, logprobs, prompt_logprobs),
                arrival_time=arrival_time,
            )
            choices.append(Choice(index, prompt_index, request))
    return Plan(choices, [len(p) for p in prompts], echo, echo_only)


def _check_fields(fields: SamplingFields, vocab_size: int, budgets: list[int]) -> None:
    """What needs the tokenizer or the output budget: token ids, min_tokens."""
    _check_token_ids(list(fields.stop_token_ids or ()), vocab_size, "stop_token_ids")
    _check_token_ids([int(token) for token in fields.logit_bias or {}], vocab_size, "logit_bias")
    if fields.min_tokens and fields.min_tokens > min(budgets):
        raise invalid_request(
            f"min_tokens ({fields.min_tokens}) must not exceed the output limit "
            f"({min(budgets)})", "min_tokens")


async def plan_completion(
    request: CompletionRequest, tokenizer, info: ModelInfo, response_id: str, arrival_time: float
) -> Plan:
    prompts = await asyncio.to_thread(_completion_prompt_ids, tokenizer, request.prompts)
    vocab_size = len(tokenizer)
    echo_only = request.max_tokens == 0  # the schema allows 0 only with echo
    budgets = []
    for ids in prompts:
        _check_token_ids(ids, vocab_size, "prompt")
        budgets.append(_max_tokens(
            1 if echo_only else request.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS, len(ids),
            info, "prompt", "max_tokens",
        ))
    _check_fields(request, vocab_size, budgets)
    echo = None
    if request.echo:
        echo = [prompt if isinstance(prompt, str) else tokenizer.decode(ids)
                for prompt, ids in zip(request.prompts, prompts, strict=True)]
    return _plan(request, prompts, budgets, response_id, arrival_time, request.logprobs,
                 request.logprobs if request.echo else None, echo, echo_only)


async def plan_chat(
    request: ChatCompletionRequest, tokenizer, info: ModelInfo, response_id: str,
    arrival_time: float,
) -> Plan:
    ids = await asyncio.to_thread(chat_prompt_ids, tokenizer, request.messages,
                                  request.chat_template_kwargs)
    budget = _max_tokens(
        request.max_output_tokens, None, len(ids), info, "messages",
        request.max_output_tokens_param,
    )
    _check_fields(request, len(tokenizer), [budget])
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    return _plan(request, [ids], [budget], response_id, arrival_time, logprobs)
