"""The AFA-LoRA layer, its λ schedule and its exact merge, on tiny random-weight Llama models."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from draft_training.afa_lora import (
    ACTIVATIONS,
    AfaLoraConfig,
    AfaLoraLinear,
    adapter_layers,
    annealed_activation,
    inject,
    merge,
    set_lambda,
)
from draft_training.schedule import anneal_end_step, lambda_at

VOCAB = 96


def tiny_llama(seed: int = 0, tie_word_embeddings: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie_word_embeddings,
    )
    return LlamaForCausalLM(config).eval()


def randomize_adapters(model: torch.nn.Module, seed: int) -> None:
    """Give every A and B a random value of a trained adapter's size, so adapters matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model):
            for weight in (layer.lora_A.weight, layer.lora_B.weight):
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.2)


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


INPUT_IDS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize(
    ("total_steps", "fraction", "end"),
    [(10, 0.3, 3), (100, 0.07, 7), (7, 0.5, 4), (1000, 0.25, 250), (3, 0.0, 0), (9, 1.0, 9)],
)
def test_lambda_falls_from_one_to_exactly_zero_at_the_end_step(kind, total_steps, fraction, end):
    assert anneal_end_step(total_steps, fraction) == end
    lambdas = [lambda_at(step, total_steps, fraction, kind) for step in range(total_steps + 5)]
    if end > 0:
        assert lambdas[0] == 1.0
    assert all(lam > 0.0 for lam in lambdas[:end])
    assert all(lam == 0.0 for lam in lambdas[end:])
    assert all(later <= earlier for earlier, later in pairwise(lambdas))


def test_linear_and_cosine_schedules_have_their_shapes():
    assert lambda_at(5, 100, 0.2, "linear") == pytest.approx(0.75)
    assert lambda_at(10, 100, 0.2, "linear") == pytest.approx(0.5)
    assert lambda_at(10, 100, 0.2, "cosine") == pytest.approx(0.5)
    assert lambda_at(5, 100, 0.2, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_sigma_is_the_identity_at_lambda_zero_and_f_at_one(activation):
    f = ACTIVATIONS[activation]
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)) * 3
    assert torch.equal(annealed_activation(z, 0.0, f), z)
    assert torch.equal(annealed_activation(z, 1.0, f), f(z))
    assert torch.allclose(annealed_activation(z, 0.25, f), 0.25 * f(z) + 0.75 * z)
    assert not torch.allclose(annealed_activation(z, 0.25, f), z)


def test_inject_wraps_the_targets_freezes_the_rest_and_starts_as_the_base_model():
    model = tiny_llama()
    reference = logits(model, INPUT_IDS)
    wrapped = inject(model, AfaLoraConfig(rank=4, alpha=8, target_modules=("q_proj", "down_proj"),
                                          modules_to_save=()))
    names = sorted(
        name for name, module in model.named_modules() if isinstance(module, AfaLoraLinear)
    )
    assert names == [
        f"model.layers.{i}.{part}" for i in (0, 1) for part in ("mlp.down_proj", "self_attn.q_proj")
    ]
    assert len(wrapped) == 4 and all(layer.lam == 1.0 for layer in wrapped)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable == {f"{name}.{part}.weight" for name in names for part in ("lora_A", "lora_B")}
    assert all(layer.scaling == 2.0 for layer in wrapped)
    assert torch.equal(logits(model, INPUT_IDS), reference)  # B = 0


def test_inject_all_linear_leaves_out_the_head_and_unknown_targets_are_refused():
    model = tiny_llama()
    inject(model, AfaLoraConfig(rank=2, target_modules="all-linear"))
    assert len(adapter_layers(model)) == 2 * 7
    assert not isinstance(model.lm_head, AfaLoraLinear)
    with pytest.raises(ValueError, match="no module of the model matches"):
        inject(tiny_llama(), AfaLoraConfig(target_modules=("c_attn",)))


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_afa_lora_at_lambda_zero_equals_lora_with_the_same_weights(activation):
    afa = tiny_llama()
    lora = tiny_llama()
    inject(afa, AfaLoraConfig(method="afa-lora", rank=4, activation=activation, dropout=0.1))
    inject(lora, AfaLoraConfig(method="lora", rank=4, activation=activation, dropout=0.1))
    randomize_adapters(afa, seed=2)
    lora.load_state_dict(afa.state_dict())
    assert all(layer.lam == 0.0 for layer in adapter_layers(lora))

    assert not torch.allclose(logits(afa, INPUT_IDS), logits(lora, INPUT_IDS))  # λ = 1 differs
    set_lambda(afa, 0.0)
    assert torch.equal(logits(afa, INPUT_IDS), logits(lora, INPUT_IDS))


def test_gradients_reach_only_the_adapters_and_depend_on_lambda():
    def adapter_gradient(lam: float) -> torch.Tensor:
        model = tiny_llama()
        inject(model, AfaLoraConfig(rank=4, target_modules=("v_proj",), modules_to_save=()))
        randomize_adapters(model, seed=3)
        set_lambda(model, lam)
        model(input_ids=INPUT_IDS, labels=INPUT_IDS).loss.backward()
        assert all(
            parameter.grad is None
            for name, parameter in model.named_parameters()
            if "lora_" not in name
        )
        return model.model.layers[0].self_attn.v_proj.lora_A.weight.grad

    assert not torch.allclose(adapter_gradient(1.0), adapter_gradient(0.0))


def test_the_norms_are_trained_in_full_by_default_as_modules_to_save():
    model = tiny_llama()
    inject(model, AfaLoraConfig(rank=4, target_modules=("v_proj",)))
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    norms = {"model.norm.weight"} | {f"model.layers.{i}.{norm}.weight" for i in (0, 1)
                                     for norm in ("input_layernorm", "post_attention_layernorm")}
    assert trainable - norms == {f"model.layers.{i}.self_attn.v_proj.lora_{part}.weight"
                                 for i in (0, 1) for part in "AB"}
    assert norms <= trainable
    model(input_ids=INPUT_IDS, labels=INPUT_IDS).loss.backward()
    assert model.model.norm.weight.grad is not None
    assert model.model.embed_tokens.weight.grad is None


@pytest.mark.parametrize(
    "target_modules", [AfaLoraConfig().target_modules, "all-linear", ("q_proj", "lm_head")]
)
def test_merge_is_exact_at_lambda_zero_and_survives_save_and_load(tmp_path, target_modules):
    model = tiny_llama()
    inject(model, AfaLoraConfig(rank=4, alpha=16, target_modules=target_modules))
    randomize_adapters(model, seed=4)
    set_lambda(model, 0.0)
    unmerged = logits(model, INPUT_IDS)

    merge(model)
    assert not adapter_layers(model)
    assert all(not isinstance(module, AfaLoraLinear) for module in model.modules())
    assert (logits(model, INPUT_IDS) - unmerged).abs().max().item() < 1e-5
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert (logits(reloaded, INPUT_IDS) - unmerged).abs().max().item() < 1e-5
    assert not torch.allclose(unmerged, logits(tiny_llama(), INPUT_IDS))  # the adapter mattered


def test_merge_refuses_while_lambda_is_above_zero():
    model = tiny_llama()
    inject(model, AfaLoraConfig(rank=4))
    set_lambda(model, 0.01)
    with pytest.raises(ValueError, match="refusing to merge: λ is still 0.01"):
        merge(model)
    assert len(adapter_layers(model)) == 2 * 7  # nothing was replaced
