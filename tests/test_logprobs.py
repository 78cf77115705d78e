"""Log-probabilities on the real SmolLM2-135M-Instruct (float32), through the official `openai`
client and a real server: they are the target's, with speculation as without it, for chat
(`logprobs` + `top_logprobs`), completions (`logprobs`, `echo`, `max_tokens: 0`) and streams."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from afa_serve.engine.base import Delta, GenerationRequest, SamplingParams
from afa_serve.engine.config import EngineConfig
from afa_serve.engine.torch_engine import TorchEngine
from tests.api_harness import running_server

NAME = "smollm2"
PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name three colours."}]
ROUNDING = 1e-4  # float32: a verify pass over k + 1 tokens sums in another order than one token


def _engine(target, tokenizer, draft=None) -> TorchEngine:
    config = EngineConfig(
        target=NAME, draft=f"{NAME}-draft" if draft is not None else None,
        num_speculative_tokens=3 if draft is not None else 0, speculation="fixed",
        confidence_threshold=0.0, served_model_name=NAME, max_model_len=512)
    return TorchEngine.from_models(target, tokenizer, draft, config=config)


@pytest.fixture(scope="module")
def servers(real_target, real_draft, real_tokenizer):
    with running_server(_engine(real_target, real_tokenizer)) as plain, \
            running_server(_engine(real_target, real_tokenizer, real_draft)) as speculative:
        yield plain, speculative


def _target_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1, from one plain forward of the target."""
    with torch.inference_mode():
        logprobs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def test_chat_logprobs_with_speculation_equal_those_without(servers):
    plain, speculative = servers
    kwargs = {"model": NAME, "messages": MESSAGES, "max_tokens": 24, "temperature": 0,
              "logprobs": True, "top_logprobs": 5}
    expected = plain.client().chat.completions.create(**kwargs).choices[0]
    choice = speculative.client().chat.completions.create(**kwargs).choices[0]
    response = speculative.client().chat.completions.create(**kwargs)
    assert response.model_extra["metrics"]["speculative_decoding"]["num_drafts"] > 0
    assert choice.message.content == expected.message.content
    content, wanted = choice.logprobs.content, expected.logprobs.content
    assert "".join(entry.token for entry in content) == choice.message.content
    assert len(content) == len(wanted) == 24
    for entry, other in zip(content, wanted, strict=True):
        assert entry.token == other.token and entry.bytes == list(entry.token.encode())
        assert entry.logprob == pytest.approx(other.logprob, abs=ROUNDING)
        assert [t.token for t in entry.top_logprobs] == [t.token for t in other.top_logprobs]
        assert len(entry.top_logprobs) == 5
        # greedy: the chosen token is the likeliest
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-6)


def test_sampled_tokens_carry_the_targets_logprobs(servers, real_target, real_tokenizer):
    """Under sampling, speculative and plain decoding pick other tokens: each token's logprob is
    checked against a plain forward of the target over the whole output instead."""
    engine = servers[1].engine
    prompt_ids = real_tokenizer(PROMPT)["input_ids"]
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=11, ignore_eos=True,
                            logprobs=2)

    async def run() -> list[Delta]:
        request = GenerationRequest("sampled", tuple(prompt_ids), params)
        return [delta async for delta in engine.generate(request)]

    deltas = asyncio.run(run())
    assert deltas[-1].spec.num_drafts > 0
    output_ids = [t for d in deltas for t in d.token_ids]
    entries = [e for d in deltas for e in d.logprobs]
    assert [e.token_id for e in entries] == output_ids and len(output_ids) == 16
    reference = _target_logprobs(real_target, prompt_ids + output_ids)[len(prompt_ids) - 1:]
    assert [e.logprob for e in entries] == pytest.approx(reference.tolist(), abs=ROUNDING)
    assert all(len(e.top) == 2 and e.top[0][1] >= e.top[1][1] for e in entries)


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_echo_scores_the_prompt_as_lm_eval_needs_it(servers, real_target, real_tokenizer,
                                                     max_tokens):
    plain, speculative = servers
    kwargs = {"model": NAME, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
              "echo": True, "logprobs": 2}
    choice = speculative.client().completions.create(**kwargs).choices[0]
    expected = plain.client().completions.create(**kwargs).choices[0]
    prompt_ids = real_tokenizer(PROMPT)["input_ids"]
    logprobs = choice.logprobs
    assert choice.text == expected.text and choice.text.startswith(PROMPT)
    assert len(logprobs.tokens) == len(prompt_ids) + max_tokens
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i]))
                                    for i in range(len(logprobs.tokens))]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    reference = _target_logprobs(real_target, prompt_ids).tolist()
    assert logprobs.token_logprobs[1:len(prompt_ids)] == pytest.approx(reference, abs=ROUNDING)
    assert logprobs.token_logprobs[1:] == pytest.approx(expected.logprobs.token_logprobs[1:],
                                                        abs=ROUNDING)
    for token, top in zip(logprobs.tokens[1:], logprobs.top_logprobs[1:], strict=True):
        assert token in top and 2 <= len(top) <= 3  # the 2 likeliest and the chosen one
    usage = speculative.client().completions.create(**kwargs).usage
    assert usage.completion_tokens == max_tokens
    if max_tokens == 0:
        assert choice.text == PROMPT and choice.finish_reason == "length"


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_streamed_logprobs_equal_the_whole_response(servers, kind):
    _, speculative = servers
    client = speculative.client()
    if kind == "chat":
        kwargs = {"model": NAME, "messages": MESSAGES, "max_tokens": 12, "temperature": 0,
                  "logprobs": True, "top_logprobs": 2}
        whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
        chunks = client.chat.completions.create(stream=True, **kwargs)
        streamed = [e for c in chunks if c.choices and c.choices[0].logprobs
                    for e in c.choices[0].logprobs.content]
        assert [e.token for e in streamed] == [e.token for e in whole]
        assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole])
    else:
        kwargs = {"model": NAME, "prompt": PROMPT, "max_tokens": 12, "temperature": 0,
                  "logprobs": 1, "echo": True}
        whole = client.completions.create(**kwargs).choices[0]
        chunks = [c.choices[0] for c in client.completions.create(stream=True, **kwargs)
                  if c.choices]
        assert "".join(c.text for c in chunks) == whole.text
        tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
        offsets = [t for c in chunks if c.logprobs for t in c.logprobs.text_offset]
        values = [t for c in chunks if c.logprobs for t in c.logprobs.token_logprobs]
        assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
        assert values[0] is None and math.isclose(values[1], whole.logprobs.token_logprobs[1],
                                                  abs_tol=1e-5)
