"""A training run: its config, its folder's layout, and the model it trains.

    RUN/config.json        the FitConfig
    RUN/metrics.jsonl      one line per optimiser step: step (from 0), loss, lambda, lr
    RUN/checkpoint.pt      latest periodic checkpoint (trainable weights, optimiser, scheduler,
                           completed steps, RNG state, λ); removed once the run is final
    RUN/final.safetensors  the trained weights (metadata: completed steps, lambda)

λ recorded with weights is the λ of the last optimiser step that produced them: the λ at which
those weights compute what they were trained to compute.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from afa_serve.models.resolve import resolve_model
from draft_training.afa_lora import AfaLoraConfig, inject, set_lambda
from draft_training.atomic import atomic_file, write_json

Method = Literal["afa-lora", "lora", "full"]


class FitConfig(BaseModel):
    """Everything a run depends on. `adapter=None` means full fine-tuning of the draft."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    draft: str
    data: Path
    out: Path
    adapter: AfaLoraConfig | None = AfaLoraConfig()
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(512, ge=2)
    seed: int = 0
    checkpoint_every: int = Field(50, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @property
    def method(self) -> Method:
        return "full" if self.adapter is None else self.adapter.method


def config_path(run_dir: Path) -> Path:
    return run_dir / "config.json"


def metrics_path(run_dir: Path) -> Path:
    return run_dir / "metrics.jsonl"


def checkpoint_path(run_dir: Path) -> Path:
    return run_dir / "checkpoint.pt"


def final_path(run_dir: Path) -> Path:
    return run_dir / "final.safetensors"


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
    return FitConfig.model_validate(recorded)


def build_model(config: FitConfig) -> PreTrainedModel:
    """The draft in float32 on CPU, with the adapter injected (or all weights trainable)."""
    model = AutoModelForCausalLM.from_pretrained(resolve_model(config.draft), dtype=torch.float32)
    if config.adapter is None:
        model.requires_grad_(True)
    else:
        inject(model, config.adapter)
    return model


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


def save_final(run_dir: Path, state: dict[str, torch.Tensor], step: int, lam: float) -> None:
    with atomic_file(final_path(run_dir)) as temporary:
        save_file(state, temporary, metadata={"step": str(step), "lambda": repr(lam)})


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
