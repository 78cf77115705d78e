"""Training a feature draft (`afa_serve.engine.feature_draft`, EAGLE-1) with fit's own loop.

`FeatureDraftLM` wraps the frozen target and the trainable draft so that fit sees a causal LM:
row j's hidden state is the draft's prediction from (the target's feature at j − 1, token j),
which stands for the target's feature at j, and the target's head reads it, so row j's logits
predict token j + 1 as a plain draft's do. Row 0 has no feature before it: no other row
attends to it, as the serving draft's cache starts at row 1 (its first entry pairs feature 0
with token 1); merge checks the engine's forward against this module. Cross-entropy, KL to the
stored top-k, bucketing, held-out agreement, best checkpoints and resume all apply unchanged.
With `fit --feature-weight`, row j's hidden state also regresses onto the target's feature
at j (EAGLE's smooth-L1 term): a dense signal, and the one that makes the draft's own
predicted features, which later drafted tokens read, resemble the target's.
The target's features of an example are computed once, in the dtype the run's autocast gives
them, and kept for later epochs.

Teacher-forced agreement feeds the target's own features at every row: it is the agreement of
the first drafted token. Later drafted tokens read the draft's own predictions, so the τ the
decoder measures (`afa-train eval`, `afa-serve bench`) is below the one this implies.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from afa_serve.engine.feature_draft import FeatureDraft
from afa_serve.models.resolve import resolve_model


class FeatureDraftLM(nn.Module):
    def __init__(self, target: PreTrainedModel, draft: FeatureDraft):
        super().__init__()
        self.target = target.requires_grad_(False).eval()
        self.draft = draft.requires_grad_(True)
        self.rotary = LlamaRotaryEmbedding(draft.config)
        self._features: dict[bytes, torch.Tensor] = {}  # by an example's token ids

    @property
    def base_model(self) -> FeatureDraftLM:  # fit reads hidden states from `base_model`
        return self

    def get_output_embeddings(self) -> nn.Module:
        return self.target.get_output_embeddings()

    def train(self, mode: bool = True) -> FeatureDraftLM:
        super().train(mode)
        self.target.eval()
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                use_cache: bool = False) -> SimpleNamespace:
        """Right-padded rows (as `examples.collate` makes them)."""
        features = self.target_features(input_ids, attention_mask)
        previous = torch.cat([torch.zeros_like(features[:, :1]), features[:, :-1]], dim=1)
        embeddings = self.target.get_input_embeddings()(input_ids)
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device)[None]
        causal = torch.full((length, length), torch.finfo(torch.float32).min,
                            device=input_ids.device).triu(1)
        causal[1:, 0] = torch.finfo(torch.float32).min  # row 0 is not in serving's cache
        causal = causal[None, None]
        hidden = self.draft(previous.to(embeddings.dtype), embeddings,
                            self.rotary(embeddings, positions), causal)
        return SimpleNamespace(last_hidden_state=hidden, target_features=features)

    @torch.no_grad()
    def target_features(self, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> torch.Tensor:
        """The target's last hidden state at every position of right-padded rows (zeros at
        padding), from the cache where an example was seen before."""
        lengths = attention_mask.sum(dim=1).tolist()
        keys = [input_ids[row, :length].cpu().numpy().tobytes()
                for row, length in enumerate(lengths)]
        if any(key not in self._features for key in keys):
            hidden = self.target.get_decoder()(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
            for row, (key, length) in enumerate(zip(keys, lengths, strict=True)):
                self._features[key] = hidden[row, :length]
        out = torch.zeros(*input_ids.shape, self.target.config.hidden_size,
                          device=input_ids.device)
        for row, (key, length) in enumerate(zip(keys, lengths, strict=True)):
            out[row, :length] = self._features[key].float()
        return out


def build_feature_draft_lm(draft_folder: str, target: str) -> FeatureDraftLM:
    """The trainable draft in float32 beside its frozen target (float32; the run's autocast
    decides what its passes compute in)."""
    model = AutoModelForCausalLM.from_pretrained(resolve_model(target), dtype=torch.float32)
    draft = FeatureDraft.load(resolve_model(draft_folder), torch.float32, torch.device("cpu"))
    return FeatureDraftLM(model, draft)
