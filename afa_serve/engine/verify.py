"""Draft/verify/accept math on plain tensors: the one place speculative decoding's rules live.

Greedy: a drafted token is kept while it equals the target's argmax; the first
mismatch is replaced by the target's argmax, and if all k match the target's
argmax after them is the bonus token. The output is the target's greedy output.

Sampling (Leviathan et al. 2023, Chen et al. 2023): drafted token x_i drawn from
q_i is kept with probability min(1, p_i(x_i) / q_i(x_i)); on the first rejection
the replacement is drawn from norm(max(0, p_i - q_i)); if all k are kept the
bonus is drawn from p_{k+1}. The output then follows the target's distribution
p exactly. p and q are both processed with the same temperature/top-k/top-p.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from afa_serve.engine.penalties import LogitAdjustments


@dataclass(frozen=True)
class SamplingSettings:
    """The subset of sampling parameters that shapes a distribution."""

    temperature: float = 1.0
    top_k: int = 0  # 0 or negative: no top-k
    top_p: float = 1.0
    min_p: float = 0.0  # 0: none; else keep tokens at least min_p times the likeliest one
    # penalties, bias, min_tokens: on the logits before all of the above
    adjustments: LogitAdjustments = field(default_factory=LogitAdjustments)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class VerifyResult:
    num_accepted: int  # how many drafted tokens were kept (0..k)
    next_token: int  # the target's token after them: a correction or the bonus


def probabilities(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """Softmax of `logits` (..., V) after temperature, top-k, top-p and min-p, in float32."""
    raw = logits.float()
    logits = raw / settings.temperature
    # A temperature or repetition penalty near 0 overflows finite logits to +inf (softmax: NaN).
    # Such a row takes the softmax's limit: uniform over its largest logits.
    overflowed = torch.isposinf(logits).any(dim=-1, keepdim=True)
    if overflowed.any():
        largest = raw == raw.amax(dim=-1, keepdim=True)
        limit = torch.zeros_like(logits).masked_fill(~largest, float("-inf"))
        logits = torch.where(overflowed, limit, logits)
    vocab_size = logits.shape[-1]
    if 0 < settings.top_k < vocab_size:
        kth_largest = torch.topk(logits, settings.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if settings.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        # The most likely token always stays, however small top_p is.
        outside = (mass_before >= settings.top_p) & (mass_before > 0)
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    if settings.min_p > 0.0:
        floor = settings.min_p * probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < floor, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token id drawn from a 1-D probability vector."""
    return int(torch.multinomial(probs, 1, generator=generator).item())


def verify_greedy(draft_tokens: list[int], target_logits: torch.Tensor) -> VerifyResult:
    """Accept the longest prefix of `draft_tokens` that matches the target's argmax.

    target_logits: (k + 1, V), row i scoring the token after draft position i - 1.
    """
    target_choice = target_logits.argmax(dim=-1).tolist()
    num_accepted = 0
    for drafted, wanted in zip(draft_tokens, target_choice):
        if drafted != wanted:
            break
        num_accepted += 1
    return VerifyResult(num_accepted, target_choice[num_accepted])


def verify_sampled(
    draft_tokens: list[int],
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    settings: SamplingSettings,
    generator: torch.Generator | None,
) -> VerifyResult:
    """Rejection sampling: keeps each drafted token with probability min(1, p/q).

    draft_probs: (k, V), the distribution each drafted token was drawn from (None if k = 0).
    target_logits: (k + 1, V).
    """
    target_probs = probabilities(target_logits, settings)
    k = len(draft_tokens)
    if k:
        assert draft_probs is not None
        positions = torch.arange(k, device=target_probs.device)
        tokens = torch.tensor(draft_tokens, device=target_probs.device)
        p = target_probs[positions, tokens]
        q = draft_probs[positions, tokens]
        uniform = torch.rand(k, generator=generator, device=target_probs.device)
        rejected = (uniform * q > p).tolist()  # u < p/q  <=>  accept, without dividing by q
        for i in range(k):
            if rejected[i]:
                residual = (target_probs[i] - draft_probs[i]).clamp_min(0.0)
                total = residual.sum()
                # total == 0 only when p == q, where rejection has probability 0.
                residual = residual / total if total > 0 else target_probs[i]
                return VerifyResult(i, sample(residual, generator))
    return VerifyResult(k, sample(target_probs[k], generator))


def verify(
    draft_tokens: list[int],
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    settings: SamplingSettings,
    generator: torch.Generator | None,
) -> VerifyResult:
    """Decide how many drafted tokens the target keeps and which token follows them."""
    if settings.greedy:
        return verify_greedy(draft_tokens, target_logits)
    return verify_sampled(draft_tokens, draft_probs, target_logits, settings, generator)
