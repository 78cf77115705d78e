"""Logprobs on afa-serve's vLLM engine (vLLM's draft_model speculation, float32) equal those of
vLLM's own offline `LLM.generate` decoding the target alone: speculation changes none of them,
for output tokens (chat and completions) and for the prompt (completions' echo)."""

from __future__ import annotations

import pytest

from tests.vllm.conftest import GREEDY_CHAT, GREEDY_COMPLETION, GREEDY_MAX_TOKENS
from tests.vllm.harness import NAME

ROUNDING = 1e-4


def test_completion_logprobs_and_echo_equal_plain_vllm(vllm_server, reference_outputs):
    reference = reference_outputs["completion"]
    response = vllm_server.client(timeout=300).completions.create(
        model=NAME, prompt=GREEDY_COMPLETION, max_tokens=GREEDY_MAX_TOKENS, temperature=0,
        echo=True, logprobs=2)
    assert response.model_extra["metrics"]["speculative_decoding"]["num_drafts"] > 0
    choice = response.choices[0]
    assert choice.text == GREEDY_COMPLETION + reference["text"]
    logprobs = choice.logprobs
    expected = reference["prompt_logprobs"] + reference["logprobs"]
    assert len(logprobs.tokens) == len(expected)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.token_logprobs[1:] == pytest.approx(expected[1:], abs=ROUNDING)
    for token, top in zip(logprobs.tokens[1:], logprobs.top_logprobs[1:], strict=True):
        assert token in top and 2 <= len(top) <= 3
    only_prompt = vllm_server.client(timeout=300).completions.create(
        model=NAME, prompt=GREEDY_COMPLETION, max_tokens=0, echo=True, logprobs=0)
    assert only_prompt.choices[0].text == GREEDY_COMPLETION
    assert only_prompt.usage.completion_tokens == 0
    assert only_prompt.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        reference["prompt_logprobs"][1:], abs=ROUNDING)


def test_chat_logprobs_equal_plain_vllm(vllm_server, reference_outputs):
    reference = reference_outputs["chat"]
    choice = vllm_server.client(timeout=300).chat.completions.create(
        model=NAME, messages=GREEDY_CHAT, max_tokens=GREEDY_MAX_TOKENS, temperature=0,
        logprobs=True, top_logprobs=3).choices[0]
    content = choice.logprobs.content
    assert choice.message.content == reference["text"]
    # one entry per generated token, the end-of-turn token (as vLLM's server) included
    assert "".join(entry.token for entry in content).startswith(choice.message.content)
    assert [entry.logprob for entry in content] == pytest.approx(reference["logprobs"],
                                                                 abs=ROUNDING)
    for entry in content:  # greedy: the chosen token is the likeliest of three
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
