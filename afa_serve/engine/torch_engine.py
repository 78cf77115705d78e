"""The embedded PyTorch engine: a scheduler thread stepping sequences with `SpeculativeDecoder`.

Requests wait in a bounded queue, up to `max_num_seqs` run at once, and the
scheduler gives each running sequence one speculative step per round (fair
interleaving). Deltas go back to the asyncio side through each request's own
queue. A request takes a free running slot as it is admitted, so at most `max_queue` wait; an
aborted or finished one leaves at once (the gauges with it) and is never stepped again.
Shutting down ends every request still held: one that has streamed ends with a last delta of
its own (`finish_reason` "abort"), one that has not gets `EngineClosedError`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import torch
from transformers import PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from afa_serve.engine.base import (
    Delta,
    EngineClosedError,
    EngineStats,
    GenerationRequest,
    InvalidRequestError,
    ModelInfo,
    QueueFullError,
    RequestTimings,
    SamplingParams,
    public_model_name,
)
from afa_serve.engine.config import EngineConfig
from afa_serve.engine.draft_vocab import DraftVocab, read_draft_vocab
from afa_serve.engine.feature_draft import FeatureDraft
from afa_serve.engine.loading import (
    check_draft_compatible,
    eos_token_ids,
    load_draft,
    load_draft_tokenizer,
    load_model,
    load_tokenizer,
    max_context_length,
    resolve_device,
    resolve_dtype,
)
from afa_serve.engine.output import OutputAssembler
from afa_serve.engine.penalties import LogitAdjustments
from afa_serve.engine.speculative import SequenceState, SpeculativeDecoder
from afa_serve.engine.verify import SamplingSettings
from afa_serve.models.resolve import resolve_model

logger = logging.getLogger(__name__)


@dataclass
class _Sequence:
    """One request inside the engine."""

    request: GenerationRequest
    output: OutputAssembler
    outbox: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    timings: RequestTimings
    state: SequenceState | None = None
    last: Delta | None = None  # the last delta sent
    aborted: bool = False
    finished: bool = False

    def send(self, item: Delta | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.outbox.put_nowait, item)
        except RuntimeError:  # the client's event loop is gone
            self.aborted = True


class TorchEngine:
    """Implements `afa_serve.engine.base.Engine` on Hugging Face models."""

    def __init__(self, config: EngineConfig, torch_threads: int | None = None):
        self.config = config
        self._torch_threads = torch_threads  # None: leave torch's own setting
        self._decoder: SpeculativeDecoder | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._eos_ids: frozenset[int] = frozenset()
        self._info: ModelInfo | None = None
        self._lock = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._by_id: dict[str, _Sequence] = {}
        self._stats = EngineStats()
        self._closing = False
        self._thread: threading.Thread | None = None
        # the seeds of requests without their own, from --seed
        self._seeds = None if config.seed is None else random.Random(config.seed)

    @classmethod
    def from_models(
        cls,
        target: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        draft: PreTrainedModel | None = None,
        config: EngineConfig | None = None,
        draft_tokenizer: PreTrainedTokenizerBase | None = None,
        draft_vocab: DraftVocab | None = None,
        torch_threads: int | None = None,
    ) -> TorchEngine:
        """An engine over models already in memory (tests, notebooks, the trainer's eval)."""
        config = config or EngineConfig(target=target.name_or_path or "target")
        engine = cls(config, torch_threads)
        engine._adopt(target, tokenizer, draft, draft_tokenizer or tokenizer, draft_vocab)
        return engine

    # -- the Engine interface --------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            raise RuntimeError("the engine is not started")
        return self._info

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            raise RuntimeError("the engine is not started")
        return self._tokenizer

    async def start(self) -> None:
        if self._decoder is None:
            await asyncio.to_thread(self._load)
        if self._thread is None:
            await asyncio.to_thread(self._calibrate)
            self._thread = threading.Thread(target=self._run, name="torch-engine", daemon=True)
            self._thread.start()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        sequence = self._admit(request)
        try:
            while True:
                item = await sequence.outbox.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if not sequence.finished:
                await self.abort(request.request_id)

    async def abort(self, request_id: str) -> None:
        with self._lock:
            sequence = self._by_id.get(request_id)
            if sequence is not None:
                self._retire(sequence)
                self._lock.notify()

    def stats(self) -> EngineStats:
        with self._lock:
            stats = self._stats.snapshot()
        if self._decoder is not None:
            costs = self._decoder.policy.costs
            stats.draft_cost_ratio = costs.draft_cost_ratio
            stats.verify_cost_ratio = costs.verify_cost_ratio(self.info.num_speculative_tokens + 1)
        return stats

    async def shutdown(self) -> None:
        with self._lock:
            self._closing = True
            for sequence in [*self._waiting, *self._running]:
                self._retire(sequence)
                sequence.send(_closed_end(sequence))
            self._lock.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    # -- loading -----------------------------------------------------------------------------

    def _load(self) -> None:
        device = resolve_device(self.config.device)
        dtype = resolve_dtype(self.config.dtype, device)
        logger.info("loading target %s (%s on %s)", self.config.target, dtype, device)
        target = load_model(self.config.target, dtype, device)
        tokenizer = load_tokenizer(self.config.tokenizer or self.config.target)
        draft = draft_tokenizer = draft_vocab = None
        if self.config.draft is not None and self.config.num_speculative_tokens > 0:
            logger.info("loading draft %s", self.config.draft)
            draft = load_draft(self.config.draft, dtype, device)
            draft_tokenizer = load_draft_tokenizer(self.config.draft, tokenizer)
            draft_vocab = read_draft_vocab(resolve_model(self.config.draft))
        self._adopt(target, tokenizer, draft, draft_tokenizer, draft_vocab)

    def _adopt(
        self,
        target: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        draft: PreTrainedModel | FeatureDraft | None,
        draft_tokenizer: PreTrainedTokenizerBase | None,
        draft_vocab: DraftVocab | None = None,
    ) -> None:
        if draft is not None:
            check_draft_compatible(target, tokenizer, draft, draft_tokenizer or tokenizer)
        self._eos_ids = eos_token_ids(target, tokenizer)
        head_ids = None
        if draft_vocab is not None and self.config.draft_vocab_size > 0:
            head_ids = draft_vocab.head_ids(self.config.draft_vocab_size, self._eos_ids)
            logger.info("draft head trimmed to %d tokens (%.1f%% of its training tokens)",
                        len(head_ids), 100 * draft_vocab.coverage(self.config.draft_vocab_size))
        self._decoder = SpeculativeDecoder(
            target, draft, self.config.num_speculative_tokens,
            speculation=self.config.speculation,
            confidence_threshold=self.config.confidence_threshold,
            draft_vocab=head_ids,
            prompt_lookup=self.config.prompt_lookup,
            draft_weights=self.config.draft_weights,
        )
        self._tokenizer = tokenizer
        context = max_context_length(target)
        max_model_len = min(self.config.max_model_len or context, context)
        self._info = ModelInfo(
            name=self.config.served_model_name or public_model_name(self.config.target),
            target=self.config.target,
            draft=self.config.draft if draft is not None else None,
            num_speculative_tokens=self._decoder.num_speculative_tokens,  # 0 with no proposer
            max_model_len=max_model_len,
            engine="torch",
            dtype=str(target.dtype).removeprefix("torch."),
            device=str(target.device),
            speculation=self._decoder.policy.mode,
        )

    # -- admission ---------------------------------------------------------------------------

    def _validate(self, request: GenerationRequest) -> None:
        prompt_length = len(request.prompt_token_ids)
        params = request.params
        limit = self.info.max_model_len
        if prompt_length == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if prompt_length >= limit:
            raise InvalidRequestError(
                f"the prompt has {prompt_length} tokens; this model's context is {limit} tokens "
                "and at least one must be left for the output",
                param="prompt",
            )
        if params.max_tokens < 1:
            raise InvalidRequestError("max_tokens must be at least 1", param="max_tokens")
        if prompt_length + params.max_tokens > limit:
            raise InvalidRequestError(
                f"this model's context is {limit} tokens; the prompt has {prompt_length} and "
                f"max_tokens asks for {params.max_tokens} more: lower max_tokens to at most "
                f"{limit - prompt_length}",
                param="max_tokens",
            )
        vocab_size = self._decoder.target.get_output_embeddings().weight.shape[0]
        if any(t < 0 or t >= vocab_size for t in request.prompt_token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab_size})", "prompt")
        if params.temperature < 0:
            raise InvalidRequestError("temperature must be >= 0", param="temperature")
        if not 0 < params.top_p <= 1:
            raise InvalidRequestError("top_p must be in (0, 1]", param="top_p")
        if params.top_k < -1:
            raise InvalidRequestError("top_k must be -1, 0 or positive", param="top_k")
        if not 0 <= params.min_p <= 1:
            raise InvalidRequestError("min_p must be in [0, 1]", param="min_p")
        if params.repetition_penalty <= 0:
            raise InvalidRequestError("repetition_penalty must be > 0", "repetition_penalty")
        if any(t < 0 or t >= vocab_size for t, _ in params.logit_bias):
            raise InvalidRequestError(f"logit_bias keys must be token ids in [0, {vocab_size})",
                                      param="logit_bias")

    def _admit(self, request: GenerationRequest) -> _Sequence:
        self._validate(request)
        sequence = _Sequence(
            request=request,
            output=OutputAssembler(
                self.tokenizer, request.prompt_token_ids, request.params, self._eos_ids
            ),
            outbox=asyncio.Queue(),
            loop=asyncio.get_running_loop(),
            timings=RequestTimings(arrival=request.arrival_time),
        )
        with self._lock:
            if self._closing:
                raise EngineClosedError("the engine is shutting down")
            if request.request_id in self._by_id:
                raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
            capacity = self.config.max_num_seqs + self.config.max_queue
            if len(self._running) + len(self._waiting) >= capacity:
                raise QueueFullError(
                    f"the server is at capacity ({len(self._running)} running, "
                    f"{len(self._waiting)} waiting); retry shortly"
                )
            self._waiting.append(sequence)
            self._by_id[request.request_id] = sequence
            self._schedule()
            self._lock.notify()
        return sequence

    def _schedule(self) -> None:
        """Move waiting sequences into free running slots and update the gauges; call with the
        lock held. Run on admission too, so `waiting` never exceeds max_queue."""
        while self._waiting and len(self._running) < self.config.max_num_seqs:
            sequence = self._waiting.popleft()
            sequence.timings.scheduled = time.monotonic()
            self._running.append(sequence)
        self._stats.num_waiting = len(self._waiting)
        self._stats.num_running = len(self._running)

    def _retire(self, sequence: _Sequence) -> None:
        """Take a sequence out of the queue or the running set at once (it finished or was
        aborted) and give its slot to the next waiting one; call with the lock held. Its caches
        go with its last reference: the scheduler skips a retired sequence it still holds."""
        sequence.aborted = sequence.aborted or not sequence.finished
        if sequence in self._waiting:
            self._waiting.remove(sequence)
        elif sequence in self._running:
            self._running.remove(sequence)
        self._by_id.pop(sequence.request.request_id, None)
        self._schedule()

    # -- the scheduler thread ----------------------------------------------------------------

    def _use_threads(self) -> None:
        """Apply `torch_threads` to the calling thread: with OpenMP each thread keeps its own
        count once it has computed, so the threads that compute set it themselves."""
        if self._torch_threads is not None:
            torch.set_num_threads(self._torch_threads)

    def _calibrate(self) -> None:
        self._use_threads()
        self._decoder.calibrate()

    def _run(self) -> None:
        self._use_threads()
        while True:
            with self._lock:
                while not (self._waiting or self._running or self._closing):
                    self._lock.wait()
                if self._closing and not self._running and not self._waiting:
                    return
                batch = list(self._running)
            for sequence in batch:
                if not sequence.aborted:
                    self._advance(sequence)

    def _advance(self, sequence: _Sequence) -> None:
        """Take one step of a sequence and send its delta, retiring it first if it finished."""
        try:
            delta = self._step(sequence)
        except Exception as error:  # a fault in one request must not stop the others
            logger.exception("request %s failed", sequence.request.request_id)
            sequence.finished = True
            delta = error
        with self._lock:  # against shutdown, which ends an unfinished sequence itself
            if sequence.finished:
                self._retire(sequence)
            elif sequence.aborted:
                return
            if isinstance(delta, Delta):
                sequence.last = delta
            sequence.send(delta)

    def _seed(self, params: SamplingParams) -> int | None:
        """The request's seed, else the next of --seed's sequence (none: unseeded)."""
        if params.seed is not None or self._seeds is None:
            return params.seed
        return self._seeds.getrandbits(63)

    def _step(self, sequence: _Sequence) -> Delta:
        """Prefill a new sequence or take one speculative step; return the delta."""
        request, decoder = sequence.request, self._decoder
        params = request.params
        state = sequence.state
        first = state is None
        if state is None:
            state = sequence.state = decoder.prefill(
                list(request.prompt_token_ids), self._settings(params), self._seed(params),
                params.logprobs, params.prompt_logprobs)
            with self._lock:
                self._stats.prompt_tokens += len(request.prompt_token_ids)
        step = decoder.step(state, params.max_tokens - sequence.output.num_generated)
        update = sequence.output.add(step.tokens)
        logprobs = None if step.logprobs is None else tuple(
            step.logprobs[: len(update.token_ids)])
        now = time.monotonic()
        if sequence.timings.first_token is None:
            sequence.timings.first_token = now
        if update.finish_reason is not None:
            sequence.timings.finished = now
            sequence.finished = True
        with self._lock:
            self._stats.generation_tokens += len(update.token_ids)
            self._stats.spec.add_step(step.num_drafted, step.num_accepted)
        return Delta(
            request_id=request.request_id,
            token_ids=update.token_ids,
            text=update.text,
            finish_reason=update.finish_reason,
            num_prompt_tokens=len(request.prompt_token_ids),
            num_generated_tokens=sequence.output.num_generated,
            spec=state.spec.copy(),
            timings=sequence.timings,
            stop_reason=update.stop_reason,
            draft_cost_ratio=decoder.policy.costs.draft_cost_ratio,
            verify_cost_ratio=decoder.policy.costs.verify_cost_ratio(
                decoder.num_speculative_tokens + 1),
            logprobs=logprobs,
            prompt_logprobs=(tuple(state.prompt_logprobs)
                             if first and state.prompt_logprobs is not None else None),
        )

    def _settings(self, params: SamplingParams) -> SamplingSettings:
        end_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self._eos_ids)
        adjustments = LogitAdjustments(
            repetition_penalty=params.repetition_penalty,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            logit_bias=params.logit_bias,
            min_tokens=params.min_tokens,
            end_token_ids=frozenset(end_ids),
        )
        return SamplingSettings(params.temperature, params.top_k, params.top_p, params.min_p,
                                adjustments)


def _closed_end(sequence: _Sequence) -> Delta | EngineClosedError:
    """How a request the engine shuts down on ends: a last delta after what it has streamed, or
    the refusal one that has streamed nothing gets."""
    last = sequence.last
    if last is None:
        return EngineClosedError("the engine shut down before the request started")
    sequence.timings.finished = time.monotonic()
    return replace(last, token_ids=(), text="", finish_reason="abort", stop_reason=None,
                   logprobs=None if last.logprobs is None else (), prompt_logprobs=None)
