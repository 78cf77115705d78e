"""score: the target's next-token predictions over replies it did not write.

`generate` decodes: one forward pass per response token, about 160 tokens/s for SmolLM2-135M on
2 CPU cores. Scoring a reply someone else wrote (ChatGPT's, from ShareGPT: `replies.py`) is one
teacher-forced pass over prompt and reply, several times cheaper per token, and what the draft
must learn there is the same: the target's argmax and top-K at every position. So each record
holds the reply as `response_token_ids` (the contexts) and the target's argmax at each of its
positions as `label_token_ids` (what to predict; `examples.py` trains on them instead of the
next reply token), with the target's top-K in shards like `generate`'s (`topk_store.py`).

The reply is framed as the chat template frames an assistant turn, through its end-of-turn
token, and cut to `max_response_tokens`; prompts over `max_prompt_tokens` are skipped. Replies
are taken in a seeded shuffle (so `--limit N` is a random sample, the same every time), less
those whose prompt is in an `--exclude` set (held-out prompts). Resumable like `generate`: one
durable append per batch, and a rerun skips the ids already scored.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from afa_serve.atomic import append_jsonl, recover_jsonl
from afa_serve.descriptions import DEVICE_HELP, DTYPE_HELP, TARGET_HELP
from afa_serve.engine.loading import (
    DeviceName,
    DTypeName,
    eos_token_ids,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from afa_serve.prompts import load_prompts, prompt_token_ids, text_key
from draft_training.generate import check_topk_setting, response_end, token_progress
from draft_training.replies import REPLY_SOURCES_HELP, Reply, load_replies
from draft_training.topk_store import attach_topk, topk_dir

_SHUFFLE_SEED = "afa-train-score"


class ScoreConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    target: str = Field(description=TARGET_HELP)
    replies: str = Field("sharegpt", description=f"Replies to score: {REPLY_SOURCES_HELP}.")
    out: Path = Field(description="JSONL file of scored replies (appended to: resumable).")
    limit: int | None = Field(None, ge=1, description="Score this many replies (a seeded "
                              "random sample), not all.")
    exclude: tuple[str, ...] = Field(
        (), description="Prompt sets or files whose prompts are skipped (held-out prompts).")
    max_prompt_tokens: int = Field(256, ge=1, description="Skip replies to longer prompts.")
    max_response_tokens: int = Field(256, ge=1, description="Cut replies to this many tokens.")
    top_k_logprobs: int = Field(20, ge=1, description="Store the target's top-K "
                                "log-probabilities at every reply token, for distillation.")
    batch_size: int = Field(16, ge=1, description="Replies scored at once.")
    dtype: DTypeName = Field("auto", description=DTYPE_HELP)
    device: DeviceName = Field("auto", description=DEVICE_HELP)


@dataclass(frozen=True)
class ScoreSummary:
    out: Path
    wanted: int  # records the run asked for
    already_done: int  # found in `out` when the run started
    scored: int
    tokens: int  # reply tokens scored now
    seconds: float


@dataclass(frozen=True)
class _Item:
    id: str
    prompt_ids: list[int]
    response_ids: list[int]


def reply_token_ids(reply: Reply, tokenizer: Any, prompt_ids: list[int],
                    eos: frozenset[int]) -> list[int]:
    """The reply's tokens as the chat template frames an assistant turn after `prompt_ids`,
    through its first end-of-turn token."""
    conversation = [*reply.prompt.messages, {"role": "assistant", "content": reply.text}]
    full = list(tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False))
    if full[: len(prompt_ids)] != prompt_ids:
        raise ValueError(f"{reply.id}: the chat template does not frame the reply as a "
                         "continuation of the prompt")
    tokens = full[len(prompt_ids):]
    end = response_end(tokens, eos)
    return tokens if end is None else tokens[:end]


def _pending_items(config: ScoreConfig, tokenizer: Any, eos: frozenset[int],
                   done: set[str]) -> tuple[list[_Item], int]:
    """The items to score now, and how many records the run wants in all."""
    replies = load_replies(config.replies)
    if len({reply.id for reply in replies}) != len(replies):
        raise ValueError(f"reply ids in {config.replies} are not unique: cannot resume by id")
    random.Random(_SHUFFLE_SEED).shuffle(replies)
    excluded = {text_key(prompt) for spec in config.exclude for prompt in load_prompts(spec)}
    wanted = config.limit if config.limit is not None else len(replies)
    items, taken = [], 0
    for reply in replies:
        if taken >= wanted:
            break
        if text_key(reply.prompt) in excluded:
            continue
        prompt_ids = prompt_token_ids(reply.prompt, tokenizer)
        if len(prompt_ids) > config.max_prompt_tokens:
            continue
        taken += 1
        if reply.id in done:
            continue
        response = reply_token_ids(reply, tokenizer, prompt_ids, eos)
        items.append(_Item(reply.id, prompt_ids, response[: config.max_response_tokens]))
    return items, min(wanted, taken)


@torch.no_grad()
def _score_batch(model: Any, batch: list[_Item], top_k: int,
                 device: torch.device) -> tuple[list[dict[str, Any]], list[torch.Tensor],
                                                list[torch.Tensor]]:
    sequences = [item.prompt_ids + item.response_ids for item in batch]
    width = max(len(sequence) for sequence in sequences)
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
    hidden = model.get_decoder()(input_ids=input_ids.to(device),
                                 attention_mask=attention_mask.to(device),
                                 use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    records, ids_rows, logprob_rows = [], [], []
    for row, item in enumerate(batch):
        # position p's logits predict token p + 1: the reply's tokens are predicted from
        # len(prompt) - 1 on
        start = len(item.prompt_ids) - 1
        logits = head(hidden[row, start : start + len(item.response_ids)]).float()
        values, indices = torch.log_softmax(logits, dim=-1).topk(top_k, dim=-1)
        records.append({"id": item.id, "prompt_token_ids": item.prompt_ids,
                        "response_token_ids": item.response_ids,
                        "label_token_ids": indices[:, 0].tolist()})
        ids_rows.append(indices.cpu())
        logprob_rows.append(values.cpu())
    return records, ids_rows, logprob_rows


def score_replies(config: ScoreConfig) -> ScoreSummary:
    config.out.parent.mkdir(parents=True, exist_ok=True)
    existing = recover_jsonl(config.out)
    check_topk_setting(existing, config.top_k_logprobs, config.out)
    done = {record["id"] for record in existing}
    tokenizer = load_tokenizer(config.target)
    device = resolve_device(config.device)
    model = load_model(config.target, resolve_dtype(config.dtype, device), device).eval()
    items, wanted = _pending_items(config, tokenizer, eos_token_ids(model, tokenizer), done)
    already_done = wanted - len(items)
    items.sort(key=lambda item: len(item.prompt_ids) + len(item.response_ids))
    folder = topk_dir(config.out)
    started, tokens = time.monotonic(), 0
    progress = token_progress("score")
    with progress:
        task = progress.add_task("score", total=wanted, completed=already_done, tokens=0,
                                 rate=0.0)
        for start in range(0, len(items), config.batch_size):
            batch = items[start : start + config.batch_size]
            records, ids_rows, logprob_rows = _score_batch(
                model, batch, config.top_k_logprobs, device)
            attach_topk(folder, records, ids_rows, logprob_rows)
            append_jsonl(config.out, records)  # after the shard its records point into
            tokens += sum(len(item.response_ids) for item in batch)
            rate = tokens / max(time.monotonic() - started, 1e-9)
            progress.update(task, advance=len(batch), tokens=tokens, rate=rate)
    return ScoreSummary(config.out, wanted, already_done, len(items), tokens,
                        time.monotonic() - started)
