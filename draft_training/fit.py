"""fit: train a draft to predict the target's responses (next-token loss on response tokens).

Methods: `afa-lora` (annealed activation, λ per `schedule.py`), `lora` (the same adapter at
λ = 0 throughout) and `full` (every draft weight trained). AdamW with linear warm-up then
cosine decay to a tenth of the learning rate. Float32 on CPU; bfloat16 autocast on CUDA.

A run is resumable: every `checkpoint_every` optimiser steps the trainable weights, optimiser,
LR scheduler, completed-step count, RNG state and λ are written atomically, and `resume`
continues a killed run to the same end (the order of micro-batches is a function of the seed,
so the resumed run computes what the uninterrupted one would have).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch.optim.lr_scheduler import LambdaLR

from afa_serve.engine.loading import resolve_device
from draft_training.afa_lora import set_lambda
from draft_training.atomic import append_jsonl, atomic_file, recover_jsonl
from draft_training.examples import IGNORE_INDEX, Batch, Example, collate, load_examples
from draft_training.run import (
    FitConfig,
    build_model,
    checkpoint_path,
    config_path,
    final_path,
    load_trainable_state,
    load_trained_weights,
    metrics_path,
    read_config,
    save_final,
    trainable_state,
    write_config,
)
from draft_training.schedule import anneal_end_step

StepCallback = Callable[[dict[str, Any]], None]

MIN_LR_FACTOR = 0.1


@dataclass(frozen=True)
class FitResult:
    run_dir: Path
    steps: int
    lam: float  # λ of the last optimiser step: 0.0 when the adapter can be merged


def plan_micro_batches(num_examples: int, config: FitConfig) -> tuple[list[list[int]], int]:
    """The run's micro-batches (example indices) in order, and its number of optimiser steps.

    Each epoch is a fresh seeded permutation cut into batches; `max_steps`, when set, runs as
    many epochs (the last one partly) as those steps need.
    """
    batches_per_epoch = math.ceil(num_examples / config.batch_size)
    if config.max_steps is not None:
        total_steps = config.max_steps
    else:
        total_steps = max(1, config.epochs * batches_per_epoch // config.grad_accum)
    needed = total_steps * config.grad_accum
    generator = torch.Generator().manual_seed(config.seed)
    micro_batches: list[list[int]] = []
    while len(micro_batches) < needed:
        order = torch.randperm(num_examples, generator=generator).tolist()
        micro_batches += [
            order[start : start + config.batch_size]
            for start in range(0, num_examples, config.batch_size)
        ]
    return micro_batches[:needed], total_steps


def check_annealing_ends(config: FitConfig, total_steps: int) -> None:
    """Refuse up front a run whose last step would still train at λ > 0: it could not merge."""
    adapter = config.adapter
    if adapter is None or adapter.method != "afa-lora":
        return
    end = anneal_end_step(total_steps, adapter.anneal_fraction)
    if end > total_steps - 1:
        raise ValueError(
            f"λ reaches 0 at step {end} but the run has only {total_steps} optimiser steps "
            f"(anneal fraction {adapter.anneal_fraction}): the adapter would end non-linear and "
            "could not be merged; train for more steps or lower the anneal fraction"
        )


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return MIN_LR_FACTOR + (1.0 - MIN_LR_FACTOR) * 0.5 * (1.0 + math.cos(math.pi * progress))


def response_loss_sum(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Summed cross-entropy of the draft's next-token predictions over response tokens.

    The head runs on labelled positions only: on 2 CPU cores it dominates a small draft's step
    (a 2-layer SmolLM2 draft trains twice as fast as with logits at every position).
    """
    hidden = model.base_model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).last_hidden_state
    labelled = batch.labels != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[labelled])
    return F.cross_entropy(logits.float(), batch.labels[labelled], reduction="sum")


def fit(config: FitConfig, on_step: StepCallback | None = None) -> FitResult:
    """Start a new run in `config.out`; `on_step` sees each optimiser step's metrics record."""
    if config_path(config.out).exists():
        raise FileExistsError(f"{config.out} already holds a run: resume it or pick another out")
    config.out.mkdir(parents=True, exist_ok=True)
    write_config(config)
    return _train(config, checkpoint=None, on_step=on_step)


def resume(run_dir: Path, on_step: StepCallback | None = None) -> FitResult:
    """Continue a run from its latest checkpoint to the end it was planned to reach."""
    config = read_config(run_dir)
    if final_path(run_dir).exists():
        weights = load_trained_weights(run_dir)
        return FitResult(run_dir, weights.step, weights.lam)
    checkpoint = None
    if checkpoint_path(run_dir).exists():
        checkpoint = torch.load(checkpoint_path(run_dir), map_location="cpu", weights_only=True)
    return _train(config, checkpoint=checkpoint, on_step=on_step)


def _save_checkpoint(
    config: FitConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    completed_steps: int,
    total_steps: int,
    lam: float,
) -> None:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    state = {
        "trainable": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": completed_steps,
        "total_steps": total_steps,
        "lambda": lam,
        "rng": rng,
    }
    with atomic_file(checkpoint_path(config.out)) as temporary:
        torch.save(state, temporary)


def _restore_checkpoint(
    checkpoint: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    total_steps: int,
) -> int:
    if checkpoint["total_steps"] != total_steps:
        raise ValueError(
            f"the checkpoint belongs to a run of {checkpoint['total_steps']} steps but this data "
            f"and config plan {total_steps}: the data file changed since the run started"
        )
    load_trainable_state(model, checkpoint["trainable"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    torch.set_rng_state(checkpoint["rng"]["cpu"])
    if "cuda" in checkpoint["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    return checkpoint["step"]


def _keep_metrics_before(run_dir: Path, completed_steps: int) -> None:
    """Drop metrics a killed run logged after its last checkpoint: they are computed again."""
    path = metrics_path(run_dir)
    records = [record for record in recover_jsonl(path) if record["step"] < completed_steps]
    with atomic_file(path) as temporary:
        append_jsonl(temporary, records)


def _progress() -> Progress:
    return Progress(
        TextColumn("fit"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  λ {task.fields[lam]:.3f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


def _train(
    config: FitConfig, checkpoint: dict[str, Any] | None, on_step: StepCallback | None
) -> FitResult:
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    model = build_model(config).to(device).train()
    examples: list[Example] = load_examples(config.data, config.max_length)
    micro_batches, total_steps = plan_micro_batches(len(examples), config)
    check_annealing_ends(config, total_steps)

    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = LambdaLR(
        optimizer, partial(lr_factor, warmup_steps=config.warmup_steps, total_steps=total_steps)
    )
    step = 0
    if checkpoint is not None:
        step = _restore_checkpoint(checkpoint, model, optimizer, scheduler, total_steps)
    _keep_metrics_before(config.out, step)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )

    lam = 0.0
    with _progress() as progress:
        task = progress.add_task("fit", total=total_steps, completed=step, loss=math.nan, lam=1.0)
        while step < total_steps:
            lam = config.adapter.lambda_at(step, total_steps) if config.adapter else 0.0
            set_lambda(model, lam)
            first = step * config.grad_accum
            batches = [
                collate([examples[index] for index in indices], device)
                for indices in micro_batches[first : first + config.grad_accum]
            ]
            num_label_tokens = sum(batch.num_label_tokens for batch in batches)
            loss_value = 0.0
            for batch in batches:
                with autocast:
                    loss = response_loss_sum(model, batch) / num_label_tokens
                loss.backward()
                loss_value += loss.item()
            torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            record = {"step": step, "loss": loss_value, "lambda": lam, "lr": lr}
            append_jsonl(metrics_path(config.out), [record])
            step += 1
            if step % config.checkpoint_every == 0 and step < total_steps:
                _save_checkpoint(config, model, optimizer, scheduler, step, total_steps, lam)
            progress.update(task, completed=step, loss=loss_value, lam=lam)
            if on_step is not None:
                on_step(record)

    save_final(config.out, trainable_state(model), step, lam)
    checkpoint_path(config.out).unlink(missing_ok=True)
    return FitResult(config.out, step, lam)
