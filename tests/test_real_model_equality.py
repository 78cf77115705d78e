"""Must-show: on the real SmolLM2-135M-Instruct, speculative greedy output equals plain greedy
output token for token, on every prompt of a real prompt set (float32 target, int8 draft)."""

from __future__ import annotations

import pytest
import torch

from afa_serve.engine.loading import eos_token_ids
from afa_serve.engine.speculative import SpeculativeDecoder
from afa_serve.engine.verify import SamplingSettings
from afa_serve.prompts import load_prompts, prompt_token_ids

# ~2 minutes on 2 idle cores; many times that when another job shares them (OpenMP threads
# then wait on each other), hence the generous timeout.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

NUM_PROMPTS, MAX_TOKENS = 20, 64


def test_speculative_greedy_equals_plain_on_mt_bench(real_target, real_draft, real_tokenizer):
    torch.set_num_threads(2)
    try:
        greedy = SamplingSettings(temperature=0.0)
        eos = eos_token_ids(real_target, real_tokenizer)
        plain = SpeculativeDecoder(real_target)
        # the draft as the engine runs it on CPU: compact forward, int8 weights
        spec = SpeculativeDecoder(real_target, real_draft, num_speculative_tokens=3,
                                  draft_weights="int8")
        prompts = load_prompts("mt-bench", NUM_PROMPTS)
        mismatches = []
        for index, prompt in enumerate(prompts):
            ids = prompt_token_ids(prompt, real_tokenizer)
            expected = plain.generate(ids, MAX_TOKENS, greedy, eos).token_ids
            state = spec.generate(ids, MAX_TOKENS, greedy, eos)
            assert state.spec.num_drafts > 0
            if state.token_ids != expected:
                mismatches.append(index)
        assert mismatches == [], f"prompts whose outputs differ: {mismatches}"
    finally:
        torch.set_num_threads(1)
