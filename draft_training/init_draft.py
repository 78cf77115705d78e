"""init-draft: a draft made of the target's embeddings, first N decoder layers, final norm and head.

Works for Llama/Qwen2-style HF causal LMs, whose decoder layers are `model.layers.{i}`: the
draft's config is the target's with `num_hidden_layers = N` (and per-layer lists such as
`layer_types` cut to N), and every draft weight is the target weight of the same name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import AutoModelForCausalLM, PreTrainedModel

from afa_serve.engine.loading import load_model, load_tokenizer
from draft_training.atomic import atomic_directory

# Config entries that hold one value per decoder layer.
PER_LAYER_CONFIG_FIELDS = ("layer_types", "no_rope_layers")


class InitDraftConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    target: str
    num_layers: int = Field(2, ge=1)
    out: Path
    dtype: Literal["float32", "bfloat16"] = "float32"
    overwrite: bool = False


def truncated_draft(target: PreTrainedModel, num_layers: int) -> PreTrainedModel:
    """A new model holding copies of the target's weights for its first `num_layers` layers."""
    total = target.config.num_hidden_layers
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_layers must lie in [1, {total}] for this target, got {num_layers}")
    config_dict = target.config.to_dict()
    config_dict["num_hidden_layers"] = num_layers
    for key in PER_LAYER_CONFIG_FIELDS:
        if isinstance(config_dict.get(key), list):
            config_dict[key] = config_dict[key][:num_layers]
    config = type(target.config).from_dict(config_dict)
    draft = AutoModelForCausalLM.from_config(config, dtype=target.dtype)
    target_state = target.state_dict()
    missing = [name for name in draft.state_dict() if name not in target_state]
    if missing:
        raise ValueError(
            f"cannot build a draft of {type(target).__name__}: the target has no weights named "
            f"{missing[:5]} (only Llama/Qwen2-style models are supported)"
        )
    draft.load_state_dict({name: target_state[name] for name in draft.state_dict()}, strict=True)
    draft.generation_config = target.generation_config
    return draft.eval()


def init_draft(config: InitDraftConfig) -> Path:
    """Write the truncated draft as a dense HF folder with tokenizer and generation config."""
    target = load_model(config.target, getattr(torch, config.dtype), torch.device("cpu"))
    tokenizer = load_tokenizer(config.target)
    draft = truncated_draft(target, config.num_layers)
    with atomic_directory(config.out, overwrite=config.overwrite) as folder:
        draft.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return config.out
