"""Training examples from `generate`'s JSONL: the target's responses are the labels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from draft_training.atomic import recover_jsonl

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """Prompt then response token ids, cut to the run's max length; labels cover the response."""

    input_ids: tuple[int, ...]
    num_prompt_tokens: int

    @property
    def num_label_tokens(self) -> int:
        """Positions whose next token is a response token: what the loss is taken over."""
        return len(self.input_ids) - self.num_prompt_tokens


def load_examples(path: Path, max_length: int) -> list[Example]:
    """Every record of `path` with at least one response token within `max_length` tokens."""
    examples = []
    for record in recover_jsonl(path):
        prompt, response = record["prompt_token_ids"], record["response_token_ids"]
        if not prompt:
            raise ValueError(f"{path}: record {record.get('id')!r} has no prompt tokens")
        input_ids = tuple(prompt + response)[:max_length]
        if len(input_ids) > len(prompt):
            examples.append(Example(input_ids, len(prompt)))
    if not examples:
        raise ValueError(f"{path} holds no example with response tokens within {max_length} tokens")
    return examples


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # [batch, length], right-padded
    attention_mask: torch.Tensor
    labels: torch.Tensor  # labels[:, t] is the token to predict at position t, or IGNORE_INDEX

    @property
    def num_label_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


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
        labels[row, example.num_prompt_tokens - 1 : len(ids) - 1] = ids[example.num_prompt_tokens :]
    return Batch(input_ids.to(device), attention_mask.to(device), labels.to(device))
