"""Held-out agreement: how often the draft's argmax is the target's next token, teacher-forced.

The held-out records are the target's greedy responses, so at every response position the
draft's argmax equals the recorded token exactly when a greedy verifier would accept it. From
the per-position matches m_0, m_1, ... of one response:

    α               share of response positions where the draft matches
    r_t             run length from start t: consecutive matches m_t, m_t+1, ..., capped at k
                    (and by the end of the response)
    acceptance[j]   share of starts t with r_t > j, j = 0..k−1 (a draft of k tokens from t
                    would have its token j accepted: vLLM's per-position convention)
    τ(k)            1 + mean over t of r_t: tokens per target pass, bonus token included

Every response start counts (teacher-forced, not only the starts a decoder would visit), so τ
is what α's distribution implies, not a decode measurement (`evaluate.py` measures that).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from draft_training.examples import IGNORE_INDEX, Example, collate
from draft_training.head_rows import HeadRows

DEFAULT_K = 4


@dataclass(frozen=True)
class Agreement:
    alpha: float  # per-token agreement
    acceptance_per_position: tuple[float, ...]  # [j] = share of starts with run length > j
    tau: float  # implied mean acceptance length τ(k) = 1 + mean(min(r_t, k))
    num_tokens: int  # response positions scored
    k: int

    def record(self) -> dict[str, float | int | list[float]]:
        return {
            "alpha": self.alpha,
            "tau": self.tau,
            "acceptance_per_position": list(self.acceptance_per_position),
            "num_tokens": self.num_tokens,
            "k": self.k,
        }


def run_lengths(matches: torch.Tensor, k: int) -> torch.Tensor:
    """r_t for every start t of one response's bool matches: consecutive matches from t, ≤ k."""
    matches = matches.bool()
    lengths = torch.zeros(len(matches), dtype=torch.long)
    alive = torch.ones(len(matches), dtype=torch.bool)
    for offset in range(k):
        shifted = torch.zeros(len(matches), dtype=torch.bool)
        shifted[: max(0, len(matches) - offset)] = matches[offset:]
        alive &= shifted
        lengths += alive
    return lengths


def agreement_from_matches(
    responses: Iterable[Sequence[bool] | torch.Tensor], k: int = DEFAULT_K
) -> Agreement:
    """α, per-position acceptance and τ(k), pooled over the starts of every response."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    all_matches, all_lengths = [], []
    for response in responses:
        matches = torch.as_tensor(response, dtype=torch.bool).flatten()
        all_matches.append(matches)
        all_lengths.append(run_lengths(matches, k))
    matches = torch.cat(all_matches) if all_matches else torch.zeros(0, dtype=torch.bool)
    lengths = torch.cat(all_lengths) if all_lengths else torch.zeros(0, dtype=torch.long)
    if len(matches) == 0:
        raise ValueError("agreement needs at least one response token")
    per_position = tuple((lengths > j).double().mean().item() for j in range(k))
    return Agreement(
        alpha=matches.double().mean().item(),
        acceptance_per_position=per_position,
        tau=1.0 + lengths.double().mean().item(),
        num_tokens=len(matches),
        k=k,
    )


@torch.no_grad()
def draft_matches(
    model: torch.nn.Module,
    examples: Sequence[Example],
    batch_size: int,
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
    rows: HeadRows | None = None,
) -> list[torch.Tensor]:
    """Per example, whether the draft's argmax equals each response token (teacher-forced).

    Examples run in batches of similar length (the order of the result is the input's); the
    head runs on response positions only, as in training, and over `rows` only when given.
    The caller sets eval mode.
    """
    order = sorted(range(len(examples)), key=lambda index: len(examples[index].input_ids))
    result: list[torch.Tensor] = [torch.zeros(0, dtype=torch.bool)] * len(examples)
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = collate([examples[index] for index in indices], device)
        with autocast if autocast is not None else contextlib.nullcontext():
            hidden = model.base_model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            ).last_hidden_state
            labelled = batch.labels != IGNORE_INDEX
            head = model.get_output_embeddings()
            if rows is None:
                predicted = head(hidden[labelled]).argmax(-1)
            else:
                predicted = rows.token_ids[rows.logits(head, hidden[labelled]).argmax(-1)]
        matches = (predicted == batch.labels[labelled]).cpu()
        counts = labelled.sum(dim=1).tolist()
        for index, piece in zip(indices, matches.split(counts), strict=True):
            result[index] = piece
    return result


def heldout_agreement(
    model: torch.nn.Module,
    examples: Sequence[Example],
    batch_size: int,
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
    k: int = DEFAULT_K,
    rows: HeadRows | None = None,
) -> Agreement:
    """The draft's teacher-forced agreement with the target's responses in `examples` (its
    argmax over `rows` only, when given)."""
    return agreement_from_matches(
        draft_matches(model, examples, batch_size, device, autocast, rows), k)
