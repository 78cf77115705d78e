"""A feature draft: EAGLE-1 (arXiv 2401.15077) in vLLM's checkpoint format.

A truncated draft sees only tokens, and a 2-4-layer cut of SmolLM2 plateaus near a quarter of
the target's tokens (README). A feature draft also reads what the target already computed: at
position i it takes the target's last hidden state f_i (after the final norm, what the head
reads) beside the embedding of token i + 1, maps the pair through `fc` ([2d → d]) and one
Llama decoder layer (no input norm, as EAGLE's first layer), and predicts f_{i+1}; the target's
own head turns that into logits for token i + 2. Drafting further, its own prediction stands in
for the target's feature it does not have yet. The target's embeddings and head are shared, so
the checkpoint holds only `fc.weight` and `layers.0.*` (~5 M parameters for SmolLM2).

The folder is what vLLM loads as `EagleLlamaForCausalLM` (`"method": "eagle"`): config.json
with that architecture and one hidden layer, model.safetensors with those names.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Cache, LlamaConfig, PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

ARCHITECTURE = "EagleLlamaForCausalLM"
WEIGHTS_FILE = "model.safetensors"


def is_feature_draft(folder: Path) -> bool:
    config = folder / "config.json"
    if not config.is_file():
        return False
    return ARCHITECTURE in (json.loads(config.read_text()).get("architectures") or [])


def feature_draft_config(target_config: PretrainedConfig) -> LlamaConfig:
    """The draft layer's config: the target's attention and MLP shapes, one layer."""
    if target_config.model_type != "llama":
        raise ValueError(f"feature drafts cover Llama targets (vLLM's EAGLE-1 layer), not "
                         f"{target_config.model_type!r}")
    rope = getattr(target_config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"feature drafts cover the default rotary embedding, not "
                         f"{rope.get('rope_type')!r}")
    config = LlamaConfig.from_dict({**target_config.to_dict(), "num_hidden_layers": 1,
                                    "architectures": [ARCHITECTURE]})
    config.layer_types = None
    return config


class FeatureDraft(nn.Module):
    """`fc` and one decoder layer; `forward` maps (f_i, embedding of token i + 1) rows to the
    predicted f_{i+1} (training; serving runs `draft_forward.FeatureDraftForward`)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        config._attn_implementation = config._attn_implementation or "sdpa"  # a lone layer
        self.config = config
        hidden = config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.layer = LlamaDecoderLayer(config, layer_idx=0)
        self.layer.input_layernorm = nn.Identity()

    @classmethod
    def from_target(cls, target: nn.Module) -> FeatureDraft:
        """Start as "the next feature is this one": `fc` passes the feature through and the
        layer (the target's last, its output projections zeroed) adds nothing yet, so training
        starts from logits of the target's own scale."""
        draft = cls(feature_draft_config(target.config)).to(target.dtype)
        last = target.get_decoder().layers[-1].state_dict()
        draft.layer.load_state_dict({name: tensor for name, tensor in last.items()
                                     if not name.startswith("input_layernorm.")})
        hidden = target.config.hidden_size
        with torch.no_grad():
            draft.fc.weight.zero_()
            draft.fc.weight[:, hidden:] = torch.eye(hidden, dtype=draft.fc.weight.dtype)
            draft.layer.self_attn.o_proj.weight.zero_()
            draft.layer.mlp.down_proj.weight.zero_()
        return draft

    def forward(self, features: torch.Tensor, embeddings: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None,
                past_keys: Cache | None = None) -> torch.Tensor:
        """`past_keys`: keys and values of earlier passes the rows also attend to (the mask
        spans them, then these rows); this pass's are added to it."""
        x = self.fc(torch.cat([embeddings, features], dim=-1))
        out = self.layer(x, attention_mask=attention_mask, position_embeddings=position_embeddings,
                         past_key_values=past_keys)
        return out[0] if isinstance(out, tuple) else out

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(folder)
        tensors = {"fc.weight": self.fc.weight}
        tensors.update({f"layers.0.{name}": tensor for name, tensor in
                        self.layer.state_dict().items()})
        save_file({name: t.detach().contiguous() for name, t in tensors.items()},
                  folder / WEIGHTS_FILE)

    @classmethod
    def load(cls, folder: Path | str, dtype: torch.dtype, device: torch.device) -> FeatureDraft:
        folder = Path(folder)
        config = LlamaConfig.from_pretrained(folder)
        draft = cls(config)
        tensors = load_file(folder / WEIGHTS_FILE)
        draft.fc.weight.data.copy_(tensors.pop("fc.weight"))
        layer = {name.removeprefix("layers.0."): tensor for name, tensor in tensors.items()}
        draft.layer.load_state_dict(layer)
        return draft.to(dtype=dtype, device=device).eval()
