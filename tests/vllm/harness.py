"""What the real-vLLM tests share: one engine configuration, vLLM's own OpenAI server and offline
`LLM.generate` run as subprocesses, and vLLM's own Prometheus counters read in-process.

vLLM on CPU spends about a minute starting each engine (it spawns an engine-core and a worker
process, each importing vLLM), so the tests start every engine they need once per session and
at the same time: vLLM's server and the offline reference run in their own processes while
afa-serve's engine starts in the test process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from openai import OpenAI

from afa_serve.engine.vllm_engine import vllm_has_per_request_spec_metrics
from bench.common import START_TIMEOUT_S, Child, free_port, wait_healthy

NAME = "smollm2"  # the served model name on every server
NUM_SPECULATIVE_TOKENS = 4
DRAFT_LAYERS = 2
DTYPE = "float32"  # greedy output equality holds in float32 (see shared README)
MAX_MODEL_LEN = 1024
MAX_NUM_SEQS = 4
KV_CACHE_BYTES = 256 * 1024 * 1024  # an explicit KV cache skips vLLM's free-memory check
REPO_ROOT = Path(__file__).resolve().parents[2]


def speculative_config(draft: Path) -> dict[str, object]:
    return {"method": "draft_model", "model": str(draft),
            "num_speculative_tokens": NUM_SPECULATIVE_TOKENS}


@dataclass
class VllmOpenAIServer:
    """vLLM's own OpenAI-compatible server (`python -m vllm.entrypoints.openai.api_server`)."""

    child: Child
    url: str

    @classmethod
    def start(cls, target: Path, draft: Path, log: Path) -> VllmOpenAIServer:
        port = free_port()
        command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(target), "--served-model-name", NAME,
            "--speculative-config", json.dumps(speculative_config(draft)),
            "--dtype", DTYPE, "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN),
            "--max-num-seqs", str(MAX_NUM_SEQS), "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
            "--host", "127.0.0.1", "--port", str(port),
        ]
        if vllm_has_per_request_spec_metrics():  # 0.32 has both flags, 0.24 neither
            command += ["--per-request-spec-decode-metrics", "summary",
                        "--enable-per-request-metrics"]
        return cls(Child.start(command, log), f"http://127.0.0.1:{port}")

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        try:
            wait_healthy(self.url, self.child.process, timeout_s)
        except (RuntimeError, TimeoutError) as error:
            raise type(error)(f"vLLM's server: {error}:\n{self.child.tail()}") from None

    def client(self, **kwargs) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **kwargs)


@dataclass
class OfflineReference:
    """vLLM's offline `LLM.generate` (greedy, target alone) on given prompts, in a subprocess."""

    child: Child
    output: Path

    @classmethod
    def start(cls, target: Path, prompts: list[list[int]], max_tokens: int, folder: Path,
              speculative_config: dict | None = None) -> OfflineReference:
        """`speculative_config`: vLLM decodes with it (reference_generate.py)."""
        job = folder / "reference_job.json"
        output = folder / "reference_output.json"
        job.write_text(json.dumps({
            "target": str(target), "prompts": prompts, "max_tokens": max_tokens, "dtype": DTYPE,
            "max_model_len": MAX_MODEL_LEN, "kv_cache_memory_bytes": KV_CACHE_BYTES,
            "speculative_config": speculative_config,
        }))
        command = [sys.executable, "-m", "tests.vllm.reference_generate", str(job), str(output)]
        return cls(Child.start(command, folder / "reference.log"), output)

    def result(self, timeout_s: float = START_TIMEOUT_S) -> list[dict]:
        """Per prompt: {"token_ids", "text", "logprobs", "prompt_logprobs"}."""
        try:
            code = self.child.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.child.stop()
            raise TimeoutError(f"LLM.generate did not finish:\n{self.child.tail()}") from None
        if code != 0:
            raise RuntimeError(f"LLM.generate failed ({code}):\n{self.child.tail()}")
        return json.loads(self.output.read_text())

    def spec_counters(self) -> dict[str, float]:
        """After `result`, with a speculative_config: vLLM's drafted and accepted tokens."""
        return json.loads(self.output.with_suffix(".spec.json").read_text())


def vllm_counters() -> dict[str, float]:
    """vLLM's own counters and gauges in this process (its Prometheus logger registers them in
    prometheus_client's default registry), summed over label values except `position`."""
    from prometheus_client import REGISTRY

    values: dict[str, float] = {}
    for family in REGISTRY.collect():
        if not family.name.startswith("vllm:"):
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            name = sample.name
            if "position" in sample.labels:
                name += f"[{sample.labels['position']}]"
            values[name] = values.get(name, 0.0) + sample.value
    return values
