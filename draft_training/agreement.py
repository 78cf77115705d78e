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

A feature draft drafts its later tokens from its own features, not the target's, so its
matches are one row per drafted position (`feature_training`): m_p,t is whether pass p is
right at response position t, and r_t counts consecutive p = 1, 2, ... with m_p,t+p−1 (the
p-th token drafted from start t). On the target's own greedy responses that is what a greedy
decoder accepts from t. α stays the first drafted token's agreement.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from draft_training.examples import IGNORE_INDEX, Example, collate
from draft_training.feature_training import FeatureDraftLM
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
    """r_t for every start t of one response's bool matches: consecutive matches from t, ≤ k.

    `matches` [n] is the same for every drafted position; [positions, n] gives drafted
    position p its own row (the last row stands for positions beyond)."""
    matches = matches.bool()
    per_position = matches if matches.dim() == 2 else matches[None]
    count = per_position.shape[1]
    lengths = torch.zeros(count, dtype=torch.long)
    alive = torch.ones(count, dtype=torch.bool)
    for offset in range(k):
        row = per_position[min(offset, len(per_position) - 1)]
        shifted = torch.zeros(count, dtype=torch.bool)
        shifted[: max(0, count - offset)] = row[offset:]
        alive &= shifted
        lengths += alive
    return lengths


def agreement_from_matches(
    responses: Iterable[Sequence[bool] | torch.Tensor], k: int = DEFAULT_K
) -> Agreement:
    """α, per-position acceptance and τ(k), pooled over the starts of every response (each
    [n] matches, or [positions, n] for a feature draft)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    all_matches, all_lengths = [], []
    for response in responses:
        matches = torch.as_tensor(response, dtype=torch.bool)
        all_matches.append(matches if matches.dim() == 1 else matches[0])
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
    k: int = DEFAULT_K,
) -> list[torch.Tensor]:
    """Per example, whether the draft's argmax equals each response token (teacher-forced):
    [n] matches, or for a feature draft [k, n], one row per drafted position (module doc).

    Examples run in batches of similar length (the order of the result is the input's); the
    head runs on response positions only, as in training, and over `rows` only when given.
    The caller sets eval mode.
    """
    order = sorted(range(len(examples)), key=lambda index: len(examples[index].input_ids))
    result: list[torch.Tensor] = [torch.zeros(0, dtype=torch.bool)] * len(examples)
    head = model.get_output_embeddings()
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = collate([examples[index] for index in indices], device)
        labelled = batch.labels != IGNORE_INDEX
        with autocast if autocast is not None else contextlib.nullcontext():
            if isinstance(model, FeatureDraftLM):
                passes = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               positions=k).drafted
            else:
                passes = [model.base_model(input_ids=batch.input_ids,
                                           attention_mask=batch.attention_mask,
                                           use_cache=False).last_hidden_state]
            predicted = torch.stack([
                head(hidden[labelled]).argmax(-1) if rows is None
                else rows.token_ids[rows.logits(head, hidden[labelled]).argmax(-1)]
                for hidden in passes])
        matches = (predicted == batch.labels[labelled]).cpu()
        counts = labelled.sum(dim=1).tolist()
        for index, piece in zip(indices, matches.split(counts, dim=1), strict=True):
            result[index] = piece[0] if len(passes) == 1 else piece
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
        draft_matches(model, examples, batch_size, device, autocast, rows, k), k)
