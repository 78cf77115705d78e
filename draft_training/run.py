"""A training run: its config, its folder's layout, and the model it trains.

    RUN/config.json        the FitConfig
    RUN/metrics.jsonl      one line per optimiser step: step (from 0), loss, lambda, lr (and
                           ce, kl when distilling); with held-out data also one line per
                           evaluation, marked "kind": "eval": step (the optimiser step after
                           which it ran), lambda, alpha, tau, acceptance_per_position,
                           num_tokens, k, eligible, best. Readers of the step records skip
                           lines that have a "kind".
    RUN/checkpoint.pt      latest periodic checkpoint (trainable weights, optimiser, scheduler,
                           completed steps, RNG state, λ, best-so-far held-out weights and
                           score, evaluations since the best); removed once the run is final
    RUN/best.safetensors   with held-out data: the trainable weights of the best evaluation so
                           far by implied τ(4) (metadata: completed steps, lambda, tau, alpha)
    RUN/final.safetensors  the run's weights (metadata: completed steps, lambda, trained_steps,
                           and tau, alpha, stopped_early when chosen by held-out evaluation)

λ recorded with weights is the λ of the last optimiser step that produced them: the λ at which
those weights compute what they were trained to compute.

Best weights and the end of a run. Without `heldout_data`, final.safetensors holds the weights
of the last step. With it, the draft is evaluated on the held-out records every `eval_every`
optimiser steps and after the last one (teacher-forced agreement, `agreement.py`); only an
evaluation of weights trained at λ = 0 is *eligible* (AFA-LoRA weights before the end of
annealing cannot be merged), so during annealing evaluations are logged but neither kept nor
counted. The eligible evaluation with the highest τ (the earliest on a tie) is kept in
best.safetensors; once `patience` eligible evaluations in a row fail to beat it, the run stops
early, but never before `min_steps` optimiser steps (the first evaluations are noisy: one lucky
early τ would otherwise end a run that is still rising). However the run ends,
final.safetensors is written from the best weights: its `step` is the completed-step count of
those weights (≤ `trained_steps`), so `merge`, `eval` and `resume` (which leaves a final run as
it is) all work on the best weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from afa_serve.atomic import atomic_file, write_json
from afa_serve.engine.feature_draft import is_feature_draft
from afa_serve.engine.loading import resolve_device
from afa_serve.models.resolve import resolve_model
from draft_training.afa_lora import (
    AfaLoraConfig,
    Method,
    full_means_no_adapter,
    inject,
    set_lambda,
)
from draft_training.feature_training import FeatureDraftLM, build_feature_draft_lm

DRAFTED_POSITION_DECAY = 0.8  # weight ratio of successive drafted positions (EAGLE-3's)
DRAFTED_POSITIONS_HELP = (
    "Feature drafts: train drafted positions 1..N, position p > 1 reading the draft's own "
    "predicted feature as serving does (EAGLE-3's training-time test), over the rows a decoder "
    "drafts from as that position; position p's loss is weighted "
    f"{DRAFTED_POSITION_DECAY}^(p − 1). 1: the target's features only (EAGLE-1).")


FREEZE_INPUT_EMBEDDINGS_HELP = (
    "Full fine-tuning: keep the input embeddings as the initial draft has them and train the "
    "head as a copy of its own (a tied head is untied).")


class FitConfig(BaseModel):
    """Everything a run depends on. `adapter=None` means full fine-tuning of the draft."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    draft: str = Field(description="The draft to train (folder or model name).")
    target: str | None = Field(
        None, description="The target whose last hidden states a feature draft reads "
        "(`init-draft --kind feature`); other drafts need none.")
    data: Path = Field(description="JSONL written by `afa-train generate`.")
    scored_data: Path | None = Field(
        None, description="JSONL written by `afa-train score` (replies the target scored but "
        "did not write), trained on beside DATA: each position learns the target's argmax.")
    out: Path = Field(description="Run folder: config, metrics, checkpoints, weights.")
    adapter: AfaLoraConfig | None = AfaLoraConfig()
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW, cosine decay).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Optimiser steps of linear warm-up.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradients are clipped to this norm.")
    epochs: int = Field(1, ge=1, description="Passes over the data (unless --max-steps).")
    max_steps: int | None = Field(
        None, ge=1, description="Optimiser steps to run, whatever the epochs.")
    batch_size: int = Field(8, ge=1, description="Examples per micro-batch.")
    grad_accum: int = Field(
        1, ge=1, description="Micro-batches per optimiser step (λ counts optimiser steps).")
    max_length: int = Field(512, ge=2, description="Tokens per example, prompt included.")
    seed: int = Field(0, description="Seed of initialisation and data order.")
    checkpoint_every: int = Field(50, ge=1, description="Optimiser steps between checkpoints.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA if present.")
    ce_weight: float = Field(
        1.0, ge=0, description="Weight of the cross-entropy on the target's tokens.")
    kl_weight: float = Field(
        1.0, ge=0, description="Weight of KL(target top-K ‖ draft), where the data stores the "
        "target's top-K log-probs (generate --top-k-logprobs); data without them trains on "
        "cross-entropy alone.")
    feature_weight: float = Field(
        0.0, ge=0, description="Feature drafts: weight of EAGLE's regression term, the "
        "smooth-L1 from the draft's predicted feature to the target's at each response token "
        "(averaged over the hidden size).")
    drafted_positions: int = Field(1, ge=1, le=8, description=DRAFTED_POSITIONS_HELP)
    freeze_input_embeddings: bool = Field(False, description=FREEZE_INPUT_EMBEDDINGS_HELP)
    head_rows: int = Field(
        0, ge=0, description="Train the head over the N tokens most frequent in DATA's "
        "responses only, the rows the engines' trimmed heads serve (8192: vLLM's trim-vocab; "
        "the torch engine serves the first 4096): about half a 2-layer draft's step on CPU. "
        "0: the whole vocabulary.")
    length_bucketing: bool = Field(
        True, description="Batch examples of similar length together (less padding); a "
        "function of the seed like the order.")
    autocast: Literal["auto", "off", "bfloat16"] = Field(
        "auto", description="Mixed precision. auto: bfloat16 on CUDA and on CPUs with native "
        "bfloat16 (AVX512-BF16/AMX, measured faster), else float32.")
    heldout_data: Path | None = Field(
        None, description="JSONL from `afa-train generate` on prompts never trained on: the "
        "draft's agreement with it is measured every --eval-every steps, and the best weights "
        "(by implied τ) become the run's final weights.")
    eval_every: int = Field(50, ge=1, description="Optimiser steps between held-out evaluations.")
    patience: int | None = Field(
        None, ge=1, description="Stop after this many held-out evaluations (at λ = 0) without a "
        "better τ (default: never stop early).")
    min_steps: int = Field(
        0, ge=0, description="Never stop early before this many optimiser steps (the earlier "
        "evaluations still count towards --patience and the best weights).")

    @model_validator(mode="before")
    @classmethod
    def _full_has_no_adapter(cls, data: Any) -> Any:
        return full_means_no_adapter(data)

    @model_validator(mode="after")
    def _losses_and_method_agree(self) -> FitConfig:
        if self.ce_weight == 0 and self.kl_weight == 0:
            raise ValueError("ce_weight and kl_weight are both 0: nothing to train on")
        if self.freeze_input_embeddings and self.adapter is not None:
            raise ValueError("an adapter leaves the embeddings frozen already: "
                             "--freeze-input-embeddings is for --method full")
        return self

    @property
    def method(self) -> Method:
        return "full" if self.adapter is None else self.adapter.method

    @model_serializer(mode="wrap")
    def _without_unset_settings(
        self, handler: SerializerFunctionWrapHandler
    ) -> dict[str, Any]:
        # the mission's step keys stay as they were before `target`, `feature_weight`,
        # `scored_data`, `head_rows`, `drafted_positions`, `freeze_input_embeddings` and
        # `min_steps` existed
        data = handler(self)
        if self.target is None:
            data.pop("target", None)
        if self.feature_weight == 0:
            data.pop("feature_weight", None)
        if self.scored_data is None:
            data.pop("scored_data", None)
        if self.head_rows == 0:
            data.pop("head_rows", None)
        if self.min_steps == 0:
            data.pop("min_steps", None)
        if not self.freeze_input_embeddings:
            data.pop("freeze_input_embeddings", None)
        if self.drafted_positions == 1:
            data.pop("drafted_positions", None)
        return data


def config_path(run_dir: Path) -> Path:
    return run_dir / "config.json"


def metrics_path(run_dir: Path) -> Path:
    return run_dir / "metrics.jsonl"


def checkpoint_path(run_dir: Path) -> Path:
    return run_dir / "checkpoint.pt"


def final_path(run_dir: Path) -> Path:
    return run_dir / "final.safetensors"


def best_path(run_dir: Path) -> Path:
    return run_dir / "best.safetensors"


def write_config(config: FitConfig) -> None:
    write_json(config_path(config.out), config.model_dump(mode="json"))


def read_config(run_dir: Path) -> FitConfig:
    path = config_path(run_dir)
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a training run: it has no config.json")
    recorded = json.loads(path.read_text())
    adapter = recorded.get("adapter")
    if adapter is not None:  # runs recorded before modules_to_save existed trained none
        adapter.setdefault("modules_to_save", [])
    # runs recorded before these settings trained as they would without them: no length
    # bucketing, bfloat16 autocast on CUDA only
    recorded.setdefault("length_bucketing", False)
    if "autocast" not in recorded:
        device = resolve_device(recorded.get("device", "auto"))
        recorded["autocast"] = "bfloat16" if device.type == "cuda" else "off"
    return FitConfig.model_validate(recorded)


def build_model(config: FitConfig) -> PreTrainedModel | FeatureDraftLM:
    """The draft in float32 on CPU, with the adapter injected (or all weights trainable); a
    feature draft trains in full beside its frozen target."""
    if is_feature_draft(Path(resolve_model(config.draft))):
        if config.target is None:
            raise ValueError(f"{config.draft} is a feature draft: it needs --target")
        if config.adapter is not None:
            raise ValueError("a feature draft (5 M parameters) trains in full: --method full")
        if config.freeze_input_embeddings:
            raise ValueError("a feature draft's embeddings are its target's, never trained: "
                             "drop --freeze-input-embeddings")
        return build_feature_draft_lm(config.draft, config.target)
    if config.target is not None or config.feature_weight > 0 or config.drafted_positions > 1:
        raise ValueError(f"{config.draft} is not a feature draft: it reads no target (drop "
                         f"--target, --feature-weight and --drafted-positions)")
    model = AutoModelForCausalLM.from_pretrained(resolve_model(config.draft), dtype=torch.float32)
    if config.adapter is None:
        model.requires_grad_(True)
        if config.freeze_input_embeddings:
            untie_head(model)
            model.get_input_embeddings().requires_grad_(False)
    else:
        inject(model, config.adapter)
    return model


def untie_head(model: PreTrainedModel) -> None:
    """Give the head weights of its own, a copy of the input embeddings it was tied to."""
    head = model.get_output_embeddings()
    if head.weight is model.get_input_embeddings().weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable weights, by parameter name (tied weights once)."""
    return {
        name: parameter.detach().to("cpu", copy=True).contiguous()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    parameters = dict(model.named_parameters())
    unknown = sorted(name for name in state if name not in parameters)
    if unknown:
        raise ValueError(f"trained weights do not fit this model: unknown names {unknown[:5]}")
    with torch.no_grad():
        for name, tensor in state.items():
            parameters[name].copy_(tensor)


@dataclass(frozen=True)
class TrainedWeights:
    state: dict[str, torch.Tensor]
    step: int
    lam: float
    final: bool


def save_weights(
    path: Path,
    state: dict[str, torch.Tensor],
    step: int,
    lam: float,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write trainable weights atomically with their completed steps and λ (and `metadata`)."""
    with atomic_file(path) as temporary:
        save_file(
            state, temporary, metadata={**(metadata or {}), "step": str(step), "lambda": repr(lam)}
        )


def save_final(
    run_dir: Path,
    state: dict[str, torch.Tensor],
    step: int,
    lam: float,
    metadata: dict[str, str] | None = None,
) -> None:
    save_weights(final_path(run_dir), state, step, lam, metadata)


def weights_metadata(path: Path) -> dict[str, str]:
    with safe_open(path, framework="pt") as handle:
        return handle.metadata() or {}


def load_trained_weights(run_dir: Path) -> TrainedWeights:
    """The final weights if the run finished, else those of its latest checkpoint."""
    final = final_path(run_dir)
    if final.exists():
        with safe_open(final, framework="pt") as handle:
            metadata = handle.metadata()
        return TrainedWeights(
            load_file(final), int(metadata["step"]), float(metadata["lambda"]), final=True
        )
    checkpoint = checkpoint_path(run_dir)
    if checkpoint.exists():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        return TrainedWeights(saved["trainable"], saved["step"], saved["lambda"], final=False)
    raise FileNotFoundError(
        f"{run_dir} holds no trained weights yet (no final state, no checkpoint)"
    )


def trained_model(run_dir: Path) -> tuple[PreTrainedModel, TrainedWeights]:
    """The run's draft with its trained weights loaded and λ set as trained."""
    config = read_config(run_dir)
    weights = load_trained_weights(run_dir)
    model = build_model(config)
    load_trainable_state(model, weights.state)
    set_lambda(model, weights.lam)
    return model.eval(), weights
