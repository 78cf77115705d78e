"""`afa-serve bench`: the same prompts decoded plainly and speculatively, in one process."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.progress import track
from rich.table import Table

from afa_serve.engine.base import SpecDecodeCounts
from afa_serve.engine.loading import (
    check_draft_compatible,
    eos_token_ids,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from afa_serve.engine.speculative import SpeculativeDecoder
from afa_serve.engine.verify import SamplingSettings
from afa_serve.prompts import load_prompts, prompt_token_ids


@dataclass
class RunResult:
    outputs: list[list[int]]
    seconds: float
    spec: SpecDecodeCounts

    @property
    def num_tokens(self) -> int:
        return sum(len(o) for o in self.outputs)

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.seconds


def _decode_all(decoder, prompts, max_tokens, settings, eos, seed, label) -> RunResult:
    outputs, spec, seconds = [], SpecDecodeCounts(), 0.0
    for index, ids in enumerate(track(prompts, description=label, transient=True)):
        start = time.perf_counter()
        state = decoder.generate(ids, max_tokens, settings, eos, seed=None if seed is None
                                 else seed + index)
        seconds += time.perf_counter() - start
        outputs.append(state.token_ids[len(ids):])
        spec.merge(state.spec)
    return RunResult(outputs, seconds, spec)


def machine_description() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


def bench_command(
    target: Annotated[str, typer.Option(help="Target: HF id, local folder or packaged name.")]
    = "smollm2-135m-instruct",
    draft: Annotated[str, typer.Option(help="Draft model with the target's tokenizer.")] = ...,
    prompts: Annotated[str, typer.Option(
        help="JSONL (`prompt` or `messages`), plain text (one a line), or mt-bench / humaneval."
    )] = "mt-bench",
    num_speculative_tokens: Annotated[int, typer.Option(
        "--num-speculative-tokens", "-k", help="Tokens the draft proposes per step.")] = 4,
    max_tokens: Annotated[int, typer.Option(help="New tokens per prompt.")] = 64,
    num_prompts: Annotated[int | None, typer.Option(help="Use only the first N prompts.")] = 20,
    temperature: Annotated[float, typer.Option(help="0 = greedy (outputs compared).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of prompt i is seed + i when sampling.")] = 0,
    dtype: Annotated[str, typer.Option(help="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16.")]
    = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    out: Annotated[Path | None, typer.Option(help="Write the results JSON here.")] = None,
) -> None:
    """Decode the same prompts plainly and with the draft; print speed and acceptance.

    Greedy by default, so the outputs of both ways must be identical: the table says how many are.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)  # type: ignore[arg-type]
    tokenizer = load_tokenizer(target)
    target_model = load_model(target, torch_dtype, torch_device)
    draft_model = load_model(draft, torch_dtype, torch_device)
    check_draft_compatible(target_model, tokenizer, draft_model, load_tokenizer(draft))
    prompt_ids = [prompt_token_ids(p, tokenizer) for p in load_prompts(prompts, num_prompts)]
    settings = SamplingSettings(temperature=temperature)
    eos = eos_token_ids(target_model, tokenizer)
    sampling_seed = None if settings.greedy else seed

    plain_decoder = SpeculativeDecoder(target_model)
    spec_decoder = SpeculativeDecoder(target_model, draft_model, num_speculative_tokens)
    _decode_all(plain_decoder, prompt_ids[:1], 8, settings, eos, sampling_seed, "warm-up")
    plain = _decode_all(plain_decoder, prompt_ids, max_tokens, settings, eos, sampling_seed,
                        "plain")
    spec = _decode_all(spec_decoder, prompt_ids, max_tokens, settings, eos, sampling_seed,
                       "speculative")
    identical = sum(a == b for a, b in zip(plain.outputs, spec.outputs))
    per_position = [n / spec.spec.num_drafts for n in spec.spec.accepted_per_position] \
        if spec.spec.num_drafts else []
    results = {
        "num_prompts": len(prompt_ids),
        "greedy_identical": identical if settings.greedy else None,
        "plain_tokens_per_s": plain.tokens_per_s,
        "spec_tokens_per_s": spec.tokens_per_s,
        "speedup": spec.tokens_per_s / plain.tokens_per_s,
        "acceptance_rate": spec.spec.acceptance_rate,
        "mean_acceptance_length": spec.spec.mean_acceptance_length,
        "acceptance_per_position": per_position,
        "plain_tokens": plain.num_tokens,
        "spec_tokens": spec.num_tokens,
        "settings": {
            "target": target, "draft": draft, "prompts": prompts, "k": num_speculative_tokens,
            "max_tokens": max_tokens, "temperature": temperature, "dtype": str(torch_dtype),
            "device": str(torch_device),
        },
        "machine": machine_description(),
    }
    _print_table(results)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        temporary = out.with_suffix(out.suffix + ".tmp")
        temporary.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(temporary, out)


def _print_table(results: dict) -> None:
    table = Table(title=f"plain vs speculative, {results['num_prompts']} prompts")
    table.add_column("measure")
    table.add_column("value", justify="right")
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
    for key in ("plain_tokens_per_s", "spec_tokens_per_s", "speedup", "acceptance_rate",
                "mean_acceptance_length", "greedy_identical"):
        table.add_row(key, fmt(results[key]))
    table.add_row("acceptance_per_position",
                  " ".join(f"{p:.2f}" for p in results["acceptance_per_position"]))
    Console().print(table)
