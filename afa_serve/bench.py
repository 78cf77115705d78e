"""`afa-serve bench`: the same prompts decoded plainly and speculatively, in one process."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.progress import track
from rich.table import Table

from afa_serve.engine.base import SpecDecodeCounts
from afa_serve.engine.draft_vocab import DEFAULT_DRAFT_VOCAB_SIZE, read_draft_vocab
from afa_serve.engine.loading import (
    check_draft_compatible,
    eos_token_ids,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from afa_serve.engine.policy import DEFAULT_CONFIDENCE_THRESHOLD
from afa_serve.engine.speculative import SpeculativeDecoder
from afa_serve.engine.verify import SamplingSettings
from afa_serve.models.resolve import resolve_model
from afa_serve.prompts import load_prompts, prompt_token_ids


@dataclass
class RunResult:
    outputs: list[list[int]] = field(default_factory=list)
    seconds: float = 0.0
    spec: SpecDecodeCounts = field(default_factory=SpecDecodeCounts)

    @property
    def num_tokens(self) -> int:
        return sum(len(o) for o in self.outputs)

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.seconds

    def decode(self, decoder: SpeculativeDecoder, ids: list[int], max_tokens: int,
               settings: SamplingSettings, eos: frozenset[int], seed: int | None) -> None:
        start = time.perf_counter()
        state = decoder.generate(ids, max_tokens, settings, eos, seed=seed)
        self.seconds += time.perf_counter() - start
        self.outputs.append(state.token_ids[len(ids):])
        self.spec.merge(state.spec)


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
        help="JSONL (`prompt` or `messages`), plain text (one a line), or a named set "
             "(mt-bench, alpaca-eval, ...; NAME:N mixes)."
    )] = "mt-bench",
    num_speculative_tokens: Annotated[int, typer.Option(
        "--num-speculative-tokens", "-k", help="The most tokens the draft proposes per step.")]
    = 4,
    confidence_threshold: Annotated[float, typer.Option(
        help="The default policy's confidence stop.")] = DEFAULT_CONFIDENCE_THRESHOLD,
    draft_vocab_size: Annotated[int, typer.Option(
        help="The default policy's trimmed draft head (0: whole vocabulary; used only when the "
             "draft folder has a draft_vocab.json).")] = DEFAULT_DRAFT_VOCAB_SIZE,
    max_tokens: Annotated[int, typer.Option(help="New tokens per prompt.")] = 64,
    num_prompts: Annotated[int | None, typer.Option(help="Use only the first N prompts.")] = 20,
    temperature: Annotated[float, typer.Option(help="0 = greedy (outputs compared).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of prompt i is seed + i when sampling.")] = 0,
    dtype: Annotated[str, typer.Option(help="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16.")]
    = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    out: Annotated[Path | None, typer.Option(help="Write the results JSON here.")] = None,
) -> None:
    """Decode the same prompts three ways, interleaved prompt by prompt: plain, fixed k (the
    whole draft head, no confidence stop) and the server's default policy (adaptive k,
    confidence stop, trimmed head); print speed, acceptance and the measured costs.

    Greedy by default, so the outputs must be identical: the table says how many are.
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
    vocab = read_draft_vocab(resolve_model(draft))
    head_ids = vocab.head_ids(draft_vocab_size, eos) if vocab and draft_vocab_size else None

    k = num_speculative_tokens
    decoders = {
        "plain": SpeculativeDecoder(target_model),
        "fixed": SpeculativeDecoder(target_model, draft_model, k, speculation="fixed"),
        "default": SpeculativeDecoder(
            target_model, draft_model, k, speculation="adaptive",
            confidence_threshold=confidence_threshold, draft_vocab=head_ids),
    }
    for decoder in decoders.values():
        decoder.calibrate()
        decoder.generate(prompt_ids[0], 8, settings, eos)  # warm-up
    runs = {name: RunResult() for name in decoders}
    for index, ids in enumerate(track(prompt_ids, description="plain / fixed / default",
                                      transient=True)):
        for name, decoder in decoders.items():
            runs[name].decode(decoder, ids, max_tokens, settings, eos,
                              None if settings.greedy else seed + index)

    plain, fixed, default = runs["plain"], runs["fixed"], runs["default"]
    results = {
        "num_prompts": len(prompt_ids),
        "plain_tokens_per_s": plain.tokens_per_s,
        "fixed_k_tokens_per_s": fixed.tokens_per_s,
        "spec_tokens_per_s": default.tokens_per_s,
        "speedup": default.tokens_per_s / plain.tokens_per_s,
        "fixed_k_speedup": fixed.tokens_per_s / plain.tokens_per_s,
        "draft_cost_ratio": decoders["default"].policy.costs.draft_cost_ratio,
        "fixed_k_draft_cost_ratio": decoders["fixed"].policy.costs.draft_cost_ratio,
        "verify_cost_ratio": decoders["fixed"].policy.costs.verify_cost_ratio(k + 1),
        "greedy_identical": _identical(plain, default) if settings.greedy else None,
        "fixed_k_greedy_identical": _identical(plain, fixed) if settings.greedy else None,
        "draft_vocab_size": decoders["default"].draft_vocab_size,
        "draft_vocab_coverage": vocab.coverage(draft_vocab_size) if head_ids else None,
        **_acceptance("", default.spec),
        **_acceptance("fixed_k_", fixed.spec),
        "plain_tokens": plain.num_tokens,
        "spec_tokens": default.num_tokens,
        "settings": {
            "target": target, "draft": draft, "prompts": prompts, "k": k,
            "confidence_threshold": confidence_threshold, "max_tokens": max_tokens,
            "temperature": temperature, "dtype": str(torch_dtype), "device": str(torch_device),
        },
        "machine": machine_description(),
    }
    _print_table(results)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        temporary = out.with_suffix(out.suffix + ".tmp")
        temporary.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(temporary, out)


def _identical(a: RunResult, b: RunResult) -> int:
    return sum(x == y for x, y in zip(a.outputs, b.outputs, strict=True))


def _acceptance(prefix: str, spec: SpecDecodeCounts) -> dict:
    """Acceptance figures of one run; per position over the steps that drafted at all."""
    return {
        f"{prefix}acceptance_rate": spec.acceptance_rate,
        f"{prefix}mean_acceptance_length": spec.mean_acceptance_length,
        f"{prefix}acceptance_per_position": (
            [n / spec.num_drafts for n in spec.accepted_per_position] if spec.num_drafts else []),
        f"{prefix}steps_by_draft_length": spec.steps_by_draft_length,
    }


def _print_table(results: dict) -> None:
    table = Table(title=f"plain vs fixed k vs default policy, {results['num_prompts']} prompts")
    table.add_column("measure")
    table.add_column("value", justify="right")
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
    for key in ("plain_tokens_per_s", "fixed_k_tokens_per_s", "spec_tokens_per_s", "speedup",
                "fixed_k_speedup", "draft_cost_ratio", "fixed_k_draft_cost_ratio",
                "verify_cost_ratio", "mean_acceptance_length", "fixed_k_mean_acceptance_length",
                "acceptance_rate", "greedy_identical", "fixed_k_greedy_identical",
                "draft_vocab_size", "draft_vocab_coverage"):
        table.add_row(key, fmt(results[key]))
    for key in ("acceptance_per_position", "fixed_k_acceptance_per_position"):
        table.add_row(key, " ".join(f"{p:.2f}" for p in results[key]))
    table.add_row("steps_by_draft_length", " ".join(map(str, results["steps_by_draft_length"])))
    Console().print(table)
