"""What the HTTP layer costs: the same prompts through the engine directly and through the
OpenAI-compatible server (official `openai` client, streamed and not), in one process and one
run, on one engine instance. Greedy with a fixed output length (EOS ignored), so every path
produces the same tokens; the difference is the API's tokenizing, validation, JSON/SSE and
HTTP round trips.

    PYTHONPATH=. .venv/bin/python bench/http_overhead.py [--target T] [--draft D -k K]
        [--prompts mt-bench] [--num-prompts 8] [--max-tokens 32] [--repeats 1] [--threads N]
        [--out bench/results/http_overhead.json]

Prints a markdown table (median per request and per output token) and writes the JSON
(atomically).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import openai
import torch

from afa_serve.api import create_app
from afa_serve.api.server import serving_in_thread
from afa_serve.atomic import write_json
from afa_serve.engine.base import GenerationRequest, SamplingParams
from afa_serve.engine.config import EngineConfig
from afa_serve.engine.torch_engine import TorchEngine
from afa_serve.prompts import Prompt, load_prompts, prompt_token_ids
from bench.common import chat_messages, machine_info, markdown_table

MODES = ("engine", "server", "server_stream")


@dataclass
class Run:
    mode: str
    prompt: int
    latency_s: float  # request sent -> last token received
    first_token_s: float  # request sent -> first output received
    tokens: int
    text: str


async def _direct(engine: TorchEngine, ids: list[int], params: SamplingParams, n: int) -> Run:
    request = GenerationRequest(f"bench-{n}-{time.monotonic_ns()}", tuple(ids), params)
    start = time.perf_counter()
    first, pieces, tokens = None, [], 0
    async for delta in engine.generate(request):
        first = first or time.perf_counter()
        pieces.append(delta.text)
        tokens = delta.num_generated_tokens
    return Run("engine", n, time.perf_counter() - start, first - start, tokens, "".join(pieces))


def _server(client: openai.OpenAI, model: str, prompt: Prompt, max_tokens: int, n: int) -> Run:
    start = time.perf_counter()
    response = client.chat.completions.create(
        model=model, messages=chat_messages(prompt), max_tokens=max_tokens, temperature=0,
        extra_body={"ignore_eos": True})
    latency = time.perf_counter() - start
    return Run("server", n, latency, latency, response.usage.completion_tokens,
               response.choices[0].message.content)


def _server_stream(client: openai.OpenAI, model: str, prompt: Prompt, max_tokens: int,
                   n: int) -> Run:
    start = time.perf_counter()
    first, pieces, tokens = None, [], 0
    for chunk in client.chat.completions.create(
            model=model, messages=chat_messages(prompt), max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True}):
        for choice in chunk.choices:
            if choice.delta.content:
                first = first or time.perf_counter()
                pieces.append(choice.delta.content)
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    latency = time.perf_counter() - start
    return Run("server_stream", n, latency, (first or start + latency) - start, tokens,
               "".join(pieces))


def _summary(runs: list[Run]) -> dict[str, dict[str, float]]:
    summary = {}
    for mode in MODES:
        mine = [r for r in runs if r.mode == mode]
        summary[mode] = {
            "requests": len(mine),
            "median_latency_ms": statistics.median(r.latency_s for r in mine) * 1000,
            "median_first_token_ms": statistics.median(r.first_token_s for r in mine) * 1000,
            "median_ms_per_token": statistics.median(r.latency_s / r.tokens for r in mine) * 1000,
            "tokens_per_s": sum(r.tokens for r in mine) / sum(r.latency_s for r in mine),
        }
    # Runs come in triples (engine, server, server_stream) of one prompt: compare within each.
    triples = [runs[i:i + len(MODES)] for i in range(0, len(runs), len(MODES))]
    for position, mode in enumerate(MODES[1:], start=1):
        extra = [t[position].latency_s - t[0].latency_s for t in triples]
        per_token = [(t[position].latency_s - t[0].latency_s) / t[position].tokens
                     for t in triples]
        summary[mode]["median_overhead_ms_per_request"] = statistics.median(extra) * 1000
        summary[mode]["median_overhead_ms_per_token"] = statistics.median(per_token) * 1000
    return summary


COLUMNS = (("path", "mode", "{}"), ("latency ms", "median_latency_ms", "{:.1f}"),
           ("1st token ms", "median_first_token_ms", "{:.1f}"),
           ("ms/token", "median_ms_per_token", "{:.2f}"), ("tok/s", "tokens_per_s", "{:.1f}"),
           ("+ms/request", "median_overhead_ms_per_request", "{:.2f}"),
           ("+ms/token", "median_overhead_ms_per_token", "{:.3f}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="smollm2-135m-instruct")
    parser.add_argument("--draft", default=None)
    parser.add_argument("-k", "--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--prompts", default="mt-bench")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1, help="passes over the prompts")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 avoids OpenMP contention on a busy machine)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, default=Path("bench/results/http_overhead.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = EngineConfig(target=args.target, draft=args.draft,
                               num_speculative_tokens=args.num_speculative_tokens,
                               dtype=args.dtype, max_num_seqs=1)
    engine = TorchEngine(config)
    prompts = load_prompts(args.prompts, limit=args.num_prompts)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    runs: list[Run] = []
    with serving_in_thread(create_app(engine)) as url:  # its lifespan loads the engine
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                               timeout=600)
        model = engine.info.name
        ids = [prompt_token_ids(p, engine.tokenizer) for p in prompts]
        # One warm-up round, then each prompt on each path in turn (drift hits all alike).
        asyncio.run(_direct(engine, ids[0], params, -1))
        _server(client, model, prompts[0], args.max_tokens, -1)
        for _ in range(args.repeats):
            for n, prompt in enumerate(prompts):
                runs.append(asyncio.run(_direct(engine, ids[n], params, n)))
                runs.append(_server(client, model, prompt, args.max_tokens, n))
                runs.append(_server_stream(client, model, prompt, args.max_tokens, n))
    by_prompt = {}
    for run in runs:
        by_prompt.setdefault(run.prompt, set()).add(run.text)
    identical = sum(len(texts) == 1 for texts in by_prompt.values())

    summary = _summary(runs)
    print(f"\nmedians over prompts, {args.max_tokens} output tokens each\n")
    print(markdown_table([{"mode": mode, **row} for mode, row in summary.items()], COLUMNS))
    print(f"\nidentical text on all paths: {identical}/{len(prompts)} prompts")
    info = engine.info
    write_json(args.out, {
        "benchmark": "http_overhead",
        "num_prompts": len(prompts),
        "identical_outputs": identical,
        "summary": summary,
        "settings": {**vars(args), "out": str(args.out), "engine": info.engine,
                     "dtype": info.dtype, "device": info.device,
                     "num_speculative_tokens": info.num_speculative_tokens},
        "machine": {**machine_info("torch"),
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "runs": [asdict(run) for run in runs],
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
