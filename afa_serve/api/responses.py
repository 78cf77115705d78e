"""Deltas -> OpenAI responses: whole bodies, SSE chunk streams, usage and per-response metrics.

Per-response metrics (`metrics` beside `usage`) follow vLLM's per-request metrics: the
choices' speculative-decoding counts summed, and timings from scheduling to the last token. A
stream carries them on its last chunk before `data: [DONE]` (the usage chunk when
`stream_options.include_usage`, as vLLM; otherwise the last choice chunk).

Logprobs come with the deltas that carry their tokens. A completion with `echo` starts with the
prompt's text (and, with logprobs, the prompt's tokens, the first one unscored); with
`max_tokens: 0` the token the engine generated to score the prompt is left out, as vLLM does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from pydantic import BaseModel

from afa_serve.api.errors import APIError
from afa_serve.api.logprobs import LogprobFormatter
from afa_serve.api.prompting import Choice, Plan
from afa_serve.api.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    ErrorResponse,
    ResponseMetrics,
    SpeculativeDecodingMetrics,
    Usage,
)
from afa_serve.api.streams import ChoiceStreams, ClientDisconnected
from afa_serve.engine.base import Delta, SpecDecodeCounts, TokenLogprob

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


def sse(body: BaseModel) -> bytes:
    """One server-sent event."""
    return b"data: " + body.model_dump_json().encode() + b"\n\n"


@dataclass(frozen=True)
class UsageInStream:
    """Where a stream carries usage: a last chunk of its own (OpenAI's include_usage), and
    with vLLM's continuous_usage_stats on every chunk too."""

    last: bool = False
    continuous: bool = False


@dataclass(frozen=True)
class ResponseContext:
    response_id: str
    created: int
    model: str
    num_spec_tokens: int  # k; 0 when the engine decodes without a draft
    logprobs: LogprobFormatter


@dataclass
class ResponseAccount:
    """What a response's choices have produced so far."""

    plan: Plan
    last: dict[int, Delta] = field(default_factory=dict)
    texts: dict[int, list[str]] = field(default_factory=dict)
    logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    prompt_logprobs: dict[int, tuple[TokenLogprob | None, ...]] = field(default_factory=dict)

    def add(self, index: int, delta: Delta, keep_text: bool) -> None:
        self.last[index] = delta
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs[index] = delta.prompt_logprobs
        if keep_text and delta.text:
            self.texts.setdefault(index, []).append(delta.text)
        if keep_text and delta.logprobs:
            self.logprobs.setdefault(index, []).extend(delta.logprobs)

    def echo(self, choice: Choice) -> str:
        return "" if self.plan.echo is None else self.plan.echo[choice.prompt_index]

    def text(self, choice: Choice) -> str:
        generated = "" if self.plan.echo_only else "".join(self.texts.get(choice.index, ()))
        return self.echo(choice) + generated

    def completion_logprobs(
        self, choice: Choice, generated: list[TokenLogprob], formatter: LogprobFormatter,
        text_offset: int, with_prompt: bool,
    ) -> CompletionLogprobs | None:
        """The choice's logprobs (the prompt's first, with echo), or None if not asked for."""
        if choice.request.params.logprobs is None:
            return None
        entries: list[TokenLogprob | None] = []
        ids: list[int] = []
        if with_prompt and self.plan.echo is not None:
            entries += self.prompt_logprobs[choice.index]
            ids += choice.request.prompt_token_ids
        if not self.plan.echo_only:
            entries += generated
            ids += [entry.token_id for entry in generated]
        return formatter.completion(entries, ids, text_offset)

    @property
    def finished(self) -> bool:
        return len(self.last) == len(self.plan.choices) and all(
            d.finished for d in self.last.values()
        )

    def usage(self) -> Usage:
        completion = 0 if self.plan.echo_only else sum(
            d.num_generated_tokens for d in self.last.values())
        prompt = self.plan.num_prompt_tokens
        return Usage(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion)

    def metrics(self, num_spec_tokens: int) -> ResponseMetrics:
        """Timings as vLLM's per-request metrics, the choices taken together as one request."""
        deltas = list(self.last.values())
        timings = [d.timings for d in deltas]
        scheduled = min((t.scheduled for t in timings if t.scheduled is not None), default=None)
        first = min((t.first_token for t in timings if t.first_token is not None), default=None)
        last = max((t.finished for t in timings if t.finished is not None), default=None)
        arrival = min(t.arrival for t in timings)
        generated = sum(d.num_generated_tokens for d in deltas)
        decode_time = sum(t.finished - t.first_token for t in timings
                          if t.finished is not None and t.first_token is not None)
        later_tokens = sum(max(0, d.num_generated_tokens - 1) for d in deltas)

        def ms(seconds: float | None) -> float | None:
            return None if seconds is None else seconds * 1000

        def between(start: float | None, end: float | None) -> float | None:
            return None if start is None or end is None else end - start

        span = between(scheduled, last)
        return ResponseMetrics(
            time_to_first_token_ms=ms(between(scheduled, first)),
            generation_time_ms=ms(between(first, last)),
            queue_time_ms=ms(between(arrival, scheduled)),
            mean_itl_ms=ms(decode_time / later_tokens) if later_tokens else None,
            tokens_per_second=generated / span if span else None,
            speculative_decoding=(
                speculative_metrics(deltas, num_spec_tokens) if num_spec_tokens else None),
        )


def speculative_metrics(deltas: list[Delta], k: int) -> SpeculativeDecodingMetrics | None:
    """The choices' figures summed; None (null) where the engine does not know one's."""
    if any(delta.spec is None for delta in deltas):
        return None
    spec = SpecDecodeCounts()
    for delta in deltas:
        spec.merge(delta.spec)
    # Acceptance is a prefix: steps accepting >= j tokens = accepted_per_position[j - 1].
    at_least = [spec.num_drafts, *spec.accepted_per_position, *[0] * (k + 1)][: k + 2]
    return SpeculativeDecodingMetrics(
        mean_acceptance_length=spec.mean_acceptance_length or 1.0,
        draft_acceptance_rate=spec.acceptance_rate or 0.0,
        acceptance_histogram=[at_least[j] - at_least[j + 1] for j in range(k + 1)],
        num_spec_steps=spec.num_drafts,
        num_drafts=spec.num_drafts,
        num_accepted_draft_tokens=spec.num_accepted_tokens,
        num_draft_tokens=spec.num_draft_tokens,
        num_spec_tokens=k,
        num_accepted_tokens_per_pos=(spec.accepted_per_position + [0] * k)[:k],
        draft_length_histogram=(
            (spec.steps_by_draft_length + [0] * (k + 1))[: k + 1]
            if spec.steps_by_draft_length else None),
        draft_cost_ratio=deltas[-1].draft_cost_ratio if deltas else None,
        verify_cost_ratio=deltas[-1].verify_cost_ratio if deltas else None,
    )


async def collect(streams: ChoiceStreams, account: ResponseAccount) -> None:
    async for index, delta in streams:
        account.add(index, delta, keep_text=True)


def completion_body(context: ResponseContext, account: ResponseAccount) -> CompletionResponse:
    return CompletionResponse(
        id=context.response_id, created=context.created, model=context.model,
        choices=[
            CompletionChoice(index=c.index, text=account.text(c),
                             logprobs=account.completion_logprobs(
                                 c, account.logprobs.get(c.index, []), context.logprobs, 0,
                                 with_prompt=True),
                             finish_reason=account.last[c.index].finish_reason,
                             stop_reason=account.last[c.index].stop_reason)
            for c in account.plan.choices
        ],
        usage=account.usage(),
        metrics=account.metrics(context.num_spec_tokens),
    )


def chat_body(context: ResponseContext, account: ResponseAccount) -> ChatCompletionResponse:
    return ChatCompletionResponse(
        id=context.response_id, created=context.created, model=context.model,
        choices=[
            ChatChoice(index=c.index, message=AssistantMessage(content=account.text(c)),
                       logprobs=_chat_logprobs(context, c, account.logprobs.get(c.index, [])),
                       finish_reason=account.last[c.index].finish_reason,
                       stop_reason=account.last[c.index].stop_reason)
            for c in account.plan.choices
        ],
        usage=account.usage(),
        metrics=account.metrics(context.num_spec_tokens),
    )


def _chat_logprobs(context: ResponseContext, choice: Choice,
                   logprobs: Sequence[TokenLogprob]) -> ChatLogprobs | None:
    if choice.request.params.logprobs is None:
        return None
    return context.logprobs.chat(logprobs)


async def _events(
    context: ResponseContext,
    streams: ChoiceStreams,
    account: ResponseAccount,
    usage_in_stream: UsageInStream,
    opening: list[BaseModel],
    chunk_of: Callable[[int, Delta], CompletionChunk | ChatCompletionChunk],
    usage_chunk: Callable[[Usage, ResponseMetrics], CompletionChunk | ChatCompletionChunk],
) -> AsyncIterator[bytes]:
    """The SSE stream of a response whose engine requests have started; closes them at the end."""
    try:
        for body in opening:
            yield sse(body)
        async for index, delta in streams:
            account.add(index, delta, keep_text=False)
            if not (delta.text or delta.finished or delta.logprobs or delta.prompt_logprobs):
                continue  # text held back (a partial character or a possible stop string)
            chunk = chunk_of(index, delta)
            if usage_in_stream.continuous:
                chunk.usage = account.usage()
            if account.finished and not usage_in_stream.last:
                chunk.metrics = account.metrics(context.num_spec_tokens)
            yield sse(chunk)
        if usage_in_stream.last:
            yield sse(usage_chunk(account.usage(), account.metrics(context.num_spec_tokens)))
        yield DONE
    except ClientDisconnected:
        return
    except Exception as error:  # a fault after the 200 went out: say so in the stream
        logger.exception("stream %s failed", context.response_id)
        detail = APIError(500, f"The server failed while streaming: {error}", type="server_error")
        yield sse(ErrorResponse(error=detail.detail))
        yield DONE
    finally:
        await streams.aclose()


def completion_events(
    context: ResponseContext, streams: ChoiceStreams, account: ResponseAccount,
    usage_in_stream: UsageInStream,
) -> AsyncIterator[bytes]:
    choices = {c.index: c for c in account.plan.choices}
    text_offsets: dict[int, int] = {}  # per choice: where its next chunk's text starts

    def chunk(index: int, delta: Delta) -> CompletionChunk:
        choice = choices[index]
        first = index not in text_offsets
        text = ((account.echo(choice) if first else "")
                + ("" if account.plan.echo_only else delta.text))
        offset = text_offsets.get(index, 0)
        text_offsets[index] = offset + len(text)
        return CompletionChunk(
            id=context.response_id, created=context.created, model=context.model,
            choices=[CompletionChoice(
                index=index, text=text,
                logprobs=account.completion_logprobs(
                    choice, list(delta.logprobs or ()), context.logprobs, offset,
                    with_prompt=first),
                finish_reason=delta.finish_reason, stop_reason=delta.stop_reason)],
        )

    def last(usage: Usage, metrics: ResponseMetrics) -> CompletionChunk:
        return CompletionChunk(id=context.response_id, created=context.created,
                               model=context.model, choices=[], usage=usage, metrics=metrics)

    return _events(context, streams, account, usage_in_stream, [], chunk, last)


def chat_events(
    context: ResponseContext, streams: ChoiceStreams, account: ResponseAccount,
    usage_in_stream: UsageInStream,
) -> AsyncIterator[bytes]:
    choices = {c.index: c for c in account.plan.choices}

    def chunk(index: int, delta: Delta) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=context.response_id, created=context.created, model=context.model,
            choices=[ChatChunkChoice(
                index=index,
                delta=ChatDelta(content=delta.text) if delta.text else ChatDelta(),
                logprobs=_chat_logprobs(context, choices[index], delta.logprobs or ()),
                finish_reason=delta.finish_reason,
                stop_reason=delta.stop_reason,
            )],
        )

    def last(usage: Usage, metrics: ResponseMetrics) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=context.response_id, created=context.created,
                                   model=context.model, choices=[], usage=usage, metrics=metrics)

    opening = [
        ChatCompletionChunk(
            id=context.response_id, created=context.created, model=context.model,
            choices=[ChatChunkChoice(index=c.index, delta=ChatDelta(role="assistant", content=""),
                                     finish_reason=None)],
        )
        for c in account.plan.choices
    ]
    return _events(context, streams, account, usage_in_stream, opening, chunk, last)


def now_unix() -> int:
    return int(time.time())
