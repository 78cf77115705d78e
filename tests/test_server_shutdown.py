"""Shutting down: `afa-serve serve` as a real process takes its settings from a config file and
the environment and, on SIGTERM, stops accepting, lets the running stream finish and exits 0;
what outlives the drain timeout is cut."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.api_harness import TINY, running_server, tiny_engine
from tests.conftest import tiny_llama

NAME = "tiny-from-file"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, real_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    model = tiny_llama(vocab_size=len(real_tokenizer), layers=2)
    model.config.max_position_embeddings = 2048  # room for long streams (RoPE has no limit)
    model.save_pretrained(folder)
    real_tokenizer.save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir: Path, tmp_path: Path, drain_timeout_s: float):
    config = tmp_path / "serve.yaml"
    config.write_text(f"target: {model_dir}\nserved-model-name: {NAME}\nengine: torch\n"
                      f"max_model_len: 1024\ndrain_timeout_s: {drain_timeout_s}\n")
    port = free_port()
    env = {**os.environ, "AFA_SERVE_CONFIG": str(config), "AFA_SERVE_API_KEY": "k3y"}
    process = subprocess.Popen(
        [sys.executable, "-m", "afa_serve", "serve", "--port", str(port), "--log-level",
         "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise TimeoutError("the server did not come up")


def stream_in_background(url: str, max_tokens: int, model: str = NAME, api_key: str = "k3y"):
    """Start a streaming completion; return (first chunk seen, result holder, thread)."""
    first_chunk = threading.Event()
    result: dict = {"chunks": 0, "finish": None, "error": None}

    def run():
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0)
        try:
            for chunk in client.completions.create(
                model=model, prompt="Tell me a story", max_tokens=max_tokens, temperature=0,
                stream=True, extra_body={"ignore_eos": True},
            ):
                result["chunks"] += 1
                first_chunk.set()
                if chunk.choices and chunk.choices[0].finish_reason:
                    result["finish"] = chunk.choices[0].finish_reason
        except Exception as error:  # the stream cut at the drain timeout
            result["error"] = error
        first_chunk.set()

    thread = threading.Thread(target=run)
    thread.start()
    return first_chunk, result, thread


def test_sigterm_drains_the_running_stream_and_exits_0(tiny_model_dir, tmp_path):
    process, url = start_server(tiny_model_dir, tmp_path, drain_timeout_s=60)
    try:
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer k3y"}).json()
        assert [m["id"] for m in models["data"]] == [NAME]  # from the config file
        assert httpx.get(f"{url}/v1/models").status_code == 401  # the key from the env

        first_chunk, result, thread = stream_in_background(url, max_tokens=600)
        assert first_chunk.wait(30)
        process.send_signal(signal.SIGTERM)
        chunks_at_signal = result["chunks"]
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):  # no longer accepting connections
            httpx.get(f"{url}/health", timeout=2)
        thread.join(60)
        assert result["error"] is None and result["finish"] == "length"
        assert result["chunks"] > chunks_at_signal + 50  # it went on after the signal
        assert process.wait(60) == 0
    finally:
        process.kill()


def test_streams_that_outlive_the_drain_timeout_are_cut_and_the_server_returns(
    real_tokenizer,
):
    """The timeout branch, in-process: uvicorn cancels what is left and the engine stops."""
    engine = tiny_engine(real_tokenizer, k=0, max_model_len=8192)
    with running_server(engine, drain_timeout_s=0.5) as server:
        first_chunk, result, thread = stream_in_background(server.url, max_tokens=8000,
                                                           model=TINY, api_key="unused")
        assert first_chunk.wait(30)
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 5
    thread.join(30)
    assert result["finish"] is None  # cut before its end
    assert engine.stats().num_running == 0
