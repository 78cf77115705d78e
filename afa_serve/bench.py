"""`afa-serve bench`: the same prompts decoded plainly and speculatively, in one process."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
import typer
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.progress import track
from rich.table import Table

from afa_serve.atomic import write_json
from afa_serve.descriptions import DEVICE_HELP, DTYPE_HELP, PROMPTS_HELP, TARGET_HELP
from afa_serve.engine.base import SpecDecodeCounts
from afa_serve.engine.config import DEFAULT_MODEL, EngineConfig
from afa_serve.engine.draft_forward import DraftWeightsSetting
from afa_serve.engine.draft_vocab import DEFAULT_DRAFT_VOCAB_SIZE, read_draft_vocab
from afa_serve.engine.loading import DeviceName, DTypeName, load_target_and_draft
from afa_serve.engine.policy import DEFAULT_CONFIDENCE_THRESHOLD
from afa_serve.engine.prompt_lookup import PromptLookup
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


class BenchConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    target: str = Field(DEFAULT_MODEL, description=TARGET_HELP)
    draft: str = Field(description="Draft model with the target's tokenizer.")
    prompts: str = Field("mt-bench", description=PROMPTS_HELP)
    num_speculative_tokens: int = Field(
        4, ge=1, le=32, description="The most tokens the draft proposes per step.")
    confidence_threshold: float = Field(
        DEFAULT_CONFIDENCE_THRESHOLD, ge=0.0, lt=1.0,
        description="The default policy's confidence stop.")
    draft_vocab_size: int = Field(
        DEFAULT_DRAFT_VOCAB_SIZE, ge=0, description="The default policy's trimmed draft head "
        "(0: whole vocabulary; used only when the draft folder has a draft_vocab.json).")
    draft_weights: DraftWeightsSetting = EngineConfig.model_fields["draft_weights"]
    prompt_lookup_max: int = EngineConfig.model_fields["prompt_lookup_max"]
    prompt_lookup_min: int = EngineConfig.model_fields["prompt_lookup_min"]
    max_new_tokens: int = Field(64, ge=1, description="New tokens per prompt.")
    limit: int | None = Field(20, ge=1, description="Use only the first N prompts.")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy (outputs compared).")
    seed: int = Field(0, description="Seed of prompt i is seed + i when sampling.")
    dtype: DTypeName = Field("auto", description=DTYPE_HELP)
    device: DeviceName = Field("auto", description=DEVICE_HELP)


def bench(
    config: BenchConfig,
    out: Annotated[Path | None, typer.Option(help="Write the results JSON here.")] = None,
) -> None:
    """Decode the same prompts four ways, interleaved prompt by prompt: plain, fixed k (the
    whole draft head in --dtype, no confidence stop, no prompt lookup), the server's default
    policy (adaptive k, confidence stop, trimmed head, int8 draft on CPU, prompt lookup) and
    that policy with the draft model alone (no prompt lookup); print speed, acceptance and
    the measured costs.

    Greedy by default, so the outputs must be identical: the table says how many are.
    """
    # the server's own rule (and its check of min against max), before any model loads
    lookup = EngineConfig(num_speculative_tokens=config.num_speculative_tokens,
                          prompt_lookup_min=config.prompt_lookup_min,
                          prompt_lookup_max=config.prompt_lookup_max).prompt_lookup
    models = load_target_and_draft(config.target, config.draft, config.dtype, config.device)
    target_model, draft_model, tokenizer = models.target, models.draft, models.tokenizer
    prompt_ids = [prompt_token_ids(p, tokenizer) for p in load_prompts(config.prompts, config.limit)]
    settings = SamplingSettings(temperature=config.temperature)
    eos = models.eos
    vocab = read_draft_vocab(resolve_model(config.draft))
    size = config.draft_vocab_size
    head_ids = vocab.head_ids(size, eos) if vocab and size else None

    k = config.num_speculative_tokens

    def policy(prompt_lookup: PromptLookup | None) -> SpeculativeDecoder:
        return SpeculativeDecoder(
            target_model, draft_model, k, speculation="adaptive",
            confidence_threshold=config.confidence_threshold, draft_vocab=head_ids,
            prompt_lookup=prompt_lookup, draft_weights=config.draft_weights)

    decoders = {
        "plain": SpeculativeDecoder(target_model),
        "fixed": SpeculativeDecoder(target_model, draft_model, k, speculation="fixed"),
        "default": policy(lookup),
        "draft_only": policy(None),
    }
    for decoder in decoders.values():
        decoder.calibrate()
        decoder.generate(prompt_ids[0], 8, settings, eos)  # warm-up
    runs = {name: RunResult() for name in decoders}
    for index, ids in enumerate(track(prompt_ids, description=" / ".join(decoders),
                                      transient=True)):
        for name, decoder in decoders.items():
            runs[name].decode(decoder, ids, config.max_new_tokens, settings, eos,
                              None if settings.greedy else config.seed + index)

    plain, fixed, default, draft_only = (runs[name] for name in decoders)
    results = {
        "num_prompts": len(prompt_ids),
        "plain_tokens_per_s": plain.tokens_per_s,
        "fixed_k_tokens_per_s": fixed.tokens_per_s,
        "spec_tokens_per_s": default.tokens_per_s,
        "speedup": default.tokens_per_s / plain.tokens_per_s,
        "fixed_k_speedup": fixed.tokens_per_s / plain.tokens_per_s,
        "draft_only_speedup": draft_only.tokens_per_s / plain.tokens_per_s,
        "draft_cost_ratio": decoders["default"].policy.costs.draft_cost_ratio,
        "fixed_k_draft_cost_ratio": decoders["fixed"].policy.costs.draft_cost_ratio,
        "verify_cost_ratio": decoders["fixed"].policy.costs.verify_cost_ratio(k + 1),
        "greedy_identical": _identical(plain, default) if settings.greedy else None,
        "fixed_k_greedy_identical": _identical(plain, fixed) if settings.greedy else None,
        "draft_only_greedy_identical": _identical(plain, draft_only) if settings.greedy else None,
        "draft_vocab_size": decoders["default"].draft_vocab_size,
        "draft_vocab_coverage": vocab.coverage(size) if head_ids else None,
        **_acceptance("", default.spec),
        **_acceptance("fixed_k_", fixed.spec),
        **_acceptance("draft_only_", draft_only.spec),
        "plain_tokens": plain.num_tokens,
        "spec_tokens": default.num_tokens,
        "settings": {
            "target": config.target, "draft": config.draft, "prompts": config.prompts, "k": k,
            "confidence_threshold": config.confidence_threshold,
            "draft_weights": decoders["default"].draft_weights,
            "prompt_lookup": [config.prompt_lookup_min, config.prompt_lookup_max]
            if lookup else None,
            "max_tokens": config.max_new_tokens, "temperature": config.temperature,
            "dtype": str(models.dtype), "device": str(models.device),
        },
        "machine": machine_description(),
    }
    _print_table(results)
    if out is not None:
        write_json(out, results)


def _identical(a: RunResult, b: RunResult) -> int:
    return sum(x == y for x, y in zip(a.outputs, b.outputs, strict=True))


def _acceptance(prefix: str, spec: SpecDecodeCounts) -> dict:
    """Acceptance figures of one run; per position over the steps that drafted at all."""
    return {
        f"{prefix}acceptance_rate": spec.acceptance_rate,
        f"{prefix}mean_acceptance_length": spec.mean_acceptance_length,
        f"{prefix}acceptance_per_position": spec.acceptance_per_position,
        f"{prefix}steps_by_draft_length": spec.steps_by_draft_length,
    }


def _print_table(results: dict) -> None:
    table = Table(title=f"plain vs fixed k vs default policy (and its draft alone), "
                        f"{results['num_prompts']} prompts")
    table.add_column("measure")
    table.add_column("value", justify="right")
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
    for key in ("plain_tokens_per_s", "fixed_k_tokens_per_s", "spec_tokens_per_s", "speedup",
                "fixed_k_speedup", "draft_only_speedup", "draft_cost_ratio", "fixed_k_draft_cost_ratio",
                "verify_cost_ratio", "mean_acceptance_length", "fixed_k_mean_acceptance_length",
                "draft_only_mean_acceptance_length",
                "acceptance_rate", "greedy_identical", "fixed_k_greedy_identical",
                "draft_only_greedy_identical",
                "draft_vocab_size", "draft_vocab_coverage"):
        table.add_row(key, fmt(results[key]))
    for key in ("acceptance_per_position", "fixed_k_acceptance_per_position",
                "draft_only_acceptance_per_position"):
        table.add_row(key, " ".join(f"{p:.2f}" for p in results[key]))
    table.add_row("steps_by_draft_length", " ".join(map(str, results["steps_by_draft_length"])))
    Console().print(table)
