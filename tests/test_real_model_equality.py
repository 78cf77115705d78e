"""Must-show: on the real SmolLM2-135M-Instruct, speculative greedy output equals plain greedy
output token for token, on every prompt of a real prompt set."""

from __future__ import annotations

import pytest
import torch

from afa_serve.engine.loading import eos_token_ids
from afa_serve.engine.speculative import SpeculativeDecoder
from afa_serve.engine.verify import SamplingSettings
from afa_serve.prompts import load_prompts, prompt_token_ids

pytestmark = pytest.mark.slow

# 8 prompts keep CI short; `afa-serve bench` shows the same on 20 (README, bench/results).
NUM_PROMPTS, MAX_TOKENS = 8, 64


def test_speculative_greedy_equals_plain_on_mt_bench(real_target, real_draft, real_tokenizer):
    torch.set_num_threads(2)
    try:
        greedy = SamplingSettings(temperature=0.0)
        eos = eos_token_ids(real_target, real_tokenizer)
        plain = SpeculativeDecoder(real_target)
        spec = SpeculativeDecoder(real_target, real_draft, num_speculative_tokens=3)
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
