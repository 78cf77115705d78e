"""Penalties, logit bias and min_tokens on raw logits: the rules that depend on the text so far.

They follow vLLM's sampler (and OpenAI's definitions of the two penalties):
- `logit_bias` adds a fixed amount to chosen tokens' logits;
- before `min_tokens` tokens are generated, the end-of-generation tokens cannot be picked;
- `repetition_penalty` r divides a positive logit by r and multiplies a negative one by r, for
  every token already in the prompt or the output;
- `frequency_penalty` subtracts f times a token's count in the output, `presence_penalty`
  subtracts p once a token is in the output.

Speculative decoding stays exact because each row is adjusted with its own history: the target's
row i scores the token after the sequence plus the first i drafted tokens, and so does the draft
when it proposes the i-th. `verify.py` then works on adjusted logits as on raw ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LogitAdjustments:
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    end_token_ids: frozenset[int] = frozenset()  # masked until min_tokens are generated

    @property
    def active(self) -> bool:
        return bool(
            self.repetition_penalty != 1.0 or self.presence_penalty or self.frequency_penalty
            or self.logit_bias or (self.min_tokens and self.end_token_ids)
        )


def adjust(
    logits: torch.Tensor,
    adjustments: LogitAdjustments,
    token_ids: Sequence[int],
    num_prompt_tokens: int,
) -> torch.Tensor:
    """`logits` (rows, V) adjusted, in float32. The last row scores the token after all of
    `token_ids` (prompt, then output); each row before it, the token after one token fewer."""
    if not adjustments.active:
        return logits
    rows, vocab = logits.shape
    logits = logits.float().clone()
    device = logits.device
    if adjustments.logit_bias:
        ids, biases = zip(*adjustments.logit_bias, strict=True)
        logits[:, list(ids)] += torch.tensor(biases, device=device)
    ids = torch.tensor(list(token_ids), dtype=torch.long, device=device)
    generated_before = len(token_ids) - rows + 1 - num_prompt_tokens  # output length at row 0
    if adjustments.min_tokens and adjustments.end_token_ids:
        masked = torch.arange(rows, device=device) + generated_before < adjustments.min_tokens
        end = torch.tensor(sorted(adjustments.end_token_ids), device=device)
        logits[masked.nonzero().flatten()[:, None], end] = float("-inf")
    # counts[i]: each token's occurrences in row i's output
    output = ids[num_prompt_tokens:]
    counts = torch.bincount(output[:generated_before], minlength=vocab).repeat(rows, 1)
    for row, token in enumerate(output[generated_before:].tolist(), start=1):
        counts[row:, token] += 1
    if adjustments.repetition_penalty != 1.0:
        seen = counts > 0
        seen[:, ids[:num_prompt_tokens]] = True
        penalty = adjustments.repetition_penalty
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalised, logits)
    if adjustments.frequency_penalty:
        logits -= adjustments.frequency_penalty * counts
    if adjustments.presence_penalty:
        logits -= adjustments.presence_penalty * (counts > 0)
    return logits
