"""Training the head rows the engines serve, not the whole vocabulary.

Both engines score a trained draft's head over the target's most frequent response tokens only
(the torch engine the first 4,096 of `draft_vocab.json`, vLLM the 8,192 of `trim-vocab`), so
the draft's argmax among those rows is all that is ever served. `fit --head-rows N` computes the
head, its softmax and both losses over the N tokens the training responses hold most often (the
same ranking `merge` writes to `draft_vocab.json`), which on 2 CPU cores halves a 2-layer
SmolLM2 draft's step at N = 8,192 (README). A label outside the rows is not trained on; the
teacher's mass on tokens outside them joins the KL's tail; held-out agreement takes the argmax
over the same rows. The merged draft is still a full-vocabulary checkpoint: rows outside were
not trained as outputs, so serve it with a trimmed head (the default on both engines).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from afa_serve.engine.draft_vocab import DraftVocab, count_tokens
from draft_training.examples import IGNORE_INDEX


@dataclass(frozen=True)
class HeadRows:
    token_ids: torch.Tensor  # [N] the trained rows' token ids, ascending
    row_of: torch.Tensor  # [vocab] each token id's row, -1 for a token outside them

    @classmethod
    def most_frequent(cls, responses: Iterable[Iterable[int]], rows: int,
                      vocab_size: int) -> HeadRows:
        return cls.first_of(count_tokens(responses), rows, vocab_size)

    @classmethod
    def first_of(cls, vocab: DraftVocab, rows: int, vocab_size: int) -> HeadRows:
        """The `rows` most frequent tokens of a counted vocabulary."""
        token_ids = torch.tensor(vocab.head_ids(rows), dtype=torch.long)
        row_of = torch.full((vocab_size,), -1, dtype=torch.long)
        row_of[token_ids] = torch.arange(len(token_ids))
        return cls(token_ids, row_of)

    def to(self, device: torch.device) -> HeadRows:
        return HeadRows(self.token_ids.to(device), self.row_of.to(device))

    def logits(self, head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """[N_positions, rows]: the head applied with those rows only."""
        bias = None if head.bias is None else head.bias[self.token_ids]
        return F.linear(hidden, head.weight[self.token_ids], bias)

    def labels(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids as rows; IGNORE_INDEX outside them."""
        rows = self.row_of[token_ids]
        return torch.where(rows >= 0, rows, torch.full_like(rows, IGNORE_INDEX))
