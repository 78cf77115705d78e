"""afa-serve side by side with vLLM on one machine: what afa-serve's HTTP layer costs over vLLM's
own OpenAI server on the same engine, and where afa-serve's torch engine stands against vLLM.

Configurations, each server started alone, on the same prompts:

    vllm-plain        vLLM's own OpenAI server, no draft
    vllm-spec         vLLM's own server with the draft (`--speculative-config` draft_model, k;
                      eagle for a feature draft)
    afa-vllm-spec     afa-serve on its vLLM engine with the draft, fixed k
    afa-torch-plain   afa-serve on its torch engine, no speculation
    afa-torch-spec    afa-serve on its torch engine with the draft as vLLM runs it (fixed k,
                      whole draft head, no confidence stop, no prompt lookup)
    afa-torch-default afa-serve on its torch engine with the draft and its default settings
                      (adaptive k, prompt lookup, confidence stop, trimmed int8 draft)

Hugging Face `generate` (assisted or not) is not compared: the standard client needs a server.

After a warm-up request, vLLM's benchmark client (`vllm bench serve`, see bench/common.py) sends
every prompt at concurrency 1, then at `--concurrency`: streamed completions of the prompts as
the target's chat template renders them, greedy, `max_tokens` tokens each (EOS ignored, so
every configuration generates the same count; `--no-ignore-eos`: each answer ends where the
target ends it, as a real client's does, and tok/s counts the tokens generated); not
chat, whose first chunk (the role) afa-serve sends before the first token, vLLM with it. tok/s,
TTFT, ITL (per streamed chunk, which may hold several tokens), TPOT (per token) and the texts
come from the client's saved JSON; acceptance and τ (1 + accepted / drafts) from the server's
/metrics counters, diffed over each phase; batch-1 texts are compared with afa-torch-plain's.
The JSON (`--out`) and its markdown table (`.md`) are written after every configuration.

`--rounds N` interleaves instead, against a machine whose speed drifts over minutes: every
configuration's server starts at once (each idle while another is measured), the prompts are
cut into N slices in order, and round r sends slice r to each configuration in turn, the order
rotated every round so each goes first equally often; a configuration's rounds are then pooled
as one run (tokens over summed wall time, percentiles over all requests). One client only.
Run it under the vLLM venv (make vllm-cpu) from the repository root:

    PYTHONPATH=. .venv-vllm/bin/python bench/side_by_side.py --target T --draft D [options]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
from transformers import AutoConfig

import afa_serve
from afa_serve.atomic import atomic_file, write_json
from afa_serve.engine.base import SpecDecodeCounts
from afa_serve.engine.feature_draft import is_feature_draft
from afa_serve.engine.loading import load_tokenizer, own_vocabulary
from afa_serve.engine.vllm_support import vllm_installed
from afa_serve.models.resolve import resolve_model
from afa_serve.prompts import load_prompts
from bench import common

SERVED_NAME = "bench"  # the model name every server serves
REFERENCE = "afa-torch-plain"  # batch-1 texts are compared with this configuration's
# The torch engine speculating as vLLM's draft_model method (afa-serve bench's "fixed" arm).
TORCH_AS_VLLM = ["--speculation", "fixed", "--confidence-threshold", "0",
                 "--draft-vocab-size", "0", "--prompt-lookup-max", "0"]
Runner = Literal["vllm", "afa-vllm", "afa-torch"]
# name: (server, with the draft), in the default run order
CONFIGS: dict[str, tuple[Runner, bool]] = {
    "vllm-plain": ("vllm", False), "vllm-spec": ("vllm", True),
    "afa-vllm-spec": ("afa-vllm", True),
    "afa-torch-plain": ("afa-torch", False), "afa-torch-spec": ("afa-torch", True),
    "afa-torch-default": ("afa-torch", True),
}
# The torch engine's speculation flags beside the draft, by configuration
TORCH_SPECULATION = {"afa-torch-spec": TORCH_AS_VLLM, "afa-torch-default": []}
# headline name: (configuration, configuration it is compared with)
PAIRS = {"vllm_spec_vs_vllm_plain": ("vllm-spec", "vllm-plain"),
         "http_overhead_vs_vllm": ("afa-vllm-spec", "vllm-spec"),
         "afa_torch_spec_vs_vllm_spec": ("afa-torch-spec", "vllm-spec"),
         "afa_torch_plain_vs_vllm_plain": ("afa-torch-plain", "vllm-plain")}


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
    torch_threads: int | None  # afa-serve's torch engine; None: its default
    prompts: str
    num_prompts: int
    concurrencies: list[int]
    ignore_eos: bool
    rounds: int


@dataclass
class Phase:
    concurrency: int
    client: dict[str, Any]  # vLLM's benchmark client's saved result, every request in it
    spec: SpecDecodeCounts  # the server's counters over the phase


@dataclass
class ConfigRun:
    config: str
    startup_s: float | None = None
    phases: list[Phase] = field(default_factory=list)
    error: str | None = None


def draft_has_own_vocabulary(draft: str, target: str) -> bool:
    """Whether the draft has a vocabulary of its own (`afa-train trim-vocab`), which vLLM maps
    to the target's by token string (`use_heterogeneous_vocab`, greedy drafting)."""
    vocab_size = AutoConfig.from_pretrained(resolve_model(draft)).vocab_size
    return own_vocabulary(load_tokenizer(target), load_tokenizer(draft), vocab_size)


def server_command(name: str, s: Settings, port: int) -> list[str]:
    runner, speculative = CONFIGS[name]
    shared = ["--served-model-name", SERVED_NAME, "--dtype", s.dtype, "--max-model-len",
              str(s.max_model_len), "--max-num-seqs", str(s.max_num_seqs), "--host",
              "127.0.0.1", "--port", str(port)]
    vllm_engine = ["--kv-cache-memory-bytes", str(s.kv_cache_memory_bytes),
                   *(["--enforce-eager"] if s.enforce_eager else [])]
    if runner == "vllm":
        if not speculative:
            return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                    s.target, *shared, *vllm_engine]
        if is_feature_draft(Path(resolve_model(s.draft))):  # vLLM's EAGLE-1
            method: dict[str, Any] = {"method": "eagle"}
        else:
            method = {"method": "draft_model",
                      **({"use_heterogeneous_vocab": True}
                         if draft_has_own_vocabulary(s.draft, s.target) else {})}
        spec = json.dumps({**method, "model": s.draft, "num_speculative_tokens": s.k})
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", s.target,
                *shared, *vllm_engine, "--speculative-config", spec]
    afa = [sys.executable, "-m", "afa_serve", "serve", "--target", s.target, *shared,
           "--drain-timeout-s", "5"]
    draft = ["--draft", s.draft, "-k", str(s.k)]
    if runner == "afa-vllm":
        return [*afa, "--engine", "vllm", *vllm_engine, *draft, "--speculation", "fixed"]
    threads = ["--torch-threads", str(s.torch_threads)] if s.torch_threads else []
    speculation = [*draft, *TORCH_SPECULATION[name]] if speculative else [
        "--speculation", "off"]
    return [*afa, "--engine", "torch", *threads, *speculation]


def warm_up(url: str, max_tokens: int) -> None:
    httpx.post(f"{url}/v1/completions", timeout=600, json={
        "model": SERVED_NAME, "prompt": "Hello", "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True}).raise_for_status()


def run_phase(server: common.Server, s: Settings, dataset: Path, num_prompts: int,
              concurrency: int, config: str) -> Phase:
    """Every prompt of `dataset` through vLLM's benchmark client, with the server's counters."""
    vllm = CONFIGS[config][0] == "vllm"
    counters = common.VLLM_SPEC_COUNTERS if vllm else common.AFA_SPEC_COUNTERS
    before = common.spec_counts(server.url, counters)
    client = common.ClientRun(server.url, SERVED_NAME, s.target, dataset, num_prompts,
                              s.max_tokens, concurrency, s.ignore_eos)
    result = client.run(dataset.with_name(f"{dataset.stem}-{config}-{concurrency}.json"))
    if result["completed"] != num_prompts:
        first = next((error for error in result["errors"] if error), "none")
        raise RuntimeError(f"{result['completed']} of {num_prompts} requests completed "
                           f"(prompts over 1024 tokens are dropped); error: {first[-500:]}")
    spec = common.counts_since(before, common.spec_counts(server.url, counters))
    print(f"[{config}] {concurrency} client(s), {num_prompts} prompts: "
          f"{result['duration']:.1f} s", flush=True)
    return Phase(concurrency, result, spec)


def launch(name: str, s: Settings, dataset: Path) -> tuple[ConfigRun, common.Server]:
    """Start the configuration's server and warm it up; a failure is recorded in the run."""
    run = ConfigRun(name)
    port = common.free_port()
    command = server_command(name, s, port)
    print(f"[{name}] starting: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    server = common.Server.start(command, dataset.with_name(f"{name}.log"), port)
    try:
        server.wait_ready()
        run.startup_s = time.perf_counter() - started
        print(f"[{name}] ready in {run.startup_s:.0f} s", flush=True)
        warm_up(server.url, s.max_tokens)
    except Exception as error:  # noqa: BLE001 - recorded; the other configurations still run
        record_failure(run, server, error)
    return run, server


def record_failure(run: ConfigRun, server: common.Server, error: Exception) -> None:
    run.error = f"{type(error).__name__}: {error}"
    print(f"[{run.config}] FAILED: {run.error}\n--- log tail ({server.log}) ---\n"
          f"{common.tail(server.log)}\n---", flush=True)


def measure(name: str, s: Settings, dataset: Path) -> ConfigRun:
    """Start the configuration's server, run the phases, stop it; a failure is recorded."""
    run, server = launch(name, s, dataset)
    try:
        if run.error is None:
            for concurrency in s.concurrencies:
                run.phases.append(run_phase(server, s, dataset, s.num_prompts, concurrency, name))
    except Exception as error:  # noqa: BLE001 - recorded; the other configurations still run
        record_failure(run, server, error)
    finally:
        server.stop()
    return run


def rotated(names: list[str], by: int) -> list[str]:
    by %= len(names)
    return names[by:] + names[:by]


def pooled_counts(counts: list[SpecDecodeCounts]) -> SpecDecodeCounts:
    total = SpecDecodeCounts()
    for part in counts:
        total.merge(part)
    return total


def measure_interleaved(names: list[str], s: Settings, dataset: Path,
                        slices: list[Path]) -> list[ConfigRun]:
    """Every server up at once; round r sends slice r to each configuration in rotated order;
    each configuration's rounds pooled into one phase (`common.pool_results`)."""
    launched = [launch(name, s, dataset) for name in names]
    runs = {run.config: run for run, _ in launched}
    servers = {run.config: server for run, server in launched}
    rounds: dict[str, list[Phase]] = {name: [] for name in names}
    try:
        for number, part in enumerate(slices):
            count = len(json.loads(part.read_text()))
            for name in rotated(names, number):
                if runs[name].error is not None:
                    continue
                try:
                    rounds[name].append(run_phase(servers[name], s, part, count, 1, name))
                except Exception as error:  # noqa: BLE001 - recorded; the others go on
                    record_failure(runs[name], servers[name], error)
    finally:
        for server in servers.values():
            server.stop()
    for name, phases in rounds.items():
        if runs[name].error is None and phases:
            runs[name].phases.append(Phase(
                1, common.pool_results([phase.client for phase in phases]),
                pooled_counts([phase.spec for phase in phases])))
    return list(runs.values())


def summarize(config: str, phase: Phase, reference: list[str] | None) -> dict[str, Any]:
    """One table row: the client's figures, acceptance and τ, batch-1 texts as the reference's."""
    texts = phase.client["generated_texts"]
    return {
        "config": config, "concurrency": phase.concurrency, **common.client_figures(phase.client),
        "acceptance_rate": phase.spec.acceptance_rate,
        "mean_acceptance_length": phase.spec.mean_acceptance_length,
        "identical_to_reference": None if reference is None or phase.concurrency != 1
        else sum(a == b for a, b in zip(texts, reference)),
    }


def headline(rows: list[dict[str, Any]], concurrencies: list[int]) -> dict[str, Any]:
    """Per pair and concurrency, the throughput ratio x 100; for http_overhead_vs_vllm, 100 less
    it (the share lost: positive is slower). None where a configuration did not run."""
    tps = {(r["config"], r["concurrency"]): r["throughput_tok_s"] for r in rows}
    heads = {name: {c: 100 * tps[a, c] / tps[b, c] if (a, c) in tps and (b, c) in tps else None
                    for c in concurrencies} for name, (a, b) in PAIRS.items()}
    heads["http_overhead_vs_vllm"] = {c: None if v is None else 100 - v
                                      for c, v in heads["http_overhead_vs_vllm"].items()}
    return heads


COLUMNS = (("config", "config", "{}"), ("clients", "concurrency", "{}"),
           ("tok/s", "throughput_tok_s", "{:.1f}"), ("TTFT p50 ms", "ttft_p50_ms", "{:.0f}"),
           ("TTFT p95 ms", "ttft_p95_ms", "{:.0f}"), ("ITL p50 ms", "itl_p50_ms", "{:.1f}"),
           ("ITL p95 ms", "itl_p95_ms", "{:.1f}"), ("TPOT ms", "tpot_median_ms", "{:.1f}"),
           ("tok/chunk", "tokens_per_chunk", "{:.2f}"), ("accept", "acceptance_rate", "{:.1%}"),
           ("τ", "mean_acceptance_length", "{:.2f}"),
           (f"= {REFERENCE}", "identical_to_reference", "{}"))


def markdown(rows: list[dict[str, Any]], runs: list[ConfigRun], heads: dict[str, Any],
             num_prompts: int) -> str:
    lines = [common.markdown_table(rows, COLUMNS),
             f"`= {REFERENCE}`: batch-1 outputs identical to {REFERENCE}'s, of {num_prompts}; "
             + "ITL is per streamed chunk, TPOT per token."]
    for name, by_clients in heads.items():
        parts = [f"{c} client(s): " + ("n/a" if v is None else f"{v:.1f} %")
                 for c, v in by_clients.items()]
        lines.append(f"- {name}: {', '.join(parts)}")
    lines += [f"- {run.config}: FAILED ({run.error})" for run in runs if run.error]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="target: packaged name or folder")
    parser.add_argument("--draft", required=True, help="draft: packaged name or folder")
    parser.add_argument("-k", "--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--prompts", default="mt-bench", help="a prompt set or file")
    parser.add_argument("--limit", "--num-prompts", type=int, default=8, help="prompts used")
    parser.add_argument("--max-new-tokens", "--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--concurrency", type=int, default=8, help="the second phase's clients")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated, in run order (default: all: {','.join(CONFIGS)})")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                        help="vLLM without torch.compile (start-up ~40 s, not ~120 s)")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=512 * 1024 * 1024)
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="afa-serve's torch engine's threads (default: its own)")
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="generate max-new-tokens per prompt past EOS (vLLM bench's "
                        "--ignore-eos); --no-ignore-eos ends each answer at EOS")
    parser.add_argument("--rounds", type=int, default=1,
                        help="N > 1: every server up at once, the prompts in N slices sent to "
                        "each configuration in turn (rotated order), one client; beats a "
                        "machine's drift")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench/results/side_by_side.json"))
    args = parser.parse_args()
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; known: {', '.join(CONFIGS)}")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.rounds > 1 and args.concurrency > 1:
        parser.error("--rounds N > 1 measures one client: give --concurrency 1")
    if not vllm_installed():
        parser.error("run it with the vLLM venv's python (make vllm-cpu builds .venv-vllm)")
    return args


def write_results(args: argparse.Namespace, s: Settings, info: dict[str, Any],
                  runs: list[ConfigRun]) -> str:
    """Write the JSON and the markdown table of the configurations run so far; return the table."""
    names = args.configs.split(",")
    reference = next((run.phases[0].client["generated_texts"] for run in runs
                      if run.config == REFERENCE and run.phases), None)
    rows = [summarize(run.config, phase, reference) for run in runs for phase in run.phases]
    rows.sort(key=lambda r: (r["concurrency"], names.index(r["config"])))
    heads = headline(rows, s.concurrencies)
    table = markdown(rows, runs, heads, s.num_prompts)
    write_json(args.out, {
        "benchmark": "side_by_side", "headline": heads, "summary": rows,
        "settings": {**asdict(s), "configs": names, "reference": REFERENCE,
                     "client": "vllm bench serve", "python": sys.executable},
        "machine": {**info, "load_average_at_end": os.getloadavg()},
        "runs": [asdict(run) for run in runs],
    })
    with atomic_file(args.out.with_suffix(".md")) as temporary:
        temporary.write_text(table)
    return table


def main() -> None:
    args = parse_args()
    prompts = load_prompts(args.prompts, limit=args.limit)
    settings = Settings(
        target=common.model_path(args.target), draft=common.model_path(args.draft),
        k=args.num_speculative_tokens, dtype=args.dtype, max_tokens=args.max_new_tokens,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes, enforce_eager=args.enforce_eager,
        torch_threads=args.torch_threads, prompts=args.prompts, num_prompts=len(prompts),
        concurrencies=[1, args.concurrency] if args.concurrency > 1 else [1],
        ignore_eos=args.ignore_eos, rounds=args.rounds)
    info = {**common.machine_info("torch", "vllm", "transformers"),
            "afa_serve": afa_serve.__version__, "load_average_at_start": os.getloadavg()}
    dataset = Path(tempfile.mkdtemp(prefix="side_by_side-")) / "prompts.json"
    common.write_prompt_dataset(prompts, settings.target, dataset)
    print(f"prompts, server and client logs in {dataset.parent}", flush=True)
    names = args.configs.split(",")
    if args.rounds > 1:
        runs = measure_interleaved(names, settings, dataset,
                                   common.slice_dataset(dataset, args.rounds))
    else:
        runs = []
        for name in names:
            runs.append(measure(name, settings, dataset))
            # After every configuration, so a run stopped by a time limit keeps what it measured.
            write_results(args, settings, info, runs)
    table = write_results(args, settings, info, runs)
    print("\n" + table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    if any(run.error for run in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
