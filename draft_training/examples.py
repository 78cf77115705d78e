"""Training examples from `generate`'s JSONL: the target's responses are the labels.

A record that carries `topk` (see `topk_store.py`) also gives, per response token, the target's
top-K log-probabilities at the position predicting it: the teacher of the distillation loss.
Its rows are read when a batch is collated, not held in memory with the examples.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from afa_serve.atomic import recover_jsonl

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TopkRef:
    """Where an example's teacher rows lie: rows offset.. of `folder/shard`, K per row."""

    folder: Path
    shard: str
    offset: int
    k: int


@dataclass(frozen=True)
class Example:
    """Prompt then response token ids, cut to the run's max length; labels cover the response."""

    input_ids: tuple[int, ...]
    num_prompt_tokens: int
    topk: TopkRef | None = None
    # What each position is trained to predict when that is not the next input token: the
    # target's argmax over text it was scored on rather than text it wrote (`score`).
    labels: tuple[int, ...] | None = None

    @property
    def num_label_tokens(self) -> int:
        """Positions whose next token is a response token: what the loss is taken over."""
        return len(self.input_ids) - self.num_prompt_tokens


def response_token_ids(path: Path) -> Iterator[list[int]]:
    """The target's response tokens of each record of a data file."""
    return (record["response_token_ids"] for record in recover_jsonl(path))


def load_examples(path: Path, max_length: int) -> list[Example]:
    """Every record of `path` with a response, as at most `max_length` tokens: a prompt too long
    to leave room for the response keeps its end (at least a quarter of `max_length`; the
    response, not the prompt, is what is learnt), then the response is cut to fit."""
    examples = []
    folder: Path | None = None
    for record in recover_jsonl(path):
        prompt, response = record["prompt_token_ids"], record["response_token_ids"]
        if not prompt:
            raise ValueError(f"{path}: record {record.get('id')!r} has no prompt tokens")
        room = max(max_length - len(response), max_length // 4, 1)
        prompt = prompt[-room:]
        input_ids = tuple(prompt + response)[:max_length]
        if len(input_ids) <= len(prompt):
            continue
        labels = record.get("label_token_ids")
        if labels is not None:
            if len(labels) != len(response):
                raise ValueError(f"{path}: record {record.get('id')!r} has "
                                 f"{len(labels)} label_token_ids for {len(response)} response tokens")
            labels = tuple(labels[: len(input_ids) - len(prompt)])
        topk = None
        if record.get("topk") is not None:
            if folder is None:
                from draft_training.topk_store import topk_dir

                folder = topk_dir(Path(path))
            pointer = record["topk"]
            topk = TopkRef(folder, pointer["shard"], int(pointer["offset"]), int(pointer["k"]))
        examples.append(Example(input_ids, len(prompt), topk, labels))
    if not examples:
        raise ValueError(f"{path} holds no example with response tokens within {max_length} tokens")
    check_one_topk_size(examples, str(path))
    return examples


def check_one_topk_size(examples: list[Example], source: str) -> None:
    sizes = sorted({example.topk.k for example in examples if example.topk is not None})
    if len(sizes) > 1:
        raise ValueError(f"{source}: records store top-k of different sizes {sizes}; use one K")


@dataclass(frozen=True)
class Teacher:
    """The target's top-K at labelled positions, in the order of `labels != IGNORE_INDEX`
    (row-major); `mask` marks the positions that have one (examples without top-k have none)."""

    token_ids: torch.Tensor  # [num_labelled, K] int64
    logprobs: torch.Tensor  # [num_labelled, K] float32
    mask: torch.Tensor  # [num_labelled] bool


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [batch, length], right-padded
    attention_mask: torch.Tensor
    labels: torch.Tensor  # labels[:, t] is the token to predict at position t, or IGNORE_INDEX
    teacher: Teacher | None = None  # None when no example of the batch has top-k

    @property
    def num_label_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def _teacher(examples: list[Example], device: torch.device) -> Teacher | None:
    refs = [example.topk for example in examples if example.topk is not None]
    if not refs:
        return None
    from draft_training.topk_store import read_rows

    k = refs[0].k
    ids, logprobs, mask = [], [], []
    for example in examples:
        length = example.num_label_tokens
        if example.topk is None:
            ids.append(torch.zeros(length, k, dtype=torch.long))
            logprobs.append(torch.zeros(length, k, dtype=torch.float32))
            mask.append(torch.zeros(length, dtype=torch.bool))
            continue
        ref = example.topk
        rows_ids, rows_logprobs = read_rows(ref.folder, ref.shard, ref.offset, length)
        if rows_ids.shape[1] != k:
            raise ValueError(
                f"{ref.folder / ref.shard}: rows have K = {rows_ids.shape[1]}, not {k}"
            )
        ids.append(rows_ids)
        logprobs.append(rows_logprobs)
        mask.append(torch.ones(length, dtype=torch.bool))
    return Teacher(
        torch.cat(ids).to(device), torch.cat(logprobs).to(device), torch.cat(mask).to(device)
    )


def collate(examples: list[Example], device: torch.device) -> Batch:
    """Right-pad to the longest example; each position is labelled with the next token when
    that token belongs to the response."""
    length = max(len(example.input_ids) for example in examples)
    input_ids = torch.zeros(len(examples), length, dtype=torch.long)
    attention_mask = torch.zeros(len(examples), length, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        ids = torch.tensor(example.input_ids)
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        targets = ids[example.num_prompt_tokens :] if example.labels is None else torch.tensor(
            example.labels)
        labels[row, example.num_prompt_tokens - 1 : len(ids) - 1] = targets
    return Batch(
        input_ids.to(device),
        attention_mask.to(device),
        labels.to(device),
        _teacher(examples, device),
    )


def padding_fraction(micro_batches: list[list[int]], examples: list[Example]) -> float:
    """Share of the token slots of `micro_batches` (right-padded to each batch's longest) that
    are padding."""
    slots = real = 0
    for indices in micro_batches:
        lengths = [len(examples[index].input_ids) for index in indices]
        slots += max(lengths) * len(lengths)
        real += sum(lengths)
    return 1.0 - real / slots if slots else 0.0
