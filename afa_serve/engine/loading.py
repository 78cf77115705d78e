"""Loading target and draft models by HF id, local folder or packaged name; checking they pair."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from afa_serve.engine.feature_draft import FeatureDraft, is_feature_draft
from afa_serve.models.resolve import resolve_model

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]
DeviceName = Literal["auto", "cpu", "cuda"]


class IncompatibleDraftError(ValueError):
    """The draft cannot verify against the target: their vocabularies differ."""


def resolve_device(device: DeviceName | str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype_name(dtype: DTypeName, device_type: str) -> str:
    """`auto`: bfloat16 on CUDA, float32 elsewhere (exact greedy equality holds best in float32);
    the one rule for a `--dtype auto`, on both engines and in the trainer's commands. Where the
    trainer picks a dtype for speed alone (the mission's answers, fit's autocast), it takes
    `fastest_dtype_name`."""
    if dtype == "auto":
        return "bfloat16" if device_type == "cuda" else "float32"
    return dtype


def cpu_runs_bfloat16_natively() -> bool:
    """Whether this CPU has bfloat16 instructions: on x86, AVX512-BF16 or AMX; elsewhere
    (Arm), oneDNN's own check. Without them oneDNN emulates bfloat16 on AVX512, slower than
    float32 (its own check says yes there): on an Ice Lake Xeon (2 vCPUs, AVX512 without BF16) a
    1024 × 1024 matmul ran at 54 GFLOP/s in bfloat16 against 170 in float32 (2026-12-03)."""
    try:
        if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
            return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def fastest_dtype_name(device_type: str) -> str:
    """bfloat16 where this machine runs it natively (CUDA; a CPU with bfloat16 instructions),
    else float32: the dtype for work where speed matters more than exact equality with
    float32 decoding (the trainer's generating and its autocast)."""
    native = device_type == "cuda" or (device_type == "cpu" and cpu_runs_bfloat16_natively())
    return "bfloat16" if native else "float32"


def resolve_dtype(dtype: DTypeName, device: torch.device) -> torch.dtype:
    return getattr(torch, resolve_dtype_name(dtype, device.type))


def load_model(name_or_path: str, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(resolve_model(name_or_path), dtype=dtype)
    return model.to(device).eval()


def load_draft(name_or_path: str, dtype: torch.dtype,
               device: torch.device) -> PreTrainedModel | FeatureDraft:
    """A causal LM, or a feature draft (`feature_draft.py`) when the folder holds one."""
    folder = Path(resolve_model(name_or_path))
    if is_feature_draft(folder):
        return FeatureDraft.load(folder, dtype, device)
    return load_model(name_or_path, dtype, device)


def load_draft_tokenizer(name_or_path: str,
                         target_tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The draft's own tokenizer; a feature draft reads the target's tokens and has none."""
    if is_feature_draft(Path(resolve_model(name_or_path))):
        return target_tokenizer
    return load_tokenizer(name_or_path)


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


def vocabulary_difference(
    target_tokenizer: PreTrainedTokenizerBase, draft_tokenizer: PreTrainedTokenizerBase
) -> str | None:
    """What differs between two tokenizers' vocabularies, or None if they are the same."""
    target_vocab, draft_vocab = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    if target_vocab == draft_vocab:
        return None
    differing = sorted(
        token
        for token in target_vocab.keys() | draft_vocab.keys()
        if target_vocab.get(token) != draft_vocab.get(token)
    )
    return (
        f"tokenizer vocabularies differ (target {len(target_vocab)} tokens, draft "
        f"{len(draft_vocab)}; {len(differing)} entries differ, e.g. {differing[:5]})"
    )


def own_vocabulary(target_tokenizer: PreTrainedTokenizerBase,
                   draft_tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> bool:
    """Whether the draft has a smaller vocabulary of its own whose every token (as a string)
    is one of the target's: what `afa-train trim-vocab` writes."""
    target, draft = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    return (len(draft) == vocab_size < len(target)
            and all(token in target for token in draft))


def check_draft_compatible(
    target: PreTrainedModel,
    target_tokenizer: PreTrainedTokenizerBase,
    draft: PreTrainedModel | FeatureDraft,
    draft_tokenizer: PreTrainedTokenizerBase,
) -> None:
    """Refuse a draft whose tokens do not mean what the target's do, saying what differs (a
    feature draft: one whose layer does not fit the target's hidden states)."""
    if isinstance(draft, FeatureDraft):
        names = ("hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size")
        theirs = tuple(getattr(draft.config, name) for name in names)
        ours = tuple(getattr(target.config, name) for name in names)
        if target.config.model_type != "llama" or theirs != ours:
            raise IncompatibleDraftError(
                f"the feature draft was made for another target: its {', '.join(names)} are "
                f"{theirs}, the target's ({target.config.model_type}) {ours}")
        return
    target_logits = target.get_output_embeddings().weight.shape[0]
    draft_logits = draft.get_output_embeddings().weight.shape[0]
    if own_vocabulary(target_tokenizer, draft_tokenizer, draft_logits):
        raise IncompatibleDraftError(
            f"the draft has a vocabulary of its own ({draft_logits} of the target's tokens, "
            "`afa-train trim-vocab`), which only the vLLM engine maps to the target's: give "
            "the torch engine the dense draft (it trims the head itself, --draft-vocab-size)")
    problems = [difference] if (difference := vocabulary_difference(
        target_tokenizer, draft_tokenizer)) else []
    if target_logits != draft_logits:
        problems.append(
            f"output vocabulary sizes differ (target {target_logits}, draft {draft_logits})"
        )
    if problems:
        raise IncompatibleDraftError(
            "the draft model cannot be used with this target: " + "; ".join(problems)
        )


@dataclass(frozen=True)
class TargetAndDraft:
    """A target and a draft checked to pair, on one device in one dtype."""

    target: PreTrainedModel
    draft: PreTrainedModel | FeatureDraft
    tokenizer: PreTrainedTokenizerBase  # the target's (the draft's means the same)
    eos: frozenset[int]
    dtype: torch.dtype
    device: torch.device


def load_target_and_draft(
    target: str, draft: str, dtype: DTypeName, device: DeviceName | str
) -> TargetAndDraft:
    """Load both models as named (id, folder or packaged name); refuse a draft that does not
    pair with the target."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    tokenizer = load_tokenizer(target)
    target_model = load_model(target, torch_dtype, torch_device)
    draft_model = load_draft(draft, torch_dtype, torch_device)
    check_draft_compatible(target_model, tokenizer, draft_model,
                           load_draft_tokenizer(draft, tokenizer))
    return TargetAndDraft(target_model, draft_model, tokenizer,
                          eos_token_ids(target_model, tokenizer), torch_dtype, torch_device)


def max_context_length(model: PreTrainedModel) -> int:
    for attribute in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model.config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(
        f"cannot tell the context length of {model.config.model_type}: pass --max-model-len"
    )
