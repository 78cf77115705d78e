"""The draft's forward: logits for the token after a sequence's newest ones, from its own cache.

Two implementations of one interface (`new_cache()`, `logits(cache, token_ids)`):
`HFDraftForward` runs the transformers model; `CompactDraftForward` runs the same weights
without the transformers module stack, optionally in int8. `draft_forward` picks.

A 2-layer SmolLM2 draft does little arithmetic per token (576-wide matrices): its time goes to
reading its weights from memory and to the Python of transformers' module stack (module calls,
cache objects, masks, output dataclasses). For Llama-family decoders (Llama, Qwen2, Mistral:
pre-norm RMSNorm, rotary attention with grouped KV heads, SiLU-gated MLP) this module runs the
same computation on the model's own weight tensors, fused where that is exact (q/k/v into one
matrix, gate/up into one), with a KV cache of preallocated tensors that a step only writes into
and crops by moving its length. The arithmetic follows transformers' (RMSNorm in float32, rotary
tables in float32 cast to the model's dtype), so its logits match HF's to rounding. It only
proposes tokens: the target verifies every one, so decoding stays lossless whatever its
rounding.

Measured (SmolLM2 2-layer draft, 4096-token head, bfloat16, one thread; README): a draft
forward takes 4.2 ms through HF, 3.4 ms compact and 2.0 ms compact in int8 (one scale per
weight row, `torch._weight_int8pack_mm`), against a 58 ms target step: the draft's time is
mostly reading its weights, so halving their bytes halves it. Held-out agreement with the
target: 0.2345 → 0.2332 in int8.

A model the compact forward does not cover (`unsupported_reason` says why) keeps the HF one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from afa_serve.engine.feature_draft import FeatureDraft

DraftWeights = Literal["dtype", "int8"]  # the model's own dtype, or int8 with row scales
DraftWeightsSetting = Literal["auto", "int8", "dtype"]

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
INITIAL_CAPACITY = 256  # cached positions allocated at first; doubled when a sequence outgrows it


def unsupported_reason(model: PreTrainedModel) -> str | None:
    """Why the compact forward cannot run `model` exactly, or None when it can."""
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {config.model_type!r} (covered: {', '.join(SUPPORTED_MODEL_TYPES)})"
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        return f"rope type {rope.get('rope_type')!r} (covered: default)"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} (covered: silu)"
    if getattr(config, "use_sliding_window", False) or (
            config.model_type == "mistral" and getattr(config, "sliding_window", None)):
        return "sliding-window attention"
    if getattr(config, "mlp_bias", False):
        return "MLP biases"
    return None


class _Linear:
    """y = x·Wᵀ (+ b), W as the model holds it or in int8 with one scale per output row."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, int8: bool):
        self.bias = bias
        self.weight = self.scales = None
        if int8:
            scales = weight.float().abs().amax(dim=1).clamp(min=1e-12) / 127
            self.weight = (weight.float() / scales[:, None]).round().clamp(-127, 127).to(
                torch.int8)
            self.scales = scales.to(weight.dtype)
        else:
            self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.scales is None:
            return F.linear(x, self.weight, self.bias)
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.scales)
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return y if self.bias is None else y + self.bias


@dataclass
class _Layer:
    input_norm: torch.Tensor | None  # None: none (a feature draft's layer)
    qkv: _Linear  # [q_size + 2 * kv_size, hidden]
    out: _Linear
    post_norm: torch.Tensor
    gate_up: _Linear  # [2 * intermediate, hidden]
    down: _Linear


class CompactCache:
    """Keys and values of one sequence: [layers, kv_heads, capacity, head_dim] each. Offers
    the two methods of transformers' `DynamicCache` the decoder uses."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values
        self.length = 0

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, max_length: int) -> None:
        """Keep the first `max_length` positions (negative: drop that many), as DynamicCache."""
        if max_length < 0:
            max_length = self.length + max_length
        self.length = min(self.length, max(max_length, 0))

    def reserve(self, length: int) -> None:
        capacity = self.keys.shape[2]
        if length <= capacity:
            return
        while capacity < length:
            capacity *= 2
        layers, heads, held, head_dim = self.keys.shape
        extra = self.keys.new_zeros(layers, heads, capacity - held, head_dim)
        self.keys = torch.cat([self.keys, extra], dim=2)
        self.values = torch.cat([self.values, extra], dim=2)


class DraftCache(Protocol):
    """What the decoder does with a draft's cache (transformers' `DynamicCache` has both)."""

    def get_seq_length(self) -> int: ...

    def crop(self, max_length: int) -> None: ...


class DraftForward(Protocol):
    def new_cache(self) -> DraftCache: ...

    def logits(self, cache, token_ids: list[int]) -> torch.Tensor:
        """Run `token_ids` on top of `cache` (extending it); the last position's logits over
        the head's rows."""
        ...


class HFDraftForward:
    """The transformers model's own forward (with its head cut to `head_ids` when given)."""

    def __init__(self, model: PreTrainedModel, head_ids: torch.Tensor | None = None):
        self.model = model
        self.head = None
        if head_ids is not None:
            weight = model.get_output_embeddings().weight.detach()
            self.head = weight.index_select(0, head_ids).contiguous()

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    @torch.inference_mode()
    def logits(self, cache: DynamicCache, token_ids: list[int]) -> torch.Tensor:
        input_ids = torch.tensor([token_ids], device=self.model.device)
        if self.head is None:
            return self.model(input_ids=input_ids, past_key_values=cache, use_cache=True,
                              logits_to_keep=1).logits[0, -1]
        hidden = self.model.base_model(
            input_ids=input_ids, past_key_values=cache, use_cache=True
        ).last_hidden_state[0, -1]
        return hidden @ self.head.T


def draft_forward(model: PreTrainedModel, head_ids: torch.Tensor | None = None,
                  weights: DraftWeights = "dtype") -> DraftForward:
    """The compact forward where it covers `model`, else the HF one; int8 needs the compact
    one and raises a ValueError saying why where it does not cover the model."""
    reason = unsupported_reason(model)
    if reason is None:
        return CompactDraftForward(model, head_ids, int8=weights == "int8")
    if weights == "int8":
        raise ValueError(f"int8 draft weights need the compact draft forward, which does not "
                         f"cover {reason}")
    return HFDraftForward(model, head_ids)


def resolve_draft_weights(setting: DraftWeightsSetting, model: PreTrainedModel) -> DraftWeights:
    """`auto`: int8 on CPU where the compact forward covers the model (measured: half the
    draft's cost, agreement unchanged); the model's dtype elsewhere (int8 runs on CUDA too, but
    gained nothing there: an H200 served 1.30× with it against 1.39× without,
    bench/results/gpu/)."""
    if setting != "auto":
        return setting
    if model.device.type == "cpu" and unsupported_reason(model) is None:
        return "int8"
    return "dtype"


class CompactDraftForward:
    """The draft's forward on its weight tensors (optionally int8), outside transformers."""

    def __init__(self, model: PreTrainedModel, head_ids: torch.Tensor | None = None,
                 int8: bool = False):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the compact draft forward does not cover {reason}")
        decoder = model.get_decoder()
        self._shapes(model.config, model.dtype, model.device)
        self.embed = decoder.embed_tokens.weight.detach()
        self.final_norm: torch.Tensor | None = decoder.norm.weight.detach()
        self.head = _head(model, head_ids, int8)
        self.layers = [self._layer(layer, int8) for layer in decoder.layers]

    def _shapes(self, config, dtype: torch.dtype, device: torch.device) -> None:
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads)
        self.eps = config.rms_norm_eps
        self.dtype = dtype
        self.device = device
        base = config.rope_parameters["rope_theta"]
        self.inv_freq = 1.0 / (base ** (
            torch.arange(0, self.head_dim, 2, dtype=torch.float, device=self.device)
            / self.head_dim))

    @staticmethod
    def _layer(layer, int8: bool) -> _Layer:
        attention, mlp = layer.self_attn, layer.mlp
        projections = (attention.q_proj, attention.k_proj, attention.v_proj)
        biases = [p.bias for p in projections]
        out_bias = attention.o_proj.bias
        input_norm = getattr(layer.input_layernorm, "weight", None)  # Identity: none
        return _Layer(
            input_norm=None if input_norm is None else input_norm.detach(),
            qkv=_Linear(torch.cat([p.weight.detach() for p in projections]),
                        None if biases[0] is None else torch.cat([b.detach() for b in biases]),
                        int8),
            out=_Linear(attention.o_proj.weight.detach(),
                        None if out_bias is None else out_bias.detach(), int8),
            post_norm=layer.post_attention_layernorm.weight.detach(),
            gate_up=_Linear(torch.cat([mlp.gate_proj.weight.detach(),
                                       mlp.up_proj.weight.detach()]), None, int8),
            down=_Linear(mlp.down_proj.weight.detach(), None, int8),
        )

    def new_cache(self) -> CompactCache:
        shape = (len(self.layers), self.num_kv_heads, INITIAL_CAPACITY, self.head_dim)
        return CompactCache(torch.zeros(shape, dtype=self.dtype, device=self.device),
                            torch.zeros(shape, dtype=self.dtype, device=self.device))

    def _norm(self, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        if weight is None:
            return x
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x32.to(self.dtype)

    def _rotary(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(start, start + count, dtype=torch.float, device=self.device)
        freqs = positions[:, None] * self.inv_freq[None]
        angles = torch.cat([freqs, freqs], dim=-1)
        return angles.cos().to(self.dtype), angles.sin().to(self.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    @torch.inference_mode()
    def logits(self, cache: CompactCache, token_ids: list[int]) -> torch.Tensor:
        x = self._decode(cache, self.embed[torch.tensor(token_ids, device=self.device)])
        return self.head(self._norm(x[-1:], self.final_norm))[0]

    def _decode(self, cache: CompactCache, x: torch.Tensor) -> torch.Tensor:
        """Run the layers over new rows `x` ([count, hidden]) on top of `cache`."""
        count, start = x.shape[0], cache.length
        end = start + count
        cache.reserve(end)
        cos, sin = self._rotary(start, count)
        mask = None
        if count > 1:  # each new token sees the cache and the new tokens up to itself
            mask = torch.ones(count, end, dtype=torch.bool, device=self.device).tril(start)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        for index, layer in enumerate(self.layers):
            qkv = layer.qkv(self._norm(x, layer.input_norm))
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q = self._rotate(q.view(count, self.num_heads, self.head_dim).transpose(0, 1), cos, sin)
            k = self._rotate(k.view(count, self.num_kv_heads, self.head_dim).transpose(0, 1),
                             cos, sin)
            cache.keys[index, :, start:end] = k
            cache.values[index, :, start:end] = v.view(
                count, self.num_kv_heads, self.head_dim).transpose(0, 1)
            attended = F.scaled_dot_product_attention(
                q[None], cache.keys[index, None, :, :end], cache.values[index, None, :, :end],
                attn_mask=mask, enable_gqa=self.num_heads != self.num_kv_heads)
            x = x + layer.out(attended[0].transpose(0, 1).reshape(count, q_size))
            gate, up = layer.gate_up(self._norm(x, layer.post_norm)).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        cache.length = end
        return x


class FeatureDraftForward(CompactDraftForward):
    """A feature draft (`feature_draft.py`) on the target's embeddings and head: `step` takes
    the tokens with the features beside them and returns the last position's logits and its
    predicted feature, which stands in for the target's at the next drafted position."""

    def __init__(self, draft: FeatureDraft, target: PreTrainedModel,
                 head_ids: torch.Tensor | None = None, int8: bool = False):
        reason = unsupported_reason(target)  # the draft's layer has the target's rotary
        if reason is not None:
            raise ValueError(f"feature drafts do not cover {reason}")
        self._shapes(draft.config, target.dtype, target.device)
        self.embed = target.get_input_embeddings().weight.detach()
        self.final_norm = None  # the draft's output is read by the head as it is
        self.head = _head(target, head_ids, int8)
        self.fc = _Linear(draft.fc.weight.detach().to(target.dtype), None, int8)
        self.layers = [self._layer(draft.layer.to(target.dtype), int8)]

    def logits(self, cache: CompactCache, token_ids: list[int]) -> torch.Tensor:
        raise TypeError("a feature draft needs the target's features: use step()")

    @torch.inference_mode()
    def step(self, cache: CompactCache, token_ids: list[int],
             features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`features[j]` is the target's (or the draft's own) feature at the position before
        `token_ids[j]`."""
        embedded = self.embed[torch.tensor(token_ids, device=self.device)]
        x = self._decode(cache, self.fc(torch.cat([embedded, features.to(self.dtype)], dim=-1)))
        return self.head(x[-1:])[0], x[-1]


def _head(model: PreTrainedModel, head_ids: torch.Tensor | None, int8: bool) -> _Linear:
    head = model.get_output_embeddings().weight.detach()
    if head_ids is not None:
        head = head.index_select(0, head_ids).contiguous()
    return _Linear(head, None, int8)
