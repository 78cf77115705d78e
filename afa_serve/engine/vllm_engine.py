"""The vLLM engine: vLLM's `AsyncLLM` (with a draft model: its `draft_model` speculator) behind
afa-serve's `Engine` interface, so the same HTTP layer, metrics and dashboards serve both engines.

- Requests become vLLM `SamplingParams` with DELTA outputs; each vLLM output becomes a `Delta`
  (one output may carry several tokens when drafts were accepted). Closing a stream early
  closes vLLM's generator, which aborts the request in vLLM.
- Engine-wide figures come from a stat logger handed to `AsyncLLM`: vLLM calls it once per
  engine step with that step's scheduler and iteration stats (deltas, not totals), which are
  summed into an `EngineStats`. vLLM also registers its own `vllm:*` metrics in
  prometheus_client's default registry; afa-serve's /metrics renders its own registry only.
- Per-request speculative figures come from vLLM's per-request spec-decode metrics, which vLLM
  sends with a request's last output only (and not for a request cut by a stop string):
  deltas without them carry `spec=None`, which responses show as null. Releases without them
  (before `per_request_spec_decode_metrics`, e.g. 0.24) send none at all, while the
  engine-wide figures are complete on every release.
- Admission is this engine's own, as the torch engine's: at most max_num_seqs + max_queue
  requests at once, beyond them QueueFullError (not every vLLM release has an admission limit).
- Before vLLM starts, the draft is checked against the target (tokenizer vocabularies, output
  vocabulary sizes, tensor-parallel sizes) so a mismatch is one clear error, not a failure
  deep inside vLLM's start-up.

vLLM is imported when the engine starts; importing this module only checks it is installed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from transformers import AutoConfig
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from afa_serve.engine.base import (
    Delta,
    EngineClosedError,
    EngineError,
    EngineStats,
    FinishReason,
    GenerationRequest,
    InvalidRequestError,
    ModelInfo,
    QueueFullError,
    RequestTimings,
    SamplingParams,
    SpecDecodeCounts,
    TokenLogprob,
    public_model_name,
)
from afa_serve.engine.config import CPU_MEMORY_UTILIZATION, EngineConfig
from afa_serve.engine.feature_draft import is_feature_draft
from afa_serve.engine.loading import (
    IncompatibleDraftError,
    load_draft_tokenizer,
    load_tokenizer,
    own_vocabulary,
    resolve_dtype_name,
    vocabulary_difference,
)
from afa_serve.engine.vllm_support import VllmUnavailableError, vllm_installed
from afa_serve.models.resolve import resolve_model

if not vllm_installed():
    raise VllmUnavailableError("vLLM is not installed")

logger = logging.getLogger(__name__)

# vLLM's finish reasons that end a request normally, as ours.
_FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "abort": "abort",
    "repetition": "stop",  # vLLM's optional repetition detector stopped it
}


# -- checks before vLLM starts ---------------------------------------------------------------


def check_draft_pairing(
    config: EngineConfig,
    target_tokenizer: PreTrainedTokenizerBase,
    draft_tokenizer: PreTrainedTokenizerBase,
    target_config: Any,
    draft_config: Any,
) -> bool:
    """Refuse a draft vLLM could not verify against the target, saying what differs. A draft
    with a vocabulary of its own (`afa-train trim-vocab`) passes when every one of its tokens is
    the target's and this vLLM maps vocabularies (`vllm_maps_vocabularies`): True then."""
    vocabulary = vocabulary_difference(target_tokenizer, draft_tokenizer)
    own = own_vocabulary(target_tokenizer, draft_tokenizer, draft_config.vocab_size)
    if own:
        vocabulary = None if vllm_maps_vocabularies() else (
            f"it has a vocabulary of its own ({draft_config.vocab_size} of the target's "
            "tokens), which this vLLM cannot map to the target's (use_heterogeneous_vocab, "
            "vLLM 0.32 and later)")
    elif target_config.vocab_size != draft_config.vocab_size:
        vocabulary = "; ".join(filter(None, [vocabulary, (
            f"output vocabulary sizes differ (target {target_config.vocab_size}, "
            f"draft {draft_config.vocab_size})")]))
    if vocabulary:
        raise IncompatibleDraftError(
            f"the draft model {config.draft} cannot be used with the target {config.target}: "
            f"{vocabulary}"
        )
    tp = config.tensor_parallel_size
    draft_tp = config.draft_tensor_parallel_size or tp
    if draft_tp not in (1, tp):
        raise ValueError(
            f"draft_tensor_parallel_size is {draft_tp}: vLLM runs a draft model either "
            f"unsharded (1) or sharded like the target (tensor_parallel_size {tp})"
        )
    for role, model_config, size in (("target", target_config, tp),
                                     ("draft", draft_config, draft_tp)):
        heads = model_config.num_attention_heads
        if heads % size:
            raise ValueError(
                f"the {role} model has {heads} attention heads, which {size}-way tensor "
                f"parallelism cannot split evenly: choose a size that divides {heads}"
            )
    return own


# -- statistics ------------------------------------------------------------------------------


class StatsAccumulator:
    """Sums vLLM's per-step stats into an `EngineStats`; keeps the latest gauges per engine."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = EngineStats()
        self._running: dict[int, int] = {}
        self._waiting: dict[int, int] = {}

    def record(self, scheduler_stats: Any, iteration_stats: Any, engine_index: int) -> None:
        with self._lock:
            stats = self._stats
            if scheduler_stats is not None:
                self._running[engine_index] = scheduler_stats.num_running_reqs
                # As vLLM's own waiting gauge: waiting for capacity plus deferred.
                self._waiting[engine_index] = (
                    scheduler_stats.num_waiting_reqs
                    + getattr(scheduler_stats, "num_skipped_waiting_reqs", 0)
                )
                stats.num_running = sum(self._running.values())
                stats.num_waiting = sum(self._waiting.values())
                step = scheduler_stats.spec_decoding_stats
                if step is not None:
                    stats.spec.merge(SpecDecodeCounts(
                        step.num_drafts, step.num_draft_tokens, step.num_accepted_tokens,
                        list(step.num_accepted_tokens_per_pos),
                    ))
            if iteration_stats is not None:
                stats.prompt_tokens += iteration_stats.num_prompt_tokens
                stats.generation_tokens += iteration_stats.num_generation_tokens

    def snapshot(self) -> EngineStats:
        with self._lock:
            return self._stats.snapshot()


def stat_logger_factory(accumulator: StatsAccumulator) -> Callable[..., Any]:
    """A per-engine stat logger factory for `AsyncLLM(stat_loggers=[...])` feeding `accumulator`."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class AfaServeStatLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0):
            self._engine_index = engine_index

        def record(self, scheduler_stats: Any, iteration_stats: Any,
                   mm_cache_stats: Any = None, engine_idx: int = 0) -> None:
            accumulator.record(scheduler_stats, iteration_stats, engine_idx)

        def log_engine_initialized(self) -> None:
            logger.info("vLLM engine %d initialized", self._engine_index)

    return AfaServeStatLogger


def vllm_has_per_request_spec_metrics() -> bool:
    """Whether this vLLM can send per-request spec-decode metrics (0.32 can, 0.24 cannot)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    return "per_request_spec_decode_metrics" in {
        f.name for f in dataclasses.fields(AsyncEngineArgs)}


def vllm_maps_vocabularies() -> bool:
    """Whether this vLLM runs a draft whose vocabulary differs from the target's, mapping the
    two by token string (SpeculativeConfig.use_heterogeneous_vocab, greedy drafting: 0.32)."""
    from vllm.config import SpeculativeConfig

    return "use_heterogeneous_vocab" in {f.name for f in dataclasses.fields(SpeculativeConfig)}


def vllm_has_batch_schedule() -> bool:
    """Whether this vLLM chooses k by batch size (num_speculative_tokens_per_batch_size: 0.32
    can, 0.24 cannot)."""
    from vllm.config import SpeculativeConfig

    return "num_speculative_tokens_per_batch_size" in {
        f.name for f in dataclasses.fields(SpeculativeConfig)}


def request_spec_counts(metrics: Any) -> SpecDecodeCounts:
    """vLLM's per-request `RequestSpecDecodeMetrics` (histogram[j] = steps that accepted exactly
    j drafts) as our counts: acceptance is a prefix, so position p was accepted in every step
    that accepted more than p."""
    histogram = list(metrics.histogram)
    return SpecDecodeCounts(
        num_drafts=sum(histogram),
        num_draft_tokens=metrics.num_draft_tokens,
        num_accepted_tokens=sum(j * steps for j, steps in enumerate(histogram)),
        accepted_per_position=[sum(histogram[p + 1:]) for p in range(len(histogram) - 1)],
    )


# -- the engine ------------------------------------------------------------------------------


class VllmEngine:
    """Implements `afa_serve.engine.base.Engine` on vLLM's `AsyncLLM`."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self._llm: Any = None  # vllm.v1.engine.async_llm.AsyncLLM once started
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._info: ModelInfo | None = None
        self._accumulator = StatsAccumulator()
        self._active: set[str] = set()
        self._own_vocabulary = False  # the draft's vocabulary is its own (vLLM maps it)
        self._closing = False

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

    @property
    def vllm(self) -> Any:
        """The running `AsyncLLM` (for tests and diagnostics)."""
        if self._llm is None:
            raise RuntimeError("the engine is not started")
        return self._llm

    async def start(self) -> None:
        if self._llm is not None:
            return
        self._tokenizer = await asyncio.to_thread(self._check_models)
        # vLLM binds its output handling to the running event loop: build it on this loop.
        # This blocks the loop for the start-up; nothing is served before start() returns.
        self._llm = self._build()
        self._info = self._model_info()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        llm = self._llm
        if self._closing or llm is None:
            raise EngineClosedError("the engine is shutting down")
        if request.request_id in self._active:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        capacity = self.config.max_num_seqs + self.config.max_queue
        if len(self._active) >= capacity:
            raise QueueFullError(
                f"the server is at capacity ({len(self._active)} requests); retry shortly")
        params = self._sampling_params(request.params, self.info.num_speculative_tokens > 0)
        timings = RequestTimings(arrival=request.arrival_time)
        self._active.add(request.request_id)  # no await since the checks: admission is exact
        outputs: Any = None
        generated = 0
        first = True
        try:
            engine_input = await self._engine_input(request.prompt_token_ids)
            outputs = llm.generate(engine_input, params, request.request_id)
            while True:
                output = await self._next_output(outputs)
                now = time.monotonic()
                completion = output.outputs[0]
                generated += len(completion.token_ids)
                self._note_times(timings, output, now, bool(completion.token_ids))
                finish_reason = self._finish_reason(completion.finish_reason)
                if finish_reason is not None:
                    timings.finished = now
                # Sent with the last output only; never before vLLM 0.32 (no such attribute).
                metrics = getattr(completion, "spec_decode_metrics", None)
                spec = request_spec_counts(metrics) if metrics is not None else None
                yield Delta(
                    request_id=request.request_id,
                    token_ids=tuple(completion.token_ids),
                    text=completion.text,
                    finish_reason=finish_reason,
                    num_prompt_tokens=len(request.prompt_token_ids),
                    num_generated_tokens=generated,
                    spec=spec,
                    timings=timings,
                    stop_reason=completion.stop_reason,
                    logprobs=(None if request.params.logprobs is None else _logprobs(
                        completion.token_ids, completion.logprobs, request.params.logprobs)),
                    prompt_logprobs=(_prompt_logprobs(
                        request.prompt_token_ids, output.prompt_logprobs,
                        request.params.prompt_logprobs)
                        if first and request.params.prompt_logprobs is not None else None),
                )
                first = False
                if finish_reason is not None:
                    return
        finally:
            self._active.discard(request.request_id)
            if outputs is not None:  # vLLM aborts a request whose generator closes unfinished
                await outputs.aclose()

    async def abort(self, request_id: str) -> None:
        if self._llm is not None and request_id in self._active:
            await self._llm.abort(request_id)

    def stats(self) -> EngineStats:
        return self._accumulator.snapshot()

    async def shutdown(self) -> None:
        self._closing = True
        llm, self._llm = self._llm, None
        if llm is None:
            return
        if self._active:
            await llm.abort(list(self._active))
        await asyncio.to_thread(llm.shutdown)

    # -- start-up --------------------------------------------------------------------------

    def _check_models(self) -> PreTrainedTokenizerBase:
        """Load the tokenizer(s) and check the draft pairs with the target; return the target's."""
        config = self.config
        tokenizer = load_tokenizer(config.tokenizer or config.target)
        if config.speculative:
            assert config.draft is not None
            self._own_vocabulary = check_draft_pairing(
                config, tokenizer, load_draft_tokenizer(config.draft, tokenizer),
                AutoConfig.from_pretrained(resolve_model(config.target)),
                AutoConfig.from_pretrained(resolve_model(config.draft)),
            )
        return tokenizer

    def _engine_args(self, device_type: str) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs

        config = self.config
        dtype = resolve_dtype_name(config.dtype, device_type)
        memory = config.gpu_memory_utilization
        if memory is None and device_type == "cpu":
            memory = CPU_MEMORY_UTILIZATION
        target = resolve_model(config.target)
        settings: dict[str, Any] = {
            "model": target,
            "tokenizer": resolve_model(config.tokenizer) if config.tokenizer else target,
            "served_model_name": config.served_model_name or config.target,
            "dtype": dtype,
            "max_model_len": config.max_model_len,
            "tensor_parallel_size": config.tensor_parallel_size,
            "kv_cache_memory_bytes": config.kv_cache_memory_bytes,
            "enforce_eager": config.enforce_eager,
            "max_num_seqs": config.max_num_seqs,
            "disable_log_stats": True,  # no periodic log lines; our stat logger still gets stats
        }
        if memory is not None:
            settings["gpu_memory_utilization"] = memory
        if config.seed is not None:
            settings["seed"] = config.seed
        speculative = self._speculative_config()
        if speculative is not None:
            settings["speculative_config"] = speculative
            if vllm_has_per_request_spec_metrics():  # 0.24 has not: see the module doc
                settings["per_request_spec_decode_metrics"] = "summary"
        return AsyncEngineArgs(**settings)

    def _speculative_config(self) -> dict[str, Any] | None:
        """vLLM's speculative_config: the draft model, else prompt lookup (vLLM's ngram method;
        vLLM runs one method at a time); k by batch size under adaptive speculation where the
        release has it (0.32 has, 0.24 has not: then k is fixed)."""
        config = self.config
        if config.speculation == "off":
            return None
        speculative: dict[str, Any] = {"num_speculative_tokens": config.num_speculative_tokens}
        if config.speculative:
            draft = resolve_model(config.draft)  # a feature draft is vLLM's EAGLE-1
            method = "eagle" if is_feature_draft(Path(draft)) else "draft_model"
            speculative.update(method=method, model=draft)
            if self._own_vocabulary:
                speculative["use_heterogeneous_vocab"] = True
            if config.draft_tensor_parallel_size is not None:
                speculative["draft_tensor_parallel_size"] = config.draft_tensor_parallel_size
        elif config.prompt_lookup is not None:
            speculative.update(method="ngram", prompt_lookup_min=config.prompt_lookup_min,
                               prompt_lookup_max=config.prompt_lookup_max)
        else:
            return None
        if config.speculation == "adaptive" and vllm_has_batch_schedule():
            speculative["num_speculative_tokens_per_batch_size"] = config.batch_schedule()
        return speculative

    def _build(self) -> Any:
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        device_type = current_platform.device_type
        wanted = self.config.device
        if wanted != "auto" and wanted.split(":")[0] != device_type:
            raise ValueError(f"device {wanted!r} asked for, but vLLM here runs on {device_type}")
        if wanted.startswith("cuda:") and wanted != "cuda:0":
            raise ValueError(
                f"vLLM takes no device index ({wanted!r}): choose the GPU with "
                "CUDA_VISIBLE_DEVICES and pass device cuda"
            )
        args = self._engine_args(device_type)
        logger.info("starting vLLM on %s: target %s, speculation %s", device_type, args.model,
                    args.speculative_config)
        return AsyncLLM.from_engine_args(
            args, stat_loggers=[stat_logger_factory(self._accumulator)]
        )

    def _model_info(self) -> ModelInfo:
        from vllm.platforms import current_platform

        model_config = self._llm.model_config
        config = self.config
        speculative = self._llm.vllm_config.speculative_config is not None
        if not speculative:
            speculation = "off"
        elif config.speculation == "adaptive" and not vllm_has_batch_schedule():
            speculation = "fixed"
            logger.warning("this vLLM has no num_speculative_tokens_per_batch_size: "
                           "--speculation adaptive runs a fixed k")
        else:
            speculation = config.speculation
        return ModelInfo(
            name=config.served_model_name or public_model_name(config.target),
            target=config.target,
            draft=config.draft if speculative and config.speculative else None,
            num_speculative_tokens=config.num_speculative_tokens if speculative else 0,
            max_model_len=model_config.max_model_len,
            engine="vllm",
            dtype=str(model_config.dtype).removeprefix("torch."),
            device=current_platform.device_type,
            speculation=speculation,
        )

    # -- requests --------------------------------------------------------------------------

    @staticmethod
    def _sampling_params(params: SamplingParams, speculative: bool) -> Any:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import RequestOutputKind

        if speculative:  # vLLM refuses them with a draft, without naming them
            for name, unsupported in (("min_p", params.min_p > 0), ("logit_bias",
                                                                     bool(params.logit_bias))):
                if unsupported:
                    raise InvalidRequestError(
                        f"{name} is not supported by vLLM's speculative decoding", name)
        try:
            return VllmSamplingParams(
                max_tokens=params.max_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                seed=params.seed,
                stop=list(params.stop),
                stop_token_ids=list(params.stop_token_ids),
                ignore_eos=params.ignore_eos,
                min_p=params.min_p,
                repetition_penalty=params.repetition_penalty,
                presence_penalty=params.presence_penalty,
                frequency_penalty=params.frequency_penalty,
                logit_bias=dict(params.logit_bias) or None,
                min_tokens=params.min_tokens,
                skip_special_tokens=params.skip_special_tokens,
                logprobs=params.logprobs,
                prompt_logprobs=params.prompt_logprobs,
                output_kind=RequestOutputKind.DELTA,
            )
        except (VLLMValidationError, ValueError) as error:  # a ValueError up to 0.24, not in 0.32
            raise InvalidRequestError(str(error), getattr(error, "parameter", None)) from None

    async def _engine_input(self, prompt_token_ids: tuple[int, ...]) -> Any:
        """The prompt as vLLM's engine takes it: rendered by its renderer where it has one."""
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import TokensPrompt

        prompt = TokensPrompt(prompt_token_ids=list(prompt_token_ids))
        renderer = getattr(self._llm, "renderer", None)
        if renderer is None:  # vLLM releases before the renderer take the prompt as it is
            return prompt
        try:
            (engine_input,) = await renderer.render_cmpl_async([prompt])
        except (VLLMValidationError, ValueError) as error:
            raise InvalidRequestError(str(error), "prompt") from None
        return engine_input

    @staticmethod
    async def _next_output(outputs: AsyncIterator[Any]) -> Any:
        """vLLM's next output; its refusals (raised before the first) as our engine errors:
        vLLM's generate() lets through a ValueError only for a bad request, and raises
        VLLMValidationError, a ValueError up to 0.24 but not in 0.32, for bad requests too."""
        from vllm.exceptions import VLLMValidationError

        try:
            return await anext(outputs)
        except StopAsyncIteration:
            raise EngineError("vLLM's output stream ended without a finish reason") from None
        except (VLLMValidationError, ValueError) as error:
            raise InvalidRequestError(str(error), getattr(error, "parameter", None)) from None

    @staticmethod
    def _finish_reason(reason: str | None) -> FinishReason | None:
        if reason is None:
            return None
        if reason not in _FINISH_REASONS:  # "error": vLLM failed the request internally
            raise EngineError(f"vLLM ended the request with finish reason {reason!r}")
        return _FINISH_REASONS[reason]

    @staticmethod
    def _note_times(timings: RequestTimings, output: Any, now: float, has_tokens: bool) -> None:
        """Scheduling time from vLLM's engine core (time.monotonic, one clock per host);
        first token as this process received it."""
        if timings.scheduled is None:
            scheduled = getattr(output.metrics, "scheduled_ts", 0.0) if output.metrics else 0.0
            if scheduled:
                timings.scheduled = scheduled
        if has_tokens and timings.first_token is None:
            timings.first_token = now



def _token_logprob(token_id: int, ranked: dict[int, Any], num_top: int) -> TokenLogprob:
    """vLLM's {token id: Logprob(logprob, rank, ...)} at one position (the `num_top` likeliest
    tokens and the chosen one) as ours."""
    top = sorted((entry.rank, token, entry.logprob) for token, entry in ranked.items()
                 if entry.rank is not None and entry.rank <= num_top)
    return TokenLogprob(token_id, ranked[token_id].logprob,
                        tuple((token, logprob) for _, token, logprob in top))


def _logprobs(token_ids: Any, logprobs: Any, num_top: int) -> tuple[TokenLogprob, ...]:
    return tuple(_token_logprob(token, ranked, num_top)
                 for token, ranked in zip(token_ids, logprobs or (), strict=True))


def _prompt_logprobs(prompt_ids: tuple[int, ...], logprobs: Any,
                     num_top: int) -> tuple[TokenLogprob | None, ...]:
    """vLLM's prompt logprobs (the first None) as ours."""
    return (None, *(_token_logprob(token, ranked, num_top)
                    for token, ranked in zip(prompt_ids[1:], list(logprobs)[1:], strict=True)))
