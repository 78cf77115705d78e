"""compare: untrained vs LoRA vs AFA-LoRA vs full fine-tuning, and an AFA-LoRA ablation.

All arms share the mission's work dir: the same training prompts and target responses, the
same truncated draft to start from, the same optimiser steps, batch and seed, and one adapter
rank for LoRA and AFA-LoRA. Each trained draft is merged and evaluated on the HELD-OUT prompts
(never in the training data) with the engine's speculative decoder (`evaluate.py`). The
ablation trains AFA-LoRA over activation × schedule × anneal fraction with everything else
fixed. Every fit, merge and eval is a cached step (`pipeline.WorkDir`), so an interrupted
comparison picks up where it stopped and a larger grid reuses the cells already done.

Writes to OUT: table.md, results.json, per_position.png, training.png, ablation.png.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors import safe_open

from afa_serve.atomic import atomic_file, recover_jsonl, write_json
from afa_serve.config_cli import comma_separated
from afa_serve.engine.loading import (
    eos_token_ids,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from afa_serve.prompts import load_prompts, prompt_token_ids
from draft_training.afa_lora import ActivationName, AfaLoraConfig
from draft_training.evaluate import evaluate, report
from draft_training.pipeline import (
    Log,
    MissionConfig,
    Prepared,
    StepOutcome,
    WorkDir,
    afa_run_name,
    draft_fit_config,
    fit_step,
    merge_step,
    prepare,
)
from draft_training.run import Method, final_path, metrics_path
from draft_training.schedule import ScheduleKind

# A mission sized for comparing arms: fewer prompts, shorter responses and fewer steps than
# `mission`'s (150, as in the README's table).
# its own work dir: its data and its runs (`full`, `afa-lora-*`) share the mission's names but
# not its settings, so in the mission's folder each would retrain the other's
COMPARE_MISSION = MissionConfig(
    work_dir=Path("afa-train-work-compare"),
    num_prompts=120, num_heldout=20, max_new_tokens=96, steps=150, batch_size=8, lr=1e-3,
    adapter=AfaLoraConfig(), generate_max_minutes=0,  # every arm learns from all 120 answers
)


class CompareConfig(BaseModel):
    """`mission` fixes the data, draft, steps, batch, seed, KL weight and the adapter (rank,
    alpha, target modules, and the AFA-LoRA arm's activation, schedule and anneal fraction); its
    `lr` is the adapters' learning rate. The arms train without held-out evaluation."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mission: MissionConfig = COMPARE_MISSION
    out: Path = Field(
        Path("bench/results/compare"),
        description="Folder for table.md, results.json and the PNG plots.")
    lr_full: float = Field(1e-4, gt=0, description="Learning rate of full fine-tuning.")
    num_speculative_tokens: int = Field(4, ge=1, description="Draft tokens per step.")
    eval_max_new_tokens: int = Field(96, ge=1, description="New tokens per held-out prompt.")
    activations: comma_separated(ActivationName) = Field(
        ("relu", "silu", "gelu"), description="Ablation: activations.")
    schedules: comma_separated(ScheduleKind) = Field(
        ("linear", "cosine"), description="Ablation: schedules.")
    anneal_fractions: comma_separated(float) = Field(
        (0.1, 0.3, 0.6), description="Ablation: anneal fractions.")
    ablation_limit: int | None = Field(
        None, ge=0, description="Run only the first N ablation cells (the AFA-LoRA arm's own "
        "cell first); 0 skips the ablation. [default: the whole grid]")

    @model_validator(mode="after")
    def _adapters_to_compare(self) -> CompareConfig:
        if self.mission.adapter is None:
            raise ValueError("compare needs the adapters' settings (it trains full fine-tuning "
                             "as an arm of its own): drop --method full")
        return self


@dataclass(frozen=True)
class Arm:
    name: str  # run folder name; the AFA-LoRA arm's is its ablation cell's, so they share a run
    method: Method | None  # None: the untrained draft
    adapter: AfaLoraConfig | None
    lr: float


def arms(config: CompareConfig) -> dict[str, Arm]:
    mission = config.mission
    lora = mission.adapter.model_copy(update={"method": "lora"})
    afa = mission.adapter.model_copy(update={"method": "afa-lora"})
    return {
        "untrained": Arm("untrained", None, None, 0.0),
        "lora": Arm("lora", "lora", lora, mission.lr),
        "afa-lora": Arm(afa_run_name(afa), "afa-lora", afa, mission.lr),
        "full": Arm("full", "full", None, config.lr_full),
    }


def ablation_cells(config: CompareConfig) -> list[Arm]:
    """The grid in a fixed order, the AFA-LoRA arm's own cell first (it is already trained)."""
    base = config.mission.adapter.model_copy(update={"method": "afa-lora"})
    cells = [
        base.model_copy(update={"activation": a, "schedule": s, "anneal_fraction": f})
        for a, s, f in itertools.product(
            config.activations, config.schedules, config.anneal_fractions
        )
    ]
    cells.sort(key=lambda adapter: adapter != base)
    arms_ = [
        Arm(afa_run_name(adapter), "afa-lora", adapter, config.mission.lr) for adapter in cells
    ]
    return arms_ if config.ablation_limit is None else arms_[: config.ablation_limit]


class HeldOutEvaluator:
    """The target and the held-out prompts, loaded on first use (not at all if all is cached)."""

    def __init__(self, config: CompareConfig, heldout: Path):
        self.config = config
        self.heldout = heldout
        self.device = resolve_device(config.mission.device)
        self.dtype = resolve_dtype("auto", self.device)

    @cached_property
    def target(self) -> Any:
        return load_model(self.config.mission.target, self.dtype, self.device)

    @cached_property
    def prompt_ids(self) -> list[list[int]]:
        tokenizer = load_tokenizer(self.config.mission.target)
        return [prompt_token_ids(prompt, tokenizer) for prompt in load_prompts(str(self.heldout))]

    @cached_property
    def eos(self) -> frozenset[int]:
        return eos_token_ids(self.target, load_tokenizer(self.config.mission.target))

    def __call__(self, draft_folder: Path, label: str) -> dict[str, Any]:
        draft = load_model(str(draft_folder), self.dtype, self.device)
        acceptance = evaluate(
            self.target,
            draft,
            self.prompt_ids,
            self.config.num_speculative_tokens,
            self.config.eval_max_new_tokens,
            self.eos,
            label=f"eval {label}",
        )
        return report(
            acceptance,
            k=self.config.num_speculative_tokens,
            target=self.config.mission.target,
            draft=str(draft_folder),
            prompts=str(self.heldout),
            settings={
                "decoding": "greedy",
                "max_new_tokens": self.config.eval_max_new_tokens,
                "dtype": str(self.dtype).removeprefix("torch."),
                "device": str(self.device),
                "torch_threads": torch.get_num_threads(),
            },
        )

    @property
    def inputs(self) -> dict[str, Any]:
        return {
            "target": self.config.mission.target,
            "heldout_sha256": hashlib.sha256(self.heldout.read_bytes()).hexdigest(),
            "k": self.config.num_speculative_tokens,
            "max_new_tokens": self.config.eval_max_new_tokens,
            "dtype": str(self.dtype),
        }


@dataclass(frozen=True)
class ArmResult:
    arm: Arm
    eval: dict[str, Any]
    fit_seconds: float | None
    trainable_params: int | None
    metrics: list[dict[str, Any]]  # per optimiser step: step, loss, lambda, lr

    @property
    def final_loss(self) -> float | None:
        """Mean training loss over the last tenth of the steps (at least one)."""
        if not self.metrics:
            return None
        tail = self.metrics[-max(1, len(self.metrics) // 10) :]
        return sum(record["loss"] for record in tail) / len(tail)


class Comparison:
    """The cached steps of one comparison in a work dir."""

    def __init__(self, config: CompareConfig, log: Log):
        self.config = config
        self.work = WorkDir(config.mission.work_dir, log)
        self.prepared: Prepared = prepare(config.mission, self.work)
        self.evaluator = HeldOutEvaluator(config, self.prepared.heldout_prompts)

    def run_arm(self, arm: Arm) -> ArmResult:
        mission = self.config.mission
        prepared = self.prepared
        fitted = None
        if arm.method is None:
            draft: StepOutcome = prepared.draft_init
        else:
            fit_config = draft_fit_config(
                mission, prepared, arm.name, arm.adapter, arm.lr, heldout=False)
            fitted = fit_step(self.work, arm.name, fit_config, [prepared.draft_init, prepared.data])
            draft = merge_step(self.work, arm.name, fitted)
        report_path = mission.work_dir / "evals" / f"{arm.name}.json"
        self.work.step(
            f"eval-{arm.name}",
            self.evaluator.inputs,
            report_path,
            lambda stale: write_json(report_path, self.evaluator(draft.output, arm.name)),
            after=[draft],
        )
        run_dir = fitted.output.parent if fitted else None
        return ArmResult(
            arm,
            json.loads(report_path.read_text()),
            fitted.seconds if fitted else None,
            _count_parameters(final_path(run_dir)) if run_dir else None,
            [record for record in recover_jsonl(metrics_path(run_dir)) if "kind" not in record]
            if run_dir else [],
        )


def _count_parameters(weights: Path) -> int:
    total = 0
    with safe_open(weights, framework="pt") as handle:
        for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
            total += math.prod(handle.get_slice(name).get_shape())
    return total


@dataclass(frozen=True)
class CompareResult:
    arms: dict[str, ArmResult]
    ablation: list[ArmResult]
    files: list[Path]


def run_compare(config: CompareConfig, log: Log) -> CompareResult:
    comparison = Comparison(config, log)
    arm_results = {label: comparison.run_arm(arm) for label, arm in arms(config).items()}
    ablation = [comparison.run_arm(cell) for cell in ablation_cells(config)]
    files = write_outputs(config, arm_results, ablation)
    return CompareResult(arm_results, ablation, files)


# ---- outputs -------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(
    config: CompareConfig, arms_: dict[str, ArmResult], ablation: list[ArmResult]
) -> str:
    mission = config.mission
    adapter = mission.adapter
    heldout = arms_["untrained"].eval
    lines = [
        f"# Draft training comparison: {mission.target}, {mission.layers}-layer draft",
        "",
        (
            f"Training: {mission.num_prompts} prompts from {', '.join(mission.prompts)} "
            f"(target's greedy responses, ≤ {mission.max_new_tokens} tokens), {mission.steps} "
            f"optimiser steps × batch {mission.batch_size}, seed {mission.seed}; adapters rank "
            f"{adapter.rank}, alpha {adapter.alpha:g} on {_modules(adapter)}. AFA-LoRA arm: "
            f"{adapter.activation}, {adapter.schedule} anneal over the first "
            f"{adapter.anneal_fraction:.0%} of the steps."
        ),
        (
            f"Evaluation: {heldout['num_prompts']} HELD-OUT prompts (not in the training data), "
            f"greedy speculative decoding with the engine's decoder, k = {config.num_speculative_tokens}, "
            f"≤ {config.eval_max_new_tokens} new tokens, {heldout['settings']['dtype']}."
        ),
        "",
        (
            "| arm | trainable params | lr | train loss (last 10%) | τ (mean acceptance length) "
            "| acceptance rate | per position | fit time |"
        ),
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for label, result in arms_.items():
        per_position = " / ".join(f"{p:.2f}" for p in result.eval["acceptance_per_position"])
        lines.append(
            f"| {label} | {result.trainable_params or 0:,} | "
            f"{f'{result.arm.lr:g}' if result.arm.method else '–'} | {_fmt(result.final_loss)} | "
            f"{_fmt(result.eval['mean_acceptance_length'])} | "
            f"{_fmt(result.eval['acceptance_rate'])} | {per_position} | "
            f"{_fmt(result.fit_seconds, 0) + ' s' if result.fit_seconds is not None else '–'} |"
        )
    if ablation:
        lines += [
            "",
            "## AFA-LoRA ablation (same data, steps, rank and held-out prompts)",
            "",
            "| activation | schedule | anneal fraction | train loss (last 10%) | τ | acceptance rate |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for result in sorted(ablation, key=lambda r: -r.eval["mean_acceptance_length"]):
            adapter_ = result.arm.adapter
            assert adapter_ is not None
            lines.append(
                f"| {adapter_.activation} | {adapter_.schedule} | {adapter_.anneal_fraction:g} | "
                f"{_fmt(result.final_loss)} | {_fmt(result.eval['mean_acceptance_length'])} | "
                f"{_fmt(result.eval['acceptance_rate'])} |"
            )
    return "\n".join(lines) + "\n"


def _modules(adapter: AfaLoraConfig) -> str:
    modules = adapter.target_modules
    return modules if isinstance(modules, str) else ", ".join(modules)


def _save_figure(figure: Figure, path: Path) -> None:
    """Figures are drawn off-screen (matplotlib's Agg canvas): no display, no pyplot state."""
    with atomic_file(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120, bbox_inches="tight")


def _moving_average(values: list[float], window: int) -> list[float]:
    return [
        sum(values[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1))
        for i in range(len(values))
    ]


def plot_per_position(arms_: dict[str, ArmResult], k: int, path: Path) -> None:
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    markers = "osD^vx*"
    highest = 0.0
    for index, (label, result) in enumerate(arms_.items()):
        per_position = result.eval["acceptance_per_position"]
        # arms often end level: a small sideways offset and its own marker keep each visible
        positions = [p + 0.06 * (index - (len(arms_) - 1) / 2)
                     for p in range(1, len(per_position) + 1)]
        axes.plot(positions, per_position, marker=markers[index % len(markers)], label=label)
        for x, y in zip(positions, per_position, strict=True):  # staggered: no overlaps
            axes.annotate(f"{y:.3f}", (x, y), textcoords="offset points",
                          xytext=(14, 4 + 9 * index), fontsize=7, color=f"C{index}")
        highest = max(highest, *per_position)
    axes.set_xticks(range(1, k + 1))
    axes.set_xlabel("draft position")
    axes.set_ylabel("share of drafts accepted up to this position")
    axes.set_ylim(0, max(highest * 1.35, 0.05))  # fitted to the data, not to 1
    axes.set_title("Per-position acceptance on held-out prompts")
    axes.legend()
    axes.grid(alpha=0.3)
    _save_figure(figure, path)


def plot_training(arms_: dict[str, ArmResult], ablation: list[ArmResult], path: Path) -> None:
    figure = Figure(figsize=(11, 4))
    loss_axes, lambda_axes = figure.subplots(1, 2)
    for label, result in arms_.items():
        if result.metrics:
            steps = [record["step"] for record in result.metrics]
            losses = [record["loss"] for record in result.metrics]
            loss_axes.plot(steps, _moving_average(losses, 10), label=label)
    loss_axes.set_xlabel("optimiser step")
    loss_axes.set_ylabel("response-token loss (moving average of 10)")
    loss_axes.set_title("Training loss")
    loss_axes.legend()
    loss_axes.grid(alpha=0.3)
    schedules: dict[str, list[dict[str, Any]]] = {}
    for result in [*arms_.values(), *ablation]:
        adapter = result.arm.adapter
        if adapter is not None and result.metrics:
            if adapter.method == "lora":
                name = "lora (λ = 0)"
            else:
                name = f"{adapter.schedule}, {adapter.anneal_fraction:g}"
            schedules.setdefault(name, result.metrics)
    for name, metrics in schedules.items():
        lambda_axes.plot([r["step"] for r in metrics], [r["lambda"] for r in metrics], label=name)
    lambda_axes.set_xlabel("optimiser step")
    lambda_axes.set_ylabel("λ")
    lambda_axes.set_title("AFA-LoRA λ (schedule, anneal fraction)")
    lambda_axes.legend()
    lambda_axes.grid(alpha=0.3)
    _save_figure(figure, path)


def plot_ablation(arms_: dict[str, ArmResult], ablation: list[ArmResult], path: Path) -> None:
    figure = Figure(figsize=(max(6, 0.6 * len(ablation) + 2), 4))
    axes = figure.subplots()
    labels = []
    for result in ablation:
        adapter = result.arm.adapter
        assert adapter is not None
        labels.append(f"{adapter.activation}\n{adapter.schedule}\n{adapter.anneal_fraction:g}")
    taus = [r.eval["mean_acceptance_length"] for r in ablation]
    bars = axes.bar(range(len(ablation)), taus)
    axes.bar_label(bars, fmt="%.3f", fontsize=8)
    references = [arms_[label].eval["mean_acceptance_length"]
                  for label in ("untrained", "lora", "full")]
    for label, style, tau in zip(("untrained", "lora", "full"), (":", "--", "-."), references,
                                 strict=True):
        axes.axhline(tau, linestyle=style, color="k", label=f"{label} {tau:.3f}")
    # τ is at least 1 and the arms differ in the second decimal: fit the axis to the values
    low, high = min(*taus, *references), max(*taus, *references)
    margin = max(0.1 * (high - low), 0.005)
    axes.set_ylim(low - margin, high + 2 * margin)
    axes.set_xticks(range(len(ablation)), labels, fontsize=8)
    axes.set_ylabel("τ on held-out prompts")
    axes.set_title("AFA-LoRA ablation: activation / schedule / anneal fraction")
    axes.legend()
    _save_figure(figure, path)


def write_outputs(
    config: CompareConfig, arms_: dict[str, ArmResult], ablation: list[ArmResult]
) -> list[Path]:
    out = config.out
    table = out / "table.md"
    with atomic_file(table) as temporary:
        temporary.write_text(markdown_table(config, arms_, ablation))
    plot_per_position(arms_, config.num_speculative_tokens, out / "per_position.png")
    plot_training(arms_, ablation, out / "training.png")
    files = [table, out / "per_position.png", out / "training.png"]
    if ablation:
        plot_ablation(arms_, ablation, out / "ablation.png")
        files.append(out / "ablation.png")

    def entry(result: ArmResult) -> dict[str, Any]:
        return {
            "run": result.arm.name,
            "method": result.arm.method or "untrained",
            "adapter": result.arm.adapter.model_dump(mode="json") if result.arm.adapter else None,
            "lr": result.arm.lr if result.arm.method else None,
            "trainable_params": result.trainable_params,
            "final_train_loss": result.final_loss,
            "fit_seconds": result.fit_seconds,
            "eval": result.eval,
        }

    results = out / "results.json"
    write_json(
        results,
        {
            "config": config.model_dump(mode="json"),
            "arms": {label: entry(result) for label, result in arms_.items()},
            "ablation": [entry(result) for result in ablation],
        },
    )
    return [*files, results]
