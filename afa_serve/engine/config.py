"""`EngineConfig`: what an engine serves and how, one model for the torch and the vLLM engine.

`afa-serve serve` takes these fields as its flags (through `ServeConfig`, which extends this
model with the HTTP server's settings); each engine reads the settings it supports, and the
few that only one engine supports are named in `TORCH_ONLY` and `VLLM_ONLY`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from afa_serve.descriptions import DTYPE_HELP, TARGET_HELP
from afa_serve.engine.draft_vocab import DEFAULT_DRAFT_VOCAB_SIZE
from afa_serve.engine.loading import DTypeName
from afa_serve.engine.policy import DEFAULT_CONFIDENCE_THRESHOLD, SpeculationMode

DEFAULT_MODEL = "smollm2-135m-instruct"
# On CPU, gpu_memory_utilization is the share of host memory vLLM reserves, and it refuses to
# start unless that much is free: its GPU default (0.92) never is.
CPU_MEMORY_UTILIZATION = 0.5

TORCH_ONLY = frozenset({"speculation", "confidence_threshold", "draft_vocab_size"})
VLLM_ONLY = frozenset({
    "tensor_parallel_size", "draft_tensor_parallel_size", "gpu_memory_utilization",
    "kv_cache_memory_bytes", "enforce_eager",
})


class EngineConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    target: str = Field(DEFAULT_MODEL, description=TARGET_HELP)
    draft: str | None = Field(
        None, description="Draft model (same tokenizer as the target); none decodes plainly.")
    num_speculative_tokens: int = Field(
        4, ge=0, le=32, description="k: the most draft tokens per step.")
    speculation: SpeculationMode = Field(
        "adaptive", description="Torch engine: adaptive (each step's k, 0 included, from "
        "measured draft/verify costs and live acceptance), fixed (always k) or off.")
    confidence_threshold: float = Field(
        DEFAULT_CONFIDENCE_THRESHOLD, ge=0.0, lt=1.0, description="Torch engine: the draft "
        "stops proposing when its pick's probability is below this (0: never).")
    draft_vocab_size: int = Field(
        DEFAULT_DRAFT_VOCAB_SIZE, ge=0, description="Torch engine: the draft's head scores only "
        "the N most frequent tokens of the draft's draft_vocab.json (0: the whole vocabulary).")
    served_model_name: str | None = Field(
        None, min_length=1,
        description="The `model` name clients send (default: the target as given).")
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

    @property
    def speculative(self) -> bool:
        return self.draft is not None and self.num_speculative_tokens > 0

    def ignored_by(self, engine: Literal["torch", "vllm"]) -> list[str]:
        """The other engine's own settings that are given a value other than their default."""
        other = VLLM_ONLY if engine == "torch" else TORCH_ONLY
        fields = EngineConfig.model_fields
        return sorted(name for name in other if getattr(self, name) != fields[name].default)

    def engine_config(self) -> EngineConfig:
        """This config's engine settings alone (of a `ServeConfig`, say)."""
        return EngineConfig.model_validate(
            self.model_dump(include=set(EngineConfig.model_fields)))
