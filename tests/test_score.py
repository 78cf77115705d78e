"""`afa-train score` on the tiny byte-level chat target of test_training: the target's argmax
and top-K over replies it did not write, resumable, and fit training on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from draft_training.examples import collate, load_examples
from draft_training.fit import fit
from draft_training.replies import load_replies
from draft_training.run import FitConfig
from draft_training.score import ScoreConfig, score_replies
from draft_training.topk_store import record_rows
from tests.test_training import (  # noqa: F401  (fixtures)
    byte_chat_tokenizer,
    data_file,
    draft_dir,
    load,
    prompts_file,
    target_dir,
)

CONVERSATIONS = [
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"},
     {"role": "assistant", "content": "Because the sky scatters short wavelengths."}],
    [{"role": "user", "content": "Count to five."},
     {"role": "assistant", "content": "One, two, three, four, five. " * 4}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "user", "content": "x" * 120}, {"role": "assistant", "content": "A long prompt."}],
]


@pytest.fixture
def replies_file(tmp_path) -> Path:
    path = tmp_path / "replies.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    return path


def score_config(target: Path, replies: Path, out: Path, **overrides) -> ScoreConfig:
    settings = {"target": str(target), "replies": str(replies), "out": out, "top_k_logprobs": 5,
                "max_prompt_tokens": 100, "max_response_tokens": 60, "batch_size": 2,
                "dtype": "float32"}
    return ScoreConfig(**(settings | overrides))


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_score_records_the_targets_argmax_and_top_k_at_every_reply_token(
        target_dir, replies_file, tmp_path):  # noqa: F811
    out = tmp_path / "scored.jsonl"
    summary = score_replies(score_config(target_dir, replies_file, out))
    scored = records(out)
    # the fifth prompt is over 100 tokens: skipped
    assert summary.scored == summary.wanted == len(scored) == 4
    tokenizer = byte_chat_tokenizer()
    target = load(target_dir)
    by_id = {reply.id: reply for reply in load_replies(str(replies_file))}
    for record in scored:
        reply = by_id[record["id"]]
        response = record["response_token_ids"]
        full = record["prompt_token_ids"] + response
        # the reply as the template frames an assistant turn, through <|im_end|>, or cut at 60
        assert tokenizer.decode(full) == tokenizer.apply_chat_template(
            [*reply.prompt.messages, {"role": "assistant", "content": reply.text}],
            tokenize=False)[: len(tokenizer.decode(full))]
        if len(tokenizer(reply.text)["input_ids"]) < 60:
            assert response[-1] == tokenizer.eos_token_id
        else:
            assert len(response) == 60
        with torch.no_grad():
            logits = target(torch.tensor([full])).logits[0].float()
        start = len(record["prompt_token_ids"]) - 1
        logprobs = torch.log_softmax(logits[start : start + len(response)], dim=-1)
        assert record["label_token_ids"] == logprobs.argmax(-1).tolist()
        ids, values = record_rows(out, record)
        assert torch.equal(ids, logprobs.topk(5).indices)
        torch.testing.assert_close(values, logprobs.topk(5).values, atol=2e-3, rtol=0)
    # the target did not write these replies: its argmax differs from the next reply token
    assert any(record["label_token_ids"] != record["response_token_ids"] for record in scored)


def test_score_resumes_by_reply_id_takes_a_seeded_sample_and_skips_excluded_prompts(
        target_dir, replies_file, tmp_path):  # noqa: F811
    out = tmp_path / "scored.jsonl"
    first = score_replies(score_config(target_dir, replies_file, out, limit=2))
    assert (first.scored, first.wanted) == (2, 2)
    again = score_replies(score_config(target_dir, replies_file, out, limit=3))
    assert (again.already_done, again.scored, again.wanted) == (2, 1, 3)
    assert score_replies(score_config(target_dir, replies_file, out, limit=3)).scored == 0
    ids = [record["id"] for record in records(out)]
    assert len(set(ids)) == 3

    excluded = tmp_path / "heldout.jsonl"
    excluded.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    other = tmp_path / "other.jsonl"
    score_replies(score_config(target_dir, replies_file, other, exclude=(str(excluded),)))
    assert sorted(record["id"] for record in records(other)) == sorted(
        f"{replies_file}:{line}" for line in (1, 2, 3))

    with pytest.raises(ValueError, match="no top-k|top-k 5"):
        score_replies(score_config(target_dir, replies_file, out, top_k_logprobs=3))


def test_scored_examples_learn_the_targets_argmax_not_the_next_reply_token(
        target_dir, replies_file, tmp_path):  # noqa: F811
    out = tmp_path / "scored.jsonl"
    score_replies(score_config(target_dir, replies_file, out))
    examples = load_examples(out, max_length=80)
    batch = collate(examples, torch.device("cpu"))
    for row, (example, record) in enumerate(zip(examples, records(out), strict=True)):
        start = example.num_prompt_tokens - 1
        end = len(example.input_ids) - 1
        expected = record["label_token_ids"][: end - start]
        assert batch.labels[row, start:end].tolist() == expected
        assert (batch.labels[row, :start] == -100).all()
        assert (batch.labels[row, end:] == -100).all()


def test_fit_trains_on_scored_replies_beside_the_targets_responses(
        target_dir, replies_file, draft_dir, data_file, tmp_path):  # noqa: F811
    scored = tmp_path / "scored.jsonl"
    score_replies(score_config(target_dir, replies_file, scored, top_k_logprobs=20))
    base = {"draft": str(draft_dir), "data": data_file, "adapter": None, "batch_size": 4,
            "epochs": 1}
    without = FitConfig(**base, out=tmp_path / "without")
    assert "scored_data" not in without.model_dump()  # the mission's step keys are unchanged
    with_scored = FitConfig(**base, out=tmp_path / "with", scored_data=scored)
    # one epoch of 4 examples a step: the 8 responses alone, then with the 4 scored replies
    assert fit(without).steps == 2
    assert fit(with_scored).steps == 3

    with pytest.raises(ValueError, match="top-k of different sizes"):
        mixed_k = tmp_path / "k5.jsonl"
        score_replies(score_config(target_dir, replies_file, mixed_k))
        fit(FitConfig(**base, out=tmp_path / "mixed", scored_data=mixed_k))
