"""A bounded load test: 64 concurrent streaming clients against a server that holds 16, a
quarter of them leaving early. Every request is answered in full or cleanly refused (429),
and afterwards nothing runs or waits."""

from __future__ import annotations

import asyncio
import random

import openai
import pytest

from tests.api_harness import TINY, idle, running_server, tiny_engine, wait_until

CLIENTS = 64
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def server(real_tokenizer):
    engine = tiny_engine(real_tokenizer, k=3, max_num_seqs=4, max_queue=12)
    with running_server(engine) as running:
        yield running


async def one_client(client: openai.AsyncOpenAI, number: int, rng: random.Random) -> str:
    max_tokens = rng.randint(8, 48)
    leaves_early = number % 4 == 0
    common = {"model": TINY, "max_tokens": max_tokens, "temperature": 0.7, "seed": number,
              "stream": True, "stream_options": {"include_usage": True}}
    try:
        if number % 2:
            stream = await client.completions.create(prompt=f"Story {number}:", **common)
        else:
            stream = await client.chat.completions.create(messages=MESSAGES, **common)
    except openai.RateLimitError as refused:
        assert refused.response.headers["Retry-After"]
        return "refused"
    finish, usage, chunks = None, None, 0
    async for chunk in stream:
        chunks += 1
        if leaves_early and chunks == 2:
            await stream.close()
            return "left"
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
        usage = chunk.usage or usage
    assert finish in ("length", "stop"), finish
    assert usage is not None and 1 <= usage.completion_tokens <= max_tokens
    return "answered"


def test_64_concurrent_streams_are_answered_or_refused_and_nothing_is_left(server):
    before = server.metrics()

    async def main() -> list[str]:
        rng = random.Random(0)
        async with server.async_client(timeout=60) as client:
            return await asyncio.gather(*(one_client(client, i, rng) for i in range(CLIENTS)))

    outcomes = asyncio.run(asyncio.wait_for(main(), timeout=120))
    assert outcomes.count("answered") > 0 and outcomes.count("refused") > 0
    assert len(outcomes) == CLIENTS

    assert wait_until(lambda: idle(server), timeout_s=5)
    after = server.metrics()
    assert after[("afa_serve_num_requests_running", frozenset())] == 0
    assert after[("afa_serve_num_requests_waiting", frozenset())] == 0

    def moved(status: str) -> float:
        return sum(after.get((name, labels), 0) - before.get((name, labels), 0)
                   for name, labels in after
                   if name == "afa_serve_requests_total" and ("status", status) in labels)

    assert moved("429") == outcomes.count("refused")
    assert moved("200") == outcomes.count("answered") + outcomes.count("left")
    assert server.client().completions.create(model=TINY, prompt="still fine", max_tokens=3)
