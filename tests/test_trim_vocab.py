"""`afa-train trim-vocab` on a real SmolLM2 draft: the trimmed draft keeps the special tokens and
the most frequent response tokens, its tokenizer names exactly those tokens as the target
does, and its logits are the dense draft's at the kept rows."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from afa_serve.engine.draft_vocab import count_tokens, write_draft_vocab
from afa_serve.engine.loading import (
    IncompatibleDraftError,
    check_draft_compatible,
    own_vocabulary,
)
from draft_training.cli import app
from draft_training.init_draft import InitDraftConfig, init_draft
from draft_training.trim_vocab import trim_vocabulary

TEXT = ("The quick brown fox jumps over the lazy dog. The dog sleeps, and the fox runs on "
        "over the hill to the river, where the fox drinks.")


@pytest.fixture(scope="module")
def dense_draft(real_model_path, real_tokenizer, tmp_path_factory) -> Path:
    """The target's first 2 layers, with the tokens of TEXT (as if they were the target's
    responses) counted into draft_vocab.json."""
    folder = init_draft(InitDraftConfig(target=str(real_model_path), num_layers=2,
                                        out=tmp_path_factory.mktemp("dense") / "draft"))
    write_draft_vocab(folder, count_tokens([real_tokenizer(TEXT)["input_ids"]]))
    return folder


def test_trimmed_draft_is_the_dense_draft_at_the_kept_rows(dense_draft, real_tokenizer,
                                                          tmp_path):
    text_ids = real_tokenizer(TEXT)["input_ids"]
    special = sorted(real_tokenizer.added_tokens_decoder)
    # the chat framing before every answer: system prompt, user turn, "<|im_start|>assistant\n"
    framing = real_tokenizer(real_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False),
        add_special_tokens=False)["input_ids"]
    assert "istant" in real_tokenizer.convert_ids_to_tokens(framing)  # not in TEXT
    expected = set(special) | set(framing) - {real_tokenizer.convert_tokens_to_ids("Hi")} \
        | set(text_ids)
    out = tmp_path / "trimmed"
    result = CliRunner().invoke(app, ["trim-vocab", str(dense_draft), "--out", str(out),
                                      "--rows", "4096"])  # more than there are: all of them
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out)
    assert "100.0% of the counted response tokens" in result.output

    trimmed_tokenizer = AutoTokenizer.from_pretrained(out)
    trimmed = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    rows = trimmed.config.vocab_size
    assert rows == len(trimmed_tokenizer.get_vocab()) == len(expected)
    # each trimmed row is a target token, by string: the special tokens first, in order
    strings = trimmed_tokenizer.convert_ids_to_tokens(list(range(rows)))
    keep = real_tokenizer.convert_tokens_to_ids(strings)
    assert keep[: len(special)] == special and set(keep) == expected
    assert own_vocabulary(real_tokenizer, trimmed_tokenizer, rows)
    assert not own_vocabulary(real_tokenizer, real_tokenizer, len(real_tokenizer.get_vocab()))
    # the same end-of-sequence token, renumbered
    assert keep[trimmed.config.eos_token_id] == real_tokenizer.eos_token_id
    # a token outside the kept set is the unknown token
    assert trimmed_tokenizer.convert_tokens_to_ids("Ġelephant") == trimmed_tokenizer.unk_token_id

    dense = AutoModelForCausalLM.from_pretrained(dense_draft, dtype=torch.float32).eval()
    new_id = {old: new for new, old in enumerate(keep)}
    with torch.no_grad():
        dense_logits = dense(torch.tensor([text_ids])).logits[0][:, keep]
        trimmed_logits = trimmed(torch.tensor([[new_id[t] for t in text_ids]])).logits[0]
    torch.testing.assert_close(trimmed_logits, dense_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(trimmed_logits.argmax(-1), dense_logits.argmax(-1))


def test_the_torch_engine_refuses_a_trimmed_draft_by_name(
        dense_draft, real_target, real_tokenizer, tmp_path):
    out = trim_vocabulary(dense_draft, 128, tmp_path / "trimmed").out
    draft = AutoModelForCausalLM.from_pretrained(out)
    with pytest.raises(IncompatibleDraftError, match="only the vLLM engine maps"):
        check_draft_compatible(real_target, real_tokenizer, draft,
                               AutoTokenizer.from_pretrained(out))


def test_trim_vocab_needs_the_drafts_token_counts(real_model_path, tmp_path):
    folder = init_draft(InitDraftConfig(target=str(real_model_path), num_layers=1,
                                        out=tmp_path / "uncounted"))
    result = CliRunner().invoke(app, ["trim-vocab", str(folder), "--out", str(tmp_path / "t")])
    assert result.exit_code == 1
    assert "has no draft_vocab.json" in result.output
    assert not (tmp_path / "t").exists()


def test_trim_vocab_refuses_to_keep_the_whole_vocabulary(dense_draft, tmp_path):
    every_token = tmp_path / "every-token"
    shutil.copytree(dense_draft, every_token)
    write_draft_vocab(every_token, count_tokens([list(range(49152))]))
    result = CliRunner().invoke(app, ["trim-vocab", str(every_token), "--out", str(tmp_path / "t"),
                                      "--rows", "49152"])
    assert result.exit_code == 1 and "there is nothing to trim" in result.output
    assert not (tmp_path / "t").exists()
