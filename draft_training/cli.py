"""`afa-train`: train a draft model the target accepts more often, and hand it over as a plain
checkpoint. Each command's options are its config model's fields (`afa_serve.config_cli`); the
command calls one function and prints what came of it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import torch
import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.table import Table

from afa_serve.atomic import write_json
from afa_serve.config_cli import Handler, config_command, validation_message
from draft_training.compare import CompareConfig, run_compare
from draft_training.evaluate import EvalConfig, evaluate_config
from draft_training.fit import fit as fit_training
from draft_training.fit import resume
from draft_training.generate import GenerateConfig, generate_responses
from draft_training.init_draft import InitDraftConfig, init_draft
from draft_training.merge import merge_run
from draft_training.pipeline import MissionConfig, run_mission
from draft_training.run import FitConfig, config_path, read_config
from draft_training.score import ScoreConfig, score_replies
from draft_training.trim_vocab import DEFAULT_ROWS, trim_vocabulary

app = typer.Typer(
    help=(
        "Train a speculative-decoding draft (in full, or with an AFA-LoRA or LoRA adapter) and "
        "ship it as a dense checkpoint.\n\n"
        "The whole pipeline in one command:  afa-train mission  (prints the trained draft's "
        "folder; serve it with  afa-serve serve --draft FOLDER).\n\n"
        "Step by step:  init-draft → generate → fit → merge → eval.  A draft learns to predict "
        "the target's own responses, so `generate` asks the target and `fit` trains on its "
        "answers. `compare` sets AFA-LoRA against LoRA, full fine-tuning and the untrained draft."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
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
    except ValidationError as error:
        _stderr.print(f"error: {validation_message(error)}", soft_wrap=True)
        raise typer.Exit(1) from None
    except (ValueError, FileExistsError, FileNotFoundError) as error:
        _stderr.print(f"error: {error}", soft_wrap=True)
        raise typer.Exit(1) from None


def command(model: type[BaseModel], name: str | None = None) -> Callable[[Handler], Handler]:
    """A command taking its options from `model`, reporting a refused config as afa-train does."""
    return config_command(app, model, name=name, errors=_user_errors)


@app.callback()
def main(
    threads: Annotated[int | None, typer.Option(
        min=1, help="CPU threads for torch (default: torch's, one per core). On a machine "
        "shared with other jobs, 1 can be much faster than spinning on busy cores.")] = None,
) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


@command(InitDraftConfig, name="init-draft")
def init_draft_command(config: InitDraftConfig) -> None:
    """Make a draft from the target itself: its embeddings, some of its decoder layers (the
    first --num-layers, or the listed --layers), final norm and head (for when no small sibling
    model with the same tokenizer exists).

    Any HF causal LM with the target's tokenizer can be a draft too; then skip this step.
    """
    with _user_errors():
        typer.echo(init_draft(config))


@command(GenerateConfig)
def generate(config: GenerateConfig) -> None:
    """Record the target's own responses to a prompt set: the data a draft learns from.

    Rerun the same command after an interruption: prompts already answered in OUT are skipped
    (and with --max-minutes the time already spent counts).
    With --top-k-logprobs K (default 20) the target's top-K log-probabilities of every response
    token go to OUT's .topk/ folder (data.jsonl -> data.topk/), for distillation. On a CPU
    with bfloat16 instructions (AVX512-BF16, AMX) --dtype bfloat16 runs about twice as fast as
    the default float32 (elsewhere it is emulated, and slower), but its greedy tokens then
    depend on the batch a prompt lands in; float32 gives the same tokens whatever the batch.
    """
    with _user_errors():
        summary = generate_responses(config)
    rate = summary.new_tokens / summary.seconds if summary.seconds else 0.0
    left = summary.prompts - summary.already_done - summary.generated
    out_of_time = (f"; {left} left unanswered: --max-minutes {config.max_minutes:g} spent"
                   if summary.out_of_time else "")
    _log(
        f"{summary.generated} responses generated ({summary.new_tokens} tokens, "
        f"{rate:.1f} tok/s), {summary.already_done} already done, of {summary.prompts}"
        f"{out_of_time}"
    )
    typer.echo(summary.out)


@command(ScoreConfig)
def score(config: ScoreConfig) -> None:
    """Have the target score replies it did not write (ChatGPT's, from ShareGPT): more data
    for a draft, several times cheaper per token than `generate`.

    One teacher-forced pass per batch records the target's argmax (what the draft is trained to
    predict there) and top-K log-probabilities at every reply token. Pass OUT to `fit
    --scored-data` beside the target's own responses. Rerun the same command after an
    interruption: replies already scored in OUT are skipped.
    """
    with _user_errors():
        summary = score_replies(config)
    rate = summary.tokens / summary.seconds if summary.seconds else 0.0
    _log(f"{summary.scored} replies scored ({summary.tokens} tokens, {rate:.1f} tok/s), "
         f"{summary.already_done} already done, of {summary.wanted}")
    typer.echo(summary.out)


@command(FitConfig)
def fit(
    config: FitConfig,
    resume_run: Annotated[bool, typer.Option(
        "--resume/--no-resume", help="If OUT already holds a run, continue it from its last "
        "checkpoint (with the settings it was started with) instead of refusing.")] = False,
) -> None:
    """Train a draft on the target's responses: next-token loss on the response tokens only.

    Where DATA stores the target's top-K log-probs, the loss adds --kl-weight times the KL
    from the target's top-K distribution. A progress bar shows the loss, λ and the latest
    held-out τ and α; checkpoints are written atomically every --checkpoint-every steps, so a
    killed run continues with --resume (or `afa-train resume`). It trains on one device.
    """
    with _user_errors():
        if resume_run and config_path(config.out).exists():
            _log(f"resuming the run in {config.out} with the settings it was started with")
            result = resume(config.out)
        else:
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


@app.command("trim-vocab")
def trim_vocab(
    draft: Annotated[Path, typer.Argument(help="A merged draft folder (with draft_vocab.json).")],
    out: Annotated[Path, typer.Option(help="Folder for the trimmed draft.")],
    rows: Annotated[int, typer.Option(min=2, help="Tokens the trimmed draft keeps.")] = DEFAULT_ROWS,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT.")] = False,
) -> None:
    """Write the draft with a vocabulary of its own, for vLLM: its special tokens and the
    target's most frequent response tokens, embedding and head cut to those rows, a
    word-level tokenizer over them. afa-serve's vLLM engine (and vLLM's own server with
    use_heterogeneous_vocab) maps it to the target's vocabulary, so the draft scores ROWS
    tokens, not the whole vocabulary. The torch engine takes the dense draft instead
    (--draft-vocab-size).
    """
    with _user_errors():
        report = trim_vocabulary(draft, rows, out, overwrite=overwrite)
    _log(f"trimmed to {report.rows} tokens, {report.coverage:.1%} of the counted response tokens")
    typer.echo(report.out)


@command(EvalConfig, name="eval")
def eval_command(
    config: EvalConfig,
    out: Annotated[Path | None, typer.Option(help="Write the JSON report here.")] = None,
) -> None:
    """Measure how much of the draft the target accepts, with the engine's own speculative
    decoder (greedy): mean acceptance length τ (tokens per target forward), acceptance rate and
    acceptance per draft position."""
    with _user_errors():
        result = evaluate_config(config)
    if out is not None:
        write_json(out, result)
    table = Table(title=f"{config.draft} drafting for {config.target}, "
                        f"k = {config.num_speculative_tokens}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("prompts", str(result["num_prompts"]))
    table.add_row("mean acceptance length τ", f"{result['mean_acceptance_length']:.3f}")
    table.add_row("acceptance rate", f"{result['acceptance_rate']:.3f}")
    table.add_row("acceptance per position",
                  " ".join(f"{p:.2f}" for p in result["acceptance_per_position"]))
    _stderr.print(table)
    if out is not None:
        typer.echo(out)


@command(MissionConfig)
def mission(config: MissionConfig) -> None:
    """The whole pipeline: pull the target → choose prompts (training / held-out) →
    init-draft → generate the target's responses (with its top-k log-probabilities) → fit
    (every weight but the input embeddings by default, or an adapter: --method afa-lora /
    lora; cross-entropy + KL, best held-out checkpoint) → merge (→ trim-vocab, the draft for
    vLLM). Prints the merged draft's folder as its last line.

    Every step is cached in WORK-DIR: run it again and it returns at once; change a setting and
    only the steps that depend on it run again; a killed run resumes. At its defaults it takes
    17–25 minutes on 2 CPU cores with native bfloat16 from an empty work folder, and about 30 at
    most on slower ones, where answering stops after 13 minutes (README). Then serve:
    afa-serve serve --draft "$(afa-train mission | tail -n 1)"
    """
    with _user_errors():
        result = run_mission(config, _log)
    total = sum(step.seconds for step in result.steps if step.ran)
    on_vllm = (f"\non vLLM: afa-serve serve --engine vllm --target {config.target} --draft "
               f"{result.vllm_draft}" if result.vllm_draft is not None else "")
    _log(
        f"mission done ({total:.0f} s of steps run now); held-out prompts: "
        f"{result.heldout_prompts}\nserve it: afa-serve serve --target {config.target} --draft "
        f"{result.draft}{on_vllm}"
    )
    typer.echo(result.draft)


@command(CompareConfig)
def compare(config: CompareConfig) -> None:
    """Train untrained / LoRA / AFA-LoRA / full-fine-tuning drafts on the same data, steps and
    rank, evaluate each on held-out prompts, and ablate AFA-LoRA over activation × schedule ×
    anneal fraction. Writes OUT/table.md, OUT/results.json and PNG plots (per-position
    acceptance, loss and λ curves, ablation).

    Shares WORK-DIR with `mission` (same data, cached steps): an interrupted comparison
    continues where it stopped, and a bigger grid reuses the cells already done.
    """
    with _user_errors():
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
