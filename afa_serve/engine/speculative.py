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

Three things make a step cheaper than a fixed-k one, none of which can change the output:
- `policy.py` chooses each step's k (0 = plain) from measured costs and live acceptance;
- after its first token, the draft stops proposing when its probability for its own pick
  falls below `confidence_threshold` (a decision on the draft's own numbers only);
- with a `draft_vocab`, the draft's head computes logits over those token ids only and its
  picks are mapped back to target ids; a token outside the set is never proposed, and the
  draft's distribution is zero there, so rejection sampling stays exact;
- the draft runs through `draft_forward.py`: outside transformers' module stack where it covers
  the model, with int8 weights when asked (`draft_weights`).
A feature draft (`feature_draft.py`, EAGLE-1) reads the target's last hidden state: the
target's passes keep theirs for the positions the verify accepts, the draft consumes them when
it next catches up, and its cache is cut back to the positions whose features came from the
target (its own predictions stand in only while drafting).
The draft is lazy: it catches up on the tokens it has not seen only when a step drafts, so
plain steps cost the target's forward alone.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from afa_serve.engine.base import SpecDecodeCounts, TokenLogprob
from afa_serve.engine.draft_forward import (
    DraftCache,
    DraftWeights,
    DraftWeightsSetting,
    FeatureDraftForward,
    draft_forward,
    resolve_draft_weights,
)
from afa_serve.engine.feature_draft import FeatureDraft
from afa_serve.engine.logprobs import token_logprobs
from afa_serve.engine.penalties import adjust
from afa_serve.engine.policy import RequestSpeculation, SpeculationMode, SpeculationPolicy
from afa_serve.engine.prompt_lookup import PromptLookup
from afa_serve.engine.verify import SamplingSettings, probabilities, sample, verify

CALIBRATION_CONTEXT = 64  # tokens of context the start-up timings run on
CALIBRATION_REPEATS = 5
CATCH_UP_TOKENS = 2  # draft forwards over more tokens than this are not timed as c
PROMPT_LOGPROBS_CHUNK = 512  # prompt tokens scored per forward: bounds the logits held at once


@dataclass(frozen=True)
class StepResult:
    tokens: list[int]  # the accepted drafted tokens, then the target's own token
    num_drafted: int
    num_accepted: int
    logprobs: list[TokenLogprob] | None = None  # one per token, when the sequence asks for them


@dataclass
class SequenceState:
    """Everything one sequence carries between steps."""

    token_ids: list[int]
    num_prompt_tokens: int
    settings: SamplingSettings
    generator: torch.Generator | None
    target_cache: DynamicCache
    draft_cache: DraftCache | None
    spec: SpecDecodeCounts = field(default_factory=SpecDecodeCounts)
    speculation: RequestSpeculation = field(default_factory=RequestSpeculation)
    num_logprobs: int | None = None  # likeliest tokens to report with each token's logprob
    prompt_logprobs: list[TokenLogprob | None] | None = None  # the first prompt token's is None
    # a feature draft's input: the target's features at the positions after the draft's cache,
    # in the chunks its passes gave them (joined once, when the draft next runs)
    draft_features: list[torch.Tensor] | None = None

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


def _truncate(cache: DraftCache, length: int) -> None:
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
    """Stateless over sequences: holds the models and the speculation policy, acts on
    `SequenceState`s.

    `num_speculative_tokens` is k, the most tokens a step drafts; `speculation` says how each
    step's k is chosen (`fixed`: always k; `adaptive`: by `policy.py`; `off`: never draft).
    `draft_weights="int8"` runs the draft with int8 weights (a ValueError for a model the
    compact draft forward does not cover); `"auto"` resolves as the engine's setting does, and
    `self.draft_weights` says what the draft runs in.
    """

    def __init__(
        self,
        target: PreTrainedModel,
        draft: PreTrainedModel | FeatureDraft | None = None,
        num_speculative_tokens: int = 0,
        *,
        speculation: SpeculationMode = "fixed",
        confidence_threshold: float = 0.0,
        draft_vocab: Sequence[int] | None = None,
        prompt_lookup: PromptLookup | None = None,
        draft_weights: DraftWeightsSetting = "dtype",
    ):
        if num_speculative_tokens < 0:
            raise ValueError("num_speculative_tokens must be >= 0")
        if not 0.0 <= confidence_threshold < 1.0:
            raise ValueError("confidence_threshold must lie in [0, 1)")
        self.target = target.eval()
        self.draft = draft.eval() if draft is not None else None
        self.prompt_lookup = prompt_lookup
        drafting = draft is not None or prompt_lookup is not None
        self.num_speculative_tokens = num_speculative_tokens if drafting else 0
        self.policy = SpeculationPolicy(speculation, self.num_speculative_tokens)
        self.confidence_threshold = confidence_threshold
        self._vocab_size = target.get_output_embeddings().weight.shape[0]
        self._hidden_size = target.config.hidden_size
        self._draft_ids: torch.Tensor | None = None
        if draft is not None and draft_vocab is not None:
            self._draft_ids = torch.tensor(list(draft_vocab), dtype=torch.long,
                                           device=target.device)
        self.draft_weights: DraftWeights | None = None
        self._draft_forward = None
        self._features = isinstance(draft, FeatureDraft)  # the draft reads the target's
        if self._features:
            self.draft_weights = resolve_draft_weights(draft_weights, target)
            self._draft_forward = FeatureDraftForward(draft, target, self._draft_ids,
                                                      int8=self.draft_weights == "int8")
        elif draft is not None:
            self.draft_weights = resolve_draft_weights(draft_weights, draft)
            self._draft_forward = draft_forward(draft, self._draft_ids, self.draft_weights)

    @property
    def draft_vocab_size(self) -> int | None:
        """How many token ids the draft's head scores (None: the whole vocabulary)."""
        return None if self._draft_ids is None else len(self._draft_ids)

    @torch.inference_mode()
    def prefill(
        self,
        prompt_ids: list[int],
        settings: SamplingSettings,
        seed: int | None = None,
        num_logprobs: int | None = None,
        num_prompt_logprobs: int | None = None,
    ) -> SequenceState:
        """Cache the prompt in the target (all but its last token); the draft catches up later.
        With `num_prompt_logprobs`, score every prompt token but the first on the way."""
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
            draft_cache=self._draft_forward.new_cache() if self._draft_forward else None,
            num_logprobs=num_logprobs,
        )
        if self._features:
            state.draft_features = []
        if num_prompt_logprobs is None:
            if len(prompt_ids) > 1:
                self._keep_features(state, self._target_pass(state, prompt_ids[:-1], 1)[1])
            return state
        # scored: every row's logits, a chunk at a time ([chunk, V], not [prompt, V], at once)
        state.prompt_logprobs = [None]
        for start in range(0, len(prompt_ids) - 1, PROMPT_LOGPROBS_CHUNK):
            end = min(start + PROMPT_LOGPROBS_CHUNK, len(prompt_ids) - 1)
            logits, features = self._target_pass(state, prompt_ids[start:end],
                                                 logits_to_keep=0)  # 0: every row
            self._keep_features(state, features)
            state.prompt_logprobs += token_logprobs(logits, prompt_ids[start + 1 : end + 1],
                                                    num_prompt_logprobs)
            del logits  # not held while the next chunk's are computed
        return state

    @torch.inference_mode()
    def step(self, state: SequenceState, max_new_tokens: int) -> StepResult:
        """Advance `state` by 1 .. k + 1 tokens, never more than `max_new_tokens`."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        k, drafted, draft_probs, looked_up = self._proposal(state, max_new_tokens - 1)
        proposed = time.perf_counter()

        known = len(state.token_ids)
        target_logits, features = self._target_pass(state, [state.token_ids[-1], *drafted],
                                                    logits_to_keep=len(drafted) + 1)
        adjusted = adjust(target_logits, state.settings.adjustments, state.token_ids + drafted,
                          state.num_prompt_tokens)
        result = verify(drafted, draft_probs, adjusted, state.settings, state.generator)
        self.policy.costs.observe_target(len(drafted) + 1, time.perf_counter() - proposed)
        self.policy.record(state.speculation, k, len(drafted), result.num_accepted, looked_up)

        new_tokens = drafted[: result.num_accepted] + [result.next_token]
        logprobs = None
        if state.num_logprobs is not None:  # the target's raw distribution, as plain decoding's
            logprobs = token_logprobs(target_logits, new_tokens, state.num_logprobs)
        state.token_ids.extend(new_tokens)
        state.spec.add_step(len(drafted), result.num_accepted)
        _truncate(state.target_cache, known + result.num_accepted)
        if features is not None:  # those of the pending token and the accepted drafted ones
            self._keep_features(state, features[: result.num_accepted + 1])
            _truncate(state.draft_cache, known - 1)
        elif state.draft_cache is not None:
            _truncate(state.draft_cache, known + result.num_accepted)
        return StepResult(new_tokens, len(drafted), result.num_accepted, logprobs)

    def _proposal(
        self, state: SequenceState, max_k: int
    ) -> tuple[int, list[int], torch.Tensor | None, bool]:
        """The step's k and drafted tokens (with their distributions when sampling), and
        whether prompt lookup drafted them: the policy weighs what lookup found against the
        draft model."""
        found: list[int] = []
        if self.prompt_lookup is not None and self.policy.mode != "off":  # no scan for naught
            found = self.prompt_lookup.propose(state.token_ids, min(self.num_speculative_tokens,
                                                                    max_k))
        choice = self.policy.choose(state.speculation, len(found), self.draft is not None)
        k = min(choice.k, max_k)
        if choice.lookup:
            drafted = found[:k]
            return k, drafted, self._point_masses(drafted, state.settings), True
        drafted, draft_probs = self._propose(state, k)
        return k, drafted, draft_probs, False

    def _target_pass(self, state: SequenceState, token_ids: list[int],
                     logits_to_keep: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The target's forward on top of its cache: the last `logits_to_keep` rows of logits
        (0: all), and for a feature draft every row's feature (the last hidden state)."""
        if not self._features:
            return _forward(self.target, state.target_cache, token_ids, logits_to_keep), None
        hidden = self.target.get_decoder()(
            input_ids=torch.tensor([token_ids], device=self.target.device),
            past_key_values=state.target_cache, use_cache=True,
        ).last_hidden_state[0]
        return self.target.get_output_embeddings()(hidden[-logits_to_keep:]), hidden

    @staticmethod
    def _keep_features(state: SequenceState, features: torch.Tensor | None) -> None:
        if features is not None:
            state.draft_features.append(features)

    def _point_masses(self, tokens: list[int], settings: SamplingSettings) -> torch.Tensor | None:
        """The distributions a deterministic proposer drew `tokens` from (sampling only)."""
        if settings.greedy:
            return None
        masses = torch.zeros(len(tokens), self._vocab_size, device=self.target.device)
        masses[torch.arange(len(tokens)), torch.tensor(tokens)] = 1.0
        return masses

    def _propose(self, state: SequenceState, k: int) -> tuple[list[int], torch.Tensor | None]:
        """Let the draft catch up with the sequence and propose up to k tokens, stopping when
        it is unsure of its pick. Returns the tokens (target ids) and the distributions they were
        drawn from (sampling only, over the whole vocabulary)."""
        if k == 0:
            return [], None
        assert state.draft_cache is not None and self._draft_forward is not None
        settings = state.settings
        # a feature draft's position i pairs feature i with token i + 1
        pending = state.token_ids[state.draft_cache.get_seq_length() + self._features :]
        if not pending:  # a one-token prompt: no feature to draft from yet
            return [], None
        features = torch.cat(state.draft_features) if self._features else None
        drafted: list[int] = []
        probs: list[torch.Tensor] = []
        for _ in range(k):
            started = time.perf_counter()
            if self._features:
                raw, own_feature = self._draft_forward.step(state.draft_cache, pending, features)
                features, state.draft_features = own_feature[None], []
            else:
                raw = self._draft_forward.logits(state.draft_cache, pending)
            logits = self._adjusted(raw, state, drafted)
            if settings.greedy:
                index = int(logits.argmax().item())
                token_probs = None
                if self.confidence_threshold > 0.0:
                    confidence = float(logits.float().softmax(-1)[index])
            else:
                token_probs = probabilities(logits, settings)
                index = sample(token_probs, state.generator)
                confidence = float(token_probs.max())
            if len(pending) <= CATCH_UP_TOKENS:  # a catch-up over many tokens is not c
                self.policy.costs.observe_draft(1, time.perf_counter() - started)
            # the first token's forward is paid for: it is always proposed
            if drafted and self.confidence_threshold > 0.0 and (
                    confidence < self.confidence_threshold):
                break
            token = index if self._draft_ids is None else int(self._draft_ids[index])
            drafted.append(token)
            if token_probs is not None:
                probs.append(self._full_vocab(token_probs))
            pending = [token]
        return drafted, _stacked(probs)

    def _adjusted(self, logits: torch.Tensor, state: SequenceState,
                  drafted: list[int]) -> torch.Tensor:
        """The draft's logits after the penalties the target's get, with the same history."""
        adjustments = state.settings.adjustments
        if not adjustments.active:
            return logits
        history = state.token_ids + drafted
        if self._draft_ids is None:
            return adjust(logits[None], adjustments, history, state.num_prompt_tokens)[0]
        full = torch.full((self._vocab_size,), float("-inf"), device=logits.device)
        full[self._draft_ids] = logits.float()
        adjusted = adjust(full[None], adjustments, history, state.num_prompt_tokens)[0]
        return adjusted.index_select(0, self._draft_ids)

    def _full_vocab(self, probs: torch.Tensor) -> torch.Tensor:
        """A distribution over the draft's trimmed vocabulary, spread over the target's."""
        if self._draft_ids is None:
            return probs
        full = torch.zeros(self._vocab_size, dtype=probs.dtype, device=probs.device)
        return full.index_copy_(0, self._draft_ids, probs)

    @torch.inference_mode()
    def calibrate(self) -> None:
        """Time target passes of 1 .. k + 1 tokens and one draft forward (with a draft model)
        on a short random context (medians of a few runs): the policy's costs until live steps
        refine them."""
        if self.num_speculative_tokens == 0:
            return
        generator = torch.Generator().manual_seed(0)
        context = torch.randint(self._vocab_size, (CALIBRATION_CONTEXT,),
                                generator=generator).tolist()

        def median_seconds(new_cache, prefill, run) -> float:
            cache = new_cache()
            prefill(cache)
            times = []
            for _ in range(CALIBRATION_REPEATS):
                started = time.perf_counter()
                run(cache)
                times.append(time.perf_counter() - started)
                _truncate(cache, len(context))
            return statistics.median(times)

        extra = context[: self.num_speculative_tokens + 1]
        self.policy.costs.target_pass_s = [
            median_seconds(
                lambda: DynamicCache(config=self.target.config),
                lambda cache: _forward(self.target, cache, context, logits_to_keep=1),
                lambda cache, n=n: _forward(self.target, cache, extra[:n],
                                            logits_to_keep=n).argmax(-1).tolist())
            for n in range(1, self.num_speculative_tokens + 2)
        ]
        if self._draft_forward is not None:
            forward = self._draft_forward

            def draft_logits(cache, tokens: list[int]) -> torch.Tensor:
                if not self._features:
                    return forward.logits(cache, tokens)
                features = torch.zeros(len(tokens), self._hidden_size,
                                       dtype=self.target.dtype, device=self.target.device)
                return forward.step(cache, tokens, features)[0]

            self.policy.costs.draft_forward_s = median_seconds(
                forward.new_cache, lambda cache: draft_logits(cache, context),
                lambda cache: int(draft_logits(cache, extra[:1]).argmax().item()))

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


def _stacked(probs: list[torch.Tensor]) -> torch.Tensor | None:
    return torch.stack(probs) if probs else None
