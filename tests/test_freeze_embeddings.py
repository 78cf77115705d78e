"""`fit --freeze-input-embeddings`: full fine-tuning that keeps the input embeddings and trains
an untied copy of the head, on the tiny draft of `test_training.py`."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from draft_training.examples import response_token_ids
from draft_training.fit import fit
from draft_training.head_rows import HeadRows
from draft_training.merge import merge_run
from draft_training.run import build_model, load_trained_weights
from tests.test_head_rows import data_file  # noqa: F401 (fixtures)
from tests.test_training import (  # noqa: F401 (fixtures)
    draft_dir,
    fit_config,
    target_dir,
)


def test_only_full_fine_tuning_freezes_the_input_embeddings(draft_dir, data_file, tmp_path):  # noqa: F811
    with pytest.raises(ValidationError, match="--method full"):
        fit_config(draft_dir, data_file, tmp_path / "run", freeze_input_embeddings=True)
    frozen = fit_config(draft_dir, data_file, tmp_path / "run", adapter=None,
                        freeze_input_embeddings=True)
    assert frozen.model_dump()["freeze_input_embeddings"] is True
    assert "freeze_input_embeddings" not in fit_config(
        draft_dir, data_file, tmp_path / "x", adapter=None).model_dump()

    model = build_model(frozen)
    embeddings, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert head is not embeddings and torch.equal(head, embeddings)
    assert not embeddings.requires_grad and head.requires_grad
    assert all(parameter.requires_grad for name, parameter in model.named_parameters()
               if parameter is not embeddings)


def test_fit_trains_the_head_not_the_input_embeddings_and_merges_both(
        draft_dir, data_file, tmp_path):  # noqa: F811
    config = fit_config(draft_dir, data_file, tmp_path / "run", adapter=None, head_rows=12,
                        freeze_input_embeddings=True, max_steps=4)
    state = load_trained_weights(fit(config).run_dir).state
    assert "lm_head.weight" in state and "model.embed_tokens.weight" not in state

    initial = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32)
    report = merge_run(config.out, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(report.out, dtype=torch.float32)
    assert not merged.config.tie_word_embeddings
    assert torch.equal(merged.get_input_embeddings().weight,
                       initial.get_input_embeddings().weight)
    rows = HeadRows.most_frequent(response_token_ids(data_file), 12, merged.config.vocab_size)
    head = merged.get_output_embeddings().weight[rows.token_ids]
    assert torch.equal(head, state["lm_head.weight"][rows.token_ids])
    assert not torch.equal(head, initial.get_output_embeddings().weight[rows.token_ids])
    assert report.max_abs_logit_diff < 1e-4
