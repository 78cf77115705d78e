"""Shutting down: `afa-serve serve` as a real process takes its settings from a config file and
the environment and, on SIGTERM, drains: it keeps listening and answers new requests and
/health with 503 + Retry-After, lets the running stream finish and exits 0; a stream that
outlives the drain timeout ends with a last chunk (finish_reason set) and `data: [DONE]`, and
the process exits soon after, with no traceback in its log."""

from __future__ import annotations

import json
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
AUTH = {"Authorization": "Bearer k3y"}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, real_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    model = tiny_llama(vocab_size=len(real_tokenizer), layers=2)
    model.config.max_position_embeddings = 8192  # room for long streams (RoPE has no limit)
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
                      f"max_model_len: 8192\ndrain_timeout_s: {drain_timeout_s}\n")
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
        except Exception as error:  # noqa: BLE001 - recorded; the tests expect none
            result["error"] = error
        first_chunk.set()

    thread = threading.Thread(target=run)
    thread.start()
    return first_chunk, result, thread


def test_sigterm_drains_the_running_stream_and_exits_0(tiny_model_dir, tmp_path):
    process, url = start_server(tiny_model_dir, tmp_path, drain_timeout_s=60)
    try:
        models = httpx.get(f"{url}/v1/models", headers=AUTH).json()
        assert [m["id"] for m in models["data"]] == [NAME]  # from the config file
        assert models["data"][0]["root"] == tiny_model_dir.name  # its name, not its path
        assert httpx.get(f"{url}/v1/models").status_code == 401  # the key from the env
        keep_alive = httpx.Client(headers=AUTH)
        assert keep_alive.get(f"{url}/v1/models").status_code == 200

        first_chunk, result, thread = stream_in_background(url, max_tokens=600)
        assert first_chunk.wait(30)
        process.send_signal(signal.SIGTERM)
        chunks_at_signal = result["chunks"]
        time.sleep(0.3)
        health = httpx.get(f"{url}/health", timeout=2)  # still listening, and says so
        assert health.status_code == 503 and health.headers["Retry-After"] == "1"
        for refused in (
            httpx.post(f"{url}/v1/completions", headers=AUTH, timeout=2,
                       json={"model": NAME, "prompt": "hi", "max_tokens": 2}),
            keep_alive.get(f"{url}/v1/models"),  # an open keep-alive connection
        ):
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
            assert refused.json()["error"]["code"] == "shutting_down"
        thread.join(60)
        assert result["error"] is None and result["finish"] == "length"
        assert result["chunks"] > chunks_at_signal + 50  # it went on after the signal
        assert process.wait(60) == 0
        assert "Traceback" not in process.stdout.read()
    finally:
        process.kill()


def test_a_stream_that_outlives_the_drain_timeout_ends_whole_and_the_process_exits(
    tiny_model_dir, tmp_path
):
    process, url = start_server(tiny_model_dir, tmp_path, drain_timeout_s=2)
    try:
        with httpx.stream("POST", f"{url}/v1/completions", headers=AUTH, timeout=30, json={
            "model": NAME, "prompt": "Tell me a story", "max_tokens": 8000, "stream": True,
            "ignore_eos": True,
        }) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            events = [line for line in lines if line]  # to the end: a whole chunked body
        exited = process.wait(30)
        took = time.monotonic() - signalled
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2].removeprefix("data: "))
        assert last["choices"][0]["finish_reason"] == "abort"
        assert all(json.loads(e.removeprefix("data: "))["choices"][0]["finish_reason"] is None
                   for e in events[:-2])
        assert exited == 0 and 2 <= took < 2 + 3  # the timeout, the cut's grace and a step
        assert "Traceback" not in process.stdout.read()
    finally:
        process.kill()


def test_leaving_an_in_process_server_cuts_its_streams_the_same_way(real_tokenizer):
    engine = tiny_engine(real_tokenizer, k=0, max_model_len=8192)
    with running_server(engine, drain_timeout_s=0.5) as server:
        first_chunk, result, thread = stream_in_background(server.url, max_tokens=8000,
                                                           model=TINY, api_key="unused")
        assert first_chunk.wait(30)
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 5
    thread.join(30)
    assert result["error"] is None and result["finish"] == "abort"
    assert engine.stats().num_running == 0
