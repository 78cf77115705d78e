"""guidellm's default streaming run against afa-serve (real SmolLM2 with a truncated draft, under
uvicorn): its openai_http backend streams chat completions with `stream_options:
{"include_usage": true, "continuous_usage_stats": true}`; a short synchronous run on synthetic
prompts completes every request, none errored or cut short."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from afa_serve.engine.config import EngineConfig
from afa_serve.engine.torch_engine import TorchEngine
from tests.api_harness import Server, running_server

NAME = "smollm2"
REQUESTS = 4
OUTPUT_TOKENS = 8


@pytest.fixture(scope="module")
def server(real_target, real_tokenizer, real_draft) -> Iterator[Server]:
    config = EngineConfig(target=NAME, draft=f"{NAME}-draft", num_speculative_tokens=3,
                          max_model_len=512)
    engine = TorchEngine.from_models(real_target, real_tokenizer, real_draft, config=config)
    with running_server(engine) as running:
        yield running


def test_guidellm_default_streaming_run_completes_every_request(server, real_model_path,
                                                               tmp_path):
    report = tmp_path / "benchmarks.json"
    run = subprocess.run(
        [sys.executable, "-m", "guidellm", "run",
         "--backend", f"kind=openai_http,target={server.url}",
         "--profile", "kind=synchronous",
         "--constraint", f"kind=max_requests,count={REQUESTS}",
         "--tokenizer", f"kind=hf_auto,model={real_model_path}",  # for the synthetic prompts
         "--data", f"kind=synthetic_text,prompt_tokens=32,output_tokens={OUTPUT_TOKENS}",
         "--output", f"kind=json,path={report}",
         "--disable-console-interactive"],
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    benchmark = json.loads(Path(report).read_text())["benchmarks"][0]
    # The scheduler's own tally of every request it sent. `metrics.request_totals` counts only
    # the requests inside guidellm's measurement window, which once left out the request that
    # tripped max_requests (3 of 4, nothing errored or cut short).
    state = benchmark["scheduler_state"]
    # On failure, what guidellm said and recorded: a flake seen once in 8 runs, not in 30 since.
    statuses = {kind: [request["info"]["status"] for request in requests or []]
                for kind, requests in benchmark["requests"].items() if kind != "total"}
    evidence = (f"{json.dumps(state, indent=1)}\nrequest statuses: {statuses}"
                f"\n{run.stdout[-3000:]}{run.stderr[-3000:]}")
    assert (state["created_requests"], state["successful_requests"], state["errored_requests"],
            state["cancelled_requests"]) == (REQUESTS, REQUESTS, 0, 0), evidence
    answered = {dict(labels)["status"]: value for (name, labels), value in server.metrics().items()
                if name == "afa_serve_requests_total"
                and ("endpoint", "/v1/chat/completions") in labels}
    assert answered == {"200": REQUESTS}, evidence  # streamed chat completions, all answered 200
