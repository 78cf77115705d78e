"""fit: train a draft to predict the target's responses (next-token loss on response tokens).

Methods: `afa-lora` (annealed activation, λ per `schedule.py`), `lora` (the same adapter at
λ = 0 throughout) and `full` (every draft weight trained). AdamW (fused: one kernel over all
weights; on 2 CPU cores 0.04 s a step against 0.24 s for the default, mostly the tied
embedding's 28 M weights) with linear warm-up then cosine decay to a tenth of the learning rate.
On a CPU the run keeps freed memory in the process (`host_memory.py`, with what it gains).

Loss per response token: ce_weight·CE(target's token) + kl_weight·KL(p_target ‖ q_draft) over
K + 1 outcomes, the target's stored top-K ids plus one tail bucket (`topk_kl`). Records
without top-k are trained on CE alone; data with none at all falls back to CE with a warning
(an error if ce_weight is 0, since nothing would train).

Micro-batches: each epoch is a seeded permutation; with `length_bucketing` it is cut into pools
of `BUCKET_POOL_BATCHES` batches, each pool sorted by length and cut into batches, and the
epoch's batches shuffled (seeded): little padding, order still random and a function of the
seed.

Autocast (`autocast` setting): "auto" is bfloat16 on CUDA and on CPUs with native bfloat16,
where it was measured faster (`autocast_context`), else none; "bfloat16" forces it, "off"
trains in float32. Weights and optimiser state stay float32 either way; held-out evaluation
runs under the same autocast as training. "auto" is decided on the machine that runs: resume
a run with it on a machine of another kind and its precision may change (pin it to keep a
resume bit-exact there).

A run is resumable: every `checkpoint_every` optimiser steps the trainable weights, optimiser,
LR scheduler, completed-step count, RNG state, λ and the held-out state (best weights and
score, evaluations since the best) are written atomically, and `resume` continues a killed run
to the same end (the order of micro-batches is a function of the seed, so the resumed run
computes what the uninterrupted one would have). Held-out evaluation, best weights and early
stopping: see `run.py`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
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

from afa_serve.atomic import append_jsonl, atomic_file, recover_jsonl, write_jsonl
from afa_serve.engine.loading import fastest_dtype_name, resolve_device
from draft_training.afa_lora import set_lambda
from draft_training.agreement import heldout_agreement
from draft_training.examples import (
    IGNORE_INDEX,
    Batch,
    Example,
    Teacher,
    check_one_topk_size,
    collate,
    load_examples,
    response_token_ids,
)
from draft_training.feature_training import reachable_rows
from draft_training.head_rows import HeadRows
from draft_training.host_memory import keep_freed_memory
from draft_training.run import (
    DRAFTED_POSITION_DECAY,
    FitConfig,
    best_path,
    build_model,
    checkpoint_path,
    config_path,
    final_path,
    load_trainable_state,
    load_trained_weights,
    metrics_path,
    read_config,
    save_final,
    save_weights,
    trainable_state,
    weights_metadata,
    write_config,
)
from draft_training.schedule import anneal_end_step

StepCallback = Callable[[dict[str, Any]], None]

logger = logging.getLogger(__name__)

MIN_LR_FACTOR = 0.1
BUCKET_POOL_BATCHES = 32  # batches per length-sorted pool
TAIL_EPS = 1e-6  # floor of a tail probability before its log


@dataclass(frozen=True)
class FitResult:
    run_dir: Path
    steps: int  # completed optimiser steps of the final weights (with held-out data: the best)
    lam: float  # λ those weights were trained at: 0.0 when the adapter can be merged
    # optimiser steps the run ran: more than `steps` when the best weights came earlier, fewer
    # than planned when it stopped early
    trained_steps: int | None = None
    stopped_early: bool = False
    tau: float | None = None  # held-out implied τ(4) of the final weights


def plan_micro_batches(
    lengths: Sequence[int] | int, config: FitConfig
) -> tuple[list[list[int]], int]:
    """The run's micro-batches (example indices) in order, and its number of optimiser steps.

    `lengths` are the examples' token counts (a bare count plans without bucketing). Each epoch
    is a fresh seeded permutation cut into batches (length-bucketed if the config says so);
    `max_steps`, when set, runs as many epochs (the last one partly) as those steps need.
    """
    num_examples = lengths if isinstance(lengths, int) else len(lengths)
    bucketing = config.length_bucketing and not isinstance(lengths, int)
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
        if bucketing:
            assert not isinstance(lengths, int)
            micro_batches += _bucketed(order, lengths, config.batch_size, generator)
        else:
            micro_batches += [
                order[start : start + config.batch_size]
                for start in range(0, num_examples, config.batch_size)
            ]
    return micro_batches[:needed], total_steps


def _bucketed(
    order: list[int], lengths: Sequence[int], batch_size: int, generator: torch.Generator
) -> list[list[int]]:
    """One epoch's batches: pools of `order` sorted by length, cut, then the batches shuffled."""
    pool_size = batch_size * BUCKET_POOL_BATCHES
    batches: list[list[int]] = []
    for pool_start in range(0, len(order), pool_size):
        pool = sorted(order[pool_start : pool_start + pool_size], key=lambda i: lengths[i])
        batches += [pool[start : start + batch_size] for start in range(0, len(pool), batch_size)]
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[index] for index in shuffle]


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


def autocast_context(setting: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast a run trains and evaluates under.

    "auto" is bfloat16 on CUDA, and on a CPU with native bfloat16 (AVX512-BF16 / AMX), where
    it was measured faster: one optimiser step of the 2-layer SmolLM2-135M draft, batch 8 × 300
    tokens (240 labelled each), 2 cores of an AMD EPYC with AVX512-BF16, settings alternated,
    median seconds: AFA-LoRA r16 12.9 in float32 vs 10.3 in bfloat16, with the top-20 KL
    15.2 vs 10.9; full fine-tuning 13.7 vs 10.9. Elsewhere "auto" is float32: where oneDNN
    emulates bfloat16 (an Ice Lake Xeon, AVX512 without BF16) 12 steps of the default mission's
    fit took 64.8 s under bfloat16 autocast against 28.6 s in float32, start-up included.
    """
    if setting == "off":
        return contextlib.nullcontext()
    if setting == "bfloat16" or fastest_dtype_name(device.type) == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def topk_kl_from_log_probs(
    student_log_probs: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor
) -> torch.Tensor:
    """Σ over rows of KL(p ‖ q) on K + 1 outcomes: the teacher's top-K ids and the tail.

    p: the teacher's top-K probabilities exp(logprobs) as stored, tail 1 − Σ p; q: the
    student's probabilities of the same ids (from its log_softmax `student_log_probs` [N, V]),
    tail 1 − Σ q. A teacher id of -1 is a token the student does not score (`head_rows`): its
    p joins the tail. Float32; tails are floored at `TAIL_EPS` before their log, and an
    outcome with p = 0 contributes 0.
    """
    teacher_logprobs = teacher_logprobs.float()
    scored = teacher_ids >= 0
    zeros = torch.zeros_like(teacher_logprobs)
    p = torch.where(scored, teacher_logprobs.exp(), zeros)
    log_q = student_log_probs.float().gather(-1, teacher_ids.clamp_min(0))
    head = torch.where(p > 0, p * (teacher_logprobs - log_q), zeros).sum(-1)
    p_tail = (1.0 - p.sum(-1)).clamp_min(TAIL_EPS)
    q_tail = (1.0 - torch.where(scored, log_q.exp(), zeros).sum(-1)).clamp_min(TAIL_EPS)
    return (head + p_tail * (p_tail.log() - q_tail.log())).sum()


def topk_kl(
    student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor
) -> torch.Tensor:
    """Summed top-K KL(teacher ‖ student) from the student's raw logits [N, V]."""
    return topk_kl_from_log_probs(
        F.log_softmax(student_logits.float(), dim=-1), teacher_ids, teacher_logprobs
    )


@dataclass(frozen=True)
class LossTerms:
    """A batch's loss terms, each summed over its response tokens."""

    ce: torch.Tensor
    kl: torch.Tensor | None  # None: no teacher in the batch, or distillation off
    feature: torch.Tensor | None  # None: not asked for (feature drafts only)


def response_loss_terms(
    model: torch.nn.Module,
    batch: Batch,
    distill: bool = True,
    feature: bool = False,
    rows: HeadRows | None = None,
    positions: int = 1,
) -> LossTerms:
    """CE over the batch's response tokens; top-K KL over those with a teacher (with `distill`);
    for a feature draft with `feature`, EAGLE's regression term: the smooth-L1 from the
    draft's predicted feature to the target's, averaged over the hidden size. With `rows`, the
    head, its softmax and both losses cover those rows only (`head_rows.py`). A feature draft
    with `positions` > 1 adds the terms of its later drafted positions (`feature_training`),
    position p weighted `DRAFTED_POSITION_DECAY`^(p − 1), over the rows serving drafts from
    as position p (`reachable_rows`).

    The head runs on labelled positions only: on 2 CPU cores it dominates a small draft's step
    (a 2-layer SmolLM2 draft trains twice as fast as with logits at every position).
    """
    unrolled = {"positions": positions} if positions > 1 else {}
    output = model.base_model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
        **unrolled)
    passes = output.drafted if unrolled else [output.last_hidden_state]
    labelled = batch.labels != IGNORE_INDEX
    targets = _LabelledTargets.of(batch, labelled, distill, rows,
                                  output.target_features if feature else None)
    head = model.get_output_embeddings()
    terms = [_position_terms(head, passes[0][labelled], targets, rows)]
    if unrolled:
        reachable = reachable_rows(batch.input_ids, batch.labels, positions)
        terms += [_position_terms(head, hidden[labelled], targets, rows, kept[labelled])
                  for hidden, kept in zip(passes[1:], reachable[1:], strict=True)]
    weights = [DRAFTED_POSITION_DECAY**position for position in range(len(terms))]

    def weighted(values: list[torch.Tensor | None]) -> torch.Tensor | None:
        if values[0] is None:
            return None
        return sum(weight * value for weight, value in zip(weights, values, strict=True))

    return LossTerms(weighted([term.ce for term in terms]), weighted([term.kl for term in terms]),
                     weighted([term.feature for term in terms]))


@dataclass(frozen=True)
class _LabelledTargets:
    """What each drafted position is compared with, one row per labelled position (row-major):
    the same for every position, so computed once per batch."""

    labels: torch.Tensor  # [N]; head-row indices with `rows`
    teacher: Teacher | None  # None: no distillation for this batch; ids as head-row indices
    features: torch.Tensor | None  # [N, hidden] float32: the target's, for the regression term

    @classmethod
    def of(cls, batch: Batch, labelled: torch.Tensor, distill: bool, rows: HeadRows | None,
           target_features: torch.Tensor | None) -> _LabelledTargets:
        labels = batch.labels[labelled]
        teacher = batch.teacher
        if not distill or teacher is None or not bool(teacher.mask.any()):
            teacher = None
        elif rows is not None:
            teacher = Teacher(rows.row_of[teacher.token_ids], teacher.logprobs, teacher.mask)
        features = None if target_features is None else target_features[labelled].float()
        return cls(labels if rows is None else rows.labels(labels), teacher, features)


def _position_terms(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: _LabelledTargets,
    rows: HeadRows | None,
    kept: torch.Tensor | None = None,
) -> LossTerms:
    """One drafted position's terms from its hidden states at the labelled rows, over the
    rows `kept` marks (all when None)."""
    labels, teacher, features = targets.labels, targets.teacher, targets.features
    if kept is not None:
        hidden, labels = hidden[kept], labels[kept]
        features = None if features is None else features[kept]
        if teacher is not None:
            teacher = Teacher(teacher.token_ids[kept], teacher.logprobs[kept], teacher.mask[kept])
    regression = None
    if features is not None:
        regression = F.smooth_l1_loss(hidden.float(), features,
                                      reduction="none").mean(dim=-1).sum()
    logits = head(hidden) if rows is None else rows.logits(head, hidden)
    if teacher is None:
        return LossTerms(F.cross_entropy(logits.float(), labels, reduction="sum"), None,
                         regression)
    log_probs = F.log_softmax(logits.float(), dim=-1)
    ce = F.nll_loss(log_probs, labels, reduction="sum")
    if bool(teacher.mask.all()):  # no copy of the [N, V] log-probs when every row has one
        kl = topk_kl_from_log_probs(log_probs, teacher.token_ids, teacher.logprobs)
    else:
        mask = teacher.mask
        kl = topk_kl_from_log_probs(log_probs[mask], teacher.token_ids[mask],
                                    teacher.logprobs[mask])
    return LossTerms(ce, kl, regression)


def response_loss_sum(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Summed cross-entropy of the draft's next-token predictions over response tokens."""
    return response_loss_terms(model, batch, distill=False).ce


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
        metadata = weights_metadata(final_path(run_dir))
        return FitResult(
            run_dir,
            weights.step,
            weights.lam,
            trained_steps=int(metadata.get("trained_steps", weights.step)),
            stopped_early=metadata.get("stopped_early") == "true",
            tau=float(metadata["tau"]) if "tau" in metadata else None,
        )
    checkpoint = None
    if checkpoint_path(run_dir).exists():
        checkpoint = torch.load(checkpoint_path(run_dir), map_location="cpu", weights_only=True)
    return _train(config, checkpoint=checkpoint, on_step=on_step)


@dataclass
class _Heldout:
    """Held-out state carried through a run and its checkpoints."""

    examples: list[Example]
    best: dict[str, Any] | None = None  # trainable, step (completed), lambda, tau, alpha
    evals_since_best: int = 0  # eligible evaluations since the best one
    last: dict[str, Any] | None = None  # the latest evaluation record

    def checkpoint_state(self) -> dict[str, Any]:
        return {"best": self.best, "evals_since_best": self.evals_since_best, "last": self.last}

    def restore(self, saved: dict[str, Any] | None) -> None:
        saved = saved or {}
        self.best = saved.get("best")
        self.evals_since_best = saved.get("evals_since_best", 0)
        self.last = saved.get("last")

    def metadata(self) -> dict[str, str]:
        assert self.best is not None
        return {"tau": repr(self.best["tau"]), "alpha": repr(self.best["alpha"])}


def _save_checkpoint(
    config: FitConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    completed_steps: int,
    total_steps: int,
    lam: float,
    heldout: _Heldout | None,
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
    if heldout is not None:
        state["heldout"] = heldout.checkpoint_state()
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
    """Drop metrics a killed run logged after its last checkpoint: they are computed again.

    Step and evaluation records alike carry the index of the optimiser step they follow."""
    path = metrics_path(run_dir)
    records = [record for record in recover_jsonl(path) if record["step"] < completed_steps]
    write_jsonl(path, records)


def _heldout_text(record: dict[str, Any] | None) -> str:
    if record is None:
        return ""
    return f"held-out τ {record['tau']:.3f}  α {record['alpha']:.3f}"


def _progress() -> Progress:
    return Progress(
        TextColumn("fit"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  λ {task.fields[lam]:.3f}"),
        TextColumn("{task.fields[heldout]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


def _check_teacher(config: FitConfig, examples: list[Example]) -> bool:
    """Whether the run distils; a warning (or, with ce_weight 0, an error) when it cannot."""
    if config.kl_weight == 0:
        return False
    if any(example.topk is not None for example in examples):
        return True
    if config.ce_weight == 0:
        raise ValueError(
            f"kl_weight > 0 and ce_weight = 0, but {config.data} stores no top-k log-probs: "
            "nothing to train on (generate with top-k, or set ce_weight)"
        )
    logger.warning(
        "%s stores no top-k log-probs: training on cross-entropy only (kl_weight %g unused)",
        config.data,
        config.kl_weight,
    )
    return False


def _evaluate(
    config: FitConfig,
    model: torch.nn.Module,
    heldout: _Heldout,
    device: torch.device,
    autocast: contextlib.AbstractContextManager,
    step_index: int,
    lam: float,
    rows: HeadRows | None,
) -> dict[str, Any]:
    """Evaluate the weights after optimiser step `step_index`; keep them if they are the best."""
    model.eval()
    agreement = heldout_agreement(model, heldout.examples, config.batch_size, device, autocast,
                                  rows=rows)
    model.train()
    eligible = lam == 0.0
    improved = eligible and (heldout.best is None or agreement.tau > heldout.best["tau"])
    if improved:
        heldout.best = {
            "trainable": trainable_state(model),
            "step": step_index + 1,
            "lambda": lam,
            "tau": agreement.tau,
            "alpha": agreement.alpha,
        }
        heldout.evals_since_best = 0
        _write_best(config.out, heldout)
    elif eligible:
        heldout.evals_since_best += 1
    record = {
        "kind": "eval",
        "step": step_index,
        "lambda": lam,
        **agreement.record(),
        "eligible": eligible,
        "best": improved,
    }
    heldout.last = record
    return record


def _write_best(run_dir: Path, heldout: _Heldout) -> None:
    best = heldout.best
    if best is None:
        best_path(run_dir).unlink(missing_ok=True)
        return
    save_weights(
        best_path(run_dir), best["trainable"], best["step"], best["lambda"], heldout.metadata()
    )


def _train(
    config: FitConfig, checkpoint: dict[str, Any] | None, on_step: StepCallback | None
) -> FitResult:
    device = resolve_device(config.device)
    if device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(config.seed)
    model = build_model(config).to(device).train()
    examples: list[Example] = load_examples(config.data, config.max_length)
    if config.scored_data is not None:
        examples += load_examples(config.scored_data, config.max_length)
        check_one_topk_size(examples, f"{config.data} and {config.scored_data}")
    distill = _check_teacher(config, examples)
    rows = None
    if config.head_rows:
        rows = HeadRows.most_frequent(
            response_token_ids(config.data), config.head_rows,
            model.get_output_embeddings().weight.shape[0]).to(device)
    regress_features = config.feature_weight > 0
    lengths = [len(example.input_ids) for example in examples]
    micro_batches, total_steps = plan_micro_batches(lengths, config)
    check_annealing_ends(config, total_steps)
    heldout = None
    if config.heldout_data is not None:
        heldout = _Heldout(load_examples(config.heldout_data, config.max_length))

    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay,
                                  fused=True)
    scheduler = LambdaLR(
        optimizer, partial(lr_factor, warmup_steps=config.warmup_steps, total_steps=total_steps)
    )
    step = 0
    if checkpoint is not None:
        step = _restore_checkpoint(checkpoint, model, optimizer, scheduler, total_steps)
    _keep_metrics_before(config.out, step)
    if heldout is not None:  # best-so-far as of the checkpoint (a later one is computed again)
        heldout.restore(checkpoint.get("heldout") if checkpoint is not None else None)
        _write_best(config.out, heldout)
    autocast = autocast_context(config.autocast, device)

    lam = 0.0
    stopped_early = False
    with _progress() as progress:
        task = progress.add_task(
            "fit",
            total=total_steps,
            completed=step,
            loss=math.nan,
            lam=1.0,
            heldout=_heldout_text(heldout.last if heldout else None),
        )
        while step < total_steps and not stopped_early:
            lam = config.adapter.lambda_at(step, total_steps) if config.adapter else 0.0
            set_lambda(model, lam)
            first = step * config.grad_accum
            batches = [
                collate([examples[index] for index in indices], device)
                for indices in micro_batches[first : first + config.grad_accum]
            ]
            num_label_tokens = sum(batch.num_label_tokens for batch in batches)
            loss_value = ce_value = kl_value = feature_value = 0.0
            for batch in batches:
                with autocast:
                    terms = response_loss_terms(model, batch, distill, regress_features, rows,
                                                config.drafted_positions)
                    ce = terms.ce / num_label_tokens
                    loss = config.ce_weight * ce
                    if terms.kl is not None:
                        kl = terms.kl / num_label_tokens
                        loss = loss + config.kl_weight * kl
                        kl_value += kl.item()
                    if terms.feature is not None:
                        feature = terms.feature / num_label_tokens
                        loss = loss + config.feature_weight * feature
                        feature_value += feature.item()
                loss.backward()
                loss_value += loss.item()
                ce_value += ce.item()
            torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            record = {"step": step, "loss": loss_value, "lambda": lam, "lr": lr}
            if distill:
                record |= {"ce": ce_value, "kl": kl_value}
            if regress_features:
                record["feature"] = feature_value
            append_jsonl(metrics_path(config.out), [record])
            step += 1
            if heldout is not None and (step % config.eval_every == 0 or step == total_steps):
                evaluation = _evaluate(config, model, heldout, device, autocast, step - 1, lam,
                                       rows)
                append_jsonl(metrics_path(config.out), [evaluation])
                stopped_early = (config.patience is not None
                                 and heldout.evals_since_best >= config.patience
                                 and config.min_steps <= step < total_steps)
            if step % config.checkpoint_every == 0 and step < total_steps and not stopped_early:
                _save_checkpoint(
                    config, model, optimizer, scheduler, step, total_steps, lam, heldout
                )
            progress.update(
                task,
                completed=step,
                loss=loss_value,
                lam=lam,
                heldout=_heldout_text(heldout.last if heldout else None),
            )
            if on_step is not None:
                on_step(record)

    final_state, final_step, final_lam = trainable_state(model), step, lam
    metadata = {"trained_steps": str(step)}
    tau = None
    if heldout is not None and heldout.best is not None:
        best = heldout.best
        final_state, final_step, final_lam = best["trainable"], best["step"], best["lambda"]
        metadata |= heldout.metadata() | {"stopped_early": "true" if stopped_early else "false"}
        tau = best["tau"]
    save_final(config.out, final_state, final_step, final_lam, metadata)
    checkpoint_path(config.out).unlink(missing_ok=True)
    if stopped_early:
        logger.info(
            "stopped early after %d of %d steps: %d evaluations without a better τ",
            step,
            total_steps,
            heldout.evals_since_best if heldout else 0,
        )
    return FitResult(config.out, final_step, final_lam, step, stopped_early, tau)
