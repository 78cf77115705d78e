"""`draft_training.evaluate`: acceptance figures measured by the engine's speculative decoder,
on tiny random-weight Llama models."""

from __future__ import annotations

import json

import pytest
import torch

from afa_serve.engine.base import SpecDecodeCounts
from afa_serve.engine.speculative import SpeculativeDecoder
from afa_serve.engine.verify import SamplingSettings
from draft_training.evaluate import evaluate, report
from tests.conftest import tiny_llama, truncated_copy

VOCAB = 64
K = 4


def random_prompts(count: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, VOCAB - 1, (int(length),), generator=generator).tolist()
        for length in torch.randint(3, 12, (count,), generator=generator)
    ]


@pytest.fixture(scope="module")
def target():
    return tiny_llama(vocab_size=VOCAB, layers=2, seed=0)


def test_a_draft_identical_to_the_target_is_always_accepted(target):
    draft = tiny_llama(vocab_size=VOCAB, layers=2, seed=0)  # same weights, its own copy
    # 20 new tokens = 4 full steps of k + 1 = 5 tokens: every step drafts k tokens.
    acceptance = evaluate(target, draft, random_prompts(3, seed=1), K, max_new_tokens=20)
    data = report(acceptance, k=K)

    assert data["acceptance_rate"] == 1.0
    assert data["mean_acceptance_length"] == K + 1
    assert data["acceptance_per_position"] == [1.0] * K
    assert data["counts"]["num_drafts"] == 3 * 4
    assert data["counts"]["num_draft_tokens"] == 3 * 4 * K
    assert data["counts"]["generated_tokens"] == 3 * 20


def test_report_sums_the_engines_counts_and_derives_the_figures_from_them(target):
    draft = truncated_copy(tiny_llama(vocab_size=VOCAB, layers=4, seed=7), 1)  # unrelated
    prompts = random_prompts(4, seed=2)
    eos = frozenset({VOCAB - 1})
    data = json.loads(json.dumps(report(evaluate(target, draft, prompts, K, 17, eos), k=K)))

    expected = SpecDecodeCounts()  # the same requests decoded one by one by the engine
    generated = 0
    decoder = SpeculativeDecoder(target, draft, num_speculative_tokens=K)
    for prompt in prompts:
        state = decoder.generate(prompt, 17, SamplingSettings(temperature=0.0), eos)
        expected.merge(state.spec)
        generated += state.num_generated
    counts = data["counts"]
    assert counts["num_drafts"] == expected.num_drafts
    assert counts["num_draft_tokens"] == expected.num_draft_tokens
    assert counts["num_accepted_tokens"] == expected.num_accepted_tokens
    assert counts["accepted_per_position"] == expected.accepted_per_position
    assert counts["generated_tokens"] == generated

    assert list(data)[:4] == [
        "mean_acceptance_length",
        "acceptance_rate",
        "acceptance_per_position",
        "num_prompts",
    ]
    assert data["num_prompts"] == 4 and data["k"] == K
    assert data["mean_acceptance_length"] == 1 + expected.num_accepted_tokens / expected.num_drafts
    assert data["acceptance_rate"] == expected.num_accepted_tokens / expected.num_draft_tokens
    per_position = data["acceptance_per_position"]
    assert per_position == [n / expected.num_drafts for n in expected.accepted_per_position]
    assert per_position == sorted(per_position, reverse=True)  # accepted only after a prefix
    # An unrelated random draft is rarely right: far below the identical draft's 1.0.
    assert data["acceptance_rate"] < 0.3
    assert data["mean_acceptance_length"] < 2.0


def test_evaluate_refuses_an_empty_prompt_set(target):
    with pytest.raises(ValueError, match="at least one prompt"):
        evaluate(target, target, [], K, 8)
