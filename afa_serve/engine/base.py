"""The engine contract: what the API layer may know of any engine.

An engine turns a prompt (token ids) and sampling settings into a stream of
`Delta`s. It knows nothing of HTTP or Prometheus: it keeps plain counters in an
`EngineStats` that `afa_serve.metrics` reads at scrape time, and hands each
request's own figures back in its deltas.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from afa_serve.engine.config import EngineConfig

FinishReason = Literal["stop", "length", "abort"]


class EngineError(Exception):
    """Base class of errors an engine raises for a request it cannot serve."""


class InvalidRequestError(EngineError):
    """The request cannot be served as asked (prompt too long, bad parameter).

    `param` names the offending request field, as OpenAI's error body does.
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class QueueFullError(EngineError):
    """The bounded waiting queue is full; the client should retry later."""

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineClosedError(EngineError):
    """The engine is shutting down and takes no new work."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)
    min_tokens: int = 0  # no end-of-generation token or stop string before this many tokens
    skip_special_tokens: bool = True
    logprobs: int | None = None  # per output token: its logprob and this many likeliest tokens
    prompt_logprobs: int | None = None  # the same for every prompt token but the first

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the target's raw distribution, and the likeliest tokens
    there: (token id, logprob), most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)


@dataclass
class SpecDecodeCounts:
    """Speculative-decoding counts, for one request or for an engine's lifetime."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    # steps by how many tokens they drafted: [n] = steps that drafted n (0: plain steps);
    # empty where the engine does not report it (vLLM)
    steps_by_draft_length: list[int] = field(default_factory=list)

    def add_step(self, num_draft_tokens: int, num_accepted: int) -> None:
        """Record one draft/verify step: `num_draft_tokens` proposed, the first `num_accepted` kept."""
        _add_at(self.steps_by_draft_length, num_draft_tokens, 1)
        if num_draft_tokens == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_position) < num_draft_tokens:
            self.accepted_per_position.extend(
                [0] * (num_draft_tokens - len(self.accepted_per_position))
            )
        for position in range(num_accepted):
            self.accepted_per_position[position] += 1

    def merge(self, other: SpecDecodeCounts) -> None:
        self.num_drafts += other.num_drafts
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        if len(self.accepted_per_position) < len(other.accepted_per_position):
            self.accepted_per_position.extend(
                [0] * (len(other.accepted_per_position) - len(self.accepted_per_position))
            )
        for position, count in enumerate(other.accepted_per_position):
            self.accepted_per_position[position] += count
        for length, count in enumerate(other.steps_by_draft_length):
            _add_at(self.steps_by_draft_length, length, count)

    @property
    def acceptance_rate(self) -> float | None:
        if self.num_draft_tokens == 0:
            return None
        return self.num_accepted_tokens / self.num_draft_tokens

    @property
    def mean_acceptance_length(self) -> float | None:
        """1 + accepted/drafts: tokens produced per target forward (the bonus token included)."""
        if self.num_drafts == 0:
            return None
        return 1.0 + self.num_accepted_tokens / self.num_drafts

    @property
    def acceptance_per_position(self) -> list[float]:
        """Per draft position, the share of drafting steps whose token there was accepted."""
        if self.num_drafts == 0:
            return []
        return [accepted / self.num_drafts for accepted in self.accepted_per_position]

    def copy(self) -> SpecDecodeCounts:
        return SpecDecodeCounts(
            self.num_drafts,
            self.num_draft_tokens,
            self.num_accepted_tokens,
            list(self.accepted_per_position),
            list(self.steps_by_draft_length),
        )


def _add_at(counts: list[int], index: int, amount: int) -> None:
    if len(counts) <= index:
        counts.extend([0] * (index + 1 - len(counts)))
    counts[index] += amount


@dataclass
class RequestTimings:
    """Monotonic timestamps (time.monotonic) of one request's life in the engine."""

    arrival: float
    scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None

    @property
    def queue_time_s(self) -> float | None:
        return None if self.scheduled is None else self.scheduled - self.arrival


@dataclass(frozen=True)
class Delta:
    """New output of one request since its previous delta.

    `text` is the newly decoded text (it may be empty while a multi-byte
    character or a possible stop string is held back). The last delta of a
    request has a `finish_reason`. Counts are cumulative for the request; `spec` is None where
    the engine does not know the request's own speculative figures (vLLM sends them with a
    request's last output only, and not at all before 0.32 or for a request cut by a stop string).
    """

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_generated_tokens: int
    spec: SpecDecodeCounts | None
    timings: RequestTimings
    stop_reason: str | int | None = None  # the stop string or token that ended it
    # the engine's measured costs when the delta was made (None where it does not measure)
    draft_cost_ratio: float | None = None
    verify_cost_ratio: float | None = None
    # with SamplingParams.logprobs: one per token of token_ids; with prompt_logprobs, on the
    # first delta: one per prompt token, the first None (nothing scores it)
    logprobs: tuple[TokenLogprob, ...] | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EngineStats:
    """Cumulative counters and current gauges of an engine, read by the metrics exporter."""

    spec: SpecDecodeCounts = field(default_factory=SpecDecodeCounts)
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_running: int = 0
    num_waiting: int = 0
    # measured costs, where the engine measures them: c (a draft forward over a plain target
    # step) and v (a target pass over k + 1 tokens over a one-token pass)
    draft_cost_ratio: float | None = None
    verify_cost_ratio: float | None = None

    def snapshot(self) -> EngineStats:
        return EngineStats(
            self.spec.copy(),
            self.prompt_tokens,
            self.generation_tokens,
            self.num_running,
            self.num_waiting,
            self.draft_cost_ratio,
            self.verify_cost_ratio,
        )


def public_model_name(model: str) -> str:
    """A model as clients may see it: a local folder by its own name, never the server's path
    to it; a hub id or packaged model name as given."""
    path = Path(model).expanduser()
    if path.is_absolute() or model.startswith((".", "~")) or path.exists():
        return path.resolve().name
    return model


@dataclass(frozen=True)
class ModelInfo:
    """What is being served, for /v1/models, responses and the info metric: names only, as
    `public_model_name` makes them, whatever paths the engine was given."""

    name: str  # the name clients use in the `model` field
    target: str
    draft: str | None
    num_speculative_tokens: int
    max_model_len: int
    engine: str  # "torch" or "vllm"
    dtype: str
    device: str
    speculation: str = "fixed"  # how each step's k is chosen: adaptive, fixed or off

    def __post_init__(self) -> None:
        for name in ("target", "draft"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, public_model_name(value))


@runtime_checkable
class Engine(Protocol):
    """What the API layer needs of an engine. Implementations: TorchEngine, VllmEngine."""

    config: EngineConfig  # what it serves; it holds max_num_seqs + max_queue requests at once

    @property
    def info(self) -> ModelInfo: ...

    @property
    def tokenizer(self):  # a transformers PreTrainedTokenizerBase
        ...

    async def start(self) -> None:
        """Load models and start the scheduling loop."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream the request's deltas; the last has a finish_reason.

        Raises InvalidRequestError or QueueFullError before the first delta.
        Closing the iterator early (a client that went away) aborts the request.
        """

    async def abort(self, request_id: str) -> None:
        """Stop a request and free what it holds; a no-op if it already ended."""

    def stats(self) -> EngineStats:
        """A consistent snapshot of the engine's counters and gauges."""

    async def shutdown(self) -> None:
        """Stop taking work, abort what runs, free the models."""
