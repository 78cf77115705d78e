"""Prompt lookup: what it proposes, how the policy weighs it, and that decoding stays lossless."""

from __future__ import annotations

import pytest

from afa_serve.engine.base import GenerationRequest, SamplingParams
from afa_serve.engine.config import EngineConfig
from afa_serve.engine.policy import PROBE_INTERVAL, RequestSpeculation
from afa_serve.engine.prompt_lookup import PromptLookup
from afa_serve.engine.speculative import SpeculativeDecoder
from afa_serve.engine.torch_engine import TorchEngine
from afa_serve.engine.verify import SamplingSettings
from tests.conftest import tiny_llama, tiny_tokenizer
from tests.test_policy import GREEDY, engine_stats_for, formula_best_k, policy_with
from tests.test_verify import TARGET_SEED, sampling_p_value


@pytest.mark.parametrize("tokens,max_tokens,wanted", [
    ([1, 2, 3, 4, 1, 2, 3], 4, [4, 1, 2, 3]),  # the 3-gram 1 2 3 occurred: what followed it
    ([1, 2, 3, 4, 1, 2, 3], 2, [4, 1]),  # no more than asked
    ([9, 1, 2, 8, 1, 2], 3, [8, 1, 2]),  # the latest occurrence of the longest suffix
    ([5, 1, 7, 6, 1, 7, 2, 6, 1], 2, [7, 2]),  # 6 1 beats the later lone 1 ... 1 7 of "5 1"
    ([7, 3, 5, 8, 3], 3, [5, 8, 3]),  # only the 1-gram 3 occurred before
    ([4, 5, 6], 3, []),  # nothing repeats
    ([4], 3, []),
])
def test_prompt_lookup_proposes_what_followed_the_longest_latest_match(tokens, max_tokens,
                                                                      wanted):
    assert PromptLookup(min_ngram=1, max_ngram=3).propose(tokens, max_tokens) == wanted


def test_prompt_lookup_respects_its_shortest_ngram():
    assert PromptLookup(min_ngram=2, max_ngram=3).propose([7, 3, 5, 8, 3], 3) == []
    with pytest.raises(ValueError):
        PromptLookup(min_ngram=3, max_ngram=2)


@pytest.mark.parametrize("acceptance,verify,found", [
    ([0.9, 0.85, 0.8, 0.8], [1.0, 1.02, 1.04, 1.06, 1.08], 4),  # a repeating text: all of it
    ([0.9, 0.85, 0.8, 0.8], [1.0, 1.02, 1.04, 1.06, 1.08], 2),  # no more than was found
    ([0.3, 0.2, 0.1, 0.1], [1.0, 1.15, 1.3, 1.45, 1.6], 4),  # weak matches, dear verify
    ([0.02, 0.0, 0.0, 0.0], [1.0, 1.1, 1.2, 1.3, 1.4], 4),  # matches that never hold: skip
])
def test_the_policy_weighs_lookup_with_the_formula_at_no_draft_cost(acceptance, verify, found):
    policy = policy_with(0.5, verify, max_k=4)  # the draft model's c plays no part
    policy.engine_lookup_stats = engine_stats_for(acceptance)
    wanted = formula_best_k(acceptance, 0.0, verify[:found + 1])
    choice = policy.choose(RequestSpeculation(), found, drafting=False)
    assert (choice.k, choice.lookup) == (wanted, wanted > 0)


@pytest.mark.parametrize("lookup,draft,c,wanted", [
    ([0.9, 0.9, 0.9, 0.9], [0.5, 0.5, 0.5, 0.5], 0.1, True),  # lookup is better and free
    ([0.1, 0.1, 0.0, 0.0], [0.8, 0.8, 0.8, 0.8], 0.05, False),  # a weak match: the draft
    ([0.3, 0.2, 0.1, 0.1], [0.3, 0.2, 0.1, 0.1], 0.1, True),  # as likely: the free one
])
def test_the_policy_gives_the_step_to_the_proposer_that_promises_more(lookup, draft, c, wanted):
    verify = [1.0, 1.05, 1.1, 1.15, 1.2]
    policy = policy_with(c, verify, max_k=4)
    policy.engine_lookup_stats = engine_stats_for(lookup)
    policy.engine_stats = engine_stats_for(draft)
    request = RequestSpeculation()
    lookup_speedups = policy.expected_speedups(request, lookup=True)
    draft_speedups = policy.expected_speedups(request)
    assert (max(lookup_speedups) >= max(draft_speedups)) == wanted  # the premise
    choice = policy.choose(request, 4, drafting=True)
    assert choice.lookup == wanted and choice.k > 0


def test_a_lookup_that_failed_is_probed_again_and_comes_back():
    policy = policy_with(0.3, [1.0, 1.3, 1.6, 1.9, 2.2], max_k=4)
    request = RequestSpeculation()
    for _ in range(100):  # early matches all failed, engine-wide and in this request
        policy.record(request, 2, 2, 0, lookup=True)
    choices = [policy.choose(request, 4, drafting=False) for _ in range(PROBE_INTERVAL)]
    assert [c.k for c in choices] == [0] * (PROBE_INTERVAL - 1) + [1] and choices[-1].lookup
    for _ in range(60):  # the text turned repetitive: the probes succeed
        request.lookup_probe.probing = True
        policy.record(request, 1, 1, 1, lookup=True)
    for _ in range(30):
        policy.record(request, 4, 4, 4, lookup=True)
    choice = policy.choose(request, 4, drafting=False)
    assert choice.lookup and choice.k == 4


def test_fixed_verifies_all_that_lookup_found_and_off_none():
    for mode, wanted in (("fixed", 3), ("off", 0)):
        policy = policy_with(0.1, [1.0, 9.0, 9.0, 9.0, 9.0], max_k=4)
        policy.mode = mode
        assert policy.choose(RequestSpeculation(), 3).k == wanted


@pytest.mark.parametrize("with_draft", [False, True])
@pytest.mark.parametrize("mode", ["adaptive", "fixed"])
def test_greedy_output_with_prompt_lookup_equals_plain(with_draft, mode):
    target = tiny_llama(layers=2, seed=0)
    plain = SpeculativeDecoder(target)
    draft = tiny_llama(layers=1, seed=5) if with_draft else None
    decoder = SpeculativeDecoder(target, draft, 4, speculation=mode,
                                 prompt_lookup=PromptLookup(1, 3))
    decoder.calibrate()
    for prompt in ([3], [5, 6, 7, 5, 6, 7, 5, 6], list(range(20))):
        state = decoder.generate(prompt, 48, GREEDY)
        assert state.token_ids == plain.generate(prompt, 48, GREEDY).token_ids
    # a tiny random model loops, and the loops are found
    assert state.spec.num_draft_tokens > 0 and state.spec.num_accepted_tokens > 0


@pytest.mark.parametrize("with_draft", [False, True])
def test_sampling_with_prompt_lookup_follows_the_target(with_draft):
    settings = SamplingSettings(temperature=1.0)
    target = tiny_llama(vocab_size=5, layers=2, seed=TARGET_SEED)
    draft = tiny_llama(vocab_size=5, layers=1, seed=5) if with_draft else None
    decoder = SpeculativeDecoder(target, draft, 2, speculation="fixed",
                                 prompt_lookup=PromptLookup(1, 2))
    assert sampling_p_value(decoder, target, settings) > 1e-3


async def test_the_engine_looks_up_prompts_by_default_even_without_a_draft():
    target = tiny_llama(layers=2, seed=0)
    engine = TorchEngine.from_models(target, tiny_tokenizer(), None,
                                     EngineConfig(target="tiny", num_speculative_tokens=4))
    await engine.start()
    try:
        assert engine.info.draft is None and engine.info.num_speculative_tokens == 4
        request = GenerationRequest("a", (1, 2, 3), SamplingParams(
            max_tokens=40, temperature=0.0, ignore_eos=True))
        deltas = [d async for d in engine.generate(request)]
        tokens = [t for d in deltas for t in d.token_ids]
        assert tokens == SpeculativeDecoder(target).generate([1, 2, 3], 40, GREEDY).token_ids[3:]
        assert deltas[-1].spec.num_draft_tokens > 0  # the tiny model loops: lookup finds it
    finally:
        await engine.shutdown()


def test_prompt_lookup_settings():
    assert EngineConfig(prompt_lookup_max=0).prompt_lookup is None
    assert EngineConfig(num_speculative_tokens=0).prompt_lookup is None
    assert EngineConfig(prompt_lookup_min=2, prompt_lookup_max=4).prompt_lookup == PromptLookup(
        2, 4)
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        EngineConfig(prompt_lookup_min=4, prompt_lookup_max=2)


def test_the_vllm_batch_schedule_is_parsed_and_checked():
    config = EngineConfig(speculative_batch_schedule="1-2:4,3-8:1,9-64:0")
    assert config.batch_schedule() == [(1, 2, 4), (3, 8, 1), (9, 64, 0)]
    for bad in ("2-8:1", "1-4:2,6-8:1", "1-4:2,3-8:1", "1-4", "1-4:x"):
        with pytest.raises(ValueError):
            EngineConfig(speculative_batch_schedule=bad)
