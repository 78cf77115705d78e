"""eval: how often a target accepts a draft's tokens, measured by the engine's own decoder.

Every prompt is decoded greedily by `afa_serve.engine.speculative.SpeculativeDecoder` (the
decoder the server runs, with `verify.py`'s acceptance rule), and its `SpecDecodeCounts` are
summed over the prompts. Nothing here re-implements verification: the figures are the ones the
engine would report on `/metrics` for the same requests.

    mean_acceptance_length  τ = 1 + accepted / drafts: tokens per target forward (bonus included)
    acceptance_rate         accepted / drafted tokens
    acceptance_per_position [i] = drafts whose token i was accepted / drafts (vLLM's convention)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import PreTrainedModel

from afa_serve.descriptions import DEVICE_HELP, DTYPE_HELP, PROMPTS_HELP, TARGET_HELP
from afa_serve.engine.base import SpecDecodeCounts
from afa_serve.engine.loading import DeviceName, DTypeName, load_target_and_draft
from afa_serve.engine.speculative import SpeculativeDecoder
from afa_serve.engine.verify import SamplingSettings
from afa_serve.prompts import load_prompts, prompt_token_ids

GREEDY = SamplingSettings(temperature=0.0)


class EvalConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    target: str = Field(description=TARGET_HELP)
    draft: str = Field(description="Draft model (same tokenizer as the target).")
    prompts: str = Field(
        description=f"{PROMPTS_HELP} Use prompts the draft was NOT trained on (a mission's "
        "WORK/prompts/heldout.jsonl).")
    num_speculative_tokens: int = Field(4, ge=1, description="Draft tokens per step.")
    max_new_tokens: int = Field(96, ge=1, description="New tokens per prompt.")
    limit: int | None = Field(None, ge=1, description="Use the first N prompts only.")
    chat: bool = Field(True, description="Wrap text prompts in the chat template.")
    dtype: DTypeName = Field("auto", description=DTYPE_HELP)
    device: DeviceName = Field("auto", description=DEVICE_HELP)


@dataclass(frozen=True)
class Acceptance:
    """Summed engine counts over a prompt set, and what decoding it cost."""

    spec: SpecDecodeCounts
    num_prompts: int
    generated_tokens: int
    seconds: float



def evaluate(
    target: PreTrainedModel,
    draft: PreTrainedModel,
    prompts: Sequence[list[int]],
    k: int,
    max_new_tokens: int,
    eos: frozenset[int] = frozenset(),
    label: str = "eval",
) -> Acceptance:
    """Decode each tokenized prompt greedily with speculative decoding and sum the counts."""
    if not prompts:
        raise ValueError("evaluate needs at least one prompt")
    decoder = SpeculativeDecoder(target, draft, num_speculative_tokens=k)
    total = SpecDecodeCounts()
    generated = 0
    started = time.monotonic()
    progress = Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("τ {task.fields[tau]:.2f}"),
        TimeRemainingColumn(),
    )
    with progress:
        task = progress.add_task(label, total=len(prompts), tau=float("nan"))
        for prompt_ids in prompts:
            state = decoder.generate(prompt_ids, max_new_tokens, GREEDY, eos)
            total.merge(state.spec)
            generated += state.num_generated
            progress.update(task, advance=1, tau=total.mean_acceptance_length or float("nan"))
    return Acceptance(total, len(prompts), generated, time.monotonic() - started)


def report(acceptance: Acceptance, **about: Any) -> dict[str, Any]:
    """The JSON report: the three headline figures first, then what they were measured on."""
    spec = acceptance.spec
    return {
        "mean_acceptance_length": spec.mean_acceptance_length,
        "acceptance_rate": spec.acceptance_rate,
        "acceptance_per_position": spec.acceptance_per_position,
        "num_prompts": acceptance.num_prompts,
        **about,
        "counts": {
            "num_drafts": spec.num_drafts,
            "num_draft_tokens": spec.num_draft_tokens,
            "num_accepted_tokens": spec.num_accepted_tokens,
            "accepted_per_position": list(spec.accepted_per_position),
            "generated_tokens": acceptance.generated_tokens,
        },
        "seconds": round(acceptance.seconds, 2),
    }


def evaluate_config(config: EvalConfig) -> dict[str, Any]:
    """Load target, draft and prompts as `config` names them; return the report."""
    models = load_target_and_draft(config.target, config.draft, config.dtype, config.device)
    prompts = load_prompts(config.prompts, config.limit)
    prompt_ids = [prompt_token_ids(p, models.tokenizer, chat=config.chat) for p in prompts]
    acceptance = evaluate(models.target, models.draft, prompt_ids, config.num_speculative_tokens,
                          config.max_new_tokens, models.eos)
    return report(
        acceptance,
        k=config.num_speculative_tokens,
        target=config.target,
        draft=config.draft,
        prompts=config.prompts,
        settings={
            "decoding": "greedy",
            "max_new_tokens": config.max_new_tokens,
            "chat": config.chat,
            "dtype": str(models.dtype).removeprefix("torch."),
            "device": str(models.device),
            "torch_threads": torch.get_num_threads(),
        },
    )
