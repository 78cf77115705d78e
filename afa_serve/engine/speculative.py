"""Speculative decoding of one sequence with a Hugging Face target and draft.

Invariant kept between steps: the target's KV cache holds every token of the
sequence but the last, which is "pending" (its logits are not computed yet).
One step:
  1. the draft catches up on the tokens its cache lacks and proposes k tokens,
     one forward each, extending its own cache;
  2. the target scores [pending, d1..dk] in one forward: k + 1 rows of logits;
  3. `verify` keeps n drafted tokens and picks the next token from the target;
  4. both caches are cut back to the accepted prefix.
With k = 0 (no draft) a step is a plain decoding step of the target alone.
The step is the same for the first token: prefill leaves the prompt's last
token pending, so time to first token is prefill plus one step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from afa_serve.engine.base import SpecDecodeCounts
from afa_serve.engine.verify import SamplingSettings, choose_token, verify


@dataclass(frozen=True)
class StepResult:
    tokens: list[int]  # the accepted drafted tokens, then the target's own token
    num_drafted: int
    num_accepted: int


@dataclass
class SequenceState:
    """Everything one sequence carries between steps."""

    token_ids: list[int]
    num_prompt_tokens: int
    settings: SamplingSettings
    generator: torch.Generator | None
    target_cache: DynamicCache
    draft_cache: DynamicCache | None
    spec: SpecDecodeCounts = field(default_factory=SpecDecodeCounts)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


def _truncate(cache: DynamicCache, length: int) -> None:
    """Drop cached positions beyond `length`."""
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)


def _forward(
    model: PreTrainedModel, cache: DynamicCache, token_ids: list[int], logits_to_keep: int
) -> torch.Tensor:
    """Run `token_ids` through `model` on top of `cache`; return the last `logits_to_keep` rows."""
    input_ids = torch.tensor([token_ids], device=model.device)
    out = model(
        input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=logits_to_keep
    )
    return out.logits[0]


class SpeculativeDecoder:
    """Stateless over sequences: holds the models, acts on `SequenceState`s."""

    def __init__(
        self,
        target: PreTrainedModel,
        draft: PreTrainedModel | None = None,
        num_speculative_tokens: int = 0,
    ):
        if num_speculative_tokens < 0:
            raise ValueError("num_speculative_tokens must be >= 0")
        self.target = target.eval()
        self.draft = draft.eval() if draft is not None else None
        self.num_speculative_tokens = num_speculative_tokens if draft is not None else 0

    @torch.inference_mode()
    def prefill(
        self,
        prompt_ids: list[int],
        settings: SamplingSettings,
        seed: int | None = None,
    ) -> SequenceState:
        """Cache the prompt in the target (all but its last token) and in the draft."""
        if not prompt_ids:
            raise ValueError("the prompt must hold at least one token")
        generator = None
        if not settings.greedy:
            generator = torch.Generator(device=self.target.device)
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
        state = SequenceState(
            token_ids=list(prompt_ids),
            num_prompt_tokens=len(prompt_ids),
            settings=settings,
            generator=generator,
            target_cache=DynamicCache(config=self.target.config),
            draft_cache=DynamicCache(config=self.draft.config) if self.draft is not None else None,
        )
        if len(prompt_ids) > 1:
            _forward(self.target, state.target_cache, prompt_ids[:-1], logits_to_keep=1)
        return state

    @torch.inference_mode()
    def step(self, state: SequenceState, max_new_tokens: int) -> StepResult:
        """Advance `state` by 1 .. k + 1 tokens, never more than `max_new_tokens`."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        k = min(self.num_speculative_tokens, max_new_tokens - 1)
        drafted, draft_probs = self._propose(state, k)

        known = len(state.token_ids)
        target_logits = _forward(
            self.target, state.target_cache, [state.token_ids[-1], *drafted], logits_to_keep=k + 1
        )
        result = verify(drafted, draft_probs, target_logits, state.settings, state.generator)

        new_tokens = drafted[: result.num_accepted] + [result.next_token]
        state.token_ids.extend(new_tokens)
        state.spec.add_step(k, result.num_accepted)
        _truncate(state.target_cache, known + result.num_accepted)
        if state.draft_cache is not None:
            _truncate(state.draft_cache, known + result.num_accepted)
        return StepResult(new_tokens, k, result.num_accepted)

    def _propose(self, state: SequenceState, k: int) -> tuple[list[int], torch.Tensor | None]:
        """Let the draft catch up with the sequence and propose k tokens."""
        if k == 0:
            return [], None
        assert self.draft is not None and state.draft_cache is not None
        pending = state.token_ids[state.draft_cache.get_seq_length() :]
        drafted: list[int] = []
        probs: list[torch.Tensor] = []
        for _ in range(k):
            logits = _forward(self.draft, state.draft_cache, pending, logits_to_keep=1)[-1]
            token, token_probs = choose_token(logits, state.settings, state.generator)
            drafted.append(token)
            if token_probs is not None:
                probs.append(token_probs)
            pending = [token]
        return drafted, torch.stack(probs) if probs else None

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        settings: SamplingSettings,
        eos_token_ids: frozenset[int] = frozenset(),
        seed: int | None = None,
    ) -> SequenceState:
        """Decode to `max_new_tokens` or the first EOS token (kept in the output)."""
        state = self.prefill(prompt_ids, settings, seed)
        while state.num_generated < max_new_tokens:
            new_tokens = self.step(state, max_new_tokens - state.num_generated).tokens
            eos_at = next((i for i, t in enumerate(new_tokens) if t in eos_token_ids), None)
            if eos_at is not None:
                del state.token_ids[len(state.token_ids) - len(new_tokens) + eos_at + 1 :]
                break
        return state
