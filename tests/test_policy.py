"""Speculation that never loses: the policy's choice of k, confidence stopping, the trimmed head.

All on tiny random models or plain numbers; the real-model figures live in `afa-serve bench`.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from afa_serve.engine.base import GenerationRequest, SamplingParams
from afa_serve.engine.config import EngineConfig
from afa_serve.engine.draft_vocab import count_tokens, read_draft_vocab, write_draft_vocab
from afa_serve.engine.policy import (
    MAX_PROBE_INTERVAL,
    PROBE_INTERVAL,
    DraftStats,
    RequestSpeculation,
    SpeculationPolicy,
)
from afa_serve.engine.speculative import SpeculativeDecoder
from afa_serve.engine.torch_engine import TorchEngine
from afa_serve.engine.verify import SamplingSettings
from tests.conftest import tiny_llama, tiny_tokenizer
from tests.test_verify import DRAFT_SEED, TARGET_SEED, sampling_p_value

GREEDY = SamplingSettings(temperature=0.0)


def policy_with(c: float, verify: list[float], max_k: int) -> SpeculationPolicy:
    policy = SpeculationPolicy("adaptive", max_k)
    policy.costs.target_pass_s = [0.1 * v for v in verify]
    policy.costs.draft_forward_s = 0.1 * c
    return policy


def engine_stats_for(acceptance: list[float], observations: float = 1e6) -> DraftStats:
    """Engine-wide counts of steps at k = len(acceptance) whose position j is accepted with
    conditional probability β_j, the draft always proposing all k."""
    k = len(acceptance)
    reached, accepted, survive = [], [], observations
    for beta in acceptance:
        reached.append(survive)
        survive *= beta
        accepted.append(survive)
    return DraftStats(reached, accepted, [observations] * k, [observations] * k)


def formula_best_k(acceptance: list[float], c: float, verify: list[float]) -> int:
    """S(k) = τ(k) / (k·c + v(k + 1)), τ(k) = 1 + Σ_{j<k} Π_{i≤j} β_i, written out here."""
    scores = []
    for k in range(len(verify)):
        tau, run = 1.0, 1.0
        for j in range(k):
            run *= acceptance[j]
            tau += run
        scores.append(tau / (k * c + verify[k]) if k else 1.0)
    return max(range(len(scores)), key=lambda k: (scores[k], -k))


@pytest.mark.parametrize(
    "acceptance,c,verify",
    [
        ([0.9, 0.85, 0.8, 0.8], 0.05, [1.0, 1.02, 1.04, 1.06, 1.08]),  # a good draft: k = 4
        ([0.6, 0.4, 0.3, 0.2], 0.15, [1.0, 1.05, 1.1, 1.2, 1.3]),  # a middling one: small k
        ([0.05, 0.02, 0.0, 0.0], 0.3, [1.0, 1.05, 1.1, 1.2, 1.3]),  # an untrained one: plain
        ([0.7, 0.7, 0.7, 0.7], 0.1, [1.0, 1.6, 1.8, 2.0, 2.2]),  # costly verify (float32)
    ],
)
def test_the_policy_picks_the_k_the_cost_formula_says(acceptance, c, verify):
    policy = policy_with(c, verify, max_k=4)
    policy.engine_stats = engine_stats_for(acceptance)
    wanted = formula_best_k(acceptance, c, verify)
    request = RequestSpeculation()  # a new request starts from what the engine learnt
    assert policy.acceptance(request) == pytest.approx(acceptance, abs=1e-4)
    assert policy.choose(request).k == wanted
    speedups = policy.expected_speedups(request)
    assert speedups[0] == 1.0 and max(speedups) == pytest.approx(speedups[wanted])


def test_steps_are_counted_per_position_with_declined_positions_as_rejections():
    stats = DraftStats()
    stats.record(k=3, num_drafted=3, num_accepted=1)  # 0 kept, 1 rejected, 2 never reached
    stats.record(k=3, num_drafted=1, num_accepted=1)  # 0 kept, the draft declined 1
    stats.record(k=2, num_drafted=2, num_accepted=2)  # all kept
    assert stats.reached == [3, 3, 0] and stats.accepted == [3, 1, 0]
    assert stats.offered == [0, 3, 1] and stats.proposed == [0, 2, 1]


def test_a_losing_draft_is_probed_with_back_off_and_a_recovering_one_comes_back():
    policy = policy_with(0.3, [1.0, 1.05, 1.1], max_k=2)
    request = RequestSpeculation()
    for _ in range(200):
        policy.record(request, 2, 2, 0)
    choices = [policy.choose(request).k for _ in range(PROBE_INTERVAL)]
    assert choices == [0] * (PROBE_INTERVAL - 1) + [1]  # plain, then one probe at k = 1
    policy.record(request, 1, 1, 0)  # the probe gained nothing: wait twice as long
    assert request.probe.interval == 2 * PROBE_INTERVAL
    for _ in range(12):
        request.probe.probing = True
        policy.record(request, 1, 1, 0)
    assert request.probe.interval == MAX_PROBE_INTERVAL
    # the text turns predictable: probes succeed, the request's own rates rise, k comes back
    for _ in range(50):
        policy.record(request, 2, 2, 2)
    assert policy.choose(request).k == 2


def test_fixed_and_off_ignore_the_measurements():
    for mode, wanted in (("fixed", 3), ("off", 0)):
        policy = SpeculationPolicy(mode, 3)
        policy.costs.target_pass_s = [1.0, 5.0, 5.0, 5.0]
        policy.costs.draft_forward_s = 2.0
        assert policy.choose(RequestSpeculation()).k == wanted


@pytest.mark.parametrize("mode,threshold", [("adaptive", 0.0), ("adaptive", 0.3),
                                            ("fixed", 0.3), ("off", 0.0)])
def test_every_policy_keeps_greedy_output_equal_to_plain(mode, threshold):
    target = tiny_llama(layers=2, seed=0)
    plain = SpeculativeDecoder(target)
    for draft_seed in (0, 5):  # seed 0 is the target itself (all accepted); 5 a random draft
        draft = tiny_llama(layers=2 if draft_seed == 0 else 1, seed=draft_seed)
        decoder = SpeculativeDecoder(target, draft, 4, speculation=mode,
                                     confidence_threshold=threshold)
        decoder.calibrate()
        for prompt in ([3], list(range(20))):
            assert decoder.generate(prompt, 40, GREEDY).token_ids == \
                plain.generate(prompt, 40, GREEDY).token_ids


def test_adaptive_speculation_drafts_with_a_good_draft_and_stops_with_a_bad_one():
    target = tiny_llama(layers=2, seed=0)
    good = SpeculativeDecoder(target, tiny_llama(layers=2, seed=0), 4, speculation="adaptive")
    bad = SpeculativeDecoder(target, tiny_llama(layers=1, seed=5), 4, speculation="adaptive")
    for decoder in (good, bad):
        decoder.calibrate()
        # the same cost on every machine: a draft forward a quarter of a target step
        decoder.policy.costs.target_pass_s = [1.0, 1.02, 1.04, 1.06, 1.08]
        decoder.policy.costs.draft_forward_s = 0.25
        decoder.policy.costs.observe_target = lambda *args: None
        decoder.policy.costs.observe_draft = lambda *args: None
        states = [decoder.generate([i, i + 1], 60, GREEDY) for i in range(8)]
        steps = [0] * 5
        for state in states:
            for length, count in enumerate(state.spec.steps_by_draft_length):
                steps[length] += count
        if decoder is good:
            assert steps[4] > 0.9 * sum(steps[1:])  # every token accepted: k stays at 4
        else:
            assert steps[0] > 0.8 * sum(steps)  # mostly plain steps, a few probes


def test_confidence_stops_the_draft_on_its_own_numbers():
    target = tiny_llama(layers=2, seed=0)
    draft = tiny_llama(layers=1, seed=5)
    text = SpeculativeDecoder(target).generate([1, 2, 3], 40, GREEDY).token_ids
    with torch.no_grad():
        confidence = draft(torch.tensor([text])).logits[0].softmax(-1).max(-1).values
    median = float(confidence.median())
    lengths = {}
    for threshold in (0.0, median, 0.99):
        decoder = SpeculativeDecoder(target, draft, 4, confidence_threshold=threshold)
        state = decoder.generate([1, 2, 3], 40, GREEDY)
        lengths[threshold] = state.spec.steps_by_draft_length
    # no threshold: every step drafts 4 but the last few, cut by the 40-token budget
    assert sum(lengths[0.0][:4]) <= 4 and lengths[0.0][4] > 0
    # the random draft is never 99 % sure: it proposes its first token only
    assert len(lengths[0.99]) == 2 and lengths[0.99][1] > 0
    # at its median confidence it stops part way
    assert sum(lengths[median][1:4]) > 0


def test_the_trimmed_head_maps_its_picks_back_to_target_ids():
    target = tiny_llama(layers=2, seed=0)
    plain = SpeculativeDecoder(target).generate([1, 2, 3], 30, GREEDY).token_ids[3:]
    used = sorted(set(plain))
    # the draft is the target itself: with the target's tokens in the head, all are accepted
    covered = SpeculativeDecoder(target, tiny_llama(layers=2, seed=0), 4, draft_vocab=used)
    state = covered.generate([1, 2, 3], 30, GREEDY)
    assert state.token_ids[3:] == plain and state.spec.acceptance_rate == 1.0
    # without the most frequent one, the draft proposes only tokens of its set, never that one
    missing = max(used, key=plain.count)
    partial = [t for t in used if t != missing]
    decoder = SpeculativeDecoder(target, tiny_llama(layers=2, seed=0), 4, draft_vocab=partial)
    proposed: list[int] = []
    original = decoder._propose

    def spy(state, k):
        drafted, probs = original(state, k)
        proposed.extend(drafted)
        return drafted, probs

    decoder._propose = spy
    state = decoder.generate([1, 2, 3], 30, GREEDY)
    assert state.token_ids[3:] == plain  # still lossless
    assert proposed and set(proposed) <= set(partial) and missing not in proposed
    assert state.spec.acceptance_rate < 1.0


@pytest.mark.parametrize("threshold,vocab,weights", [
    (0.3, None, "dtype"), (0.0, [0, 2, 3], "dtype"), (0.3, [0, 1, 4], "int8")])
def test_sampling_follows_the_target_with_confidence_stopping_and_a_trimmed_head(
    threshold, vocab, weights
):
    settings = SamplingSettings(temperature=1.0)
    target = tiny_llama(vocab_size=5, layers=2, seed=TARGET_SEED)
    draft = tiny_llama(vocab_size=5, layers=1, seed=DRAFT_SEED)
    decoder = SpeculativeDecoder(target, draft, 2, confidence_threshold=threshold,
                                 draft_vocab=vocab, draft_weights=weights)
    assert sampling_p_value(decoder, target, settings) > 1e-3


def test_draft_vocab_file_round_trips_and_reports_coverage(tmp_path):
    vocab = count_tokens([[5, 5, 5, 7], [7, 9, 5]])
    assert vocab.token_ids == (5, 7, 9) and vocab.counts == (4, 2, 1)
    assert vocab.coverage(1) == pytest.approx(4 / 7) and vocab.coverage(3) == 1.0
    assert vocab.head_ids(1, always=[2]) == [2, 5]
    write_draft_vocab(tmp_path, vocab)
    assert read_draft_vocab(tmp_path) == vocab
    assert read_draft_vocab(tmp_path / "nothing-here") is None


async def test_the_engine_reports_costs_and_draft_lengths():
    target = tiny_llama(layers=2, seed=0)
    engine = TorchEngine.from_models(
        target, tiny_tokenizer(), tiny_llama(layers=2, seed=0),
        EngineConfig(target="tiny", num_speculative_tokens=3, confidence_threshold=0.0))
    await engine.start()
    try:
        request = GenerationRequest("a", (1, 2, 3), SamplingParams(
            max_tokens=24, temperature=0.0, ignore_eos=True))
        deltas = [d async for d in engine.generate(request)]
        stats = engine.stats()
        assert stats.draft_cost_ratio is not None and stats.draft_cost_ratio > 0
        assert stats.verify_cost_ratio is not None and stats.verify_cost_ratio > 0
        assert sum(stats.spec.steps_by_draft_length) == len(deltas)
        assert engine.info.speculation == "adaptive"
    finally:
        await engine.shutdown()
        await asyncio.sleep(0)
