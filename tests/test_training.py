"""The draft-training pipeline (init-draft, generate, fit, resume, merge) on a tiny random-weight
Llama target with a byte-level chat tokenizer, both built in-process."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from afa_serve.engine.draft_vocab import read_draft_vocab
from afa_serve.engine.speculative import SpeculativeDecoder
from afa_serve.engine.verify import SamplingSettings
from afa_serve.prompts import load_prompts, prompt_token_ids
from draft_training.afa_lora import AfaLoraConfig
from draft_training.fit import fit, resume
from draft_training.generate import (
    GenerateConfig,
    answering_order,
    answers_to_asked_prompts,
    generate_responses,
    spread_order,
)
from draft_training.init_draft import InitDraftConfig, init_draft
from draft_training.merge import MergeRefusedError, merge_run
from draft_training.run import FitConfig, checkpoint_path, final_path, metrics_path, trained_model
from draft_training.schedule import anneal_end_step, lambda_at
from tests.conftest import BatchClock

TARGET_LAYERS = 4
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPTS = [
    {"prompt": "Name three colours."},
    {"messages": [{"role": "user", "content": "What is 2 + 2?"}]},
    {"prompt": "Write a haiku about the sea, please."},
    {"prompt": "Hi"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]},
    {"prompt": "Translate 'cat' into French."},
    {"prompt": "List the planets of the solar system in order from the sun."},
    {"prompt": "Say yes."},
]


def byte_chat_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {character: index for index, character in enumerate(alphabet)}
    for special in ("<|im_start|>", "<|im_end|>", "<pad>"):
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory) -> Path:
    tokenizer = byte_chat_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=TARGET_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("target")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in PROMPTS))
    return path


@pytest.fixture(scope="module")
def draft_dir(target_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("drafts") / "draft-2"
    return init_draft(InitDraftConfig(target=str(target_dir), num_layers=2, out=out))


@pytest.fixture(scope="module")
def data_file(target_dir, prompts_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "data.jsonl"
    generate_responses(
        GenerateConfig(
            target=str(target_dir), prompts=str(prompts_file), out=out, max_new_tokens=24
        )
    )
    return out


def load(folder: Path) -> LlamaForCausalLM:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


INPUT_IDS = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(5))


def test_init_draft_keeps_the_targets_first_layers_head_and_tokenizer(target_dir, tmp_path):
    target = load(target_dir)
    with torch.no_grad():
        target_out = target(INPUT_IDS, output_hidden_states=True)
        for layers in (TARGET_LAYERS, 2, 1):
            out = init_draft(
                InitDraftConfig(
                    target=str(target_dir), num_layers=layers, out=tmp_path / f"d{layers}"
                )
            )
            draft = load(out)
            assert draft.config.num_hidden_layers == layers
            if layers == TARGET_LAYERS:
                expected = target_out.logits
            else:  # the target's hidden state after `layers` layers, through its norm and head
                expected = target.lm_head(target.model.norm(target_out.hidden_states[layers]))
            assert torch.equal(draft(INPUT_IDS).logits, expected)
    draft_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "d2")
    assert draft_tokenizer.get_vocab() == AutoTokenizer.from_pretrained(target_dir).get_vocab()
    assert draft_tokenizer.chat_template == CHAT_TEMPLATE
    assert (
        GenerationConfig.from_pretrained(tmp_path / "d2").eos_token_id == target.config.eos_token_id
    )
    with pytest.raises(FileExistsError):
        init_draft(InitDraftConfig(target=str(target_dir), num_layers=2, out=tmp_path / "d2"))
    with pytest.raises(ValueError, match=r"num_layers must lie in \[1, 4\]"):
        init_draft(InitDraftConfig(target=str(target_dir), num_layers=5, out=tmp_path / "d5"))
    assert not (tmp_path / "d5").exists()


def test_generate_records_the_targets_responses_and_resumes_by_prompt_id(
    target_dir, prompts_file, tmp_path
):
    def run(out: Path, batch_size: int, limit: int | None = None):
        return generate_responses(
            GenerateConfig(
                target=str(target_dir),
                prompts=str(prompts_file),
                out=out,
                limit=limit,
                batch_size=batch_size,
                max_new_tokens=12,
            )
        )

    resumed = tmp_path / "resumed.jsonl"
    first = run(resumed, batch_size=3, limit=3)
    assert (first.already_done, first.generated) == (0, 3)
    with open(resumed, "a") as handle:  # a batch torn by a kill mid-write
        handle.write('{"id": "torn", "prompt_token_')
    second = run(resumed, batch_size=3)
    assert (second.prompts, second.already_done, second.generated) == (len(PROMPTS), 3, 5)
    assert run(resumed, batch_size=3).generated == 0

    records = [json.loads(line) for line in resumed.read_text().splitlines()]
    prompts = load_prompts(str(prompts_file))
    assert sorted(record["id"] for record in records) == sorted(prompt.id for prompt in prompts)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    by_id = {record["id"]: record for record in records}
    target = load(target_dir)
    for prompt in prompts:
        record = by_id[prompt.id]
        assert record["prompt_token_ids"] == prompt_token_ids(prompt, tokenizer)
        assert 1 <= len(record["response_token_ids"]) <= 12
        assert record["text"] == tokenizer.decode(
            record["response_token_ids"], skip_special_tokens=True
        )
        with torch.no_grad():  # greedy: each response token is the target's argmax
            ids = torch.tensor([record["prompt_token_ids"] + record["response_token_ids"]])
            predicted = target(ids).logits[0, len(record["prompt_token_ids"]) - 1 : -1].argmax(-1)
        assert predicted.tolist() == record["response_token_ids"]

    one_by_one = tmp_path / "one-by-one.jsonl"
    run(one_by_one, batch_size=1)
    unbatched = {
        json.loads(line)["id"]: json.loads(line) for line in one_by_one.read_text().splitlines()
    }

    def without_topk(records: dict) -> dict:  # shard and offset depend on the batching
        return {key: {k: v for k, v in r.items() if k != "topk"} for key, r in records.items()}

    assert without_topk(unbatched) == without_topk(by_id)

    edited = tmp_path / "edited.jsonl"  # its line 2 is now another prompt
    lines = prompts_file.read_text().splitlines()
    edited.write_text("\n".join([lines[0], lines[2]]) + "\n")
    answered = tmp_path / "answered.jsonl"
    generate_responses(GenerateConfig(target=str(target_dir), prompts=str(prompts_file),
                                      out=answered, limit=2, max_new_tokens=4))
    answered.write_text(answered.read_text().replace(str(prompts_file), str(edited)))
    with pytest.raises(ValueError, match=r"another prompt under id .*edited.jsonl:2"):
        generate_responses(GenerateConfig(target=str(target_dir), prompts=str(edited),
                                          out=answered, max_new_tokens=4))
    first, second = sorted((json.loads(line) for line in answered.read_text().splitlines()),
                           key=lambda record: record["id"])  # lines 1 and 2
    # what a mission does with a changed prompt list: the answer no longer asked is dropped
    told = []
    summary = generate_responses(GenerateConfig(target=str(target_dir), prompts=str(edited),
                                                out=answered, max_new_tokens=4),
                                 drop_unasked=lambda *counts: told.append(counts))
    assert told == [(1, 1)] and (summary.already_done, summary.generated) == (1, 1)
    records = [json.loads(line) for line in answered.read_text().splitlines()]
    assert len(records) == 2 and records[0] == first and records[1]["id"] == f"{edited}:2"
    assert records[1]["prompt_token_ids"] != second["prompt_token_ids"]


def test_generate_stops_when_its_minutes_are_spent_counting_across_runs(
    target_dir, prompts_file, tmp_path, monkeypatch
):
    """--max-minutes: the batch under way finishes, then answering stops; the time spent is
    kept beside OUT, so a rerun answers only for what is left. Batches hold prompts of
    neighbouring lengths, shortest first, then spread over the lengths (van der Corput order),
    so a run cut short has answered short and long prompts alike, the longest last."""
    from draft_training import generate

    clock = BatchClock(monkeypatch, seconds_per_batch=30)
    out = tmp_path / "data.jsonl"

    def run(minutes: float):
        return generate_responses(GenerateConfig(
            target=str(target_dir), prompts=str(prompts_file), out=out, batch_size=2,
            max_new_tokens=4, max_minutes=minutes))

    def answered() -> list[str]:
        return [json.loads(line)["id"] for line in out.read_text().splitlines()]

    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    by_length = [prompt.id for prompt in sorted(  # shortest first; ties in the file's order
        load_prompts(str(prompts_file)),
        key=lambda prompt: len(prompt_token_ids(prompt, tokenizer)))]
    batches = [by_length[start : start + 2] for start in range(0, len(by_length), 2)]
    assert generate.spread_order(len(batches)) == [0, 2, 1, 3]

    first = run(1)  # two batches of 30 s: the shortest two prompts and the third pair
    assert (first.generated, first.out_of_time) == (4, True)
    assert answered() == batches[0] + batches[2]
    assert json.loads(generate.spent_seconds_path(out).read_text()) == {"seconds": 60.0}
    again = run(1)  # spent: the target is not even loaded
    assert (again.generated, again.out_of_time, clock.batches) == (0, True, [2, 2])
    more = run(1.5)  # 30 s left: one more batch, the shorter of the two left
    assert (more.already_done, more.generated, more.out_of_time) == (4, 2, True)
    assert answered()[4:] == batches[1]
    rest = run(0)  # no limit
    assert (rest.generated, rest.out_of_time) == (2, False)
    assert answered()[6:] == batches[3]
    assert generate.spent_seconds(out) == 120.0


def test_long_prompts_come_fewer_to_a_batch_on_the_torch_path():
    """Batches of neighbouring lengths, shortest first, cut at `batch_size` rows or at
    `max_batch_tokens` rows x (longest prompt + new tokens) on the torch path; vLLM, which
    pads nothing, gets `batch_size` rows whatever their length. Then spread over the lengths."""
    lengths = [9, 1, 30, 2, 3, 12, 4, 2]
    pending = [(f"p{index}", [7] * length) for index, length in enumerate(lengths)]

    def batches(engine: str) -> list[list[int]]:
        config = GenerateConfig(target="unused", prompts="unused", out=Path("unused"),
                                batch_size=3, max_new_tokens=2, max_batch_tokens=20,
                                engine=engine)
        return [[len(ids) for _, ids in batch] for batch in answering_order(pending, config)]

    # sorted 1 2 2 | 3 4 (3 rows x 6 > 20) | 9 (2 x 11 > 20) | 12 | 30 (one alone, over it)
    by_length = [[1, 2, 2], [3, 4], [9], [12], [30]]
    assert batches("torch") == [by_length[index] for index in spread_order(5)]
    assert spread_order(5) == [0, 4, 2, 1, 3]
    assert batches("vllm") == [[1, 2, 2], [12, 30], [3, 4, 9]]  # spread_order(3): 0, 2, 1


def test_answers_to_asked_prompts_follow_their_prompt_to_a_free_line_once_each():
    def record(key: str, *prompt_ids: int) -> dict:
        return {"id": key, "prompt_token_ids": list(prompt_ids)}

    records = [record("f:1", 3), record("f:2", 1, 2), record("f:3", 1, 2), record("f:4", 9)]
    asked = {"g:1": [1, 2], "g:2": [3], "g:3": [4]}
    assert answers_to_asked_prompts(records, asked) == [record("g:2", 3), record("g:1", 1, 2)]
    # a prompt asked at two lines: an answer keeps its own line, another takes the free one
    asked = {"f:1": [1, 2], "f:2": [3], "f:3": [1, 2]}
    assert answers_to_asked_prompts(records, asked) == [
        record("f:2", 3), record("f:1", 1, 2), record("f:3", 1, 2)]
    assert answers_to_asked_prompts(records[:2], asked) == [record("f:2", 3), record("f:1", 1, 2)]
    assert answers_to_asked_prompts(records, {"f:3": [1, 2]}) == [record("f:3", 1, 2)]


def fit_config(draft_dir: Path, data_file: Path, out: Path, **overrides) -> FitConfig:
    settings = {
        "draft": str(draft_dir),
        "data": data_file,
        "out": out,
        "adapter": AfaLoraConfig(rank=4, alpha=8, dropout=0.1),
        "lr": 5e-3,
        "batch_size": 2,
        "max_steps": 8,
        "checkpoint_every": 2,
        "seed": 3,
    }
    return FitConfig(**(settings | overrides))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in metrics_path(run_dir).read_text().splitlines()]


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_fit_anneals_lambda_per_optimiser_step_with_gradient_accumulation(
    draft_dir, data_file, tmp_path, schedule
):
    adapter = AfaLoraConfig(rank=4, schedule=schedule, anneal_fraction=0.3)
    # 8 examples, batches of 2, 4 micro-batches per step, 4 epochs: 16 micro-batches, 4 steps
    config = fit_config(
        draft_dir,
        data_file,
        tmp_path / "run",
        adapter=adapter,
        max_steps=None,
        epochs=4,
        grad_accum=4,
    )
    result = fit(config)
    lambdas = [record["lambda"] for record in metrics(config.out)]
    assert [record["step"] for record in metrics(config.out)] == [0, 1, 2, 3]
    assert anneal_end_step(4, 0.3) == 2
    assert lambdas == [lambda_at(step, 4, 0.3, schedule) for step in range(4)]
    assert lambdas[0] == 1.0 and lambdas[1] > 0.0 and lambdas[2:] == [0.0, 0.0]
    assert (result.steps, result.lam) == (4, 0.0)


def test_fit_refuses_a_run_too_short_to_finish_annealing(draft_dir, data_file, tmp_path):
    config = fit_config(
        draft_dir,
        data_file,
        tmp_path / "run",
        max_steps=3,
        adapter=AfaLoraConfig(anneal_fraction=0.9),
    )
    with pytest.raises(ValueError, match="λ reaches 0 at step 3 but the run has only 3"):
        fit(config)


class Killed(Exception):
    pass


def kill_after(step_index: int):
    def on_step(record: dict) -> None:
        if record["step"] == step_index:
            raise Killed

    return on_step


@pytest.mark.parametrize("method", ["afa-lora", "full", "full-frozen-embeddings"])
def test_a_killed_fit_resumes_to_the_same_weights_as_an_uninterrupted_run(
    draft_dir, data_file, tmp_path, method
):
    full = method.startswith("full")
    adapter = None if full else AfaLoraConfig(rank=4, alpha=8, dropout=0.1)
    whole = fit_config(draft_dir, data_file, tmp_path / "whole", adapter=adapter, grad_accum=2,
                       freeze_input_embeddings=method == "full-frozen-embeddings")
    killed = whole.model_copy(update={"out": tmp_path / "killed"})
    fit(whole)

    with pytest.raises(Killed):
        fit(killed, on_step=kill_after(4))  # 5 steps done; the last checkpoint holds 4
    assert not final_path(killed.out).exists()
    assert torch.load(checkpoint_path(killed.out), weights_only=True)["step"] == 4
    assert len(metrics(killed.out)) == 5
    result = resume(killed.out)

    assert result.steps == 8 and not checkpoint_path(killed.out).exists()
    assert metrics(killed.out) == metrics(whole.out)
    whole_weights, resumed_weights = (
        load_file(final_path(whole.out)),
        load_file(final_path(killed.out)),
    )
    assert whole_weights.keys() == resumed_weights.keys()
    assert all(torch.equal(whole_weights[name], resumed_weights[name]) for name in whole_weights)
    losses = [record["loss"] for record in metrics(whole.out)]
    assert losses[-1] < losses[0]


def test_lora_keeps_lambda_at_zero(draft_dir, data_file, tmp_path):
    config = fit_config(
        draft_dir, data_file, tmp_path / "run", adapter=AfaLoraConfig(method="lora")
    )
    fit(config)
    assert {record["lambda"] for record in metrics(config.out)} == {0.0}


def test_merge_writes_a_dense_folder_that_computes_what_the_trained_draft_does(
    draft_dir, data_file, tmp_path
):
    run = fit_config(draft_dir, data_file, tmp_path / "run")
    fit(run)
    report = merge_run(run.out, tmp_path / "merged")
    assert report.max_abs_logit_diff < 1e-4
    assert (report.method, report.step) == ("afa-lora", 8)

    merged = load(tmp_path / "merged")
    assert not any("lora" in name for name in load_file(tmp_path / "merged" / "model.safetensors"))
    trained, _ = trained_model(run.out)
    untrained = load(draft_dir)
    with torch.no_grad():
        trained_logits = trained(INPUT_IDS).logits
        assert (merged(INPUT_IDS).logits - trained_logits).abs().max() < 1e-4
        assert (untrained(INPUT_IDS).logits - trained_logits).abs().max() > 1e-2
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(draft_dir).get_vocab()
    assert (
        GenerationConfig.from_pretrained(tmp_path / "merged").eos_token_id == tokenizer.eos_token_id
    )
    # beside it, the training responses' tokens by frequency, for the engine's trimmed head
    records = [json.loads(line) for line in data_file.read_text().splitlines()]
    counted = Counter(token for record in records for token in record["response_token_ids"])
    vocab = read_draft_vocab(tmp_path / "merged")
    assert dict(zip(vocab.token_ids, vocab.counts, strict=True)) == counted
    assert list(vocab.counts) == sorted(vocab.counts, reverse=True)
    assert vocab.total_tokens == sum(counted.values())


def test_merge_refuses_a_run_stopped_while_lambda_is_above_zero(draft_dir, data_file, tmp_path):
    run = fit_config(draft_dir, data_file, tmp_path / "run", checkpoint_every=1)
    with pytest.raises(Killed):
        fit(run, on_step=kill_after(0))  # checkpoint after step 0, trained at λ = 1
    with pytest.raises(MergeRefusedError, match=r"trained at λ = 1 > 0"):
        merge_run(run.out, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    resume(run.out)
    assert merge_run(run.out, tmp_path / "merged").max_abs_logit_diff < 1e-4


def test_a_feature_draft_trains_beside_its_target_merges_and_serves(
    target_dir, data_file, tmp_path
):
    """init-draft --kind feature → fit (full, the target beside it) → merge → the engine's
    decoder loads it and decodes exactly what the target alone does."""
    from afa_serve.engine.feature_draft import FeatureDraft, is_feature_draft
    from afa_serve.engine.loading import load_target_and_draft

    init = init_draft(InitDraftConfig(target=str(target_dir), kind="feature",
                                      out=tmp_path / "init"))
    assert is_feature_draft(init)
    with pytest.raises(ValueError, match="needs --target"):
        fit(fit_config(init, data_file, tmp_path / "no-target", adapter=None))
    truncated = init_draft(InitDraftConfig(target=str(target_dir), out=tmp_path / "truncated"))
    with pytest.raises(ValueError, match="not a feature draft"):
        fit(fit_config(truncated, data_file, tmp_path / "stray-target", adapter=None,
                       target=str(target_dir)))
    with pytest.raises(ValueError, match="not a feature draft"):
        fit(fit_config(truncated, data_file, tmp_path / "stray-weight", adapter=None,
                       feature_weight=1.0))
    run = fit_config(init, data_file, tmp_path / "run", adapter=None, target=str(target_dir),
                     max_steps=6)
    result = fit(run)
    losses = [record["loss"] for record in metrics(run.out)]
    assert losses[-1] < losses[0]  # the draft learns from the target's features
    report = merge_run(run.out, tmp_path / "merged")
    assert (report.method, report.step) == ("full", 6) and report.max_abs_logit_diff < 1e-5
    trained = FeatureDraft.load(tmp_path / "merged", torch.float32, torch.device("cpu"))
    started = FeatureDraft.load(init, torch.float32, torch.device("cpu"))
    assert not torch.equal(trained.fc.weight, started.fc.weight)
    assert read_draft_vocab(tmp_path / "merged") is not None
    assert result.steps == 6

    models = load_target_and_draft(str(target_dir), str(tmp_path / "merged"), "float32", "cpu")
    plain = SpeculativeDecoder(models.target)
    decoder = SpeculativeDecoder(models.target, models.draft, 3)
    greedy = SamplingSettings(temperature=0.0)
    for prompt in ([5, 9, 11], list(range(30, 60))):
        assert (decoder.generate(prompt, 24, greedy).token_ids
                == plain.generate(prompt, 24, greedy).token_ids)


def test_drafted_positions_add_each_later_positions_loss_at_eagle3s_weights(
    target_dir, data_file, tmp_path
):
    """`drafted_positions`: position p's cross-entropy (the pass that reads the draft's own
    features, `feature_training`) joins the loss weighted 0.8^(p − 1); fit trains on it and
    records it, and a draft that reads no features refuses it."""
    from draft_training.examples import IGNORE_INDEX, collate, load_examples
    from draft_training.feature_training import build_feature_draft_lm
    from draft_training.fit import response_loss_terms

    init = init_draft(InitDraftConfig(target=str(target_dir), kind="feature",
                                      out=tmp_path / "init"))
    model = build_feature_draft_lm(str(init), str(target_dir))
    batch = collate(load_examples(data_file, 128)[:3], torch.device("cpu"))
    labels = batch.labels
    with torch.no_grad():
        passes = model(batch.input_ids, batch.attention_mask, positions=3).drafted
        head = model.get_output_embeddings()

        def cross_entropy(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(head(hidden[rows]), labels[rows],
                                                     reduction="sum")

        labelled = labels != IGNORE_INDEX
        # position p reads its row's input token and the p − 2 before it as drafted: rows
        # whose p − 1 such tokens are inside the response (the target's own: what it predicts)
        response = torch.zeros_like(labelled)
        response[:, 1:] = labelled[:, :-1]
        second = labelled & response
        third = second & torch.roll(response, 1, dims=1)
        per_position = [cross_entropy(passes[0], labelled), cross_entropy(passes[1], second),
                        cross_entropy(passes[2], third)]
        terms = response_loss_terms(model, batch, distill=False, positions=3)
    assert per_position[1] != per_position[0]  # a later position reads other features
    assert labelled.sum() > second.sum() > third.sum() > 0
    expected = per_position[0] + 0.8 * per_position[1] + 0.64 * per_position[2]
    torch.testing.assert_close(terms.ce, expected, rtol=1e-5, atol=1e-4)

    run = fit_config(init, data_file, tmp_path / "run", adapter=None, target=str(target_dir),
                     drafted_positions=3, max_steps=4)
    fit(run)
    losses = [record["loss"] for record in metrics(run.out)]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert json.loads((run.out / "config.json").read_text())["drafted_positions"] == 3
    truncated = init_draft(InitDraftConfig(target=str(target_dir), out=tmp_path / "truncated"))
    with pytest.raises(ValueError, match="not a feature draft"):
        fit(fit_config(truncated, data_file, tmp_path / "stray", adapter=None,
                       drafted_positions=2))


def test_every_term_of_a_later_drafted_position_covers_only_its_reachable_rows(
    target_dir, data_file, tmp_path
):
    """CE, top-K KL and the regression term of each drafted position, over the head's rows,
    in a batch mixing an example without top-k and a scored one whose label at one row is
    not its next input: every term is taken over the same kept rows, computed by hand."""
    import dataclasses

    from draft_training.examples import IGNORE_INDEX, collate, load_examples, response_token_ids
    from draft_training.feature_training import build_feature_draft_lm
    from draft_training.fit import response_loss_terms, topk_kl
    from draft_training.head_rows import HeadRows

    init = init_draft(InitDraftConfig(target=str(target_dir), kind="feature",
                                      out=tmp_path / "init"))
    model = build_feature_draft_lm(str(init), str(target_dir))
    own, untaught, scored = load_examples(data_file, 128)[:3]
    response = list(scored.input_ids[scored.num_prompt_tokens:])
    labels = response[:4] + [(response[4] + 1) % 32] + response[5:]  # it would write another
    batch = collate([own, dataclasses.replace(untaught, topk=None),
                     dataclasses.replace(scored, labels=tuple(labels))], torch.device("cpu"))
    rows = HeadRows.most_frequent(response_token_ids(data_file), 40,
                                  model.get_output_embeddings().weight.shape[0])
    labelled = batch.labels != IGNORE_INDEX
    follows = torch.zeros_like(labelled)
    follows[:, 1:] = batch.input_ids[:, 1:] == batch.labels[:, :-1]
    kept = [labelled, labelled & follows]
    kept.append(kept[1] & torch.cat([torch.zeros_like(follows[:, :1]), follows[:, :-1]], 1))
    assert kept[1].sum() < labelled.sum() - 3  # the mismatch drops rows beyond the first ones
    teacher = batch.teacher
    assert teacher is not None and 0 < teacher.mask.sum() < len(teacher.mask)
    smooth_l1 = torch.nn.functional.smooth_l1_loss
    with torch.no_grad():
        output = model(batch.input_ids, batch.attention_mask, positions=3)
        head = model.get_output_embeddings()
        expected = {"ce": 0.0, "kl": 0.0, "feature": 0.0}
        for position, (hidden, rows_kept) in enumerate(zip(output.drafted, kept, strict=True)):
            weight = 0.8**position
            logits = rows.logits(head, hidden[rows_kept])
            expected["ce"] += weight * torch.nn.functional.cross_entropy(
                logits, rows.labels(batch.labels[rows_kept]), reduction="sum")
            taught = teacher.mask & rows_kept[labelled]
            expected["kl"] += weight * topk_kl(logits[teacher.mask[rows_kept[labelled]]],
                                               rows.row_of[teacher.token_ids[taught]],
                                               teacher.logprobs[taught])
            expected["feature"] += weight * smooth_l1(
                hidden[rows_kept], output.target_features[rows_kept],
                reduction="none").mean(dim=-1).sum()
        terms = response_loss_terms(model, batch, feature=True, rows=rows, positions=3)
    for name, value in expected.items():
        torch.testing.assert_close(getattr(terms, name), value, rtol=1e-5, atol=1e-4)


def test_later_drafted_positions_skip_rows_serving_never_drafts_from():
    """Position p's row j reads tokens j − p + 2..j as drafts the target accepted: in text the
    target only scored (`--scored-data`), a token it would not have written (its label one
    row before differs) takes every row whose later positions read it out of their loss."""
    from draft_training.examples import IGNORE_INDEX
    from draft_training.feature_training import reachable_rows

    ignore = IGNORE_INDEX
    input_ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    own = torch.tensor([[ignore, 3, 4, 5, 6, 7, ignore]])  # the target wrote 3..7
    assert [rows.tolist()[0] for rows in reachable_rows(input_ids, own, 3)] == [
        [True] * 7,
        [False, False, True, True, True, True, True],
        [False, False, False, True, True, True, True],
    ]
    scored = torch.tensor([[ignore, 3, 9, 5, 6, 7, ignore]])  # at row 2 it predicted 9, not 4
    assert [rows.tolist()[0] for rows in reachable_rows(input_ids, scored, 3)] == [
        [True] * 7,
        [False, False, True, False, True, True, True],
        [False, False, False, False, False, True, True],
    ]


def test_the_feature_regression_term_is_eagles_smooth_l1_and_trains(
    target_dir, data_file, tmp_path
):
    """`feature_weight`: per response token, the smooth-L1 from the draft's predicted feature to
    the target's final-norm hidden state at that row, averaged over the hidden size."""
    from draft_training.examples import IGNORE_INDEX, collate, load_examples
    from draft_training.feature_training import build_feature_draft_lm
    from draft_training.fit import response_loss_terms

    init = init_draft(InitDraftConfig(target=str(target_dir), kind="feature",
                                      out=tmp_path / "init"))
    model = build_feature_draft_lm(str(init), str(target_dir))
    batch = collate(load_examples(data_file, 128)[:3], torch.device("cpu"))
    terms = response_loss_terms(model, batch, feature=True)
    with torch.no_grad():
        predicted = model(batch.input_ids, batch.attention_mask).last_hidden_state
        target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
        wanted = target(batch.input_ids, attention_mask=batch.attention_mask,
                        output_hidden_states=True).hidden_states[-1]  # after the final norm
    expected = 0.0
    for row, column in (batch.labels != IGNORE_INDEX).nonzero().tolist():
        difference = (predicted[row, column] - wanted[row, column]).abs()
        expected += torch.where(difference < 1, 0.5 * difference**2, difference - 0.5).mean()
    torch.testing.assert_close(terms.feature, torch.as_tensor(expected), rtol=1e-4, atol=1e-5)
    assert response_loss_terms(model, batch).feature is None  # only when asked for

    run = fit_config(init, data_file, tmp_path / "run", adapter=None, target=str(target_dir),
                     feature_weight=1.0, ce_weight=0.01, kl_weight=0.0, max_steps=6)
    fit(run)  # the regression term leads, as EAGLE weighs it
    regression = [record["feature"] for record in metrics(run.out) if "feature" in record]
    assert len(regression) == 6 and regression[-1] < regression[0]
    assert json.loads((run.out / "config.json").read_text())["feature_weight"] == 1.0
