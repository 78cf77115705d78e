"""`afa-train` end to end on a tiny random-weight Llama target saved to a tmp folder: every
command through typer's CliRunner, the mission's step cache, and the comparison's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
)
from typer.testing import CliRunner

from afa_serve.engine import loading
from draft_training.afa_lora import AfaLoraConfig
from draft_training.cli import app
from draft_training.compare import CompareConfig
from draft_training.fit import fit
from draft_training.pipeline import MissionConfig
from draft_training.run import FitConfig, checkpoint_path, final_path, metrics_path, read_config
from tests.conftest import BatchClock, tiny_llama

runner = CliRunner()

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QUESTIONS = [
    "Name three colours.",
    "What is 2 + 2?",
    "Write a haiku about the sea.",
    "Hi",
    "Translate 'cat' into French.",
    "List the planets.",
    "Say yes.",
    "Why is the sky blue?",
    "Count to five.",
    "Spell 'draft'.",
]


def byte_chat_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {character: index for index, character in enumerate(alphabet)}
    for special in ("<|im_start|>", "<pad>", "<|im_end|>"):  # EOS last, as tiny_llama has it
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
    model = tiny_llama(vocab_size=len(tokenizer), layers=3, pad_token_id=tokenizer.pad_token_id)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("target")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": question}) + "\n" for question in QUESTIONS))
    return path


def invoke(*args: object) -> tuple[str, str]:
    """Run `afa-train ARGS`; return (stdout, stderr), failing the test on a non-zero exit."""
    result = runner.invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result.stdout, result.stderr


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_each_command_runs_end_to_end(target_dir, prompts_file, tmp_path):
    stdout, _ = invoke(
        "init-draft", "--target", target_dir, "--layers", 1, "--out", tmp_path / "draft"
    )
    assert last_line(stdout) == str(tmp_path / "draft")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "draft").config.num_hidden_layers == 1

    data = tmp_path / "data.jsonl"
    generate = ("generate", "--target", target_dir, "--prompts", prompts_file, "--out", data)
    _, stderr = invoke(*generate, "--limit", 6, "--max-new-tokens", 12, "--batch-size", 4)
    assert "6 responses generated" in stderr
    records = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(records) == 6 and all(record["response_token_ids"] for record in records)
    _, stderr = invoke(*generate, "--max-new-tokens", 12)  # resumable: only the 4 missing
    assert "4 responses generated" in stderr and "6 already done" in stderr

    run = tmp_path / "run"
    stdout, stderr = invoke(
        "fit",
        "--draft",
        tmp_path / "draft",
        "--data",
        data,
        "--out",
        run,
        "--method",
        "afa-lora",
        "--rank",
        4,
        "--alpha",
        8,
        "--target-modules",
        "q_proj,v_proj,down_proj",
        "--activation",
        "silu",
        "--schedule",
        "cosine",
        "--anneal-fraction",
        0.5,
        "--lr",
        3e-3,
        "--max-steps",
        6,
        "--batch-size",
        4,
        "--grad-accum",
        2,
        "--seed",
        1,
    )
    assert last_line(stdout) == str(run) and "final λ = 0" in stderr
    config = FitConfig.model_validate_json((run / "config.json").read_text())
    assert config.adapter is not None
    assert (config.adapter.activation, config.adapter.schedule) == ("silu", "cosine")
    assert config.adapter.target_modules == ("q_proj", "v_proj", "down_proj")
    assert config.grad_accum == 2
    lambdas = [json.loads(line)["lambda"] for line in metrics_path(run).read_text().splitlines()]
    assert lambdas[0] == 1.0 and lambdas[3:] == [0.0, 0.0, 0.0]

    stdout, stderr = invoke("merge", run, "--out", tmp_path / "merged")
    assert last_line(stdout) == str(tmp_path / "merged")
    difference = float(stderr.split("max |logit difference| vs the unmerged model")[1].split()[0])
    assert difference < 1e-4
    assert not any("lora" in name for name in load_file(tmp_path / "merged" / "model.safetensors"))

    report_path = tmp_path / "report.json"
    stdout, _ = invoke(
        "eval",
        "--target",
        target_dir,
        "--draft",
        target_dir,
        "--prompts",
        prompts_file,
        "-k",
        3,
        "--max-new-tokens",
        8,
        "--limit",
        3,
        "--out",
        report_path,
    )
    report = json.loads(report_path.read_text())
    assert last_line(stdout) == str(report_path)
    assert report["num_prompts"] == 3 and report["k"] == 3
    assert report["acceptance_rate"] == 1.0  # the target drafting for itself
    assert len(report["acceptance_per_position"]) == 3
    invoke(
        "eval",
        "--target",
        target_dir,
        "--draft",
        tmp_path / "merged",
        "--prompts",
        prompts_file,
        "-k",
        3,
        "--max-new-tokens",
        8,
        "--limit",
        3,
        "--out",
        report_path,
    )
    assert 0.0 <= json.loads(report_path.read_text())["acceptance_rate"] < 1.0


class Killed(Exception):
    pass


def test_an_interrupted_fit_is_refused_by_merge_and_finished_by_resume(
    target_dir, prompts_file, tmp_path
):
    invoke("init-draft", "--target", target_dir, "--layers", 1, "--out", tmp_path / "draft")
    data = tmp_path / "data.jsonl"
    invoke(
        "generate",
        "--target",
        target_dir,
        "--prompts",
        prompts_file,
        "--out",
        data,
        "--max-new-tokens",
        8,
    )
    run = FitConfig(
        draft=str(tmp_path / "draft"),
        data=data,
        out=tmp_path / "run",
        max_steps=8,
        batch_size=4,
        checkpoint_every=1,
    )

    def kill_after_step_1(record: dict) -> None:
        if record["step"] == 1:
            raise Killed

    with pytest.raises(Killed):
        fit(run, on_step=kill_after_step_1)  # checkpoint after 2 steps, trained at λ > 0
    assert checkpoint_path(run.out).exists() and not final_path(run.out).exists()

    refused = runner.invoke(app, ["merge", str(run.out), "--out", str(tmp_path / "merged")])
    assert refused.exit_code == 1 and "refusing to merge" in refused.stderr
    assert not (tmp_path / "merged").exists()

    _, stderr = invoke("fit", "--draft", "ignored", "--data", data, "--out", run.out, "--resume")
    assert "resuming the run" in stderr and "trained 8 steps" in stderr
    assert len(metrics_path(run.out).read_text().splitlines()) == 8
    _, stderr = invoke("resume", run.out)  # a finished run stays as it is
    assert "trained 8 steps" in stderr
    invoke("merge", run.out, "--out", tmp_path / "merged")


def mission_args(target_dir: Path, prompts_file: Path, work: Path, steps: int) -> list[object]:
    return [
        "mission",
        "--target",
        target_dir,
        "--work-dir",
        work,
        "--prompts",
        prompts_file,
        "--heldout-prompts",
        prompts_file,
        "--num-prompts",
        6,
        "--num-heldout",
        3,
        "--layers",
        1,
        "--max-new-tokens",
        8,
        "--steps",
        steps,
        "--batch-size",
        3,
        "--rank",
        4,
    ]


def test_mission_caches_every_step_and_reruns_only_what_a_change_touches(
    target_dir, prompts_file, tmp_path
):
    work = tmp_path / "work"
    stdout, stderr = invoke(*mission_args(target_dir, prompts_file, work, steps=4))
    draft = Path(last_line(stdout))
    assert draft == work / "drafts" / "afa-lora-relu-linear-0.3"
    assert AutoModelForCausalLM.from_pretrained(draft).config.num_hidden_layers == 1
    run = "afa-lora-relu-linear-0.3"
    steps = ["prompts", "init-draft", "generate-heldout", "generate", f"fit-{run}",
             f"merge-{run}", f"trim-{run}"]
    assert all(f"[run]  {step}" in stderr for step in steps)
    # beside it, the draft for vLLM: the tokens it answered with, as a vocabulary of its own
    for_vllm = work / "drafts" / f"{run}-vllm"
    assert f"on vLLM: afa-serve serve --engine vllm --target {target_dir} --draft {for_vllm}" \
        in stderr
    own, trimmed = AutoTokenizer.from_pretrained(for_vllm), AutoModelForCausalLM.from_pretrained(
        for_vllm)
    target_tokenizer = AutoTokenizer.from_pretrained(target_dir)
    assert len(own.get_vocab()) == trimmed.config.vocab_size < len(target_tokenizer.get_vocab())
    # the special tokens (last in the target's numbering) renumbered in every config
    assert own.convert_ids_to_tokens([trimmed.config.eos_token_id, trimmed.config.pad_token_id,
                                      trimmed.generation_config.eos_token_id]) == [
        "<|im_end|>", "<pad>", "<|im_end|>"]
    # and the untied head's rows are the dense draft's, at the kept tokens
    kept = target_tokenizer.convert_tokens_to_ids(own.convert_ids_to_tokens(
        list(range(trimmed.config.vocab_size))))
    dense = AutoModelForCausalLM.from_pretrained(draft)
    assert not dense.config.tie_word_embeddings
    assert torch.equal(trimmed.lm_head.weight, dense.lm_head.weight[kept])

    heldout = [json.loads(line) for line in (work / "prompts/heldout.jsonl").open()]
    train = [json.loads(line) for line in (work / "prompts/train.jsonl").open()]
    assert len(heldout) == 3 and len(train) == 6
    assert not {r["prompt"] for r in heldout} & {r["prompt"] for r in train}
    data = [json.loads(line) for line in (work / "data.jsonl").open()]
    assert len(data) == 6 and all("topk" in record for record in data)
    heldout_data = [json.loads(line) for line in (work / "heldout-data.jsonl").open()]
    assert len(heldout_data) == 3

    def finished() -> dict[str, str]:
        return {
            step: json.loads((work / "steps" / f"{step}.json").read_text())["finished_at"]
            for step in steps
        } | {"weights": (draft / "model.safetensors").stat().st_mtime_ns}

    before = finished()
    stdout, stderr = invoke(*mission_args(target_dir, prompts_file, work, steps=4))
    assert Path(last_line(stdout)) == draft
    assert all(f"[skip] {step}" in stderr for step in steps) and "[run]" not in stderr
    assert finished() == before
    # the target answered in this machine's fastest dtype: naming it changes nothing
    fastest = loading.fastest_dtype_name("cpu")
    stdout, stderr = invoke(*mission_args(target_dir, prompts_file, work, steps=4),
                            "--generate-dtype", fastest)
    assert all(f"[skip] {step}" in stderr for step in steps) and "[run]" not in stderr

    stdout, stderr = invoke(*mission_args(target_dir, prompts_file, work, steps=5))
    assert all(f"[skip] {step}" in stderr
               for step in ("prompts", "init-draft", "generate", "generate-heldout"))
    assert f"[run]  fit-{run}" in stderr and f"[run]  merge-{run}" in stderr
    records = [json.loads(line) for line in metrics_path(work / "runs" / run).open()]
    assert len([record for record in records if "kind" not in record]) == 5
    assert [record["kind"] for record in records if "kind" in record] == ["eval"]
    after = finished()
    assert after["generate"] == before["generate"] and after["weights"] != before["weights"]


def test_a_mission_given_another_prompt_list_keeps_the_answers_to_prompts_still_asked(
    target_dir, prompts_file, tmp_path, monkeypatch
):
    """More prompts: the answers so far are kept and only the new prompts answered, then the
    draft trains again; fewer: the answers no longer asked are dropped (said before generating),
    and a kill after the dropping resumes; another split: the answers to prompts still asked
    follow them to their new lines; another generation setting starts afresh."""
    from draft_training import pipeline
    from draft_training.topk_store import record_rows

    work = tmp_path / "work"

    def run(count: int, *extra: object) -> str:
        args = mission_args(target_dir, prompts_file, work, steps=2)
        args[args.index("--num-prompts") + 1] = count
        return invoke(*args, *extra)[1]

    def answers() -> dict[str, dict]:
        return {record["id"]: record for record in map(json.loads, (work / "data.jsonl").open())}

    def prompt_lines() -> list[str]:
        return (work / "prompts" / "train.jsonl").read_text().splitlines()

    run(6)
    six = answers()
    stderr = run(7)  # the whole pool
    assert "[keep] generate: 6 answers to prompts still asked, 0 dropped" in stderr
    assert "[keep] generate-heldout: 3 answers to prompts still asked, 0 dropped" in stderr
    assert "[run]  fit-" in stderr and "[run]  merge-" in stderr
    seven = answers()
    assert len(seven) == 7 and {key: seven[key] for key in six} == six
    for record in seven.values():  # every kept and new answer's top-k rows are its own
        assert record_rows(work / "data.jsonl", record)[0].shape[0] == len(
            record["response_token_ids"])

    generate_responses = pipeline.generate_responses

    def killed(config, **options):  # a kill after the answers were dropped, before the marker
        summary = generate_responses(config, **options)
        if config.out.name == "data.jsonl":
            raise KeyboardInterrupt
        return summary

    monkeypatch.setattr(pipeline, "generate_responses", killed)
    args = mission_args(target_dir, prompts_file, work, steps=2)
    args[args.index("--num-prompts") + 1] = 5
    result = runner.invoke(app, [str(arg) for arg in args])
    assert result.exit_code != 0
    assert "[keep] generate: 5 answers to prompts still asked, 2 dropped" in result.stderr
    monkeypatch.setattr(pipeline, "generate_responses", generate_responses)
    first_five = {key for key in seven if int(key.rsplit(":", 1)[1]) <= 5}  # FILE:LINE ids
    assert answers() == {key: seven[key] for key in first_five} and len(first_five) == 5
    stderr = run(5)
    assert "[run]  fit-" in stderr
    assert answers() == {key: seven[key] for key in first_five}

    def train_texts(seed: int) -> list[str]:
        return [prompt.text for prompt in pipeline.split_prompts(
            [str(prompts_file)], [str(prompts_file)], 3, seed)[1][:5]]

    first_split = train_texts(0)

    def moves_some_kept(seed: int) -> bool:
        other = train_texts(seed)
        common = set(first_split) & set(other)
        return 0 < len(common) < 5 and any(
            first_split.index(text) != other.index(text) for text in common)

    # the shuffle is seeded with the prompt file's path, which differs from run to run
    seed = next(seed for seed in range(1, 100) if moves_some_kept(seed))
    before, five = prompt_lines(), answers()
    stderr = run(5, "--split-seed", seed)  # another split: other prompts, some at other lines
    after = prompt_lines()
    common = set(before) & set(after)
    assert f"[keep] generate: {len(common)} answers to prompts still asked, " \
        f"{5 - len(common)} dropped" in stderr
    assert 0 < len(common) < 5 and any(before.index(line) != after.index(line) for line in common)
    prefix = next(iter(five)).rsplit(":", 1)[0]
    kept = {f"{prefix}:{after.index(line) + 1}": five[f"{prefix}:{before.index(line) + 1}"]
            for line in common}  # each kept answer now under its prompt's new line
    assert {key: answers()[key] for key in kept} == {
        key: record | {"id": key} for key, record in kept.items()}
    assert len(answers()) == 5

    stderr = run(5, "--split-seed", seed, "--max-new-tokens", 3)  # another generation setting
    assert "[keep] generate:" not in stderr and "[run]  generate" in stderr
    assert all(len(record["response_token_ids"]) <= 3 for record in answers().values())


def test_the_mission_answers_for_its_minutes_and_on_when_given_more(
    target_dir, prompts_file, tmp_path, monkeypatch
):
    """--generate-max-minutes: the training prompts are answered until the minutes are spent
    (the held-out ones all), the draft trains on what came; more minutes keep those answers
    and answer on; `generate --max-minutes` says what it left."""
    clock = BatchClock(monkeypatch, seconds_per_batch=60)
    work = tmp_path / "work"
    args = [*mission_args(target_dir, prompts_file, work, steps=2), "--generate-batch-size", 2]

    def answers(name: str = "data.jsonl") -> list[dict]:
        return [json.loads(line) for line in (work / name).open()]

    _, stderr = invoke(*args, "--generate-max-minutes", 2)  # two batches of 2, of 6
    first = answers()
    assert len(first) == 4 and len(answers("heldout-data.jsonl")) == 3
    assert "[run]  fit-" in stderr
    _, stderr = invoke(*args, "--generate-max-minutes", 2)
    assert "[run]" not in stderr
    batches = len(clock.batches)
    _, stderr = invoke(*args, "--generate-max-minutes", 3)  # one minute more: one batch
    assert "[keep] generate: 4 answers to prompts still asked, 0 dropped" in stderr
    assert "[skip] generate-heldout" in stderr and "[run]  fit-" in stderr
    assert answers()[:4] == first and len(answers()) == 6 and len(clock.batches) == batches + 1

    _, stderr = invoke("generate", "--target", target_dir, "--prompts", prompts_file,
                       "--out", tmp_path / "one-minute.jsonl", "--batch-size", 4,
                       "--max-new-tokens", 4, "--max-minutes", 1)
    assert "4 responses generated" in stderr
    assert f"of {len(QUESTIONS)}; {len(QUESTIONS) - 4} left unanswered: --max-minutes 1 spent" \
        in stderr


def test_the_mission_answers_in_the_machines_fastest_dtype_unless_told(monkeypatch):
    for native, fastest in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(loading, "cpu_runs_bfloat16_natively", lambda native=native: native)
        assert MissionConfig(device="cpu").answering_dtype == fastest
        assert MissionConfig(device="cpu", generate_dtype="bfloat16").answering_dtype == \
            "bfloat16"
        assert MissionConfig(device="cpu", generate_dtype="float32").answering_dtype == "float32"


def test_the_mission_fine_tunes_in_full_by_default_and_the_full_profile_fills_its_sizes(
    target_dir, prompts_file, tmp_path
):
    full = MissionConfig(profile="full")
    assert (full.work_dir, full.num_prompts, full.max_new_tokens, full.adapter, full.lr,
            full.steps, full.eval_every, full.patience, full.early_stopping_from) == (
        Path("afa-train-work-full"), 2000, 256, None, 2e-3, 1200, 25, 8, 600)
    # early stopping waits for half the steps unless told otherwise
    assert MissionConfig(steps=300).early_stopping_from == 150
    assert MissionConfig(steps=300, min_steps=0).early_stopping_from == 0
    assert MissionConfig(profile="full", num_prompts=10, steps=3).num_prompts == 10
    # where vLLM answers (two to three times as fast) the profile answers twice the prompts; this
    # suite's venv has no vLLM, so auto is the torch path (tests/vllm checks auto with vLLM)
    assert full.generate_engine == "torch"
    on_vllm = MissionConfig(profile="full", generate_engine="vllm")
    assert (on_vllm.num_prompts, on_vllm.steps) == (4000, 1200)
    assert MissionConfig(profile="full", generate_engine="vllm", num_prompts=10).num_prompts == 10
    assert MissionConfig(generate_engine="vllm").num_prompts == 800  # the default profile
    default = MissionConfig()  # full fine-tuning unless an adapter is asked for
    assert (default.adapter, default.lr, default.num_prompts, default.steps, default.patience,
            default.work_dir) == (None, 2e-3, 800, 500, 8, Path("afa-train-work"))
    # answering has a time limit too, which the VMs timed reach only without native bfloat16
    assert (default.generate_max_minutes, full.generate_max_minutes) == (13, 60)
    assert CompareConfig().mission.generate_max_minutes == 0  # every arm learns from all
    assert MissionConfig(adapter=AfaLoraConfig()).lr == 2e-3
    assert MissionConfig(adapter=AfaLoraConfig(), lr=5e-4).lr == 5e-4
    assert MissionConfig.model_validate({"adapter": {"method": "full"}}).adapter is None
    # a feature draft: a gentler peak after a warm-up, and in the full profile more steps
    feature = MissionConfig(draft_kind="feature")
    assert (feature.lr, feature.warmup_steps, feature.steps) == (1e-3, 30, 300)
    feature_full = MissionConfig(profile="full", draft_kind="feature", lr=5e-4)
    assert (feature_full.lr, feature_full.warmup_steps, feature_full.steps,
            feature_full.eval_every, feature_full.patience, feature_full.num_prompts) == (
        5e-4, 30, 1500, 100, 5, 2000)
    assert (default.warmup_steps, full.warmup_steps) == (0, 0)
    with pytest.raises(ValueError, match="compare needs the adapters' settings"):
        CompareConfig(mission=MissionConfig(adapter=None))
    # full fine-tuning of a truncated draft keeps the input embeddings; nothing else does unless
    # asked, and what trains no embeddings refuses the flag
    assert [config.freeze_input_embeddings for config in (
        default, full, feature, MissionConfig(adapter=AfaLoraConfig()))] == [
        True, True, False, False]
    assert not MissionConfig(freeze_input_embeddings=False).freeze_input_embeddings
    for refused in ({"adapter": AfaLoraConfig()}, {"draft_kind": "feature"}):
        with pytest.raises(ValueError, match="for full fine-tuning of a truncated draft"):
            MissionConfig(**refused, freeze_input_embeddings=True)

    # on the command line, at a tiny size: flags override the profile's sizes; no adapter
    work = tmp_path / "work"
    without_rank = mission_args(target_dir, prompts_file, work, steps=2)[:-2]
    stdout, stderr = invoke(*without_rank, "--profile", "full")
    assert Path(last_line(stdout)) == work / "drafts" / "full"
    run = read_config(work / "runs" / "full")
    assert (run.adapter, run.lr, run.max_steps, run.eval_every, run.patience, run.min_steps,
            run.freeze_input_embeddings) == (None, 2e-3, 2, 25, 8, 1, True)
    assert "[run]  fit-full" in stderr and "[run]  merge-full" in stderr
    initial, merged = (AutoModelForCausalLM.from_pretrained(folder) for folder in (
        work / "draft-init", Path(last_line(stdout))))
    assert torch.equal(merged.get_input_embeddings().weight,
                       initial.get_input_embeddings().weight)
    assert not torch.equal(merged.get_output_embeddings().weight,
                           merged.get_input_embeddings().weight)

    # the default profile training every weight refits beside the cached answers
    stdout, stderr = invoke(*without_rank, "--no-freeze-input-embeddings")
    assert "[skip] generate" in stderr and "[run]  fit-full" in stderr
    assert not read_config(work / "runs" / "full").freeze_input_embeddings
    merged = AutoModelForCausalLM.from_pretrained(last_line(stdout))
    assert not torch.equal(merged.get_input_embeddings().weight,
                           initial.get_input_embeddings().weight)

    # a feature draft's fit gets its kind's peak and warm-up, beside the same cached answers
    stdout, stderr = invoke(*without_rank, "--draft-kind", "feature")
    assert Path(last_line(stdout)) == work / "drafts" / "feature"
    run = read_config(work / "runs" / "feature")
    assert (run.lr, run.warmup_steps, run.max_steps, run.target) == (1e-3, 30, 2, str(target_dir))
    assert run.drafted_positions == 1
    # its later drafted positions trained too (EAGLE-3's training-time test): a new fit
    stdout, stderr = invoke(*without_rank, "--draft-kind", "feature", "--drafted-positions", "2")
    assert "[run]  fit-feature" in stderr and "[skip] generate" in stderr
    assert read_config(work / "runs" / "feature").drafted_positions == 2
    with pytest.raises(ValueError, match="only a feature draft"):
        MissionConfig(drafted_positions=2)


def test_compare_trains_every_arm_and_writes_table_plots_and_results(
    target_dir, prompts_file, tmp_path
):
    out = tmp_path / "out"
    stdout, _ = invoke(
        "compare",
        "--target",
        target_dir,
        "--work-dir",
        tmp_path / "work",
        "--out",
        out,
        "--prompts",
        prompts_file,
        "--heldout-prompts",
        prompts_file,
        "--num-prompts",
        6,
        "--num-heldout",
        3,
        "--layers",
        1,
        "--max-new-tokens",
        8,
        "--steps",
        4,
        "--batch-size",
        3,
        "--rank",
        4,
        "-k",
        2,
        "--eval-max-new-tokens",
        6,
        "--activations",
        "relu,gelu",
        "--schedules",
        "linear",
        "--anneal-fractions",
        "0.3",
        "--lr-full",
        1e-3,
    )
    names = ["table.md", "per_position.png", "training.png", "ablation.png", "results.json"]
    assert [Path(line).name for line in stdout.strip().splitlines()[-5:]] == names
    for png in names[1:4]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results = json.loads((out / "results.json").read_text())
    arms = results["arms"]
    assert list(arms) == ["untrained", "lora", "afa-lora", "full"]
    assert arms["untrained"]["trainable_params"] is None
    assert arms["lora"]["trainable_params"] == arms["afa-lora"]["trainable_params"]
    assert arms["full"]["trainable_params"] > arms["lora"]["trainable_params"]
    heldout = str(tmp_path / "work" / "prompts" / "heldout.jsonl")
    for arm in arms.values():
        assert arm["eval"]["prompts"] == heldout and arm["eval"]["num_prompts"] == 3
        assert arm["eval"]["k"] == 2 and 1.0 <= arm["eval"]["mean_acceptance_length"] <= 3.0
    # The ablation's relu/linear/0.3 cell is the AFA-LoRA arm itself: trained once, reused.
    assert [cell["adapter"]["activation"] for cell in results["ablation"]] == ["relu", "gelu"]
    assert results["ablation"][0]["eval"] == arms["afa-lora"]["eval"]
    assert sorted(p.name for p in (tmp_path / "work" / "runs").iterdir()) == [
        "afa-lora-gelu-linear-0.3",
        "afa-lora-relu-linear-0.3",
        "full",
        "lora",
    ]

    table = (out / "table.md").read_text()
    for arm in arms:
        assert f"| {arm} |" in table
    assert "HELD-OUT" in table and "| gelu | linear | 0.3 |" in table
    untrained_tau = arms["untrained"]["eval"]["mean_acceptance_length"]
    assert f"{untrained_tau:.3f}" in table
    with torch.no_grad():  # each arm's merged draft is a plain loadable checkpoint
        AutoModelForCausalLM.from_pretrained(tmp_path / "work" / "drafts" / "full")
