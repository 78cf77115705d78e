"""Penalties, logit bias, min_tokens and min_p: the rules themselves, and that speculative
decoding under them stays lossless (greedy equals plain decoding; sampled output follows the
target's penalised distribution)."""

from __future__ import annotations

import itertools

import pytest
import torch

from afa_serve.engine.penalties import LogitAdjustments, adjust
from afa_serve.engine.speculative import SpeculativeDecoder
from afa_serve.engine.verify import SamplingSettings, probabilities
from tests.conftest import tiny_llama
from tests.test_verify import (
    DRAFT_SEED,
    LENGTH,
    PROMPT,
    RUNS,
    TARGET_SEED,
    _chi_square_p_value,
    _sample_counts,
)


def test_each_row_is_penalised_with_its_own_history():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]]).repeat(3, 1)
    # prompt [0], output [2, 2, 3]: row 0 follows [0, 2], row 1 [0, 2, 2], row 2 [0, 2, 2, 3]
    history = [0, 2, 2, 3]
    repetition = adjust(logits, LogitAdjustments(repetition_penalty=2.0), history, 1)
    assert repetition.tolist() == [[1.0, -1.0, 0.25, 1.0], [1.0, -1.0, 0.25, 1.0],
                                   [1.0, -1.0, 0.25, 0.5]]  # the prompt's token 0 too
    counted = adjust(logits, LogitAdjustments(frequency_penalty=0.5, presence_penalty=0.25),
                     history, 1)
    assert counted[:, 2].tolist() == [0.5 - 0.5 - 0.25, 0.5 - 1.0 - 0.25, 0.5 - 1.0 - 0.25]
    assert counted[:, 3].tolist() == [1.0, 1.0, 1.0 - 0.5 - 0.25]
    assert counted[:, 0].tolist() == [2.0] * 3  # a prompt token is not output
    biased = adjust(logits, LogitAdjustments(logit_bias=((1, 5.0),)), history, 1)
    assert biased[:, 1].tolist() == [4.0] * 3
    # min_tokens 3: rows 0 and 1 (1 and 2 tokens generated before them) cannot end
    ended = adjust(logits, LogitAdjustments(min_tokens=3, end_token_ids=frozenset({3})),
                   history, 1)
    assert ended[:, 3].tolist() == [float("-inf"), float("-inf"), 1.0]
    assert adjust(logits, LogitAdjustments(), history, 1) is logits  # nothing to do


def test_min_p_keeps_tokens_near_the_likeliest():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = probabilities(logits, SamplingSettings(temperature=1.0, min_p=0.2))
    assert torch.allclose(kept, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)


PENALISED = LogitAdjustments(repetition_penalty=1.8, frequency_penalty=0.7, presence_penalty=0.4,
                             logit_bias=((1, 1.5),), min_tokens=2,
                             end_token_ids=frozenset({4}))
GREEDY = SamplingSettings(temperature=0.0, adjustments=PENALISED)


@pytest.mark.parametrize("draft_vocab", [None, list(range(20))])
def test_greedy_speculative_output_under_penalties_equals_plain(draft_vocab):
    target = tiny_llama(layers=2, seed=0)
    plain = SpeculativeDecoder(target)
    unpenalised = plain.generate([1, 2, 3], 40, SamplingSettings(temperature=0.0)).token_ids
    for draft_seed in (0, 5):  # the target itself (penalised alike: all accepted), a random one
        draft = tiny_llama(layers=2 if draft_seed == 0 else 1, seed=draft_seed)
        decoder = SpeculativeDecoder(target, draft, 4, draft_vocab=draft_vocab)
        expected = plain.generate([1, 2, 3], 40, GREEDY).token_ids
        state = decoder.generate([1, 2, 3], 40, GREEDY)
        assert state.token_ids == expected != unpenalised
        if draft_seed == 0 and draft_vocab is None:
            assert state.spec.acceptance_rate == 1.0  # the draft's logits got the same penalties


def _penalised_joint_distribution(model, prompt, length, settings):
    """Exact probability of every continuation, each step penalised with its own history."""
    outcomes = list(itertools.product(range(model.config.vocab_size), repeat=length))
    probs = []
    with torch.no_grad():
        for outcome in outcomes:
            ids = prompt + list(outcome)
            logits = model(torch.tensor([ids])).logits[0, len(prompt) - 1 : -1]
            adjusted = adjust(logits, settings.adjustments, ids[:-1], len(prompt))
            step = probabilities(adjusted, settings)
            probs.append(float(step[torch.arange(length), torch.tensor(outcome)].prod()))
    return outcomes, torch.tensor(probs, dtype=torch.float64)


@pytest.mark.parametrize("draft_vocab", [None, [0, 2, 3, 4]])
def test_speculative_sampling_under_penalties_follows_the_penalised_target(draft_vocab):
    settings = SamplingSettings(temperature=1.0, min_p=0.05, adjustments=PENALISED)
    target = tiny_llama(vocab_size=5, layers=2, seed=TARGET_SEED)
    draft = tiny_llama(vocab_size=5, layers=1, seed=DRAFT_SEED)
    outcomes, exact = _penalised_joint_distribution(target, PROMPT, LENGTH, settings)
    decoder = SpeculativeDecoder(target, draft, 2, draft_vocab=draft_vocab)
    counts = _sample_counts(decoder, PROMPT, LENGTH, settings, outcomes, RUNS)
    assert _chi_square_p_value(counts, exact) > 1e-3
