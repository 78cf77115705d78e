"""Helpers for the HTTP tests: a tiny real engine, a real uvicorn server, scraping /metrics.

The tiny engine is a random-weight Llama (2 layers, hidden 32) over the real SmolLM2
tokenizer and chat template, with a 1-layer truncated copy as draft: every path of the
server runs for real, in milliseconds per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
from fastapi import FastAPI
from openai import AsyncOpenAI, OpenAI
from prometheus_client.parser import text_string_to_metric_families

from afa_serve.api import ApiOptions, create_app
from afa_serve.api.server import serving_in_thread
from afa_serve.api.state import ServerState
from afa_serve.engine.base import GenerationRequest, SamplingParams
from afa_serve.engine.config import EngineConfig
from afa_serve.engine.torch_engine import TorchEngine
from tests.conftest import tiny_llama, truncated_copy

TINY = "tiny-llama"


def tiny_engine(
    tokenizer,
    k: int = 3,
    max_model_len: int = 192,
    max_num_seqs: int = 4,
    max_queue: int = 16,
    speculation: str = "fixed",
) -> TorchEngine:
    """Drafts every step by default (random draft, no confidence stop): the API's figures are
    then never trivially zero."""
    target = tiny_llama(vocab_size=len(tokenizer), layers=2, seed=0)
    target.config.max_position_embeddings = max_model_len  # RoPE itself has no limit
    draft = truncated_copy(target, 1) if k else None
    config = EngineConfig(
        target=TINY, draft=f"{TINY}-draft" if k else None, num_speculative_tokens=k,
        served_model_name=TINY, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
        max_queue=max_queue, speculation=speculation, confidence_threshold=0.0,
    )
    return TorchEngine.from_models(target, tokenizer, draft, config=config)


@dataclass
class Server:
    url: str
    app: FastAPI
    api_key: str = "unused"

    @property
    def state(self) -> ServerState:
        return self.app.state.server

    @property
    def engine(self) -> TorchEngine:
        return self.state.engine

    def client(self, **kwargs) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key, max_retries=0, **kwargs)

    def async_client(self, **kwargs) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.api_key, max_retries=0,
                           **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.api_key}", **kwargs.pop("headers", {})}
        return httpx.post(f"{self.url}{path}", headers=headers, **{"timeout": 30, **kwargs})

    def get(self, path: str, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.api_key}", **kwargs.pop("headers", {})}
        return httpx.get(f"{self.url}{path}", headers=headers, **{"timeout": 30, **kwargs})

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        """Every sample of /metrics: (name, labels without model_name) -> value."""
        response = self.get("/metrics")
        response.raise_for_status()
        samples = {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                labels = frozenset((k, v) for k, v in sample.labels.items() if k != "model_name")
                samples[(sample.name, labels)] = sample.value
        return samples


@contextlib.contextmanager
def running_server(
    engine: TorchEngine, options: ApiOptions | None = None, drain_timeout_s: float = 5.0
) -> Iterator[Server]:
    app = create_app(engine, options)
    with serving_in_thread(app, drain_timeout_s=drain_timeout_s) as url:
        yield Server(url, app, api_key=(options.api_key if options and options.api_key
                                        else "unused"))


def engine_alone(engine: TorchEngine, prompt_ids: list[int], params: SamplingParams) -> str:
    """The text the engine produces for a request, called directly (no HTTP)."""

    async def run() -> str:
        request = GenerationRequest(f"direct-{time.monotonic_ns()}", tuple(prompt_ids), params)
        return "".join([delta.text async for delta in engine.generate(request)])

    return asyncio.run(run())


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def idle(server: Server) -> bool:
    stats = server.engine.stats()
    return stats.num_running == 0 and stats.num_waiting == 0
