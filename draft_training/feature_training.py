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

Drafted positions (EAGLE-3's training-time test, arXiv 2503.01840). Serving drafts its first
token from the target's feature and each later one from the draft's own prediction at the
position before. `forward(positions=n)` runs the draft n times over the sequence to match:
pass 1 reads the target's features; pass p reads, at row j, pass p − 1's prediction at row
j − 1, and attends to what the draft's cache holds when it drafts that row as its p-th token:
pass 1's rows 1..j − p + 1 (the accepted prefix), then row j − p + q of each pass q = 2..p
(its own earlier drafts). Row j of pass p predicts token j + 1 as the p-th drafted token after
a target pass that gave features up to row j − p (and token j − p + 1).
`fit --drafted-positions n` trains on all n passes, each over the rows serving drafts from as
that position (`reachable_rows`); held-out agreement always unrolls `agreement.DEFAULT_K`
passes, so its per-position acceptance and τ are the decoder's (greedy, on the target's own
responses), not a teacher-forced bound.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel
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
                use_cache: bool = False, positions: int = 1) -> SimpleNamespace:
        """Right-padded rows (as `examples.collate` makes them); `drafted[p]` is pass p + 1's
        hidden state at every row, `last_hidden_state` pass 1's."""
        features = self.target_features(input_ids, attention_mask)
        embeddings = self.target.get_input_embeddings()(input_ids)
        length = input_ids.shape[1]
        rotary = self.rotary(embeddings, torch.arange(length, device=input_ids.device)[None])
        past_keys = DynamicCache()
        previous, drafted = features, []
        for drafted_position in range(positions):
            shifted = torch.cat([torch.zeros_like(previous[:, :1]), previous[:, :-1]], dim=1)
            mask = drafted_position_mask(length, drafted_position, input_ids.device)
            previous = self.draft(shifted.to(embeddings.dtype), embeddings, rotary, mask[None, None],
                                  past_keys)
            drafted.append(previous)
        return SimpleNamespace(last_hidden_state=drafted[0], drafted=drafted,
                               target_features=features)

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


def reachable_rows(input_ids: torch.Tensor, labels: torch.Tensor,
                   positions: int) -> list[torch.Tensor]:
    """Per drafted position, the rows [batch, length] a greedy decoder drafts from as that
    position. Pass p's row j reads rows j − p + 2..j as tokens the draft proposed and the
    target accepted, so each must be what the target predicts there (`labels` one row before):
    always so inside the target's own responses; in text it only scored (`fit --scored-data`),
    pass p drops the p − 1 rows from a token the target would not have written on (that token's
    own row included): states serving never reaches. Pass 1 reads no drafted token: every row.
    Which tokens an engine's trimmed head can propose is not considered (it differs by engine)."""
    follows = torch.zeros_like(labels, dtype=torch.bool)
    follows[:, 1:] = input_ids[:, 1:] == labels[:, :-1]
    reachable = [torch.ones_like(follows)]
    for _ in range(1, positions):
        after_reachable = torch.zeros_like(follows)
        after_reachable[:, 1:] = reachable[-1][:, :-1]
        reachable.append(follows & after_reachable)
    return reachable


def drafted_position_mask(length: int, drafted_position: int,
                          device: torch.device) -> torch.Tensor:
    """The additive mask [length, (p + 1)·length] of pass p + 1 (p = `drafted_position`) over
    the keys of passes 1..p + 1 in order: row j sees pass 1's rows 1..j − p (row 0, with no
    feature before it, is not in serving's cache; it sees itself in pass 1 only) and row
    j − p + q of pass q + 1 for q = 1..p, itself last."""
    rows = torch.arange(length, device=device)[:, None]
    columns = torch.arange(length, device=device)[None]
    blocks = [((columns >= 1) & (columns <= rows - drafted_position))
              | ((rows == 0) & (columns == 0) & (drafted_position == 0))]
    blocks += [columns == rows - drafted_position + q for q in range(1, drafted_position + 1)]
    allowed = torch.cat(blocks, dim=1)
    return torch.zeros(allowed.shape, device=device).masked_fill(
        ~allowed, torch.finfo(torch.float32).min)
