"""The target's top-k log-probabilities stored beside a generate JSONL (`topk_store`): the shard
format, rows equal to a teacher-forced forward's log_softmax top-k, resumption after a kill, and
batched generation equal to one prompt at a time on the real SmolLM2."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM

from afa_serve.prompts import load_prompts, prompt_token_ids
from draft_training.generate import GenerateConfig, HfGenerator, generate_responses, response_end
from draft_training.topk_store import read_rows, record_rows, topk_dir, write_shard
from tests.test_training import PROMPTS, byte_chat_tokenizer

K = 5
MAX_NEW_TOKENS = 10


def test_topk_dir_sits_beside_the_jsonl():
    assert topk_dir(Path("runs/data.jsonl")) == Path("runs/data.topk")
    assert topk_dir(Path("data")) == Path("data.topk")


def test_shards_are_numbered_sorted_and_read_back_as_written(tmp_path):
    folder = tmp_path / "data.topk"
    ids = torch.randint(0, 1000, (7, 4), generator=torch.Generator().manual_seed(0))
    logprobs = -torch.rand(7, 4, generator=torch.Generator().manual_seed(1)) * 10
    assert write_shard(folder, ids, logprobs) == "00000.safetensors"
    (folder / ".00001.safetensors.abc.tmp").write_bytes(b"torn")  # a temporary left by a kill
    assert write_shard(folder, ids[:3], logprobs[:3]) == "00001.safetensors"

    stored = load_file(str(folder / "00000.safetensors"))
    assert stored["token_ids"].dtype == torch.int32 and stored["logprobs"].dtype == torch.float16
    assert stored["token_ids"].shape == stored["logprobs"].shape == (7, 4)

    read_ids, read_logprobs = read_rows(folder, "00000.safetensors", 2, 4)
    assert read_ids.dtype == torch.int64 and read_logprobs.dtype == torch.float32
    order = logprobs[2:6].argsort(dim=1, descending=True)
    assert torch.equal(read_ids, ids[2:6].gather(1, order))
    torch.testing.assert_close(read_logprobs, logprobs[2:6].gather(1, order), atol=1e-2, rtol=0)
    assert torch.all(read_logprobs[:, :-1] >= read_logprobs[:, 1:])
    assert read_rows(folder, "00001.safetensors", 0, 0)[0].shape == (0, 4)
    with pytest.raises(IndexError):
        read_rows(folder, "00001.safetensors", 1, 3)

    # a shard removed and rewritten under the same name is read afresh, not from the cache
    (folder / "00001.safetensors").unlink()
    assert write_shard(folder, ids[:3], logprobs[:3] - 1) == "00001.safetensors"
    rewritten = read_rows(folder, "00001.safetensors", 0, 3)[1]
    torch.testing.assert_close(rewritten.max(dim=1).values, logprobs[:3].max(dim=1).values - 1,
                               atol=1e-2, rtol=0)


def tiny_target(folder: Path, extra_eos: list[int]) -> Path:
    tokenizer = byte_chat_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.3,  # varied responses (at 0.02 every prompt gets one repeated token)
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, *extra_eos]
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in PROMPTS))
    return path


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory, prompts_file) -> Path:
    """A tiny random target whose responses of MAX_NEW_TOKENS end, some of them, early: one of the
    tokens its greedy responses hold (not first) is made an extra end-of-sequence token."""
    plain = tiny_target(tmp_path_factory.mktemp("plain"), [])
    out = tmp_path_factory.mktemp("probe") / "probe.jsonl"
    generate_responses(config(plain, prompts_file, out, top_k_logprobs=0))
    responses = [json.loads(line)["response_token_ids"] for line in out.read_text().splitlines()]
    first = {response[0] for response in responses}
    later = Counter(token for response in responses for token in set(response[2:]) - first)
    (extra, count), = later.most_common(1)
    assert 0 < count < len(responses)
    return tiny_target(tmp_path_factory.mktemp("target"), [extra])


def config(target: Path, prompts: Path, out: Path, **overrides) -> GenerateConfig:
    settings = {"max_new_tokens": MAX_NEW_TOKENS, "batch_size": 3, "top_k_logprobs": K}
    return GenerateConfig(target=str(target), prompts=str(prompts), out=out,
                          **{**settings, **overrides})


def read_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def assert_rows_are_the_teacher_forced_topk(target_dir: Path, out: Path) -> list[dict]:
    """Every record's top-k rows against log_softmax of a float32 forward over prompt+response."""
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    records = read_records(out)
    rows_per_shard: dict[str, int] = {}
    for record in records:
        prompt, response = record["prompt_token_ids"], record["response_token_ids"]
        assert record["topk"]["k"] == K
        ids, logprobs = record_rows(out, record)
        assert ids.shape == logprobs.shape == (len(response), K)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response])).logits[0]
        expected = torch.log_softmax(logits[len(prompt) - 1 : -1].float(), dim=-1)
        top = expected.topk(K, dim=-1)
        torch.testing.assert_close(logprobs, top.values, atol=1e-2, rtol=1e-3)
        torch.testing.assert_close(logprobs, expected.gather(1, ids), atol=1e-2, rtol=1e-3)
        assert ids[:, 0].tolist() == response  # greedy: each response token is the top one
        shard = record["topk"]["shard"]
        rows_per_shard[shard] = max(rows_per_shard.get(shard, 0),
                                    record["topk"]["offset"] + len(response))
    for shard, rows in rows_per_shard.items():  # a shard holds exactly its records' rows
        assert load_file(str(topk_dir(out) / shard))["token_ids"].shape == (rows, K)
    return records


def test_generated_topk_rows_are_the_targets_log_softmax_topk(target_dir, prompts_file, tmp_path):
    out = tmp_path / "data.jsonl"
    summary = generate_responses(config(target_dir, prompts_file, out))
    assert summary.generated == len(PROMPTS)
    records = assert_rows_are_the_teacher_forced_topk(target_dir, out)
    finish = {record["finish_reason"] for record in records}
    assert finish == {"stop", "length"}, "want responses cut at EOS and responses at the limit"
    assert len({record["topk"]["shard"] for record in records}) == 3  # one shard per batch

    # top-k on or off: the same responses
    plain = tmp_path / "plain.jsonl"
    generate_responses(config(target_dir, prompts_file, plain, top_k_logprobs=0))
    assert not topk_dir(plain).exists()
    without = {record["id"]: record for record in read_records(plain)}
    assert all("topk" not in record for record in without.values())
    assert {r["id"]: {k: v for k, v in r.items() if k != "topk"} for r in records} == without


def test_a_killed_run_resumes_with_consistent_rows_past_an_orphan_shard(
    target_dir, prompts_file, tmp_path
):
    out = tmp_path / "data.jsonl"
    first = generate_responses(config(target_dir, prompts_file, out, limit=3))
    assert first.generated == 3
    # killed after writing the next batch's shard, mid-way through appending its records
    orphan = write_shard(topk_dir(out), torch.zeros(9, K, dtype=torch.int32), torch.zeros(9, K))
    with open(out, "a") as handle:
        handle.write('{"id": "torn", "topk": {"shard": "' + orphan)

    with pytest.raises(ValueError, match="top-k 5"):  # a different K would mix two settings
        generate_responses(config(target_dir, prompts_file, out, top_k_logprobs=0))
    second = generate_responses(config(target_dir, prompts_file, out))
    assert (second.already_done, second.generated) == (3, len(PROMPTS) - 3)
    assert generate_responses(config(target_dir, prompts_file, out)).generated == 0

    records = assert_rows_are_the_teacher_forced_topk(target_dir, out)
    assert sorted(record["id"] for record in records) == sorted(
        prompt.id for prompt in load_prompts(str(prompts_file))
    )
    assert orphan not in {record["topk"]["shard"] for record in records}
    assert (topk_dir(out) / orphan).exists()  # harmless: nothing points into it


@pytest.mark.slow
def test_batched_greedy_equals_one_prompt_at_a_time_on_the_real_model(
    real_model_path, real_tokenizer, tmp_path
):
    """Left padding in float32: the same greedy tokens whatever the batch, and top-k rows equal
    up to float rounding; one row ends (EOS) while the others go on."""
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"prompt": "What is the capital of France?"}) + "\n")
    # One thread: the suite shares two cores with other jobs, where two OpenMP threads wait on
    # each other (several times slower).
    generator = HfGenerator(
        GenerateConfig(target=str(real_model_path), prompts="mt-bench", out=tmp_path / "x.jsonl",
                       max_new_tokens=16, dtype="float32", top_k_logprobs=K),
        real_tokenizer,
    )
    prompts = [prompt_token_ids(prompt, real_tokenizer)
               for prompt in load_prompts("mt-bench", 2) + load_prompts(str(short))]
    assert len({len(ids) for ids in prompts}) == len(prompts)  # each row padded differently
    batched = generator(prompts)
    for ids, together in zip(prompts, batched, strict=True):
        (alone,) = generator([ids])
        end = response_end(alone.tokens, generator.eos) or len(alone.tokens)
        assert together.tokens[:end] == alone.tokens[:end]
        torch.testing.assert_close(together.topk_logprobs[:end], alone.topk_logprobs[:end],
                                   atol=1e-3, rtol=0)
    assert response_end(batched[-1].tokens, generator.eos) is not None
