"""init-draft: a draft made of the target's embeddings, some of its decoder layers, final norm
and head.

Which layers: the first N (`num_layers`, a truncated draft), or any sorted set of them
(`layers`, e.g. (0, 1, 28, 29): a layer-skipping draft keeping early and late layers).

`kind="feature"` writes a feature draft instead (`afa_serve.engine.feature_draft`, EAGLE-1 in
vLLM's format): one layer that reads the target's last hidden state, started from the target's
last layer; the layer settings do not apply to it.

Truncated drafts work for Llama/Qwen2-style HF causal LMs, whose decoder layers are
`model.layers.{i}`: the draft's config is the target's with `num_hidden_layers = len(layers)`
(and per-layer lists such as `layer_types` picked at those layers), the draft's layer i holds
the weights of the target's layer `layers[i]`, and every other draft weight is the target weight
of the same name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)
from transformers import AutoModelForCausalLM, PreTrainedModel

from afa_serve.atomic import atomic_directory
from afa_serve.descriptions import TARGET_HELP
from afa_serve.engine.feature_draft import FeatureDraft
from afa_serve.engine.loading import load_model, load_tokenizer

DraftKind = Literal["truncated", "feature"]
DRAFT_KIND_HELP = ("truncated: the target's embeddings, some of its layers, norm and head; "
                   "feature: one layer reading the target's last hidden state beside the next "
                   "token (EAGLE-1, vLLM's format), trained with the target beside it")

# Config entries that hold one value per decoder layer.
PER_LAYER_CONFIG_FIELDS = ("layer_types", "no_rope_layers")
_LAYER_WEIGHT = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class InitDraftConfig(BaseModel):
    """`num_layers` (the first N layers; 2 when neither is given) or `layers` (those target
    layers, sorted, no repeats), not both."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    target: str = Field(description=TARGET_HELP)
    kind: DraftKind = Field("truncated", description=DRAFT_KIND_HELP)
    num_layers: int | None = Field(2, ge=1, description="Keep the target's first N layers.")
    layers: tuple[int, ...] | None = Field(
        None, description="Or these target layers: 0-based, sorted, comma-separated (0,1,28,29: "
        "a layer-skipping draft; one layer alone: 5,); a bare count N means --num-layers N.")
    out: Path = Field(description="Folder to write the draft to.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Of the saved weights.")
    overwrite: bool = Field(False, description="Replace an existing OUT.")

    @model_validator(mode="before")
    @classmethod
    def _layers_or_num_layers(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("layers"), str | list):
            data = _layers_from_text(data)
        if isinstance(data, dict) and data.get("layers") is not None:
            if data.get("num_layers") is not None:
                raise ValueError("give num_layers (the first N layers) or layers, not both")
            data = {**data, "num_layers": None}
        elif isinstance(data, dict) and "num_layers" in data and data["num_layers"] is None:
            raise ValueError("give num_layers (the first N layers) or layers")
        return data

    @field_validator("layers")
    @classmethod
    def _sorted_unique(cls, layers: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if layers is not None:
            check_layers(layers)
        return layers

    @model_serializer(mode="wrap")
    def _without_unset_layers(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Dumps (the mission's step keys) of count-only configs stay as they were before
        # `layers` existed.
        data = handler(self)
        if self.layers is None:
            data.pop("layers", None)
        if self.kind == "truncated":  # likewise from before `kind`
            data.pop("kind", None)
        else:  # a feature draft has no layer settings: they must not retrain it
            data.pop("num_layers", None)
            data.pop("layers", None)
        return data


def check_layers(layers: Sequence[int], total: int | None = None) -> None:
    """ValueError unless `layers` is a non-empty, strictly increasing list of layer indices
    (below `total`, the target's layer count, when given)."""
    if not layers:
        raise ValueError("layers must name at least one layer")
    if any(isinstance(layer, bool) or not isinstance(layer, int) for layer in layers):
        raise ValueError(f"layers must be whole numbers, got {list(layers)}")
    if list(layers) != sorted(set(layers)):
        raise ValueError(f"layers must be sorted and without repeats, got {list(layers)}")
    if layers[0] < 0 or (total is not None and layers[-1] >= total):
        upper = "" if total is None else f", {total - 1}"
        raise ValueError(
            f"layers must lie in [0{upper}]"
            + ("" if total is None else " for this target")
            + f", got {list(layers)}"
        )


def _layers_from_text(data: dict[str, Any]) -> dict[str, Any]:
    """`layers` as the command line gives it: "2" (a count: the first 2 layers) or "0,1,28,29"
    (layer indices; one alone: "5,")."""
    given = data["layers"]
    if isinstance(given, list) and not all(isinstance(item, str) for item in given):
        return data
    text = given if isinstance(given, str) else ",".join(given)
    if "," in text:
        return {**data, "layers": parse_layers(text)}
    if text.strip().isdigit() and int(text) >= 1:
        return {**data, "layers": None, "num_layers": int(text)}
    raise ValueError(
        f"layers takes a count (2) or comma-separated layer indices (0,1,28,29), not {text!r}"
    )


def parse_layers(text: str) -> tuple[int, ...]:
    """`"0,1,28,29"` → (0, 1, 28, 29) (spaces and a trailing comma allowed)."""
    parts = [part.strip() for part in text.split(",")]
    if parts and parts[-1] == "":
        parts.pop()
    try:
        layers = tuple(int(part) for part in parts)
    except ValueError:
        raise ValueError(
            f"layers must be comma-separated layer indices (e.g. 0,1,28,29), got {text!r}"
        ) from None
    check_layers(layers)
    return layers


def layer_draft(target: PreTrainedModel, layers: Sequence[int]) -> PreTrainedModel:
    """A new model holding copies of the target's weights, its decoder layers `layers[i]` as
    the draft's layers i."""
    total = target.config.num_hidden_layers
    layers = tuple(layers)
    check_layers(layers, total)
    config_dict = target.config.to_dict()
    config_dict["num_hidden_layers"] = len(layers)
    for key in PER_LAYER_CONFIG_FIELDS:
        values = config_dict.get(key)
        if isinstance(values, list) and len(values) == total:
            config_dict[key] = [values[layer] for layer in layers]
    config = type(target.config).from_dict(config_dict)
    draft = AutoModelForCausalLM.from_config(config, dtype=target.dtype)
    target_state = target.state_dict()
    sources = {name: _target_weight_name(name, layers) for name in draft.state_dict()}
    missing = [name for name in sources.values() if name not in target_state]
    if missing:
        raise ValueError(
            f"cannot build a draft of {type(target).__name__}: the target has no weights named "
            f"{missing[:5]} (only Llama/Qwen2-style models are supported)"
        )
    draft.load_state_dict(
        {name: target_state[source] for name, source in sources.items()}, strict=True
    )
    draft.generation_config = target.generation_config
    return draft.eval()


def _target_weight_name(draft_name: str, layers: tuple[int, ...]) -> str:
    match = _LAYER_WEIGHT.match(draft_name)
    if match is None:
        return draft_name
    return f"model.layers.{layers[int(match.group(1))]}.{match.group(2)}"


def truncated_draft(target: PreTrainedModel, num_layers: int) -> PreTrainedModel:
    """A new model holding copies of the target's weights for its first `num_layers` layers."""
    total = target.config.num_hidden_layers
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_layers must lie in [1, {total}] for this target, got {num_layers}")
    return layer_draft(target, range(num_layers))


def init_draft(config: InitDraftConfig) -> Path:
    """Write the draft as a dense HF folder with tokenizer and generation config."""
    target = load_model(config.target, getattr(torch, config.dtype), torch.device("cpu"))
    if config.kind == "feature":
        with atomic_directory(config.out, overwrite=config.overwrite) as folder:
            FeatureDraft.from_target(target).save(folder)
        return config.out
    tokenizer = load_tokenizer(config.target)
    if config.layers is not None:
        draft = layer_draft(target, config.layers)
    else:
        assert config.num_layers is not None
        draft = truncated_draft(target, config.num_layers)
    with atomic_directory(config.out, overwrite=config.overwrite) as folder:
        draft.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return config.out
