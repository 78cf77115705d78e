"""vLLM's command-line spellings of `afa-serve serve`'s settings (`serve MODEL`, `--model`,
`--speculative-config`) and the settings vLLM users pass (`--tokenizer`, `--seed`,
`--allowed-origins`): what each sets, the errors, and a real server started with them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from afa_serve import cli
from afa_serve.config import ServeConfig
from afa_serve.engine.config import EngineConfig
from afa_serve.engine.torch_engine import TorchEngine
from tests.api_harness import TINY, running_server
from tests.conftest import tiny_llama


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in [name for name in os.environ if name.startswith("AFA_SERVE_")]:
        monkeypatch.delenv(name)


def invoke(monkeypatch, *args: str) -> tuple[ServeConfig | None, str, int]:
    """(the config `afa-serve serve ARGS` would serve, its output, its exit code); nothing is
    loaded or served."""
    built: list[ServeConfig] = []

    def keep(config: ServeConfig) -> None:
        built.append(config)
        raise SystemExit(0)

    monkeypatch.setattr(cli, "build_engine", keep)
    result = CliRunner().invoke(cli.app, ["serve", *args])
    return (built[0] if built else None), result.output, result.exit_code


def served(monkeypatch, *args: str) -> ServeConfig:
    config, output, code = invoke(monkeypatch, *args)
    assert code == 0 and config is not None, output
    return config


DRAFT_MODEL = '{"model": "d", "num_speculative_tokens": 3, "method": "draft_model"}'


@pytest.mark.parametrize("args, expected", [
    (["some/model"], {"target": "some/model"}),
    (["--model", "some/model"], {"target": "some/model"}),
    (["some/model", "--target", "some/model"], {"target": "some/model"}),
    (["--speculative-config", DRAFT_MODEL], {"draft": "d", "num_speculative_tokens": 3}),
    (["--speculative-config", '{"model": "d", "num_speculative_tokens": 2}'],
     {"draft": "d", "num_speculative_tokens": 2}),  # vLLM's default method with a model
    (["--speculative-config", '{"model": "d", "draft_tensor_parallel_size": 1}'],
     {"draft": "d", "draft_tensor_parallel_size": 1}),
    (["--speculative-config", ('{"method": "ngram", "num_speculative_tokens": 5, '
                               '"prompt_lookup_max": 4, "prompt_lookup_min": 2}')],
     {"draft": None, "num_speculative_tokens": 5, "prompt_lookup_max": 4,
      "prompt_lookup_min": 2}),
    (["--speculative-config", '{"model": "[ngram]", "prompt_lookup_max": 2}'],
     {"draft": None, "prompt_lookup_max": 2}),
    (["--speculative-config", DRAFT_MODEL, "-k", "3", "--draft", "d"],
     {"draft": "d", "num_speculative_tokens": 3}),
    (["--tokenizer", "some/tokenizer", "--seed", "7"],
     {"tokenizer": "some/tokenizer", "seed": 7}),
    (["--allowed-origins", '["https://a.example", "https://b.example"]'],
     {"allowed_origins": ("https://a.example", "https://b.example")}),  # vLLM's JSON list
    (["--allowed-origins", "https://a.example,https://b.example"],
     {"allowed_origins": ("https://a.example", "https://b.example")}),
    (["--allowed-origins", "https://a.example", "--allowed-origins", "*"],
     {"allowed_origins": ("https://a.example", "*")}),
    ([], {"allowed_origins": (), "seed": None, "tokenizer": None}),
])
def test_each_spelling_sets_the_fields(monkeypatch, args, expected):
    config = served(monkeypatch, *args)
    assert {name: getattr(config, name) for name in expected} == expected


@pytest.mark.parametrize("args, problem", [
    (["some/model", "--target", "other/model"], "target"),
    (["some/model", "--model", "other/model"], "target"),
    (["--speculative-config", DRAFT_MODEL, "-k", "2"], "num_speculative_tokens"),
    (["--speculative-config", DRAFT_MODEL, "--draft", "e"], "draft"),
    (["--speculative-config", '{"method": "eagle3", "model": "x"}'],
     "method 'eagle3' is not supported"),
    (["--speculative-config", '{"method": "mtp", "num_speculative_tokens": 1}'],
     "method 'mtp' is not supported"),
    (["--speculative-config", '{"model": "d", "quantization": "fp8"}'], "not quantization"),
    (["--speculative-config", '{"method": "ngram", "model": "d"}'], "not model"),
    (["--speculative-config", '{"num_speculative_tokens": 3}'], "needs the draft's model"),
    (["--speculative-config", "model=d"], "not valid JSON"),
    (["--speculative-config", '["d"]'], "must be a JSON object"),
    (["--speculative-config", '{"model": "d", "num_speculative_tokens": -1}'],
     "num_speculative_tokens"),
    (["--speculative-config", '{"method": "ngram", "prompt_lookup_min": 5}'],
     "prompt_lookup_min"),
    (["--seed", "-1"], "--seed"),
    (["--allowed-origins", '["https://a.example"'], "allowed_origins"),
])
def test_spellings_that_cannot_be_served_are_usage_errors(monkeypatch, args, problem):
    config, output, code = invoke(monkeypatch, *args)
    assert code == 2 and config is None, output
    assert problem in " ".join(output.replace("│", " ").split()), output  # rich wraps it


def sampled_texts(tokenizer, seed: int | None) -> list[str]:
    """Two unseeded sampled completions from a fresh server with --seed `seed`."""
    config = EngineConfig(target=TINY, served_model_name=TINY, seed=seed)
    engine = TorchEngine.from_models(tiny_llama(vocab_size=len(tokenizer)), tokenizer,
                                     config=config)
    with running_server(engine) as server:
        return [server.client().completions.create(
            model=TINY, prompt="Once upon a time", max_tokens=12, temperature=1.0,
        ).choices[0].text for _ in range(2)]


def test_seed_makes_requests_without_a_seed_sample_alike_on_every_start(real_tokenizer):
    first = sampled_texts(real_tokenizer, seed=3)
    assert first[0] != first[1]  # each request its own draw
    assert sampled_texts(real_tokenizer, seed=3) == first
    assert sampled_texts(real_tokenizer, seed=None) != first


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, real_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    model = tiny_llama(vocab_size=len(real_tokenizer), layers=2)
    model.config.max_position_embeddings = 512
    model.save_pretrained(folder / "target")  # no tokenizer: it comes from --tokenizer
    model.save_pretrained(folder / "draft")
    real_tokenizer.save_pretrained(folder / "draft")
    real_tokenizer.save_pretrained(folder / "tokenizer")
    return folder


def test_a_vllm_command_line_serves(tiny_model_dir):
    """`afa-serve serve MODEL --speculative-config ... --tokenizer ... --seed ...
    --allowed-origins ...`, as one would type `vllm serve`, serves with those settings."""
    port = free_port()
    target, draft = tiny_model_dir / "target", tiny_model_dir / "draft"
    speculative = json.dumps({"model": str(draft), "num_speculative_tokens": 2,
                              "method": "draft_model"})
    process = subprocess.Popen(
        [sys.executable, "-m", "afa_serve", "serve", str(target), "--engine", "torch",
         "--speculative-config", speculative, "--tokenizer", str(tiny_model_dir / "tokenizer"),
         "--seed", "3", "--allowed-origins", '["https://app.example"]', "--port", str(port),
         "--served-model-name", "tiny", "--log-level", "warning"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(process, url)
        model = httpx.get(f"{url}/v1/models").json()["data"][0]
        assert (Path(model["root"]).name, Path(model["draft"]).name,
                model["num_speculative_tokens"]) == ("target", "draft", 2)
        completion = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": "Hello", "max_tokens": 8, "temperature": 1.0})
        assert completion.status_code == 200, completion.text
        answer = httpx.get(f"{url}/version", headers={"Origin": "https://app.example"})
        assert answer.headers["access-control-allow-origin"] == "https://app.example"
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(process: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError("the server did not become healthy: " + process.stdout.read())
