"""OpenAI's wire format: the request bodies this server accepts and the bodies it returns.

Every field of OpenAI's chat and completions requests is known, and so are vLLM's sampling
extensions that clients send (top_k, min_p, repetition_penalty, min_tokens, ignore_eos,
stop_token_ids, skip_special_tokens, chat_template_kwargs, stream_options'
continuous_usage_stats). A field is either honoured; or accepted and ignored, where it only
concerns OpenAI's platform (store, metadata, service_tier, prompt_cache_key, user,
safety_identifier, a message's name, stream_options' include_obfuscation) or only its speed
(prediction); or, where it would change the output and cannot be honoured (tools, JSON
response formats, audio, images, ...), accepted at its neutral value only: anything else is a
400 that names the parameter, never a silent change of meaning. An unknown field is refused, as
OpenAI answers it: "Unrecognized request argument supplied".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    GetJsonSchemaHandler,
    Tag,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)
from pydantic.json_schema import JsonSchemaValue, SkipJsonSchema
from pydantic_core import CoreSchema, PydanticCustomError

MAX_CHOICES = 16  # n, and n times the number of prompts of a batched completion
MAX_PROMPTS = 16  # prompts in one batched completion request
MAX_STOP_SEQUENCES = 16
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limits
MAX_TOP_LOGPROBS = 20
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class _NeutralOnly(AfterValidator):
    """An AfterValidator whose field's JSON schema lists the values it accepts."""

    accepted: tuple[object, ...] = ()

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"enum": list(self.accepted),
                "description": "Not supported; accepted only as a no-op: one of these values."}


def _neutral_only(*neutral: object) -> AfterValidator:
    """Accept the field only when it is absent, null or one of `neutral` (a no-op value)."""

    def check(value: object, info: ValidationInfo) -> object:
        if value is None or any(value == n and type(value) is type(n) for n in neutral):
            return value
        accepted = " or ".join(repr(n) for n in (None, *neutral))
        raise PydanticCustomError(
            "unsupported_parameter",
            "'{field}' is not supported by this server; only {accepted} is accepted",
            {"field": info.field_name, "accepted": accepted},
        )

    return _NeutralOnly(check, accepted=(None, *neutral))


def _valid_unicode(value: str) -> str:
    """JSON may escape lone surrogates ("\\ud800"); no tokenizer can encode them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError(
            "invalid_unicode", "text must be valid Unicode (it holds a lone surrogate)"
        ) from None
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]


class StrictModel(BaseModel):
    """No unknown fields, no NaN/Infinity, no type coercion ("3" is not 3, 1 is not true)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class StreamOptions(StrictModel):
    include_usage: bool = False
    include_obfuscation: bool | None = Field(
        None, description="Accepted and ignored: this server adds no obfuscation field.")
    continuous_usage_stats: bool = Field(
        False, description="vLLM extension: usage so far on every chunk (with include_usage).")


StopSequence = Annotated[Text, Field(min_length=1, max_length=1024)]
Stop = StopSequence | Annotated[list[StopSequence], Field(max_length=MAX_STOP_SEQUENCES)] | None
TokenId = Annotated[int, Field(ge=0, le=INT64_MAX)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
LogitBias = dict[Annotated[str, Field(pattern=r"^(0|[1-9][0-9]{0,18})$")],  # one key per id
                 Annotated[float, Field(ge=-100.0, le=100.0)]]


class SamplingFields(StrictModel):
    """What completions and chat completions share. null means the default, as in OpenAI's API."""

    model: Text = Field(description="The served model name, as GET /v1/models lists it.")
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = Field(
        None, description="Default 1; 0 (or below 1e-5) is greedy."
    )
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = Field(None, description="Default 1.")
    top_k: Annotated[int, Field(ge=-1)] | None = Field(
        None, description="vLLM extension; -1 or 0 (the default): no top-k."
    )
    seed: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)] | None = None
    stop: Stop = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_SEQUENCES)] | None = Field(
        None, description="vLLM extension: token ids that end generation."
    )
    ignore_eos: bool | None = Field(None, description="vLLM extension: generate past EOS.")
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = Field(
        None, description="vLLM extension: keep tokens at least min_p times the likeliest one.")
    min_tokens: Annotated[int, Field(ge=0)] | None = Field(
        None, description="vLLM extension: no EOS, stop token or stop string before this many.")
    repetition_penalty: Annotated[float, Field(gt=0.0, le=2.0)] | None = Field(
        None, description="vLLM extension: 1 (the default) is none; > 1 discourages tokens "
                          "of the prompt and output.")
    skip_special_tokens: bool | None = Field(
        None, description="vLLM extension: leave special tokens out of the text (default true).")
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] | None = Field(
        None, description="Default 1. Choice i samples with seed + i when a seed is given."
    )
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="Accepted and ignored.")
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: LogitBias | None = Field(
        None, description="Token id (a string) -> bias added to its logit, -100 to 100.")

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(
        cls, value: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise PydanticCustomError(
                "stream_options_without_stream",
                "'stream_options' is only allowed when 'stream' is true",
            )
        return value

    @property
    def num_choices(self) -> int:
        return self.n or 1

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def usage_in_stream(self) -> tuple[bool, bool]:
        """(a last usage chunk, usage on every chunk): continuous_usage_stats needs the first."""
        options = self.stream_options or StreamOptions()
        return options.include_usage, options.include_usage and options.continuous_usage_stats


PromptText = Annotated[Text, Field(max_length=8 * 1024 * 1024)]
PromptTokens = Annotated[list[TokenId], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    prompt: (
        PromptText
        | Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS)]
        | PromptTokens
        | Annotated[list[PromptTokens], Field(min_length=1, max_length=MAX_PROMPTS)]
    )
    echo: bool | None = Field(
        None, description="Prefix the prompt to the text (and, with logprobs, score it).")
    max_tokens: Annotated[int, Field(ge=0)] | None = Field(
        None, description="Tokens to generate at most; default 16, as OpenAI's. 0 only with "
                          "echo: the prompt scored, nothing generated."
    )
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = Field(
        None, description="Each token's log-probability under the target (before temperature "
                          "and penalties) and this many likeliest tokens besides.")
    suffix: Annotated[str | None, _neutral_only()] = None
    best_of: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Accepted only when equal to n."
    )

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != (info.data.get("n") or 1):
            raise PydanticCustomError(
                "unsupported_parameter",
                "'best_of' is not supported by this server unless it equals n",
            )
        return value

    @field_validator("max_tokens")
    @classmethod
    def _zero_only_with_echo(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value == 0 and not info.data.get("echo"):
            raise PydanticCustomError(
                "zero_max_tokens", "'max_tokens' may be 0 only with 'echo' true")
        return value

    @property
    def prompts(self) -> list[str] | list[list[int]]:
        """The prompts of this request, a batch or not."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if isinstance(self.prompt[0], int):
            return [self.prompt]
        return self.prompt


class TextPart(StrictModel):
    type: Literal["text"]
    text: Text


class RefusalPart(StrictModel):
    """A refusal an assistant message of the conversation gave; rendered as its text."""

    type: Literal["refusal"]
    refusal: Text


def _unsupported_part(kind: str) -> AfterValidator:
    def refuse(value: object) -> object:
        raise PydanticCustomError(
            "unsupported_content", "{kind} content is not supported by this server (text only)",
            {"kind": kind})

    return AfterValidator(refuse)


class OtherPart(BaseModel):
    """An image, audio or file part: known to OpenAI, refused here with the reason."""

    model_config = ConfigDict(extra="allow")
    type: Literal["image_url", "input_audio", "file"]


ContentPart = Annotated[
    Annotated[TextPart, Tag("type=text")] | Annotated[RefusalPart, Tag("type=refusal")]
    # refused, with the reason: not in the schema
    | Annotated[OtherPart, _unsupported_part("image"), Tag("type=image_url"), SkipJsonSchema()]
    | Annotated[OtherPart, _unsupported_part("audio"), Tag("type=input_audio"), SkipJsonSchema()]
    | Annotated[OtherPart, _unsupported_part("file"), Tag("type=file"), SkipJsonSchema()],
    Discriminator(lambda part: "type=" + str(part.get("type") if isinstance(part, dict)
                                             else getattr(part, "type", None)),
                  custom_error_type="unknown_content_part",
                  custom_error_message="a content part's type is text, refusal, image_url, "
                                       "input_audio or file"),
]
NO_TOOLS = "tool calls are not supported by this server"


class ChatMessage(StrictModel):
    """A message of the conversation. Text only: image, audio and file parts are refused, and
    so are tool calls and tool results (this server has no tools)."""

    role: Annotated[  # tool and function results are refused with the reason: not in the schema
        Literal["system", "developer", "user", "assistant", "tool", "function"],
        WithJsonSchema({"enum": ["system", "developer", "user", "assistant"],
                        "type": "string"})]
    tool_calls: Annotated[list[dict[str, Any]] | None, _neutral_only([])] = None
    function_call: Annotated[dict[str, Any] | None, _neutral_only()] = None
    content: Text | Annotated[list[ContentPart], Field(min_length=1)] | None = Field(
        None, validate_default=True)
    name: str | None = Field(None, description="Accepted and ignored.")
    refusal: str | None = Field(None, description="Assistant messages: accepted and ignored.")
    tool_call_id: Annotated[str | None, _neutral_only()] = None
    audio: Annotated[dict[str, Any] | None, _neutral_only()] = None

    @field_validator("role")
    @classmethod
    def _no_tool_results(cls, value: str) -> str:
        if value in ("tool", "function"):
            raise PydanticCustomError(
                "unsupported_role", "'{role}' messages answer tool calls, which this server "
                "does not support", {"role": value})
        return value

    @field_validator("content")
    @classmethod
    def _content_unless_tool_calls(cls, value: object, info: ValidationInfo) -> object:
        """Content is required but in an assistant message of tool calls (refused above)."""
        known = info.data
        if value is None and "role" in known and (known["role"] != "assistant" or (
                "tool_calls" in known and "function_call" in known
                and not known["tool_calls"] and known["function_call"] is None)):
            raise PydanticCustomError("missing", "Field required")
        return value

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text if isinstance(part, TextPart) else part.refusal
                         for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Tokens to generate at most; default: the rest of the context."
    )
    max_tokens: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Deprecated alias of max_completion_tokens."
    )
    logprobs: bool | None = Field(
        None, description="Each output token's log-probability under the target (before "
                          "temperature and penalties).")
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = Field(
        None, description="With logprobs: this many likeliest tokens at each position.")
    tools: Annotated[list[dict[str, Any]] | None, _neutral_only([])] = None
    tool_choice: Annotated[str | dict[str, Any] | None, _neutral_only("none", "auto")] = None
    parallel_tool_calls: bool | None = Field(None, description="Accepted; there are no tools.")
    functions: Annotated[list[dict[str, Any]] | None, _neutral_only([])] = None
    function_call: Annotated[str | dict[str, Any] | None, _neutral_only("none", "auto")] = None
    response_format: Annotated[dict[str, Any] | None, _neutral_only({"type": "text"})] = None
    audio: Annotated[dict[str, Any] | None, _neutral_only()] = None
    modalities: Annotated[list[str] | None, _neutral_only(["text"])] = None
    reasoning_effort: Annotated[str | None, _neutral_only()] = None
    verbosity: Annotated[str | None, _neutral_only("medium")] = None
    web_search_options: Annotated[dict[str, Any] | None, _neutral_only()] = None
    prediction: dict[str, Any] | None = Field(
        None, description="Accepted and ignored: a predicted output only saves time, and "
                          "speculative decoding already drafts.")
    store: bool | None = Field(None, description="Accepted and ignored.")
    metadata: dict[str, str] | None = Field(None, description="Accepted and ignored.")
    service_tier: str | None = Field(None, description="Accepted and ignored.")
    prompt_cache_key: str | None = Field(None, description="Accepted and ignored.")
    prompt_cache_retention: str | None = Field(None, description="Accepted and ignored.")
    safety_identifier: str | None = Field(None, description="Accepted and ignored.")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="vLLM extension: variables for the chat template.")

    @field_validator("max_tokens")
    @classmethod
    def _one_token_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        other = info.data.get("max_completion_tokens")
        if value is not None and other is not None and value != other:
            raise PydanticCustomError(
                "conflicting_parameters",
                "give 'max_completion_tokens' or its deprecated alias 'max_tokens', not both",
            )
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise PydanticCustomError(
                "top_logprobs_without_logprobs", "'top_logprobs' needs 'logprobs' true")
        return value

    @property
    def max_output_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def max_output_tokens_param(self) -> str:
        return "max_tokens" if self.max_completion_tokens is None else "max_completion_tokens"


# -- responses -------------------------------------------------------------------------------


def _is_none(value: object) -> bool:
    return value is None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class SpeculativeDecodingMetrics(BaseModel):
    """One response's speculative-decoding figures, in vLLM's per-request shape (all choices
    together; vLLM reports none when n > 1). `num_drafts` (= vLLM's `num_spec_steps`) and
    `num_accepted_tokens_per_pos` (as the Prometheus counter) are additions."""

    mean_acceptance_length: float = Field(
        description="1 + accepted / steps: tokens per target forward, the bonus included.")
    draft_acceptance_rate: float = Field(description="accepted / drafted draft tokens.")
    acceptance_histogram: list[int] = Field(
        description="Entry j (0..k): draft/verify steps that accepted exactly j draft tokens.")
    num_spec_steps: int = Field(description="Draft/verify steps.")
    num_drafts: int = Field(description="The same as num_spec_steps.")
    num_accepted_draft_tokens: int
    num_draft_tokens: int
    num_spec_tokens: int = Field(description="k: the most draft tokens proposed per step.")
    num_accepted_tokens_per_pos: list[int] = Field(
        description="Entry i: steps whose draft token at position i was accepted.")
    draft_length_histogram: list[int] | None = Field(
        description="Entry n: steps that drafted n tokens (0: plain steps, where the adaptive "
                    "policy or the draft's confidence chose not to draft); null where the "
                    "engine does not report it.")
    draft_cost_ratio: float | None = Field(
        description="c: a draft forward over a plain target step, as the engine measures it.")
    verify_cost_ratio: float | None = Field(
        description="v: a target pass over k + 1 tokens over a one-token pass, as measured.")


class ResponseMetrics(BaseModel):
    """Per-response timings as vLLM's: from scheduling (queue time apart) to the last token."""

    time_to_first_token_ms: float | None = Field(description="Scheduled -> first token.")
    generation_time_ms: float | None = Field(description="First -> last token.")
    queue_time_ms: float | None = Field(description="Arrival -> scheduled.")
    mean_itl_ms: float | None = Field(
        description="Mean time per output token after the first (decode time / (tokens - 1)).")
    tokens_per_second: float | None = Field(description="Output tokens / (last - scheduled).")
    speculative_decoding: SpeculativeDecodingMetrics | None = Field(
        description="null when the server decodes without a draft.")


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: per token its text, logprob, likeliest tokens (the chosen one
    among them) and where it starts in the choice's text; a first prompt token's entries null."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]
    refusal: None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None
    stop_reason: str | int | None = Field(
        None, description="vLLM extension: the stop string or token id that ended the choice."
    )


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    metrics: ResponseMetrics


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = Field(None, exclude_if=_is_none, description="Last chunk only.")
    metrics: ResponseMetrics | None = Field(
        None, exclude_if=_is_none, description="Last chunk only."
    )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    metrics: ResponseMetrics


class ChatDelta(BaseModel):
    """Only the fields a chunk carries: `{"role": "assistant", "content": ""}`, `{"content": s}`
    or `{}`."""

    role: Literal["assistant"] | None = Field(None, exclude_if=_is_none)
    content: str | None = Field(None, exclude_if=_is_none)


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None
    stop_reason: str | int | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(None, exclude_if=_is_none, description="Last chunk only.")
    metrics: ResponseMetrics | None = Field(
        None, exclude_if=_is_none, description="Last chunk only."
    )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "afa-serve"
    root: str = Field(description="The target model.")
    max_model_len: int
    draft: str | None
    num_speculative_tokens: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"] = "ok"
