"""init-draft's choice of target layers: the first N, or any sorted set (a layer-skipping
draft), on tiny random-weight targets."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config, Qwen2ForCausalLM
from typer.testing import CliRunner

from draft_training.cli import app
from draft_training.init_draft import (
    InitDraftConfig,
    init_draft,
    layer_draft,
    parse_layers,
    truncated_draft,
)
from tests.conftest import tiny_llama
from tests.test_train_cli import byte_chat_tokenizer

INPUT_IDS = torch.randint(0, 28, (2, 11), generator=torch.Generator().manual_seed(3))


def layers_run_in_sequence(target, layers):
    """The target itself with only `layers` in its decoder stack, in order: what a draft of
    those layers must compute."""
    reference = copy.deepcopy(target)
    reference.model.layers = torch.nn.ModuleList(reference.model.layers[i] for i in layers)
    reference.config.num_hidden_layers = len(layers)
    if getattr(reference.config, "layer_types", None):  # Qwen2 picks each layer's mask by it
        reference.config.layer_types = [target.config.layer_types[i] for i in layers]
    return reference


def test_a_layer_skipping_draft_holds_and_runs_the_chosen_layers():
    target = tiny_llama(layers=6)
    draft = layer_draft(target, (0, 4, 5))
    assert draft.config.num_hidden_layers == 3
    target_state, draft_state = target.state_dict(), draft.state_dict()
    assert len(draft_state) == len(target_state) - 3 * len(
        [name for name in target_state if name.startswith("model.layers.0.")]
    )
    for name, weight in draft_state.items():
        source = name
        for index, layer in enumerate((0, 4, 5)):
            if name.startswith(f"model.layers.{index}."):
                source = name.replace(f"model.layers.{index}.", f"model.layers.{layer}.", 1)
        assert torch.equal(weight, target_state[source]), name
        assert weight.data_ptr() != target_state[source].data_ptr()  # a copy
    # not just the renamed first layers: draft layer 1 is target layer 4, not target layer 1
    assert not torch.equal(
        draft_state["model.layers.1.mlp.up_proj.weight"],
        target_state["model.layers.1.mlp.up_proj.weight"],
    )

    reference = layers_run_in_sequence(target, (0, 4, 5))
    with torch.no_grad():
        drafted = draft(INPUT_IDS, output_hidden_states=True, use_cache=False)
        expected = reference(INPUT_IDS, output_hidden_states=True, use_cache=False)
        assert len(drafted.hidden_states) == 4
        for got, want in zip(drafted.hidden_states, expected.hidden_states, strict=True):
            assert torch.equal(got, want)
        assert torch.equal(drafted.logits, expected.logits)
        # and with the KV cache (each draft layer its own cache slot), token by token
        cached = draft(INPUT_IDS[:, :7], use_cache=True)
        step = draft(INPUT_IDS[:, 7:], past_key_values=cached.past_key_values, use_cache=True)
        assert torch.allclose(step.logits, expected.logits[:, 7:], atol=1e-5)


def test_the_first_layers_as_a_list_are_the_truncated_draft():
    target = tiny_llama(layers=4)
    listed, truncated = layer_draft(target, (0, 1)), truncated_draft(target, 2)
    assert listed.config.to_dict() == truncated.config.to_dict()
    for (name, a), (other, b) in zip(
        listed.state_dict().items(), truncated.state_dict().items(), strict=True
    ):
        assert name == other and torch.equal(a, b)


def test_per_layer_config_lists_are_picked_at_the_kept_layers():
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=28, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
        max_window_layers=3, sliding_window=4,
    )  # fmt: skip
    target = Qwen2ForCausalLM(config).eval()
    assert target.config.layer_types == ["full_attention"] * 3 + ["sliding_attention"] * 3
    draft = layer_draft(target, (1, 2, 5))
    assert draft.config.layer_types == ["full_attention", "full_attention", "sliding_attention"]
    with torch.no_grad():
        expected = layers_run_in_sequence(target, (1, 2, 5))(INPUT_IDS, use_cache=False).logits
        assert torch.equal(draft(INPUT_IDS, use_cache=False).logits, expected)


@pytest.mark.parametrize(
    ("layers", "error"),
    [
        ((), "at least one layer"),
        ((4, 0), "sorted and without repeats"),
        ((0, 4, 4), "sorted and without repeats"),
        ((-1, 2), r"must lie in \[0, 5\] for this target"),
        ((0, 6), r"must lie in \[0, 5\] for this target"),
    ],
)
def test_bad_layer_lists_are_refused(layers, error):
    with pytest.raises(ValueError, match=error):
        layer_draft(tiny_llama(layers=6), layers)


def test_the_config_takes_a_count_or_a_list_not_both(tmp_path):
    assert InitDraftConfig(target="t", out=tmp_path).num_layers == 2
    listed = InitDraftConfig(target="t", layers=[0, 4, 5], out=tmp_path)
    assert listed.layers == (0, 4, 5) and listed.num_layers is None
    assert InitDraftConfig.model_validate(listed.model_dump(mode="json")) == listed
    # a count-only config dumps as before `layers` existed (the mission's step key)
    assert "layers" not in InitDraftConfig(target="t", num_layers=3, out=tmp_path).model_dump()
    with pytest.raises(ValidationError, match="not both"):
        InitDraftConfig(target="t", num_layers=2, layers=(0, 1), out=tmp_path)
    with pytest.raises(ValidationError, match="sorted and without repeats"):
        InitDraftConfig(target="t", layers=(3, 1), out=tmp_path)
    with pytest.raises(ValidationError, match="at least one layer"):
        InitDraftConfig(target="t", layers=(), out=tmp_path)
    with pytest.raises(ValidationError, match="give num_layers"):
        InitDraftConfig(target="t", num_layers=None, out=tmp_path)


def test_parse_layers():
    assert parse_layers("0,1,28,29") == (0, 1, 28, 29)
    assert parse_layers(" 0, 4 ,5 ") == (0, 4, 5)
    assert parse_layers("5,") == (5,)
    for bad, error in (("0,x", "comma-separated"), ("2,1", "sorted"), (",", "comma-separated")):
        with pytest.raises(ValueError, match=error):
            parse_layers(bad)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    tokenizer = byte_chat_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer), layers=6, pad_token_id=tokenizer.pad_token_id)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("target")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_init_draft_writes_the_chosen_layers(target_dir, tmp_path):
    out = init_draft(InitDraftConfig(target=str(target_dir), layers=(0, 4, 5), out=tmp_path / "d"))
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert draft.config.num_hidden_layers == 3
    reference = layers_run_in_sequence(target, (0, 4, 5))
    ids = INPUT_IDS % target.config.vocab_size
    with torch.no_grad():
        assert torch.equal(draft(ids).logits, reference(ids, use_cache=False).logits)
    with pytest.raises(ValueError, match=r"must lie in \[0, 5\]"):
        init_draft(InitDraftConfig(target=str(target_dir), layers=(0, 6), out=tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()


def test_the_cli_takes_a_count_or_a_list(target_dir, tmp_path):
    runner = CliRunner()

    def invoke(layers: str, out: str):
        args = ["init-draft", "--target", str(target_dir), "--out", str(tmp_path / out)]
        return runner.invoke(app, [*args, "--layers", layers])

    result = invoke("0,1,4,5", "listed")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(tmp_path / "listed")
    listed = AutoModelForCausalLM.from_pretrained(tmp_path / "listed")
    assert listed.config.num_hidden_layers == 4
    result = invoke("3", "counted")
    assert result.exit_code == 0, result.output
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "counted").config.num_hidden_layers == 3
    result = invoke("5,", "one")
    assert result.exit_code == 0, result.output
    for bad, error in (("0,9", "must lie in [0, 5]"), ("zero", "a count"), ("0", "a count")):
        result = invoke(bad, "bad")
        assert result.exit_code == 1 and error in result.stderr, (bad, result.output)
        assert not (tmp_path / "bad").exists()
