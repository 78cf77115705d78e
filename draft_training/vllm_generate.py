"""`afa-train generate` on vLLM (`--engine vllm`, or `auto` where vLLM runs): the target's
responses from vLLM's offline `LLM.generate`.

The same records, batching and resumability as the torch path (`generate.py` hands each batch
of prompt token ids to `VllmGenerator` and writes what comes back); only this module imports
vLLM. vLLM runs its engine core in a spawned process, so a script that uses this directly
needs the usual `if __name__ == "__main__":` guard (the `afa-train` console script has it).

Top-k: `SamplingParams(logprobs=K)` returns, per new token, a {token id: Logprob} dict of the
top K *plus the sampled token* when it falls outside them (K + 1 entries); the top K by value are
kept. The LLM is built with `logprobs_mode="raw_logprobs"` (vLLM's default, set explicitly): the
log_softmax of the raw logits, before temperature, top-p and penalties -- what the torch path
records.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import AutoConfig, GenerationConfig

from afa_serve.engine.loading import generation_end_ids, resolve_dtype_name
from afa_serve.engine.vllm_support import require_vllm
from afa_serve.models.resolve import resolve_model
from draft_training.generate import GenerateConfig, Generated

CPU_KV_CACHE_BYTES = 6 << 30  # room for ~250 SmolLM2 sequences of 1k tokens in bf16


def end_token_ids(target: str, tokenizer: Any) -> frozenset[int]:
    """The torch path's `eos_token_ids`, from the target's generation config alone."""
    try:
        generation_config = GenerationConfig.from_pretrained(target)
    except OSError:  # no generation_config.json: what transformers derives from config.json
        generation_config = GenerationConfig.from_model_config(AutoConfig.from_pretrained(target))
    return generation_end_ids(generation_config, tokenizer)


class VllmGenerator:
    def __init__(self, config: GenerateConfig, tokenizer: Any):
        require_vllm()
        from vllm import LLM, SamplingParams
        from vllm.platforms import current_platform

        target = resolve_model(config.target)
        self.eos = end_token_ids(target, tokenizer)
        # On CPU vLLM would size its KV cache from host memory (and refuse its GPU default share
        # of it): a fixed cache, ample for a batch of responses, starts beside other engines.
        memory = {"kv_cache_memory_bytes": CPU_KV_CACHE_BYTES} if current_platform.is_cpu() else {}
        if current_platform.is_cpu():
            # vLLM keeps a core for its scheduler by default, half of a 2-core host; offline
            # generation has no server to serve, and with both cores it answered 314 tok/s
            # against 242 (2026-12-02, 250 ShareGPT prompts, bfloat16, top-20, 2 vCPUs).
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        dtype = resolve_dtype_name(config.dtype, "cpu" if current_platform.is_cpu() else "cuda")
        self.top_k = config.top_k_logprobs
        logprobs = (
            {"logprobs_mode": "raw_logprobs", "max_logprobs": max(20, self.top_k)}
            if self.top_k else {}
        )
        self._llm = LLM(model=target, dtype=dtype, seed=config.seed,
                        max_num_seqs=config.batch_size, **memory, **logprobs)
        self._params = SamplingParams(
            max_tokens=config.max_new_tokens, temperature=config.temperature,
            top_p=config.top_p, seed=config.seed if config.temperature > 0 else None,
            logprobs=self.top_k or None,
        )

    def shutdown(self) -> None:
        """Stop vLLM's engine core process (its KV cache and cores), not left to the collector."""
        self._llm.llm_engine.engine_core.shutdown()

    def __call__(self, prompts: list[list[int]]) -> list[Generated]:
        from vllm.inputs import TokensPrompt

        outputs = self._llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts],
                                     self._params, use_tqdm=False)
        results = []
        for output in outputs:
            completion = output.outputs[0]
            tokens = list(completion.token_ids)
            if not self.top_k:
                results.append(Generated(tokens))
                continue
            if completion.logprobs is None or len(completion.logprobs) != len(tokens):
                raise RuntimeError("vLLM returned no log-probabilities for every new token")
            ids, values = topk_rows(completion.logprobs, self.top_k)
            results.append(Generated(tokens, ids, values))
        return results


def topk_rows(logprobs: Any, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, k] token ids and log-probabilities, by value descending, from vLLM's per-token
    {token id: Logprob} dicts (which may hold k + 1 entries: the sampled token is added)."""
    ids = torch.empty((len(logprobs), k), dtype=torch.int32)
    values = torch.empty((len(logprobs), k), dtype=torch.float32)
    for row, position in enumerate(logprobs):
        best = sorted(position.items(), key=lambda item: -item[1].logprob)[:k]
        if len(best) < k:
            raise RuntimeError(f"vLLM returned {len(best)} log-probabilities, fewer than k={k}")
        ids[row] = torch.tensor([token for token, _ in best], dtype=torch.int32)
        values[row] = torch.tensor([entry.logprob for _, entry in best], dtype=torch.float32)
    return ids, values
