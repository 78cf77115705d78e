"""`fit --head-rows`: the head, its softmax, both losses and held-out agreement over the most
frequent response tokens only, on the tiny target and draft of `test_training.py`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from afa_serve.atomic import append_jsonl
from afa_serve.engine.draft_vocab import count_tokens
from draft_training.agreement import draft_matches, heldout_agreement
from draft_training.examples import IGNORE_INDEX, collate, load_examples, response_token_ids
from draft_training.fit import fit, response_loss_terms, topk_kl
from draft_training.head_rows import HeadRows
from draft_training.merge import merge_run
from draft_training.run import load_trainable_state, load_trained_weights
from draft_training.topk_store import attach_topk, topk_dir
from tests.test_fit_heldout import heldout_file  # noqa: F401 (fixtures)
from tests.test_training import (  # noqa: F401 (fixtures)
    draft_dir,
    fit_config,
    prompts_file,
    target_dir,
)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """Responses over 40 tokens with a teacher's top 5 over 60 (the tiny target's own greedy
    responses repeat one token)."""
    generator = torch.Generator().manual_seed(0)
    path = tmp_path_factory.mktemp("varied") / "data.jsonl"
    records, ids, logprobs = [], [], []
    for index in range(6):
        records.append({
            "id": str(index),
            "prompt_token_ids": torch.randint(0, 256, (5,), generator=generator).tolist(),
            "response_token_ids": torch.randint(0, 40, (20,), generator=generator).tolist(),
        })
        ids.append(torch.stack([torch.randperm(60, generator=generator)[:5] for _ in range(20)]))
        logprobs.append(torch.log_softmax(torch.randn(20, 6, generator=generator), -1)[:, :5])
    attach_topk(topk_dir(path), records, ids, logprobs)
    append_jsonl(path, records)
    return path


def test_rows_are_the_most_frequent_response_tokens(data_file):
    rows = HeadRows.most_frequent(response_token_ids(data_file), 10, vocab_size=300)
    ranked = count_tokens(response_token_ids(data_file)).token_ids
    assert rows.token_ids.tolist() == sorted(ranked[:10])
    for row, token in enumerate(rows.token_ids.tolist()):
        assert rows.row_of[token] == row
    outside = [token for token in range(300) if token not in ranked[:10]]
    assert (rows.row_of[outside] == -1).all()
    labels = torch.tensor([ranked[0], outside[0], ranked[9]])
    assert rows.labels(labels).tolist() == [
        rows.row_of[ranked[0]].item(), IGNORE_INDEX, rows.row_of[ranked[9]].item()]


def test_topk_kl_puts_the_teachers_mass_outside_the_rows_in_the_tail():
    # The student scores 3 rows, q = (0.2, 0.5, 0.3). The teacher's top 3: row 1 at 0.4, a token
    # outside the rows (-1) at 0.3, row 0 at 0.1; its tail is 1 - 0.4 - 0.1 = 0.5 (the
    # outside token's 0.3 included), the student's 1 - 0.5 - 0.2 = 0.3.
    student = torch.tensor([[0.2, 0.5, 0.3]]).log()
    ids = torch.tensor([[1, -1, 0]])
    logprobs = torch.tensor([[0.4, 0.3, 0.1]]).log()
    expected = 0.4 * math.log(0.4 / 0.5) + 0.1 * math.log(0.1 / 0.2) + 0.5 * math.log(0.5 / 0.3)
    assert topk_kl(student, ids, logprobs).item() == pytest.approx(expected, abs=1e-6)


def test_losses_cover_the_rows_only(draft_dir, data_file):  # noqa: F811 (draft_dir)
    model = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32)
    examples = load_examples(data_file, 512)
    batch = collate(examples[:4], torch.device("cpu"))
    rows = HeadRows.most_frequent(response_token_ids(data_file), 12, model.config.vocab_size)
    terms = response_loss_terms(model, batch, rows=rows)

    labelled = batch.labels != IGNORE_INDEX
    hidden = model.model(input_ids=batch.input_ids,
                         attention_mask=batch.attention_mask).last_hidden_state[labelled]
    logits = hidden @ model.lm_head.weight[rows.token_ids].T
    labels = rows.row_of[batch.labels[labelled]]
    assert (labels == -1).any() and (labels >= 0).any()  # some labels fall outside 12 rows
    expected_ce = F.cross_entropy(logits[labels >= 0], labels[labels >= 0], reduction="sum")
    torch.testing.assert_close(terms.ce, expected_ce)
    expected_kl = topk_kl(logits, rows.row_of[batch.teacher.token_ids], batch.teacher.logprobs)
    torch.testing.assert_close(terms.kl, expected_kl)
    assert not torch.isclose(terms.ce, response_loss_terms(model, batch).ce)


def test_heldout_agreement_takes_the_argmax_over_the_rows(
        draft_dir, data_file, heldout_file):  # noqa: F811
    model = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32).eval()
    examples = load_examples(heldout_file, 512)
    rows = HeadRows.most_frequent(response_token_ids(data_file), 12, model.config.vocab_size)
    matches = draft_matches(model, examples, 3, torch.device("cpu"), rows=rows)
    for example, found in zip(examples, matches, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([example.input_ids])).logits[0]
        scored = logits[example.num_prompt_tokens - 1 : -1][:, rows.token_ids]
        predicted = rows.token_ids[scored.argmax(-1)]
        response = torch.tensor(example.input_ids[example.num_prompt_tokens :])
        assert torch.equal(found, predicted == response)


def test_fit_with_head_rows_trains_and_evaluates_over_those_rows(
        draft_dir, data_file, heldout_file, tmp_path):  # noqa: F811
    config = fit_config(draft_dir, data_file, tmp_path / "run", adapter=None, head_rows=12,
                        heldout_data=heldout_file, eval_every=4, max_steps=4)
    assert config.model_dump()["head_rows"] == 12
    assert "head_rows" not in fit_config(draft_dir, data_file, tmp_path / "x").model_dump()
    result = fit(config)
    model = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32)
    load_trainable_state(model, load_trained_weights(result.run_dir).state)
    rows = HeadRows.most_frequent(response_token_ids(data_file), 12, model.config.vocab_size)
    agreement = heldout_agreement(model.eval(), load_examples(heldout_file, 512), 2,
                                  torch.device("cpu"), rows=rows)
    assert result.tau == pytest.approx(agreement.tau)


def test_merge_zeroes_the_head_rows_fit_did_not_train(
        draft_dir, data_file, tmp_path):  # noqa: F811
    result = fit(fit_config(draft_dir, data_file, tmp_path / "run", adapter=None, head_rows=12,
                            max_steps=4))
    report = merge_run(result.run_dir, tmp_path / "merged")
    trained = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32)
    assert trained.get_output_embeddings().weight is trained.get_input_embeddings().weight
    load_trainable_state(trained, load_trained_weights(result.run_dir).state)
    merged = AutoModelForCausalLM.from_pretrained(report.out, dtype=torch.float32)

    assert not merged.config.tie_word_embeddings
    torch.testing.assert_close(merged.get_input_embeddings().weight,
                               trained.get_input_embeddings().weight)  # every row as trained
    rows = HeadRows.most_frequent(response_token_ids(data_file), 12, merged.config.vocab_size)
    head = merged.get_output_embeddings().weight
    torch.testing.assert_close(head[rows.token_ids],
                               trained.get_output_embeddings().weight[rows.token_ids])
    outside = rows.row_of == -1
    assert (head[outside] == 0).all() and (head[~outside] != 0).any(dim=1).all()
    assert report.max_abs_logit_diff < 1e-4  # over the trained rows
