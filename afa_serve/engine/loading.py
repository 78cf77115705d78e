"""Loading target and draft models by HF id, local folder or packaged name; checking they pair."""

from __future__ import annotations

from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from afa_serve.models.resolve import resolve_model

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]
DeviceName = Literal["auto", "cpu", "cuda"]


class IncompatibleDraftError(ValueError):
    """The draft cannot verify against the target: their vocabularies differ."""


def resolve_device(device: DeviceName | str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: DTypeName, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on CUDA, float32 on CPU (exact greedy equality holds best in float32)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_model(name_or_path: str, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(resolve_model(name_or_path), dtype=dtype)
    return model.to(device).eval()


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_model(name_or_path))


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Every token that ends generation: the tokenizer's EOS and the generation config's."""
    return generation_end_ids(model.generation_config, tokenizer)


def generation_end_ids(
    generation_config: GenerationConfig, tokenizer: PreTrainedTokenizerBase
) -> frozenset[int]:
    """`eos_token_ids` for a generation config without its model (vLLM loads its own)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return frozenset(ids)


def check_draft_compatible(
    target: PreTrainedModel,
    target_tokenizer: PreTrainedTokenizerBase,
    draft: PreTrainedModel,
    draft_tokenizer: PreTrainedTokenizerBase,
) -> None:
    """Refuse a draft whose tokens do not mean what the target's do, saying what differs."""
    problems: list[str] = []
    target_vocab, draft_vocab = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    if target_vocab != draft_vocab:
        differing = sorted(
            token
            for token in target_vocab.keys() | draft_vocab.keys()
            if target_vocab.get(token) != draft_vocab.get(token)
        )
        problems.append(
            f"tokenizer vocabularies differ (target {len(target_vocab)} tokens, draft "
            f"{len(draft_vocab)}; {len(differing)} entries differ, e.g. {differing[:5]})"
        )
    target_logits = target.get_output_embeddings().weight.shape[0]
    draft_logits = draft.get_output_embeddings().weight.shape[0]
    if target_logits != draft_logits:
        problems.append(
            f"output vocabulary sizes differ (target {target_logits}, draft {draft_logits})"
        )
    if problems:
        raise IncompatibleDraftError(
            "the draft model cannot be used with this target: " + "; ".join(problems)
        )


def max_context_length(model: PreTrainedModel) -> int:
    for attribute in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model.config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(
        f"cannot tell the context length of {model.config.model_type}: pass --max-model-len"
    )
