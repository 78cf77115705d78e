"""The accept/reject rules on plain tensors, and that sampled output follows the target."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

from afa_serve.engine.speculative import SpeculativeDecoder
from afa_serve.engine.verify import (
    SamplingSettings,
    probabilities,
    verify_greedy,
    verify_sampled,
)
from tests.conftest import tiny_llama


def test_greedy_keeps_matching_prefix_and_corrects_first_mismatch():
    logits = torch.full((4, 10), -5.0)
    for row, best in enumerate([3, 7, 1, 9]):
        logits[row, best] = 5.0
    assert verify_greedy([3, 7, 2], logits).num_accepted == 2
    assert verify_greedy([3, 7, 2], logits).next_token == 1
    full = verify_greedy([3, 7, 1], logits)
    assert (full.num_accepted, full.next_token) == (3, 9)  # the bonus token
    assert verify_greedy([], logits[:1]).next_token == 3  # k = 0: a plain step


def test_probabilities_apply_top_k_and_top_p():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    top_k = probabilities(logits, SamplingSettings(temperature=1.0, top_k=2))
    assert torch.allclose(top_k, torch.tensor([5 / 7, 2 / 7, 0, 0, 0]))
    top_p = probabilities(logits, SamplingSettings(temperature=1.0, top_p=0.8))
    # 0.5 + 0.2 < 0.8, so 0.15 is needed to reach it; 0.1 and 0.05 are cut
    assert torch.allclose(top_p, torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    cold = probabilities(logits, SamplingSettings(temperature=0.5))
    assert cold[0] > 0.5 and torch.isclose(cold.sum(), torch.tensor(1.0))


def test_rejection_sampling_keeps_token_with_probability_p_over_q():
    target = torch.log(torch.tensor([[0.2, 0.8], [0.5, 0.5]]))
    draft_probs = torch.tensor([[0.8, 0.2]])
    settings = SamplingSettings(temperature=1.0)
    generator = torch.Generator().manual_seed(0)
    trials = 20_000
    kept = sum(
        verify_sampled([0], draft_probs, target, settings, generator).num_accepted
        for _ in range(trials)
    )
    assert abs(kept / trials - 0.25) < 0.015  # min(1, 0.2 / 0.8)


def _joint_distribution(model, prompt: list[int], length: int, settings: SamplingSettings):
    """Exact probability of every continuation of `length` tokens under `model`."""
    vocab = model.config.vocab_size
    outcomes = list(itertools.product(range(vocab), repeat=length))
    probs = []
    with torch.no_grad():
        for outcome in outcomes:
            ids = torch.tensor([prompt + list(outcome)])
            logits = model(ids).logits[0, len(prompt) - 1 : -1]
            step_probs = probabilities(logits, settings)
            probs.append(float(step_probs[torch.arange(length), torch.tensor(outcome)].prod()))
    return outcomes, torch.tensor(probs, dtype=torch.float64)


def _sample_counts(decoder, prompt, length, settings, outcomes, runs):
    index = {outcome: i for i, outcome in enumerate(outcomes)}
    counts = torch.zeros(len(outcomes), dtype=torch.float64)
    for seed in range(runs):
        state = decoder.generate(prompt, length, settings, seed=seed)
        counts[index[tuple(state.token_ids[len(prompt):])]] += 1
    return counts


def _chi_square_p_value(counts, expected_probs):
    """Pearson's test, with cells expected fewer than 5 times pooled into one."""
    expected = expected_probs / expected_probs.sum() * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum().reshape(1)])
    wanted = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    if wanted[-1] == 0:
        if observed[-1] > 0:
            return 0.0  # a continuation the target never produces
        observed, wanted = observed[:-1], wanted[:-1]
    return chisquare(observed.numpy(), wanted.numpy()).pvalue


TARGET_SEED, DRAFT_SEED, PROMPT, LENGTH, RUNS = 1, 2, [0, 1, 2], 3, 2000


def sampling_p_value(decoder, target, settings: SamplingSettings) -> float:
    """Chi-square p-value of `decoder`'s LENGTH-token continuations of PROMPT (RUNS seeds)
    against `target`'s exact joint law."""
    outcomes, exact = _joint_distribution(target, PROMPT, LENGTH, settings)
    counts = _sample_counts(decoder, PROMPT, LENGTH, settings, outcomes, RUNS)
    return _chi_square_p_value(counts, exact)


@pytest.mark.parametrize(
    "settings",
    [
        SamplingSettings(temperature=1.0),
        SamplingSettings(temperature=0.7, top_k=3),
        SamplingSettings(temperature=1.3, top_p=0.8),
    ],
    ids=["plain", "temperature+top_k", "temperature+top_p"],
)
def test_speculative_sampling_follows_the_target_distribution(settings):
    """Chi-square of 3-token continuations (5^3 outcomes) against the target's exact joint law."""
    target = tiny_llama(vocab_size=5, layers=2, seed=TARGET_SEED)
    draft = tiny_llama(vocab_size=5, layers=1, seed=DRAFT_SEED)  # unrelated: many rejections
    decoder = SpeculativeDecoder(target, draft, num_speculative_tokens=2)
    assert sampling_p_value(decoder, target, settings) > 1e-3


def test_chi_square_check_rejects_the_drafts_own_law():
    """The statistic above has power: sampling from the draft alone fails it."""
    settings = SamplingSettings(temperature=1.0)
    target = tiny_llama(vocab_size=5, layers=2, seed=TARGET_SEED)
    draft = tiny_llama(vocab_size=5, layers=1, seed=DRAFT_SEED)
    assert sampling_p_value(SpeculativeDecoder(draft), target, settings) < 1e-6


def test_logits_that_overflow_give_the_softmaxs_limit_not_nan():
    """A repetition penalty or temperature near 0 turns finite logits into +inf (fuzzing sent
    repetition_penalty 5e-324): such a row is uniform over its largest logits, others as
    before."""
    penalised = torch.tensor([1.0, float("inf"), -2.0, float("inf"), float("-inf")])
    plain = torch.tensor([1.0, 3.0, -2.0, 3.0, float("-inf")])
    probs = probabilities(torch.stack([penalised, plain]), SamplingSettings(temperature=1.0))
    assert probs[0].tolist() == pytest.approx([0.0, 0.5, 0.0, 0.5, 0.0])
    assert probs[1].tolist() == pytest.approx(plain.softmax(-1).tolist())
    tiny = probabilities(plain[None], SamplingSettings(temperature=5e-324))
    assert tiny[0].tolist() == pytest.approx([0.0, 0.5, 0.0, 0.5, 0.0])
