"""afa-serve side by side with vLLM on one machine: what afa-serve's HTTP layer costs over vLLM's
own OpenAI server on the same engine, and where afa-serve's torch engine stands against vLLM.

Configurations, each server started alone (one at a time), on the same prompts:

    vllm-plain        vLLM's own OpenAI server, no draft
    vllm-spec         vLLM's own server with the draft (`--speculative-config` draft_model, k)
    afa-vllm-spec     afa-serve's server on its vLLM engine with the draft
    afa-torch-plain   afa-serve on its torch engine, no draft
    afa-torch-spec    afa-serve on its torch engine with the draft
    hf-assisted       Hugging Face `generate(assistant_model=draft)` in this process (batch 1)
    hf-plain          Hugging Face `generate` without the draft (batch 1)

Each server gets one warm-up request, then two phases: batch 1 (the prompts one after another)
and `--concurrency` clients sharing the prompt list, all streaming chat completions with the
official `openai` client, greedy, `max_tokens` tokens each with EOS ignored, so every
configuration produces the same number of tokens. Per request: TTFT (sent -> first content
chunk), ITL (gaps between content chunks; a speculative chunk may hold several tokens, as in
vLLM's benchmark), TPOT ((e2e - TTFT) / (tokens - 1)) and e2e; per phase: output tokens/s
(completion tokens / phase wall time) and, from the server's /metrics counters diffed over the
phase, acceptance rate (accepted / draft tokens) and mean acceptance length (1 + accepted /
drafts). Batch-1 output texts are compared with afa-torch-plain's (bf16 may diverge).

Every server, and the Hugging Face runs, use the interpreter of the vLLM venv
(scripts/setup_vllm_cpu.sh builds it), so all share one torch; the script re-runs itself under
`--vllm-python` when started by another one. vLLM on CPU binds its own OpenMP threads (on 2
cores: one for the model, one left to its frontend); `--torch-threads` sets those of afa-serve's
torch engine and of Hugging Face (torch's default is every core, which on a busy machine can be
many times slower). Run it from the repository root:

    .venv-vllm/bin/python bench/side_by_side.py --target T --draft D [-k 4] [--prompts mt-bench]
        [--num-prompts 8] [--max-tokens 64] [--dtype bfloat16] [--concurrency 8]
        [--configs vllm-plain,vllm-spec,...] [--kv-cache-memory-bytes 536870912]
        [--no-enforce-eager] [--torch-threads N] [--out bench/results/side_by_side.json]

Prints a markdown table (one row per configuration and concurrency) and the headline ratios,
writes the JSON (atomically) and the table beside it (`.md`).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import importlib.metadata
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np
import openai
from prometheus_client.parser import text_string_to_metric_families

import afa_serve
from afa_serve.prompts import Prompt, load_prompts

SERVED_NAME = "bench"  # the model name every server serves
REFERENCE = "afa-torch-plain"  # batch-1 texts are compared with this configuration's
START_TIMEOUT_S = 400.0  # vLLM on CPU: ~40 s eager, ~120 s compiled, more on a busy machine
STOP_TIMEOUT_S = 60.0
METRICS_SETTLE_S = 1.0  # vLLM records a step's stats just after sending its outputs
REPO_ROOT = Path(__file__).resolve().parents[1]

Runner = Literal["vllm", "afa-vllm", "afa-torch", "hf"]


@dataclass(frozen=True)
class Config:
    name: str
    runner: Runner
    speculative: bool


CONFIGS = {c.name: c for c in (
    Config("vllm-plain", "vllm", False),
    Config("vllm-spec", "vllm", True),
    Config("afa-vllm-spec", "afa-vllm", True),
    Config("afa-torch-plain", "afa-torch", False),
    Config("afa-torch-spec", "afa-torch", True),
    Config("hf-assisted", "hf", True),
    Config("hf-plain", "hf", False),
)}

# The spec-decode counters (drafts, draft tokens, accepted tokens) each server family exports.
VLLM_COUNTERS = ("vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_draft_tokens_total",
                 "vllm:spec_decode_num_accepted_tokens_total")
AFA_COUNTERS = ("afa_serve_spec_decode_drafts_total", "afa_serve_spec_decode_draft_tokens_total",
                "afa_serve_spec_decode_accepted_tokens_total")


@dataclass(frozen=True)
class Settings:
    """What every configuration shares."""

    target: str
    draft: str
    k: int
    dtype: str
    max_tokens: int
    max_model_len: int
    max_num_seqs: int
    kv_cache_memory_bytes: int
    enforce_eager: bool
    torch_threads: int | None  # afa-serve's torch engine and Hugging Face; None: torch's default


@dataclass
class RequestResult:
    prompt: int
    ttft_s: float  # sent -> first content chunk
    e2e_s: float  # sent -> stream end
    itl_s: list[float]  # gaps between successive content chunks
    tokens: int
    text: str

    @property
    def tpot_s(self) -> float | None:
        return (self.e2e_s - self.ttft_s) / (self.tokens - 1) if self.tokens > 1 else None


@dataclass
class SpecCounts:
    drafts: float
    draft_tokens: float
    accepted: float

    def minus(self, before: SpecCounts) -> SpecCounts:
        return SpecCounts(self.drafts - before.drafts, self.draft_tokens - before.draft_tokens,
                          self.accepted - before.accepted)

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.draft_tokens if self.draft_tokens else None

    @property
    def mean_acceptance_length(self) -> float | None:
        return 1 + self.accepted / self.drafts if self.drafts else None


@dataclass
class Phase:
    config: str
    concurrency: int
    wall_s: float
    requests: list[RequestResult]
    spec: SpecCounts | None  # None where the runner exports no counters (Hugging Face)


@dataclass
class ConfigRun:
    config: str
    startup_s: float | None = None
    phases: list[Phase] = field(default_factory=list)
    error: str | None = None


# -- servers ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vllm_command(config: Config, settings: Settings, port: int) -> list[str]:
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", settings.target, "--served-model-name", SERVED_NAME,
        "--dtype", settings.dtype, "--max-model-len", str(settings.max_model_len),
        "--max-num-seqs", str(settings.max_num_seqs),
        "--kv-cache-memory-bytes", str(settings.kv_cache_memory_bytes),
        "--host", "127.0.0.1", "--port", str(port),
    ]
    if settings.enforce_eager:
        command.append("--enforce-eager")
    if config.speculative:
        command += ["--speculative-config", json.dumps({
            "method": "draft_model", "model": settings.draft,
            "num_speculative_tokens": settings.k})]
    return command


def afa_command(engine: str, config: Config, settings: Settings, port: int) -> list[str]:
    command = [
        sys.executable, "-m", "afa_serve", "serve", "--engine", engine,
        "--target", settings.target, "--served-model-name", SERVED_NAME,
        "--dtype", settings.dtype, "--max-model-len", str(settings.max_model_len),
        "--max-num-seqs", str(settings.max_num_seqs), "--drain-timeout", "5",
        "--host", "127.0.0.1", "--port", str(port),
    ]
    if engine == "vllm":  # the same engine settings as vLLM's own server gets
        command += ["--kv-cache-memory-bytes", str(settings.kv_cache_memory_bytes)]
        if settings.enforce_eager:
            command.append("--enforce-eager")
    if config.speculative:
        command += ["--draft", settings.draft, "-k", str(settings.k)]
    return command


COMMANDS = {
    "vllm": vllm_command,
    "afa-vllm": functools.partial(afa_command, "vllm"),
    "afa-torch": functools.partial(afa_command, "torch"),
}


@dataclass
class Server:
    """A server in its own process group (vLLM spawns engine processes), logging to a file."""

    process: subprocess.Popen
    log: Path
    url: str

    @classmethod
    def start(cls, command: list[str], log: Path, port: int, env: dict[str, str]) -> Server:
        with log.open("wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                       cwd=REPO_ROOT, start_new_session=True,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1", **env})
        return cls(process, log, f"http://127.0.0.1:{port}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode})")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)
        raise TimeoutError(f"the server was not ready in {timeout_s:.0f} s")

    def stop(self) -> None:
        """SIGTERM to the whole group, also when the server exited: its engine processes stay."""
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


# -- clients ---------------------------------------------------------------------------------


def messages(prompt: Prompt) -> list[dict[str, str]]:
    return list(prompt.messages or ({"role": "user", "content": prompt.text},))


async def stream_one(client: openai.AsyncOpenAI, prompt: Prompt, n: int,
                     max_tokens: int) -> RequestResult:
    start = time.perf_counter()
    chunk_times: list[float] = []
    pieces: list[str] = []
    tokens = 0
    stream = await client.chat.completions.create(
        model=SERVED_NAME, messages=messages(prompt), max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                chunk_times.append(time.perf_counter())
                pieces.append(choice.delta.content)
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    first = chunk_times[0] if chunk_times else end
    return RequestResult(n, first - start, end - start, np.diff(chunk_times).tolist(), tokens,
                         "".join(pieces))


async def run_clients(url: str, prompts: list[Prompt], max_tokens: int,
                      concurrency: int) -> tuple[float, list[RequestResult]]:
    """`concurrency` clients take the prompts in turn; (wall time, results by prompt)."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                timeout=3600)
    todo = list(enumerate(prompts))
    results: list[RequestResult] = []

    async def worker() -> None:
        while todo:
            n, prompt = todo.pop(0)
            results.append(await stream_one(client, prompt, n, max_tokens))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    await client.close()
    return wall, sorted(results, key=lambda r: r.prompt)


def spec_counts(url: str, names: tuple[str, str, str]) -> SpecCounts:
    """The three counters on the server's /metrics, summed over labels (e.g. vLLM's engine)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    totals = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return SpecCounts(*(totals[name] for name in names))


def measure_server(config: Config, settings: Settings, prompts: list[Prompt],
                   concurrencies: list[int], logs: Path) -> ConfigRun:
    run = ConfigRun(config.name)
    port = free_port()
    command = COMMANDS[config.runner](config, settings, port)
    counters = VLLM_COUNTERS if config.runner == "vllm" else AFA_COUNTERS
    # vLLM binds its own OpenMP threads (on 2 cores: one; the other is left to its frontend).
    env: dict[str, str] = {}
    if config.runner == "afa-torch" and settings.torch_threads:
        env["OMP_NUM_THREADS"] = str(settings.torch_threads)
    print(f"[{config.name}] starting: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    server = Server.start(command, logs / f"{config.name}.log", port, env)
    try:
        server.wait_ready()
        run.startup_s = time.perf_counter() - started
        print(f"[{config.name}] ready in {run.startup_s:.0f} s", flush=True)
        asyncio.run(run_clients(server.url, prompts[:1], settings.max_tokens, 1))  # warm-up
        for concurrency in concurrencies:
            before = spec_counts(server.url, counters)
            wall, results = asyncio.run(
                run_clients(server.url, prompts, settings.max_tokens, concurrency))
            time.sleep(METRICS_SETTLE_S)
            spec = spec_counts(server.url, counters).minus(before)
            run.phases.append(Phase(config.name, concurrency, wall, results, spec))
            print(f"[{config.name}] {concurrency} client(s): {wall:.1f} s", flush=True)
    except Exception as error:
        run.error = f"{type(error).__name__}: {error}"
        print(f"[{config.name}] FAILED: {run.error}\n--- log tail ({server.log}) ---\n"
              f"{server.tail()}\n---", flush=True)
    finally:
        server.stop()
    return run


# -- Hugging Face generate, in this process --------------------------------------------------


def measure_hf(config: Config, settings: Settings, prompts: list[Prompt]) -> ConfigRun:
    """Batch 1 only: `generate` serves one request at a time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    from afa_serve.prompts import prompt_token_ids

    class ChunkClock(BaseStreamer):
        """When each chunk of new tokens came out (generate first puts the prompt)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self._prompt_seen = False

        def put(self, value: Any) -> None:
            if self._prompt_seen:
                self.times.append(time.perf_counter())
            self._prompt_seen = True

        def end(self) -> None:
            pass

    def load(path: str) -> Any:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, settings.dtype))
        model.generation_config.eos_token_id = None  # ignore EOS: always max_tokens tokens
        return model.eval()

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    run = ConfigRun(config.name)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(settings.target)
    model = load(settings.target)
    extra: dict[str, Any] = {}
    if config.speculative:
        draft = load(settings.draft)
        draft.generation_config.num_assistant_tokens = settings.k
        draft.generation_config.num_assistant_tokens_schedule = "constant"
        draft.generation_config.assistant_confidence_threshold = 0.0  # always draft k
        extra["assistant_model"] = draft
    run.startup_s = time.perf_counter() - started

    def generate(n: int, prompt: Prompt) -> RequestResult:
        ids = torch.tensor([prompt_token_ids(prompt, tokenizer)])
        clock = ChunkClock()
        start = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=settings.max_tokens, streamer=clock,
                                    pad_token_id=tokenizer.pad_token_id, **extra)
        end = time.perf_counter()
        new = output[0, ids.shape[1]:]
        first = clock.times[0] if clock.times else end
        return RequestResult(n, first - start, end - start, np.diff(clock.times).tolist(),
                             len(new), tokenizer.decode(new, skip_special_tokens=True))

    generate(0, prompts[0])  # warm-up
    start = time.perf_counter()
    results = [generate(n, prompt) for n, prompt in enumerate(prompts)]
    run.phases.append(Phase(config.name, 1, time.perf_counter() - start, results, None))
    print(f"[{config.name}] 1 client: {run.phases[0].wall_s:.1f} s", flush=True)
    return run


def measure_hf_safely(config: Config, settings: Settings, prompts: list[Prompt]) -> ConfigRun:
    try:
        return measure_hf(config, settings, prompts)
    except Exception as error:
        print(f"[{config.name}] FAILED: {error!r}", flush=True)
        return ConfigRun(config.name, error=f"{type(error).__name__}: {error}")


# -- summary ---------------------------------------------------------------------------------


def percentile_ms(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) * 1000 if values else None


def summarize(phase: Phase, reference: list[str] | None) -> dict[str, Any]:
    requests = phase.requests
    tokens = sum(r.tokens for r in requests)
    ttft = [r.ttft_s for r in requests]
    itl = [gap for r in requests for gap in r.itl_s]
    tpot = [r.tpot_s for r in requests if r.tpot_s is not None]
    chunks = sum(len(r.itl_s) + 1 for r in requests if r.tokens)
    row: dict[str, Any] = {
        "config": phase.config,
        "concurrency": phase.concurrency,
        "requests": len(requests),
        "output_tokens": tokens,
        "wall_s": phase.wall_s,
        "throughput_tok_s": tokens / phase.wall_s,
        "ttft_p50_ms": percentile_ms(ttft, 50),
        "ttft_p95_ms": percentile_ms(ttft, 95),
        "itl_p50_ms": percentile_ms(itl, 50),
        "itl_p95_ms": percentile_ms(itl, 95),
        "tpot_median_ms": percentile_ms(tpot, 50),
        "e2e_p50_ms": percentile_ms([r.e2e_s for r in requests], 50),
        "tokens_per_chunk": tokens / chunks if chunks else None,
        "acceptance_rate": phase.spec.acceptance_rate if phase.spec else None,
        "mean_acceptance_length": phase.spec.mean_acceptance_length if phase.spec else None,
        "identical_to_reference": None,
    }
    if reference is not None and phase.concurrency == 1:
        row["identical_to_reference"] = sum(r.text == t for r, t in zip(requests, reference))
    return row


def reference_texts(runs: list[ConfigRun]) -> list[str] | None:
    for run in runs:
        if run.config == REFERENCE and run.phases and run.phases[0].concurrency == 1:
            return [r.text for r in run.phases[0].requests]
    return None


def headline(rows: list[dict[str, Any]], concurrencies: list[int]) -> dict[str, Any]:
    """Percentages by concurrency; None where a configuration did not run.

    http_overhead_vs_vllm: throughput lost by afa-vllm-spec against vllm-spec (positive: slower).
    afa_torch_spec_vs_vllm_spec, afa_torch_plain_vs_vllm_plain: throughput ratio x 100."""
    throughput = {(r["config"], r["concurrency"]): r["throughput_tok_s"] for r in rows}

    def ratio(a: str, b: str, c: int) -> float | None:
        if (a, c) in throughput and (b, c) in throughput:
            return 100 * throughput[a, c] / throughput[b, c]
        return None

    overhead = {c: ratio("afa-vllm-spec", "vllm-spec", c) for c in concurrencies}
    return {
        "http_overhead_vs_vllm": {c: None if v is None else 100 - v for c, v in overhead.items()},
        "afa_torch_spec_vs_vllm_spec": {c: ratio("afa-torch-spec", "vllm-spec", c)
                                        for c in concurrencies},
        "afa_torch_plain_vs_vllm_plain": {c: ratio("afa-torch-plain", "vllm-plain", c)
                                          for c in concurrencies},
    }


COLUMNS = (("config", "config", "{}"), ("clients", "concurrency", "{}"),
           ("tok/s", "throughput_tok_s", "{:.1f}"), ("TTFT p50 ms", "ttft_p50_ms", "{:.0f}"),
           ("TTFT p95 ms", "ttft_p95_ms", "{:.0f}"), ("ITL p50 ms", "itl_p50_ms", "{:.1f}"),
           ("ITL p95 ms", "itl_p95_ms", "{:.1f}"), ("TPOT ms", "tpot_median_ms", "{:.1f}"),
           ("tok/chunk", "tokens_per_chunk", "{:.2f}"), ("accept", "acceptance_rate", "{:.1%}"),
           ("τ", "mean_acceptance_length", "{:.2f}"),
           (f"= {REFERENCE}", "identical_to_reference", "{}"))


def markdown(rows: list[dict[str, Any]], runs: list[ConfigRun], heads: dict[str, Any],
             num_prompts: int) -> str:
    def cell(row: dict[str, Any], key: str, form: str) -> str:
        value = row.get(key)
        return "n/a" if value is None else form.format(value)

    lines = ["| " + " | ".join(title for title, _, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row, key, form) for _, key, form in COLUMNS) + " |"
              for row in rows]
    lines.append("")
    lines.append(f"`= {REFERENCE}`: batch-1 outputs identical to {REFERENCE}'s, of "
                 f"{num_prompts}; ITL is per streamed chunk, TPOT per token.")
    for name, by_clients in heads.items():
        parts = [f"{c} client(s): " + ("n/a" if v is None else f"{v:.1f} %")
                 for c, v in by_clients.items()]
        lines.append(f"- {name}: {', '.join(parts)}")
    lines += [f"- {run.config}: FAILED ({run.error})" for run in runs if run.error]
    return "\n".join(lines) + "\n"


# -- main ------------------------------------------------------------------------------------


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        tmp.write(text)
    os.replace(tmp.name, path)


def version(*distributions: str) -> str | None:
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(), "processor": platform.processor(),
        "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "torch": version("torch"), "vllm": version("vllm", "vllm-cpu"),
        "transformers": version("transformers"), "afa_serve": afa_serve.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average_at_start": os.getloadavg(),
    }


REEXEC_ENV = "AFA_SIDE_BY_SIDE_REEXEC"


def run_under(python: Path) -> None:
    """Re-run this script under `python` (the vLLM venv's) unless it already runs there."""
    if not python.exists():
        sys.exit(f"error: {python} not found: build it with scripts/setup_vllm_cpu.sh")
    if os.environ.get(REEXEC_ENV) is None and \
            Path(sys.prefix).resolve() != python.parent.parent.resolve():
        os.environ[REEXEC_ENV] = str(python)  # once: a shim or a link never matches sys.prefix
        os.execv(python, [str(python), *sys.argv])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="target model folder")
    parser.add_argument("--draft", required=True, help="draft model folder")
    parser.add_argument("-k", "--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--prompts", default="mt-bench")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated, in run order (default: all: {','.join(CONFIGS)})")
    parser.add_argument("--vllm-python", type=Path, default=REPO_ROOT / ".venv-vllm/bin/python")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                        help="vLLM without torch.compile (start-up ~40 s, not ~120 s)")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=512 * 1024 * 1024)
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch threads of afa-serve's torch engine and Hugging Face "
                             "(default: torch's, all cores; vLLM binds its own)")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench/results/side_by_side.json"))
    args = parser.parse_args()
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; known: {', '.join(CONFIGS)}")
    for folder in (args.target, args.draft):
        if not Path(folder, "config.json").is_file():
            parser.error(f"{folder} is not a Hugging Face model folder (no config.json)")
    return args


def write_results(args: argparse.Namespace, settings: Settings, info: dict[str, Any],
                  names: list[str], concurrencies: list[int], runs: list[ConfigRun],
                  num_prompts: int) -> str:
    """Write the JSON and the markdown table of the configurations run so far; return the table."""
    reference = reference_texts(runs)
    rows = [summarize(phase, reference) for run in runs for phase in run.phases]
    rows += [{"config": run.config, "concurrency": c, "skipped": "batch 1 only"}
             for run in runs if CONFIGS[run.config].runner == "hf" and not run.error
             for c in concurrencies[1:]]
    rows.sort(key=lambda r: (r["concurrency"], names.index(r["config"])))
    heads = headline([r for r in rows if "skipped" not in r], concurrencies)
    table = markdown(rows, runs, heads, num_prompts)
    info["load_average_at_end"] = os.getloadavg()
    write_atomically(args.out, json.dumps({
        "benchmark": "side_by_side",
        "headline": heads,
        "summary": rows,
        "settings": {**asdict(settings), "prompts": args.prompts, "num_prompts": num_prompts,
                     "concurrencies": concurrencies, "configs": names,
                     "reference": REFERENCE, "python": sys.executable},
        "machine": info,
        "runs": [asdict(run) for run in runs],
    }, indent=2))
    write_atomically(args.out.with_suffix(".md"), table)
    return table


def main() -> None:
    args = parse_args()
    run_under(args.vllm_python)
    settings = Settings(
        target=str(Path(args.target).resolve()), draft=str(Path(args.draft).resolve()),
        k=args.num_speculative_tokens, dtype=args.dtype, max_tokens=args.max_tokens,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes, enforce_eager=args.enforce_eager,
        torch_threads=args.torch_threads)
    prompts = load_prompts(args.prompts, limit=args.num_prompts)
    names = args.configs.split(",")
    concurrencies = [1, args.concurrency] if args.concurrency > 1 else [1]
    info = machine()
    logs = Path(tempfile.mkdtemp(prefix="side_by_side-"))
    print(f"server logs in {logs}", flush=True)

    runs: list[ConfigRun] = []
    for name in names:
        config = CONFIGS[name]
        if config.runner == "hf":
            runs.append(measure_hf_safely(config, settings, prompts))
        else:
            runs.append(measure_server(config, settings, prompts, concurrencies, logs))
        # After every configuration, so a run stopped by a time limit keeps what it measured.
        table = write_results(args, settings, info, names, concurrencies, runs, len(prompts))
    print("\n" + table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    if any(run.error for run in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
