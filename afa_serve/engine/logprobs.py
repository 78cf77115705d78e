"""Log-probabilities of chosen tokens under the target's raw distribution (before temperature,
penalties and filters, as vLLM's default `raw_logprobs`), with the likeliest tokens at each row.

Under speculative decoding the verify pass already holds the target's logits for every token it
emits, so logprobs cost no extra forward and equal those of plain decoding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from afa_serve.engine.base import TokenLogprob


def token_logprobs(
    logits: torch.Tensor, token_ids: Sequence[int], num_top: int
) -> list[TokenLogprob]:
    """Row i of `logits` (rows, V) scores `token_ids[i]`; `num_top` likeliest tokens per row."""
    logprobs = logits[: len(token_ids)].float().log_softmax(dim=-1)
    chosen = logprobs[torch.arange(len(token_ids)), torch.tensor(list(token_ids))].tolist()
    top_values, top_ids = logprobs.topk(num_top, dim=-1) if num_top else (None, None)
    result = []
    for row, (token, logprob) in enumerate(zip(token_ids, chosen, strict=True)):
        top = () if top_ids is None else tuple(
            zip(top_ids[row].tolist(), top_values[row].tolist(), strict=True))
        result.append(TokenLogprob(token, logprob, top))
    return result
