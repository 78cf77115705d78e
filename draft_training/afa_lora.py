"""AFA-LoRA: a LoRA branch with an annealed activation between A and B (arXiv 2512.22455).

    h = W0·x + s·B·σ_λ(A·x),   σ_λ(z) = λ·f(z) + (1 − λ)·z,   s = alpha / rank

f is relu, silu or gelu; λ falls from 1 to exactly 0 during training (see `schedule.py`). At
λ = 0, σ is the identity, the branch is linear and merges exactly into the dense weight
W0 + s·B·A, so the trained draft ships as a plain HF checkpoint. Plain LoRA is the same layer
with λ held at 0 from the start: "AFA-LoRA at λ = 0 equals LoRA with the same weights" holds
by construction and is tested.

Why a small standalone module and not a PEFT LoRA variant: PEFT's `LoraVariant` hooks
(`peft/tuners/lora/layer.py`) are documented there as private and "prone to change"; plugging
one in needs a `LoraConfig` subclass with a field tagged `is_lora_variant`, a `lora.Linear`
subclass declaring `lora_variants`, a custom-module registration, and λ still has to live
outside PEFT's config as mutable per-layer state that PEFT's merge knows nothing of. That is
more code than the layer itself, tied to one PEFT minor version. This module keeps PEFT's
conventions instead: a config with `rank`, `alpha`, `dropout` and `target_modules` matched as
PEFT does (exact name or `.name` suffix, or `"all-linear"`), `lora_A`/`lora_B` sub-layers, A
kaiming-uniform(a=√5) and B zero as in PEFT, the base layer frozen, and a merge that is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from afa_serve.config_cli import comma_separated
from draft_training.schedule import ScheduleKind, lambda_at

ActivationName = Literal["relu", "silu", "gelu"]
Method = Literal["afa-lora", "lora", "full"]  # full: every weight trained, no adapter

ACTIVATIONS: dict[ActivationName, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "silu": F.silu,
    "gelu": F.gelu,
}

ATTENTION_AND_MLP = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# A truncated draft feeds its 2nd layer's hidden state to a final norm tuned for the 30th: the
# norm weights (576 numbers each in SmolLM2) are trained in full, as PEFT's `modules_to_save`.
NORMS = ("input_layernorm", "post_attention_layernorm", "norm")


class AfaLoraConfig(BaseModel):
    """What to adapt and how; `method="lora"` is the same adapter with λ held at 0."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Method = Field(
        "afa-lora", description="afa-lora: LoRA with an activation annealed away; lora: plain "
        "LoRA (λ = 0 throughout); full: train every weight of the draft, no adapter.")
    rank: int = Field(16, ge=1, description="Adapter rank r.")
    alpha: float = Field(32.0, gt=0, description="The branch is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout before A.")
    target_modules: comma_separated(str) | Literal["all-linear"] = Field(
        ATTENTION_AND_MLP, description="Modules to adapt, matched as PEFT does (exact or "
        "`.name` suffix), or all-linear.")
    modules_to_save: comma_separated(str) = Field(
        NORMS, description="Modules trained in full beside the adapter (PEFT's modules_to_save; "
        '"" for none): by default the RMSNorm weights, which a truncated draft needs retuned.')
    activation: ActivationName = Field(
        "relu", description="AFA-LoRA: f in σ_λ(z) = λ·f(z) + (1 − λ)·z, between A and B.")
    schedule: ScheduleKind = Field("linear", description="AFA-LoRA: how λ falls from 1 to 0.")
    anneal_fraction: float = Field(
        0.3, ge=0.0, le=1.0, description="AFA-LoRA: share of the optimiser steps over which λ "
        "reaches exactly 0; it stays 0 after, so the adapter ends linear and merges exactly.")

    @field_validator("method")
    @classmethod
    def _has_an_adapter(cls, method: Method) -> Method:
        if method == "full":
            raise ValueError("full fine-tuning trains every weight: it has no adapter settings")
        return method

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def lambda_at(self, step: int, total_steps: int) -> float:
        """λ for optimiser step `step` of `total_steps`; always 0.0 for plain LoRA."""
        if self.method == "lora":
            return 0.0
        return lambda_at(step, total_steps, self.anneal_fraction, self.schedule)


def full_means_no_adapter(data: Any) -> Any:
    """A config's raw values with `adapter.method = "full"` (as `--method full` gives it)
    turned into no adapter (`adapter=None`): full fine-tuning. For configs' before-validators."""
    adapter = data.get("adapter") if isinstance(data, dict) else None
    if isinstance(adapter, dict) and adapter.get("method") == "full":
        return {**data, "adapter": None}
    return data


def annealed_activation(
    z: torch.Tensor, lam: float, f: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """σ_λ(z) = λ·f(z) + (1 − λ)·z, returning z itself at λ = 0 (exactly the identity)."""
    if lam == 0.0:
        return z
    return lam * f(z) + (1.0 - lam) * z


class AfaLoraLinear(nn.Module):
    """A frozen `nn.Linear` plus the branch s·B·σ_λ(A·dropout(x))."""

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        activation: ActivationName,
        dropout: float,
        lam: float,
    ):
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / rank
        self.activation_name = activation
        self.activation = ACTIVATIONS[activation]
        self.lam = lam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.lora_A(self.lora_dropout(x))
        z = annealed_activation(z, self.lam, self.activation)
        return self.base_layer(x) + self.lora_B(z) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """s·B·A in float32: what the branch adds to W0 once λ = 0."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged(self) -> nn.Linear:
        """A dense `nn.Linear` computing what this layer computes; only defined at λ = 0."""
        if self.lam != 0.0:
            raise ValueError(f"cannot merge an AFA-LoRA layer at λ = {self.lam}: σ is not linear")
        base = self.base_layer
        dense = nn.Linear(
            base.in_features,
            base.out_features,
            bias=base.bias is not None,
            device=base.weight.device,
            dtype=base.weight.dtype,
        )
        with torch.no_grad():
            dense.weight.copy_((base.weight.float() + self.delta_weight()).to(base.weight.dtype))
            if base.bias is not None:
                dense.bias.copy_(base.bias)
        return dense

    def extra_repr(self) -> str:
        return (
            f"rank={self.lora_A.out_features}, scaling={self.scaling:g}, "
            f"activation={self.activation_name}, lam={self.lam:g}"
        )


def _output_layer(model: nn.Module) -> nn.Module | None:
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def _target_names(model: nn.Module, target_modules: tuple[str, ...] | str) -> list[str]:
    """Names of the modules to wrap, matched as PEFT matches `target_modules`."""
    if target_modules == "all-linear":
        output_layer = _output_layer(model)
        return [
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module is not output_layer
        ]
    names = _matching(model, target_modules)
    if not names:
        raise ValueError(f"no module of the model matches target_modules {list(target_modules)}")
    return names


def _matching(model: nn.Module, keys: tuple[str, ...]) -> list[str]:
    """Names of the modules whose name is a key or ends in `.key`, as PEFT matches them."""
    return [
        name
        for name, _ in model.named_modules()
        if any(name == key or name.endswith(f".{key}") for key in keys)
    ]


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, new)


def inject(model: nn.Module, config: AfaLoraConfig) -> list[AfaLoraLinear]:
    """Freeze `model` but its `modules_to_save`, and wrap its target linear layers in place;
    returns the wrapped layers.

    λ starts at 1.0 for AFA-LoRA (λ of step 0; B = 0 makes the start exact either way) and at
    0.0 for plain LoRA.
    """
    model.requires_grad_(False)
    for name in _matching(model, config.modules_to_save):
        model.get_submodule(name).requires_grad_(True)
    initial_lambda = config.lambda_at(0, total_steps=1)
    wrapped: list[AfaLoraLinear] = []
    for name in _target_names(model, config.target_modules):
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise TypeError(
                f"target module {name!r} is a {type(module).__name__}, only nn.Linear is supported"
            )
        layer = AfaLoraLinear(
            module, config.rank, config.alpha, config.activation, config.dropout, initial_lambda
        ).train(module.training)
        _replace_module(model, name, layer)
        wrapped.append(layer)
    return wrapped


def adapter_layers(model: nn.Module) -> list[AfaLoraLinear]:
    return [module for module in model.modules() if isinstance(module, AfaLoraLinear)]


def set_lambda(model: nn.Module, lam: float) -> None:
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"λ must lie in [0, 1], got {lam}")
    for layer in adapter_layers(model):
        layer.lam = lam


def merge(model: nn.Module) -> nn.Module:
    """Replace every AFA-LoRA layer by its dense merge, in place; refuses while any λ > 0.

    If the merged layers include the output embeddings and those were tied to the input
    embeddings, the tie is dropped from the config: the head now differs from the embeddings.
    """
    layers = {
        name: module for name, module in model.named_modules() if isinstance(module, AfaLoraLinear)
    }
    annealing = sorted({layer.lam for layer in layers.values() if layer.lam != 0.0})
    if annealing:
        raise ValueError(
            f"refusing to merge: λ is still {annealing[-1]:g} (> 0), so the adapter is not linear "
            "yet; train until the end of annealing first"
        )
    output_layer = _output_layer(model)
    for name, layer in layers.items():
        _replace_module(model, name, layer.merged())
        if layer is output_layer and getattr(model.config, "tie_word_embeddings", False):
            model.config.tie_word_embeddings = False
    return model
