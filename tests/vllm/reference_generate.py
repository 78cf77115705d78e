"""vLLM's own offline greedy output, the reference for afa-serve on vLLM:

    python -m tests.vllm.reference_generate JOB.json OUT.json

JOB holds the target, prompts (token ids), max_tokens, dtype, max_model_len and the KV cache
size; OUT gets, per prompt, the generated token ids and text of `LLM.generate` decoding the
target alone (no draft), so equality also shows the speculative engine is lossless, and the
chosen tokens' logprobs: each output token's and each prompt token's (the first None). With a
`speculative_config` in JOB, vLLM decodes with it instead, OUT holds ids and text only, and
OUT with the suffix .spec.json vLLM's drafted and accepted tokens over the whole run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

SPEC_COUNTERS = ("vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens")


def main(job_path: Path, out_path: Path) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    job = json.loads(job_path.read_text())
    speculative = job.get("speculative_config")
    llm = LLM(model=job["target"], dtype=job["dtype"], max_model_len=job["max_model_len"],
              kv_cache_memory_bytes=job["kv_cache_memory_bytes"], enforce_eager=True,
              max_num_seqs=len(job["prompts"]), speculative_config=speculative,
              disable_log_stats=speculative is None)
    if speculative is not None:
        params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"])
        outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]],
                               params)
        _write(out_path, [{"token_ids": list(o.outputs[0].token_ids), "text": o.outputs[0].text}
                          for o in outputs])
        counters = {metric.name: metric.value for metric in llm.get_metrics()
                    if metric.name in SPEC_COUNTERS}
        _write(out_path.with_suffix(".spec.json"), counters)
        return
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], logprobs=0,
                            prompt_logprobs=0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]], params)
    result = [{
        "token_ids": list(o.outputs[0].token_ids),
        "text": o.outputs[0].text,
        "logprobs": [ranked[token].logprob for token, ranked in
                     zip(o.outputs[0].token_ids, o.outputs[0].logprobs, strict=True)],
        "prompt_logprobs": [None, *(ranked[token].logprob for token, ranked in
                                    zip(o.prompt_token_ids[1:], list(o.prompt_logprobs)[1:],
                                        strict=True))],
    } for o in outputs]
    _write(out_path, result)


def _write(out_path: Path, result: list[dict]) -> None:
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out_path)


if __name__ == "__main__":  # vLLM spawns its engine core: the guard is required
    main(Path(sys.argv[1]), Path(sys.argv[2]))
