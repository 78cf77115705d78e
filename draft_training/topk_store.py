"""The target's top-k log-probabilities per response token, stored beside a generate JSONL.

For `data.jsonl` the folder is `data.topk/` (`topk_dir`). It holds numbered shards,
`00000.safetensors`, `00001.safetensors`, ..., each with two tensors of one shape [N, K]:
`token_ids` (int32) and `logprobs` (float16), every row sorted by log-probability, descending.
A record of a run with top-k carries

    "topk": {"shard": "00012.safetensors", "offset": 1234, "k": 20}

and row `offset + i` of that shard belongs to its response token i (`len(response_token_ids)`
rows in all): the target's top K of log_softmax(raw logits at temperature 1, no processing) at
the position whose next token is response token i.

Crash safety: `write_shard` makes its shard durable (temporary file, fsync, `os.replace`)
before the records that point into it are appended to the JSONL, and never reuses a shard
number, so a shard orphaned by a kill between the two, or by records dropped from the JSONL
(`generate_responses(drop_unasked=...)`), is harmless: nothing references it.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from afa_serve.atomic import atomic_file

SHARD_PATTERN = re.compile(r"^(\d{5,})\.safetensors$")


def topk_dir(jsonl_path: Path) -> Path:
    """`data.jsonl` -> `data.topk` (beside it)."""
    jsonl_path = Path(jsonl_path)
    return jsonl_path.with_name(f"{jsonl_path.name.removesuffix('.jsonl')}.topk")


def _next_shard_name(folder: Path) -> str:
    numbers = [
        int(match.group(1))
        for path in folder.iterdir()
        if (match := SHARD_PATTERN.match(path.name)) is not None
    ]
    return f"{max(numbers, default=-1) + 1:05d}.safetensors"


def attach_topk(
    folder: Path,
    records: list[dict[str, Any]],
    token_ids: list[torch.Tensor],
    logprobs: list[torch.Tensor],
) -> None:
    """Write one shard holding each record's rows (`token_ids[i]`, `logprobs[i]`: [len(response
    tokens), K]) and point the records into it; append the records only after this returns."""
    for record, rows in zip(records, token_ids, strict=True):
        if rows.shape[0] != len(record["response_token_ids"]):
            raise RuntimeError(f"{rows.shape[0]} top-k rows for a "
                               f"{len(record['response_token_ids'])}-token response")
    shard = write_shard(folder, torch.cat(token_ids), torch.cat(logprobs))
    offset = 0
    for record in records:
        record["topk"] = {"shard": shard, "offset": offset, "k": int(token_ids[0].shape[1])}
        offset += len(record["response_token_ids"])


def write_shard(folder: Path, token_ids: torch.Tensor, logprobs: torch.Tensor) -> str:
    """Write the next unused shard of `folder` atomically and durably; return its file name.

    `token_ids` and `logprobs` are [N, K]; each row is stored sorted by logprob, descending.
    """
    if token_ids.dim() != 2 or token_ids.shape != logprobs.shape:
        raise ValueError(
            f"token_ids and logprobs must both be [N, K], got {tuple(token_ids.shape)} and "
            f"{tuple(logprobs.shape)}"
        )
    logprobs = logprobs.detach().to("cpu", torch.float32)
    order = torch.argsort(logprobs, dim=1, descending=True, stable=True)
    tensors = {
        "token_ids": token_ids.detach().cpu().gather(1, order).to(torch.int32).contiguous(),
        "logprobs": logprobs.gather(1, order).to(torch.float16).contiguous(),
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = _next_shard_name(folder)
    with atomic_file(folder / name) as temporary:  # fsyncs the file and the folder
        save_file(tensors, str(temporary))
    return name


@functools.lru_cache(maxsize=64)
def _load_shard(path: str, mtime_ns: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Keyed on mtime and size too, so that a shard replaced under the same name is reloaded.
    tensors = load_file(path)
    return tensors["token_ids"], tensors["logprobs"]


def read_rows(
    folder: Path, shard: str, offset: int, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows offset .. offset + length of a shard: (token ids int64 [length, K], logprobs float32
    [length, K]). Shards are loaded once and cached."""
    path = Path(folder) / shard
    stat = os.stat(path)
    token_ids, logprobs = _load_shard(str(path), stat.st_mtime_ns, stat.st_size)
    if offset < 0 or length < 0 or offset + length > token_ids.shape[0]:
        raise IndexError(
            f"rows {offset}..{offset + length} out of range for {path} ({token_ids.shape[0]} rows)"
        )
    return (
        token_ids[offset : offset + length].to(torch.int64),
        logprobs[offset : offset + length].to(torch.float32),
    )


def record_rows(jsonl_path: Path, record: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """A record's top-k rows, one per response token (the record must carry `topk`)."""
    pointer = record["topk"]
    return read_rows(
        topk_dir(jsonl_path), pointer["shard"], pointer["offset"],
        len(record["response_token_ids"]),
    )
