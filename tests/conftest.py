"""Shared fixtures: tiny random-weight models for fast tests, and the real packaged SmolLM2."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

REAL_MODEL = "smollm2-135m-instruct"

# Tests of device code run on CPU, and on CUDA only where a GPU is (one lent to a session:
# bench/gpu/README.md); CI has none, so its CUDA cases are the only tests it skips.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))]

# Tiny-model tests are dominated by per-op overhead: one thread avoids OpenMP spin-waits when
# another process shares the two cores. Real-model tests raise it with `torch_threads`.
torch.set_num_threads(1)


def tiny_tokenizer(vocab_size: int = 28) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: one token per letter, a space, and <eos> as the last id."""
    letters = [chr(ord("a") + i) for i in range(vocab_size - 2)]
    vocab = {**{letter: i for i, letter in enumerate(letters)}, " ": vocab_size - 2,
             "<eos>": vocab_size - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


def tiny_llama(vocab_size: int = 28, layers: int = 2, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=vocab_size - 1, bos_token_id=0, **overrides,
    )
    return LlamaForCausalLM(config).eval()


def truncated_copy(model, num_layers: int):
    """A draft made of `model`'s embeddings, first `num_layers` layers, final norm and head."""
    config = model.config.__class__.from_dict(
        {**model.config.to_dict(), "num_hidden_layers": num_layers}
    )
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:num_layers]
    draft = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    draft.load_state_dict(model.state_dict(), strict=False)
    return draft.eval()


@pytest.fixture(scope="session")
def real_model_path() -> Path:
    """The packaged SmolLM2-135M-Instruct as a plain HF folder (pulled once, cached)."""
    from afa_serve.models.resolve import resolve_model

    return Path(resolve_model(REAL_MODEL))


@pytest.fixture(scope="session")
def real_target(real_model_path):
    return AutoModelForCausalLM.from_pretrained(real_model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def real_tokenizer(real_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_model_path)


@pytest.fixture(scope="session")
def real_draft(real_target):
    return truncated_copy(real_target, 2)


class BatchClock:
    """A stand-in for `generate`'s clock (the only thing faked): each batch the target answers
    takes `seconds_per_batch`; the answering itself is the real model's."""

    def __init__(self, monkeypatch, seconds_per_batch: float):
        from draft_training import generate

        self.now, self.batches = 0.0, []
        monkeypatch.setattr(generate, "time", SimpleNamespace(monotonic=lambda: self.now))
        answer = generate.HfGenerator.__call__

        def timed(generator, prompts):
            self.batches.append(len(prompts))
            self.now += seconds_per_batch
            return answer(generator, prompts)

        monkeypatch.setattr(generate.HfGenerator, "__call__", timed)
