"""vLLM's benchmark client (`vllm bench serve`) against afa-serve (torch engine, real SmolLM2
with a truncated draft), with `--backend openai` and `--backend openai-chat`: every request
completes. The client always sends `repetition_penalty`, `logprobs` and
`stream_options.include_usage`; the chat backend sends content as a list of text parts.

`vllm bench serve` is called as vLLM's CLI calls it (`vllm.benchmarks.serve.main`): the `vllm`
console script itself fails in the CPU build.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from afa_serve.engine.config import EngineConfig
from afa_serve.engine.torch_engine import TorchEngine
from tests.api_harness import Server, running_server
from tests.vllm.harness import DTYPE, NAME, NUM_SPECULATIVE_TOKENS, REPO_ROOT

NUM_PROMPTS = 6
BENCH = """
import sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
main(parser.parse_args(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def afa_server(real_model_path, draft_path) -> Iterator[Server]:
    config = EngineConfig(target=str(real_model_path), draft=str(draft_path),
                          num_speculative_tokens=NUM_SPECULATIVE_TOKENS, served_model_name=NAME,
                          dtype=DTYPE, max_model_len=512, max_num_seqs=4)
    with running_server(TorchEngine(config)) as server:
        yield server


@pytest.mark.parametrize("backend, endpoint", [("openai", "/v1/completions"),
                                               ("openai-chat", "/v1/chat/completions")])
def test_vllm_bench_serve_completes_every_request(afa_server, real_model_path, tmp_path: Path,
                                                  backend, endpoint):
    result = tmp_path / "result.json"
    command = [
        sys.executable, "-c", BENCH, "--backend", backend, "--base-url", afa_server.url,
        "--endpoint", endpoint, "--model", NAME, "--tokenizer", str(real_model_path),
        "--dataset-name", "random", "--random-input-len", "32", "--random-output-len", "8",
        "--num-prompts", str(NUM_PROMPTS), "--request-rate", "inf", "--seed", "0",
        "--ready-check-timeout-sec", "60", "--save-result", "--result-dir", str(tmp_path),
        "--result-filename", result.name,
    ]
    run = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                         check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(result.read_text())
    assert (report["completed"], report["failed"]) == (NUM_PROMPTS, 0), report.get("errors")
    assert report["total_output_tokens"] > 0
