"""fit's distillation loss, length bucketing, autocast setting, held-out agreement, best weights
and early stopping, on the tiny target and draft of `test_training.py`."""

from __future__ import annotations

import json
import logging
import math
import platform
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from afa_serve.engine import loading
from draft_training import fit as fit_module
from draft_training.agreement import (
    Agreement,
    agreement_from_matches,
    draft_matches,
    heldout_agreement,
    run_lengths,
)
from draft_training.examples import IGNORE_INDEX, collate, load_examples, padding_fraction
from draft_training.fit import fit, plan_micro_batches, resume, topk_kl
from draft_training.generate import GenerateConfig, generate_responses
from draft_training.run import (
    FitConfig,
    best_path,
    checkpoint_path,
    final_path,
    read_config,
    trained_model,
)
from draft_training.schedule import anneal_end_step
from draft_training.topk_store import topk_dir
from tests.test_training import (  # noqa: F401 (fixtures)
    Killed,
    data_file,
    draft_dir,
    fit_config,
    kill_after,
    prompts_file,
    target_dir,
)

HELDOUT_PROMPTS = [
    {"prompt": "Count to five."},
    {"prompt": "What colour is the sky?"},
    {"messages": [{"role": "user", "content": "Spell 'dog' backwards."}]},
    {"prompt": "Name a fruit that is yellow."},
]


@pytest.fixture(scope="module")
def heldout_file(target_dir, tmp_path_factory) -> Path:  # noqa: F811
    folder = tmp_path_factory.mktemp("heldout")
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(record) + "\n" for record in HELDOUT_PROMPTS))
    out = folder / "heldout.jsonl"
    generate_responses(
        GenerateConfig(target=str(target_dir), prompts=str(prompts), out=out, max_new_tokens=24)
    )
    return out


def pattern_records(count: int, seed: int) -> list[dict]:
    """Records whose responses cycle through a few tokens chosen by the prompt's last token: a
    pattern a tiny draft learns within a few steps, so its held-out τ moves (the tiny target's
    own greedy responses repeat one token, which the untrained draft already predicts)."""
    generator = torch.Generator().manual_seed(seed)
    result = []
    for index in range(count):
        prompt = torch.randint(
            0, 250, (int(torch.randint(3, 12, (1,), generator=generator)),), generator=generator
        ).tolist()
        cycle = [prompt[-1], (prompt[-1] + 7) % 250, (prompt[-1] + 3) % 250]
        response = (cycle * 8)[: int(torch.randint(6, 24, (1,), generator=generator))]
        result.append(
            {
                "id": f"p{index}",
                "prompt_token_ids": prompt,
                "response_token_ids": response,
                "text": "",
                "finish_reason": "length",
            }
        )
    return result


@pytest.fixture(scope="module")
def pattern_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("pattern")
    files = folder / "train.jsonl", folder / "heldout.jsonl"
    for path, (count, seed) in zip(files, [(32, 0), (12, 1)], strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in pattern_records(count, seed)))
    return files


def records(run_dir: Path, kind: str | None = None) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for line in lines if (record := json.loads(line)).get("kind") == kind]


def metadata(path: Path) -> dict[str, str]:
    with safe_open(path, framework="pt") as handle:
        return handle.metadata()


def same_weights(first: Path, second: Path) -> bool:
    a, b = load_file(first), load_file(second)
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


# --- the distillation loss ------------------------------------------------------------------


def test_topk_kl_matches_a_hand_computed_value():
    # V = 5, K = 2. Student q = (0.10, 0.20, 0.30, 0.15, 0.25); teacher top-2 = ids 2 and 4 at
    # p = 0.5 and 0.3, tail 0.2. The student's probabilities of those ids are 0.30 and 0.25,
    # its tail 0.45, so KL = 0.5 ln(0.5/0.3) + 0.3 ln(0.3/0.25) + 0.2 ln(0.2/0.45)
    #                      = 0.2554128 + 0.0546965 − 0.1621860 = 0.1479233.
    student = torch.tensor([[0.10, 0.20, 0.30, 0.15, 0.25]]).log()
    ids = torch.tensor([[2, 4]])
    logprobs = torch.tensor([[0.5, 0.3]]).log()
    assert topk_kl(student, ids, logprobs).item() == pytest.approx(0.1479233, abs=1e-6)
    expected = 0.5 * math.log(0.5 / 0.3) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.45)
    assert topk_kl(student + 7.0, ids, logprobs).item() == pytest.approx(expected, abs=1e-6)

    # Summed over rows; a student equal to the teacher on the K + 1 outcomes costs nothing.
    same = torch.tensor([[0.05, 0.05, 0.5, 0.1, 0.3]]).log()
    two_rows = topk_kl(torch.cat([student, same]), ids.repeat(2, 1), logprobs.repeat(2, 1))
    assert two_rows.item() == pytest.approx(0.1479233, abs=1e-6)


def test_topk_kl_stays_finite_when_a_tail_is_empty():
    # The student puts all its mass on the teacher's two ids (tail underflows to 0), and a
    # teacher row whose top-K sums to one (tail 0): both tails are floored, gradients finite.
    logits = torch.tensor([[40.0, 40.0, -40.0, -40.0, -40.0]], requires_grad=True)
    ids = torch.tensor([[0, 1]])
    for logprobs in (torch.tensor([[0.6, 0.3]]).log(), torch.tensor([[0.5, 0.5]]).log()):
        loss = topk_kl(logits, ids, logprobs)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
        logits.grad = None


def test_collated_teacher_rows_line_up_with_the_labels(data_file):  # noqa: F811
    examples = load_examples(data_file, 512)
    assert all(example.topk is not None for example in examples)
    batch = collate(examples, torch.device("cpu"))
    labels = batch.labels[batch.labels != IGNORE_INDEX]
    teacher = batch.teacher
    assert teacher is not None and teacher.mask.all()
    assert teacher.token_ids.shape == (len(labels), examples[0].topk.k)
    # Greedy responses: the target's top-1 at each position is the response token itself.
    assert torch.equal(teacher.token_ids[:, 0], labels)
    assert (teacher.logprobs[:, :-1] >= teacher.logprobs[:, 1:]).all()


def test_fit_distils_when_the_data_has_topk_and_falls_back_to_ce_without(
    draft_dir,  # noqa: F811
    data_file,  # noqa: F811
    tmp_path,
    caplog,
):
    run = fit_config(draft_dir, data_file, tmp_path / "kl", max_steps=4, kl_weight=0.5)
    fit(run)
    steps = records(run.out)
    assert all(record["kl"] > 0 for record in steps)
    assert all(
        record["loss"] == pytest.approx(record["ce"] + 0.5 * record["kl"], rel=1e-5)
        for record in steps
    )

    # the same data without its top-k folder: CE only, with a warning
    bare = tmp_path / "bare.jsonl"
    bare.write_text(
        "".join(
            json.dumps({k: v for k, v in json.loads(line).items() if k != "topk"}) + "\n"
            for line in data_file.read_text().splitlines()
        )
    )
    assert not topk_dir(bare).exists()
    with caplog.at_level(logging.WARNING, logger="draft_training.fit"):
        fit(fit_config(draft_dir, bare, tmp_path / "ce", max_steps=4))
    assert "stores no top-k log-probs: training on cross-entropy only" in caplog.text
    assert all("kl" not in record for record in records(tmp_path / "ce"))
    with pytest.raises(ValueError, match="nothing to train on"):
        fit(fit_config(draft_dir, bare, tmp_path / "none", max_steps=4, ce_weight=0.0))
    with pytest.raises(ValueError, match="both 0"):
        fit_config(draft_dir, bare, tmp_path / "x", ce_weight=0.0, kl_weight=0.0)


def test_bfloat16_autocast_trains_on_cpu(draft_dir, data_file, tmp_path):  # noqa: F811
    run = fit_config(draft_dir, data_file, tmp_path / "bf16", max_steps=4, autocast="bfloat16")
    assert fit(run).steps == 4
    assert all(math.isfinite(record["loss"]) for record in records(run.out))


def cpu_has_bfloat16_instructions() -> bool:
    """From the kernel's own list of the CPU's flags on x86 Linux (CI's machines); elsewhere
    oneDNN's check, which is what the code under test reads there too."""
    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine() != "x86_64" or not cpuinfo.exists():
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    flags = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags"))
    return bool(set(flags.split(":", 1)[1].split()) & {"avx512_bf16", "amx_bf16", "amx_tile"})


def test_native_bfloat16_is_what_the_cpu_flags_say_not_what_onednn_emulates():
    native = cpu_has_bfloat16_instructions()
    assert loading.cpu_runs_bfloat16_natively() == native
    assert loading.fastest_dtype_name("cpu") == ("bfloat16" if native else "float32")
    assert loading.fastest_dtype_name("cuda") == "bfloat16"


def test_auto_autocast_is_bfloat16_only_where_the_cpu_runs_it_natively(monkeypatch):
    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(loading, "cpu_runs_bfloat16_natively", lambda native=native: native)
        with fit_module.autocast_context("auto", cpu):
            assert torch.is_autocast_enabled("cpu") == native
        with fit_module.autocast_context("bfloat16", cpu):
            assert torch.is_autocast_enabled("cpu")
        with fit_module.autocast_context("off", cpu):
            assert not torch.is_autocast_enabled("cpu")


# --- length bucketing -----------------------------------------------------------------------


def test_length_bucketing_pads_less_and_stays_a_function_of_the_seed(tmp_path):
    lengths = [
        int(x) for x in torch.randint(20, 400, (300,), generator=torch.Generator().manual_seed(1))
    ]

    class Sized:  # what padding_fraction reads of an example
        def __init__(self, length: int):
            self.input_ids = range(length)

    examples = [Sized(length) for length in lengths]
    settings = {"draft": "d", "data": tmp_path / "d.jsonl", "out": tmp_path, "epochs": 3}
    plain = FitConfig(**settings, length_bucketing=False)
    bucketed = FitConfig(**settings)
    plain_plan, plain_steps = plan_micro_batches(lengths, plain)
    plan, steps = plan_micro_batches(lengths, bucketed)
    assert steps == plain_steps == 3 * math.ceil(300 / 8)
    assert plan_micro_batches(lengths, bucketed) == (plan, steps)
    assert plan_micro_batches(lengths, bucketed.model_copy(update={"seed": 1}))[0] != plan
    assert plan_micro_batches(len(lengths), plain) == (plain_plan, plain_steps)
    per_epoch = len(plan) // 3
    for epoch in range(3):  # every example once per epoch
        chunk = plan[epoch * per_epoch : (epoch + 1) * per_epoch]
        assert sorted(index for batch in chunk for index in batch) == list(range(300))
    assert plan[:per_epoch] != plan[per_epoch : 2 * per_epoch]
    assert padding_fraction(plan, examples) < 0.1 < padding_fraction(plain_plan, examples)


# --- held-out agreement ---------------------------------------------------------------------


def test_agreement_on_hand_made_match_sequences():
    first = [1, 1, 0, 1, 1, 1, 1, 1]
    # run lengths from each start, capped at 4 and by the end of the response
    assert run_lengths(torch.tensor(first), 4).tolist() == [2, 1, 0, 4, 4, 3, 2, 1]
    single = agreement_from_matches([first])
    assert single.alpha == 7 / 8
    assert single.tau == pytest.approx(1 + 17 / 8)
    assert single.acceptance_per_position == pytest.approx((7 / 8, 5 / 8, 3 / 8, 2 / 8))

    pooled = agreement_from_matches([first, [False, True]])  # run lengths 0, 1 added
    assert (pooled.alpha, pooled.num_tokens) == (8 / 10, 10)
    assert pooled.tau == pytest.approx(1 + 18 / 10)
    assert pooled.acceptance_per_position == pytest.approx((0.8, 0.5, 0.3, 0.2))

    assert agreement_from_matches([[True] * 100]).tau == pytest.approx(
        1 + (96 * 4 + 4 + 3 + 2 + 1) / 100
    )
    assert agreement_from_matches([[False] * 5]).tau == 1.0
    assert agreement_from_matches([[True, True, True]], k=1).acceptance_per_position == (1.0,)
    with pytest.raises(ValueError):
        agreement_from_matches([])


def test_a_feature_drafts_run_lengths_read_each_drafted_positions_own_matches():
    # [p, t]: whether drafted position p + 1's pass is right at response position t
    per_position = torch.tensor([[1, 1, 0, 1, 1],
                                 [0, 1, 1, 1, 0],
                                 [1, 1, 1, 0, 1]], dtype=torch.bool)
    # from t: position 1 at t, position 2 at t + 1, position 3 at t + 2, then position 3 on
    assert run_lengths(per_position, 3).tolist() == [3, 2, 0, 1, 1]
    assert run_lengths(per_position[:1], 4).tolist() == run_lengths(per_position[0], 4).tolist()
    agreement = agreement_from_matches([per_position], k=3)
    assert agreement.alpha == 4 / 5  # the first drafted position's matches
    assert agreement.tau == pytest.approx(1 + 7 / 5)
    assert agreement.acceptance_per_position == pytest.approx((4 / 5, 2 / 5, 1 / 5))


def test_heldout_agreement_is_the_drafts_argmax_against_the_response(
    draft_dir,  # noqa: F811
    heldout_file,
):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32).eval()
    examples = load_examples(heldout_file, 512)
    matches = draft_matches(model, examples, batch_size=3, device=torch.device("cpu"))
    for example, found in zip(examples, matches, strict=True):
        with torch.no_grad():
            logits = model(torch.tensor([example.input_ids])).logits[0]
        predicted = logits[example.num_prompt_tokens - 1 : -1].argmax(-1)
        response = torch.tensor(example.input_ids[example.num_prompt_tokens :])
        assert torch.equal(found, predicted == response)
    agreement = heldout_agreement(model, examples, 3, torch.device("cpu"))
    assert agreement == agreement_from_matches(matches)


# --- best weights, early stopping, resume ---------------------------------------------------


def heldout_config(draft_dir, data_file, heldout_file, out, **overrides) -> FitConfig:  # noqa: F811
    settings = {"heldout_data": heldout_file, "eval_every": 1, "grad_accum": 2}
    return fit_config(draft_dir, data_file, out, **(settings | overrides))


def test_final_weights_are_the_best_eligible_evaluation(
    draft_dir,  # noqa: F811
    pattern_files,
    tmp_path,
):
    train, heldout = pattern_files
    run = heldout_config(draft_dir, train, heldout, tmp_path / "run", lr=3e-2, kl_weight=0.0)
    result = fit(run)
    evals = records(run.out, "eval")
    assert [record["step"] for record in evals] == list(range(8))
    end = anneal_end_step(8, 0.3)
    assert [record["eligible"] for record in evals] == [step >= end for step in range(8)]
    assert all((record["lambda"] == 0.0) == record["eligible"] for record in evals)
    eligible = [record for record in evals if record["eligible"]]
    best = max(eligible, key=lambda record: record["tau"])  # the earliest on a tie
    assert len({record["tau"] for record in eligible}) > 1  # training moves the draft's τ
    assert [record["step"] for record in evals if record["best"]][-1] == best["step"]
    assert not any(record["best"] for record in evals if not record["eligible"])

    assert same_weights(best_path(run.out), final_path(run.out))
    final = metadata(final_path(run.out))
    assert int(final["step"]) == best["step"] + 1 and float(final["lambda"]) == 0.0
    assert float(final["tau"]) == best["tau"] and final["trained_steps"] == "8"
    assert (result.steps, result.trained_steps, result.tau) == (best["step"] + 1, 8, best["tau"])
    assert not result.stopped_early and not checkpoint_path(run.out).exists()

    # the final weights are the evaluated ones: the same τ measured again, and `resume` of the
    # finished run reports them
    model, weights = trained_model(run.out)
    cpu = torch.device("cpu")
    autocast = fit_module.autocast_context(run.autocast, cpu)  # as evaluated during the run
    again = heldout_agreement(model, load_examples(heldout, 512), 2, cpu, autocast)
    assert again.tau == best["tau"] and weights.step == best["step"] + 1
    assert resume(run.out) == result


def scripted_taus(monkeypatch, taus: dict[int, float]) -> None:
    """Held-out τ by optimiser step: the step is the last step record of the run's metrics, so
    a resumed run sees the same τ at the same step."""

    def fake(model, examples, batch_size, device, autocast=None, k=4, rows=None):
        run_dir = fake.run_dir
        step = records(run_dir)[-1]["step"]
        tau = taus[step]
        return Agreement(tau - 1.0, (tau - 1.0,) * k, tau, 10, k)

    monkeypatch.setattr(fit_module, "heldout_agreement", fake)
    return fake


# λ = 0 from step 3 of 8 on. Eligible τ: 1.5 (best), 2.0 (best), 1.9, 1.95: with patience 2 the
# run stops after step 6, keeping the weights of step 4; the τ of 9 during annealing counts
# for nothing, and step 7's 3.0 is never reached.
TAUS = {0: 9.0, 1: 9.0, 2: 9.0, 3: 1.5, 4: 2.0, 5: 1.9, 6: 1.95, 7: 3.0}


def test_early_stop_after_patience_evaluations_without_a_better_tau(
    draft_dir,  # noqa: F811
    data_file,  # noqa: F811
    heldout_file,
    tmp_path,
    monkeypatch,
):
    run = heldout_config(draft_dir, data_file, heldout_file, tmp_path / "run", patience=2)
    scripted_taus(monkeypatch, TAUS).run_dir = run.out
    result = fit(run)
    assert (result.steps, result.trained_steps, result.stopped_early) == (5, 7, True)
    assert result.tau == 2.0 and result.lam == 0.0
    assert [record["step"] for record in records(run.out)] == list(range(7))
    assert [record["best"] for record in records(run.out, "eval")] == [
        False,
        False,
        False,
        True,
        True,
        False,
        False,
    ]
    assert metadata(final_path(run.out))["stopped_early"] == "true"
    assert same_weights(best_path(run.out), final_path(run.out))

    # patience 1 would have stopped during annealing, were ineligible evaluations counted
    early = heldout_config(draft_dir, data_file, heldout_file, tmp_path / "p1", patience=1)
    scripted_taus(monkeypatch, TAUS).run_dir = early.out
    assert fit(early).trained_steps == 6


@pytest.mark.parametrize(("min_steps", "trained_steps", "tau"), [(7, 7, 2.0), (8, 8, 3.0)])
def test_early_stopping_waits_for_min_steps(
    draft_dir,  # noqa: F811
    data_file,  # noqa: F811
    heldout_file,
    tmp_path,
    monkeypatch,
    min_steps,
    trained_steps,
    tau,
):
    # patience 2 is spent after 7 steps: min_steps 7 stops there, min_steps 8 runs on to the
    # last step, whose τ of 3.0 becomes the best
    run = heldout_config(draft_dir, data_file, heldout_file, tmp_path / "run", patience=2,
                         min_steps=min_steps)
    scripted_taus(monkeypatch, TAUS).run_dir = run.out
    result = fit(run)
    assert (result.trained_steps, result.tau) == (trained_steps, tau)
    assert result.stopped_early == (trained_steps < 8)
    assert read_config(run.out).min_steps == min_steps


@pytest.mark.parametrize("kill_at", [4, 5])
def test_a_killed_run_with_evaluations_resumes_to_the_same_best_and_stop(
    draft_dir,  # noqa: F811
    data_file,  # noqa: F811
    heldout_file,
    tmp_path,
    monkeypatch,
    kill_at,
):
    # checkpoints every 2 steps; killed after step 4 (a new best written after the step-4
    # checkpoint) or after step 5 (one evaluation without improvement, in the step-6 checkpoint)
    whole = heldout_config(draft_dir, data_file, heldout_file, tmp_path / "whole", patience=2)
    killed = whole.model_copy(update={"out": tmp_path / "killed"})
    fake = scripted_taus(monkeypatch, TAUS)
    fake.run_dir = whole.out
    expected = fit(whole)

    fake.run_dir = killed.out
    with pytest.raises(Killed):
        fit(killed, on_step=kill_after(kill_at))
    assert not final_path(killed.out).exists()
    result = resume(killed.out)
    assert (result.steps, result.trained_steps, result.stopped_early, result.tau) == (
        expected.steps,
        expected.trained_steps,
        expected.stopped_early,
        expected.tau,
    )
    assert (killed.out / "metrics.jsonl").read_text() == (whole.out / "metrics.jsonl").read_text()
    assert same_weights(final_path(killed.out), final_path(whole.out))
    assert same_weights(best_path(killed.out), best_path(whole.out))


def test_a_killed_run_with_real_evaluations_resumes_to_the_same_weights(
    draft_dir,  # noqa: F811
    pattern_files,
    tmp_path,
):
    train, heldout = pattern_files
    whole = heldout_config(draft_dir, train, heldout, tmp_path / "whole", eval_every=3, lr=3e-2)
    killed = whole.model_copy(update={"out": tmp_path / "killed"})
    fit(whole)
    with pytest.raises(Killed):
        fit(killed, on_step=kill_after(7))  # evaluated after step 7, checkpoint at 6 steps
    assert torch.load(checkpoint_path(killed.out), weights_only=True)["step"] == 6
    resume(killed.out)
    assert (killed.out / "metrics.jsonl").read_text() == (whole.out / "metrics.jsonl").read_text()
    assert [record["step"] for record in records(whole.out, "eval")] == [2, 5, 7]
    assert same_weights(final_path(killed.out), final_path(whole.out))
    assert same_weights(best_path(killed.out), best_path(whole.out))


def test_fit_command_takes_the_new_settings(draft_dir, data_file, heldout_file, tmp_path):  # noqa: F811
    from typer.testing import CliRunner

    from draft_training.cli import app

    out = tmp_path / "run"
    args = ["fit", "--draft", draft_dir, "--data", data_file, "--out", out, "--method", "lora"]
    args += ["--rank", 4, "--max-steps", 4, "--batch-size", 2, "--kl-weight", 0.5]
    args += ["--ce-weight", 2, "--heldout-data", heldout_file, "--eval-every", 2]
    args += ["--patience", 3, "--min-steps", 2, "--autocast", "off", "--no-length-bucketing"]
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output
    assert "final weights: the best held-out τ(4)" in result.stderr
    config = read_config(out)
    assert (config.kl_weight, config.ce_weight, config.heldout_data) == (0.5, 2.0, heldout_file)
    assert (config.eval_every, config.patience, config.min_steps, config.autocast) == (
        2, 3, 2, "off")
    assert not config.length_bucketing
    assert [record["step"] for record in records(out, "eval")] == [1, 3]


def test_runs_recorded_before_the_new_settings_resume_as_they_trained(tmp_path):
    config = FitConfig(draft="d", data=tmp_path / "d.jsonl", out=tmp_path)
    recorded = config.model_dump(mode="json")
    for name in ("length_bucketing", "autocast", "kl_weight", "ce_weight", "heldout_data"):
        del recorded[name]
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    old = read_config(tmp_path)
    assert (old.length_bucketing, old.autocast, old.heldout_data) == (False, "off", None)


def test_a_long_prompt_keeps_its_end_so_the_response_is_still_learnt(tmp_path):
    path = tmp_path / "data.jsonl"
    records = [
        {"id": "long", "prompt_token_ids": list(range(1, 101)), "response_token_ids": [7] * 30},
        {"id": "short", "prompt_token_ids": [1, 2], "response_token_ids": [3, 4, 5]},
        {"id": "huge-response", "prompt_token_ids": list(range(1, 51)),
         "response_token_ids": [9] * 80},
    ]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    long, short, huge = load_examples(path, max_length=64)
    # the prompt's last 34 tokens, then the whole response
    assert long.input_ids == tuple(range(67, 101)) + (7,) * 30 and long.num_prompt_tokens == 34
    assert short.input_ids == (1, 2, 3, 4, 5) and short.num_prompt_tokens == 2
    # a response longer than max_length keeps a quarter of it for the prompt's end
    assert huge.input_ids == tuple(range(35, 51)) + (9,) * 48 and huge.num_prompt_tokens == 16
