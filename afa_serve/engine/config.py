"""`EngineConfig`: what an engine serves and how, one model for the torch and the vLLM engine.

`afa-serve serve` takes these fields as its flags (through `ServeConfig`, which extends this
model with the HTTP server's settings); each engine reads the settings it supports, and the
few that only one engine supports are named in `TORCH_ONLY` and `VLLM_ONLY`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from afa_serve.descriptions import DTYPE_HELP, TARGET_HELP
from afa_serve.engine.draft_forward import DraftWeightsSetting
from afa_serve.engine.draft_vocab import DEFAULT_DRAFT_VOCAB_SIZE
from afa_serve.engine.loading import DTypeName
from afa_serve.engine.policy import DEFAULT_CONFIDENCE_THRESHOLD, SpeculationMode
from afa_serve.engine.prompt_lookup import PromptLookup

DEFAULT_MODEL = "smollm2-135m-instruct"
# On CPU, gpu_memory_utilization is the share of host memory vLLM reserves, and it refuses to
# start unless that much is free: its GPU default (0.92) never is.
CPU_MEMORY_UTILIZATION = 0.5

TORCH_ONLY = frozenset({"confidence_threshold", "draft_vocab_size", "draft_weights"})
VLLM_ONLY = frozenset({
    "tensor_parallel_size", "draft_tensor_parallel_size", "gpu_memory_utilization",
    "kv_cache_memory_bytes", "enforce_eager", "speculative_batch_schedule",
})
# Speculation pays while decoding is memory-bound and loses once a batch makes it compute-bound:
# a starting point (not measured on a GPU here), to tune per model and GPU.
DEFAULT_BATCH_SCHEDULE = "1-4:4,5-16:2,17-32:1,33-1000000:0"
BATCH_SCHEDULE_PATTERN = r"^\d+-\d+:\d+(,\d+-\d+:\d+)*$"


class EngineConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    target: str = Field(DEFAULT_MODEL, description=TARGET_HELP)
    draft: str | None = Field(
        None, description="Draft model (same tokenizer as the target); none decodes plainly.")
    num_speculative_tokens: int = Field(
        4, ge=0, le=32, description="k: the most draft tokens per step.")
    speculation: SpeculationMode = Field(
        "adaptive", description="adaptive (torch engine: each step's k, 0 included, from "
        "measured draft/verify costs and live acceptance; vLLM: k by batch size, "
        "--speculative-batch-schedule), fixed (always k) or off (no speculation).")
    confidence_threshold: float = Field(
        DEFAULT_CONFIDENCE_THRESHOLD, ge=0.0, lt=1.0, description="Torch engine: the draft "
        "stops proposing when its pick's probability is below this (0: never).")
    draft_vocab_size: int = Field(
        DEFAULT_DRAFT_VOCAB_SIZE, ge=0, description="Torch engine: the draft's head scores only "
        "the N most frequent tokens of the draft's draft_vocab.json (0: the whole vocabulary).")
    draft_weights: DraftWeightsSetting = Field(
        "auto", description="Torch engine: the draft's weights in int8 (one scale per row; "
        "Llama, Qwen2 and Mistral drafts) or in --dtype; auto: int8 on CPU, where it halves "
        "the draft's cost at unchanged acceptance (measured), --dtype on CUDA.")
    prompt_lookup_max: int = Field(
        3, ge=0, le=16, description="Prompt lookup: the longest n-gram at the sequence's end "
        "looked up earlier in the prompt and output; what followed it is proposed at no draft "
        "cost, before the draft model (0: off). vLLM engine: its ngram method, used only "
        "without a draft (vLLM runs one method at a time).")
    prompt_lookup_min: int = Field(
        1, ge=1, le=16, description="Prompt lookup: the shortest n-gram it matches.")
    speculative_batch_schedule: str = Field(
        DEFAULT_BATCH_SCHEDULE, pattern=BATCH_SCHEDULE_PATTERN, description="vLLM, with "
        "--speculation adaptive: k by batch size, FIRST-LAST:K,... (inclusive batch sizes from "
        "1; K capped at -k; 0: plain decoding at those sizes), passed as vLLM's "
        "num_speculative_tokens_per_batch_size.")
    served_model_name: str | None = Field(
        None, min_length=1,
        description="The `model` name clients send (default: the target as given).")
    tokenizer: str | None = Field(
        None, min_length=1, description="Tokenizer: packaged name, local HF folder or hub id "
        "(default: the target's).")
    seed: int | None = Field(
        None, ge=0, description="Seeds the sampling of requests that give no `seed`, so the "
        "same requests in the same order sample alike (default: torch engine unseeded, vLLM "
        "its own default).")
    dtype: DTypeName = Field("auto", description=DTYPE_HELP)
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda or cuda:N.")
    max_model_len: int | None = Field(
        None, ge=2, description="Context limit in tokens (default: the model's).")
    max_num_seqs: int = Field(8, ge=1, description="Requests decoded at once.")
    max_queue: int = Field(64, ge=0, description="Requests that may wait; beyond them 429.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM: GPUs the target is split over.")
    draft_tensor_parallel_size: int | None = Field(
        None, ge=1, description="vLLM: 1 or --tensor-parallel-size (default: vLLM's choice, the "
        "target's).")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description=f"vLLM: share of GPU memory it may take (default: "
        f"vLLM's; on CPU: {CPU_MEMORY_UTILIZATION} of host memory).")
    kv_cache_memory_bytes: int | None = Field(
        None, ge=1, description="vLLM: KV cache size in bytes, instead of sizing it from free "
        "memory.")
    enforce_eager: bool = Field(
        False, description="vLLM: skip CUDA graphs and torch.compile (faster start, slower "
        "decode).")

    @model_validator(mode="after")
    def _consistent(self) -> EngineConfig:
        if self.prompt_lookup_max and self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError("prompt_lookup_min must not exceed prompt_lookup_max")
        self.batch_schedule()  # raises when the ranges are not contiguous from 1
        return self

    def batch_schedule(self) -> list[tuple[int, int, int]]:
        """`speculative_batch_schedule` as (first, last, k) ranges, checked to run from batch
        size 1 upwards without gaps or overlaps."""
        ranges = []
        for part in self.speculative_batch_schedule.split(","):
            sizes, k = part.split(":")
            first, last = sizes.split("-")
            ranges.append((int(first), int(last), int(k)))
        expected = 1
        for first, last, _ in ranges:
            if first != expected or last < first:
                raise ValueError(
                    f"speculative_batch_schedule: the range starting at {first} should start at "
                    f"{expected} and not end before it starts (ranges run from 1, in order)")
            expected = last + 1
        return ranges

    @property
    def speculative(self) -> bool:
        """A draft model proposes tokens."""
        return self.draft is not None and self.num_speculative_tokens > 0

    @property
    def prompt_lookup(self) -> PromptLookup | None:
        """The prompt-lookup proposer, when it is on."""
        if self.prompt_lookup_max == 0 or self.num_speculative_tokens == 0:
            return None
        return PromptLookup(self.prompt_lookup_min, self.prompt_lookup_max)

    def ignored_by(self, engine: Literal["torch", "vllm"]) -> list[str]:
        """The other engine's own settings that are given a value other than their default."""
        other = VLLM_ONLY if engine == "torch" else TORCH_ONLY
        fields = EngineConfig.model_fields
        return sorted(name for name in other if getattr(self, name) != fields[name].default)

    def engine_config(self) -> EngineConfig:
        """This config's engine settings alone (of a `ServeConfig`, say)."""
        return EngineConfig.model_validate(
            self.model_dump(include=set(EngineConfig.model_fields)))
