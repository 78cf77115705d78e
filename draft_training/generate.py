"""generate: the target's own responses to a prompt set, the data a draft learns to predict.

Batched, greedy unless a temperature is given, by one of two engines behind one call
(a batch of prompt token ids in, their new tokens out): Hugging Face `generate` with left
padding (`HfGenerator`, the default) or vLLM's offline `LLM.generate` (`--engine vllm`,
`vllm_generate.py`). Resumable: the JSONL output gains one durable append (flush + fsync) per
finished batch, and a rerun skips the prompt ids already there. Prompts are sorted by length
so that a batch pads little.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import GenerationConfig

from afa_serve.engine.loading import (
    DeviceName,
    DTypeName,
    eos_token_ids,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from afa_serve.prompts import load_prompts, prompt_token_ids
from draft_training.atomic import append_jsonl, recover_jsonl


class GenerateConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    target: str
    prompts: str  # a prompt file or a named set, as `afa_serve.prompts.load_prompts` takes
    out: Path
    limit: int | None = Field(None, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    batch_size: int = Field(8, ge=1)
    temperature: float = Field(0.0, ge=0.0)  # 0: greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = 0
    chat: bool = True  # wrap text prompts in the chat template
    dtype: DTypeName = "auto"
    device: DeviceName = "auto"
    engine: Literal["torch", "vllm"] = "torch"


class Generator(Protocol):
    eos: frozenset[int]  # the tokens that end a response

    def __call__(self, prompts: list[list[int]]) -> list[list[int]]:
        """The new tokens for each prompt (token ids), in order."""
        ...


class HfGenerator:
    """Hugging Face `generate` on a left-padded batch."""

    def __init__(self, config: GenerateConfig, tokenizer: Any):
        self.device = resolve_device(config.device)
        self.model = load_model(config.target, resolve_dtype(config.dtype, self.device),
                                self.device)
        self.eos = eos_token_ids(self.model, tokenizer)
        pad_id = tokenizer.pad_token_id
        self.pad_id = pad_id if pad_id is not None else min(self.eos)
        self.generation_config = GenerationConfig(
            max_new_tokens=config.max_new_tokens,
            do_sample=config.temperature > 0.0,
            temperature=config.temperature if config.temperature > 0.0 else None,
            top_p=config.top_p if config.temperature > 0.0 else None,
            top_k=None,
            eos_token_id=sorted(self.eos),
            pad_token_id=self.pad_id,
        )
        torch.manual_seed(config.seed)

    def __call__(self, prompts: list[list[int]]) -> list[list[int]]:
        input_ids, attention_mask = left_padded(prompts, self.pad_id)
        with torch.no_grad():
            output = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                generation_config=self.generation_config,
            )
        return [row.tolist() for row in output[:, input_ids.shape[1] :].cpu()]


@dataclass(frozen=True)
class GenerateSummary:
    out: Path
    prompts: int  # in the prompt set
    already_done: int  # found in `out` when the run started
    generated: int
    new_tokens: int
    seconds: float


def response_record(
    prompt_id: str,
    prompt_ids: list[int],
    new_tokens: list[int],
    eos: frozenset[int],
    tokenizer: Any,
) -> dict[str, Any]:
    """One output line: the response is cut after its first end-of-sequence token."""
    end = next((index + 1 for index, token in enumerate(new_tokens) if token in eos), None)
    response = new_tokens if end is None else new_tokens[:end]
    return {
        "id": prompt_id,
        "prompt_token_ids": prompt_ids,
        "response_token_ids": response,
        "text": tokenizer.decode(response, skip_special_tokens=True),
        "finish_reason": "length" if end is None else "stop",
    }


def left_padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, width - len(sequence) :] = torch.tensor(sequence)
        attention_mask[row, width - len(sequence) :] = 1
    return input_ids, attention_mask


def generate_responses(config: GenerateConfig) -> GenerateSummary:
    prompts = load_prompts(config.prompts, config.limit)
    keyed = [(prompt.id or str(index), prompt) for index, prompt in enumerate(prompts)]
    if len({key for key, _ in keyed}) != len(keyed):
        raise ValueError(f"prompt ids in {config.prompts} are not unique: cannot resume by id")
    config.out.parent.mkdir(parents=True, exist_ok=True)
    done = {record["id"] for record in recover_jsonl(config.out)}
    pending = [(key, prompt) for key, prompt in keyed if key not in done]
    already_done = len(keyed) - len(pending)
    if not pending:
        return GenerateSummary(config.out, len(keyed), already_done, 0, 0, 0.0)

    tokenizer = load_tokenizer(config.target)
    if config.engine == "vllm":
        from draft_training.vllm_generate import VllmGenerator

        generator: Generator = VllmGenerator(config, tokenizer)
    else:
        generator = HfGenerator(config, tokenizer)
    tokenized = sorted(
        ((key, prompt_token_ids(prompt, tokenizer, chat=config.chat)) for key, prompt in pending),
        key=lambda item: -len(item[1]),
    )
    started = time.monotonic()
    new_tokens = 0
    progress = Progress(
        TextColumn("generate"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[tokens]} tokens"),
        TimeRemainingColumn(),
    )
    with progress:
        task = progress.add_task("generate", total=len(keyed), completed=already_done, tokens=0)
        for start in range(0, len(tokenized), config.batch_size):
            batch = tokenized[start : start + config.batch_size]
            outputs = generator([ids for _, ids in batch])
            records = [
                response_record(key, ids, new, generator.eos, tokenizer)
                for (key, ids), new in zip(batch, outputs, strict=True)
            ]
            append_jsonl(config.out, records)
            new_tokens += sum(len(record["response_token_ids"]) for record in records)
            progress.update(task, advance=len(batch), tokens=new_tokens)
    seconds = time.monotonic() - started
    return GenerateSummary(
        config.out, len(keyed), already_done, len(tokenized), new_tokens, seconds
    )
