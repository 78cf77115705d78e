"""The AFA-LoRA λ schedule: 1 at the first optimiser step, exactly 0.0 from the end of annealing on.

Steps are optimiser steps (one step = `grad_accum` micro-batches), counted from 0. The λ of step
`s` is the λ every micro-batch of that step is computed with.
"""

from __future__ import annotations

import math
from typing import Literal

ScheduleKind = Literal["linear", "cosine"]


def anneal_end_step(total_steps: int, anneal_fraction: float) -> int:
    """The first optimiser step whose λ is 0.0: ceil(anneal_fraction · total_steps).

    The product is rounded to 9 decimals first so that binary-float noise does not move the
    step (0.07 · 100 is 7.000000000000001 in floats, whose ceiling would be 8).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1, got {total_steps}")
    if not 0.0 <= anneal_fraction <= 1.0:
        raise ValueError(f"anneal_fraction must lie in [0, 1], got {anneal_fraction}")
    return math.ceil(round(anneal_fraction * total_steps, 9))


def lambda_at(step: int, total_steps: int, anneal_fraction: float, kind: ScheduleKind) -> float:
    """λ for optimiser step `step`: falls from 1.0 at step 0 to exactly 0.0 at the end step."""
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    end = anneal_end_step(total_steps, anneal_fraction)
    if step >= end:
        return 0.0
    progress = step / end
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule kind {kind!r}")
