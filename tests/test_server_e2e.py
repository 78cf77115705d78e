"""End to end on the real SmolLM2-135M-Instruct with a 2-layer draft: greedy output through the
HTTP server (completions and chat, streamed and not) equals the target's own greedy decoding
by transformers' `generate`, token for token."""

from __future__ import annotations

import concurrent.futures

import pytest
import torch

from afa_serve.engine.config import EngineConfig
from afa_serve.engine.torch_engine import TorchEngine
from tests.api_harness import chat_prompt_ids, running_server

MAX_TOKENS = 24
NAME = "smollm2"
COMPLETION_PROMPT = "The three primary colours are"
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def server(real_target, real_draft, real_tokenizer):
    config = EngineConfig(target=NAME, draft=f"{NAME}-2l", num_speculative_tokens=4,
                               served_model_name=NAME, max_num_seqs=4)
    engine = TorchEngine.from_models(real_target, real_tokenizer, real_draft, config=config)
    with running_server(engine) as running:
        yield running


def plain_greedy(model, tokenizer, prompt_ids: list[int]) -> str:
    """The target alone: transformers' greedy decoding, stopping at EOS like the server."""
    with torch.inference_mode():
        output = model.generate(torch.tensor([prompt_ids]), do_sample=False,
                                max_new_tokens=MAX_TOKENS, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0, len(prompt_ids):], skip_special_tokens=True)


def joined(chunks, field: str) -> str:
    pieces = []
    for chunk in chunks:
        for choice in chunk.choices:
            pieces.append(choice.text if field == "text" else (choice.delta.content or ""))
    return "".join(pieces)


@pytest.mark.slow
def test_greedy_through_the_server_equals_plain_target_decoding(
    server, real_target, real_tokenizer
):
    client = server.client(timeout=120)
    common = {"model": NAME, "max_tokens": MAX_TOKENS, "temperature": 0}
    calls = {
        "completion": lambda: client.completions.create(prompt=COMPLETION_PROMPT, **common)
        .choices[0].text,
        "completion stream": lambda: joined(client.completions.create(
            prompt=COMPLETION_PROMPT, stream=True, **common), "text"),
        "chat": lambda: client.chat.completions.create(messages=CHAT, **common)
        .choices[0].message.content,
        "chat stream": lambda: joined(client.chat.completions.create(
            messages=CHAT, stream=True, **common), "delta"),
    }
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:  # the engine interleaves
        futures = {name: pool.submit(call) for name, call in calls.items()}
        texts = {name: future.result() for name, future in futures.items()}

    completion = plain_greedy(real_target, real_tokenizer,
                              real_tokenizer(COMPLETION_PROMPT)["input_ids"])
    chat = plain_greedy(real_target, real_tokenizer, chat_prompt_ids(real_tokenizer, CHAT))
    assert len(completion) > 20 and "Paris" in chat
    assert texts == {"completion": completion, "completion stream": completion,
                     "chat": chat, "chat stream": chat}
