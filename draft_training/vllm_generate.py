"""`afa-train generate --engine vllm`: the target's responses from vLLM's offline `LLM.generate`.

The same records, batching and resumability as the torch path (`generate.py` hands each batch
of prompt token ids to `VllmGenerator` and writes what comes back); only this module imports
vLLM. vLLM runs its engine core in a spawned process, so a script that uses this directly
needs the usual `if __name__ == "__main__":` guard (the `afa-train` console script has it).
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, GenerationConfig

from afa_serve.engine.loading import generation_end_ids
from afa_serve.engine.vllm_support import require_vllm
from afa_serve.models.resolve import resolve_model
from draft_training.generate import GenerateConfig

CPU_KV_CACHE_BYTES = 2 << 30


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
        # "auto" as the torch path resolves it: float32 on CPU (vLLM would take the model's own).
        dtype = "float32" if config.dtype == "auto" and current_platform.is_cpu() else config.dtype
        self._llm = LLM(model=target, dtype=dtype, seed=config.seed,
                        max_num_seqs=config.batch_size, **memory)
        self._params = SamplingParams(
            max_tokens=config.max_new_tokens, temperature=config.temperature,
            top_p=config.top_p, seed=config.seed if config.temperature > 0 else None,
        )

    def __call__(self, prompts: list[list[int]]) -> list[list[int]]:
        from vllm.inputs import TokensPrompt

        outputs = self._llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts],
                                     self._params, use_tqdm=False)
        return [list(output.outputs[0].token_ids) for output in outputs]
