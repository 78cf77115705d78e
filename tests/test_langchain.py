"""LangChain's `ChatOpenAI` against afa-serve (real SmolLM2 with a truncated draft, under
uvicorn): named messages (LangChain sends each message's `name`), invoke, stream (with
`stream_options.include_usage`) and batch all succeed, greedy streamed text equals the whole."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI

from afa_serve.engine.config import EngineConfig
from afa_serve.engine.torch_engine import TorchEngine
from tests.api_harness import Server, running_server

NAME = "smollm2"
MAX_TOKENS = 12
CONVERSATION = [
    SystemMessage("You answer in one short sentence.", name="rules"),
    HumanMessage("What is the capital of France?", name="ann"),
    AIMessage("Paris.", name="helper"),
    HumanMessage("And of Italy?", name="ann"),
]


@pytest.fixture(scope="module")
def server(real_target, real_tokenizer, real_draft) -> Iterator[Server]:
    config = EngineConfig(target=NAME, draft=f"{NAME}-draft", num_speculative_tokens=3,
                          served_model_name=NAME, max_model_len=512)
    engine = TorchEngine.from_models(real_target, real_tokenizer, real_draft, config=config)
    with running_server(engine) as running:
        yield running


@pytest.fixture(scope="module")
def chat(server) -> ChatOpenAI:
    return ChatOpenAI(model=NAME, base_url=f"{server.url}/v1", api_key=server.api_key,
                      temperature=0, max_tokens=MAX_TOKENS, max_retries=0, timeout=120,
                      stream_usage=True)


def test_invoke_with_named_messages(chat):
    answer = chat.invoke(CONVERSATION)
    assert isinstance(answer, AIMessage) and answer.content
    usage = answer.usage_metadata
    assert 0 < usage["output_tokens"] <= MAX_TOKENS
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert answer.response_metadata["finish_reason"] in ("stop", "length")


def test_stream_equals_invoke(chat):
    chunks = list(chat.stream(CONVERSATION))
    streamed = "".join(chunk.content for chunk in chunks)
    assert streamed == chat.invoke(CONVERSATION).content
    usage = [chunk.usage_metadata for chunk in chunks if chunk.usage_metadata]
    assert len(usage) == 1 and usage[0]["output_tokens"] > 0  # the include_usage chunk


def test_batch_all_succeed(chat):
    questions = [[HumanMessage(f"Name a colour ({i}).", name="bob")] for i in range(3)]
    answers = chat.batch(questions, return_exceptions=True)
    assert all(isinstance(answer, AIMessage) and answer.content for answer in answers), answers
