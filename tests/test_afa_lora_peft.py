"""AFA-LoRA at λ = 0 is LoRA as PEFT defines it: the same weights give PEFT's forward output
before merging, and our merge gives the dense weights of PEFT's `merge_and_unload`."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

from draft_training.afa_lora import AfaLoraConfig, adapter_layers, inject, merge, set_lambda
from tests.conftest import truncated_copy

RANK, ALPHA = 8, 16.0
TARGETS = ("q_proj", "v_proj", "down_proj")


@pytest.fixture(scope="module")
def base_model(real_target):
    """One decoder layer of the real SmolLM2: real weights, quick forwards."""
    return truncated_copy(real_target, 1)


def _ours_and_peft(base_model):
    """Our adapter (trained-looking: random A and B, λ = 0) and PEFT's with the same weights."""
    ours = copy.deepcopy(base_model)
    inject(ours, AfaLoraConfig(rank=RANK, alpha=ALPHA, target_modules=TARGETS, modules_to_save=()))
    set_lambda(ours, 0.0)
    generator = torch.Generator().manual_seed(0)
    for layer in adapter_layers(ours):
        with torch.no_grad():
            layer.lora_A.weight.normal_(0, 0.05, generator=generator)
            layer.lora_B.weight.normal_(0, 0.05, generator=generator)

    lora_config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(TARGETS), bias="none"
    )
    theirs = peft.get_peft_model(copy.deepcopy(base_model), lora_config)
    ours_by_name = dict(ours.named_modules())
    copied = 0
    for name, module in theirs.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.Linear):
            layer = ours_by_name[name]
            with torch.no_grad():
                module.lora_A["default"].weight.copy_(layer.lora_A.weight)
                module.lora_B["default"].weight.copy_(layer.lora_B.weight)
            assert module.scaling["default"] == layer.scaling
            copied += 1
    assert copied == len(adapter_layers(ours)) == 3 * base_model.config.num_hidden_layers
    return ours, theirs.eval()


INPUT_IDS = torch.tensor([[1, 520, 3000, 42, 7, 19000, 88, 2]])


def test_afa_lora_at_lambda_zero_computes_what_peft_lora_computes(base_model):
    ours, theirs = _ours_and_peft(base_model)
    with torch.no_grad():
        plain = base_model(INPUT_IDS).logits
        ours_logits = ours(INPUT_IDS).logits
        theirs_logits = theirs(input_ids=INPUT_IDS).logits
    assert not torch.allclose(ours_logits, plain, atol=1e-3)  # the adapter does change the output
    torch.testing.assert_close(ours_logits, theirs_logits, rtol=0, atol=1e-5)


def test_our_merge_equals_peft_merge_and_unload(base_model):
    ours, theirs = _ours_and_peft(base_model)
    merged_ours = merge(ours).state_dict()
    merged_theirs = theirs.merge_and_unload().state_dict()
    assert merged_ours.keys() == merged_theirs.keys()
    for name, weight in merged_ours.items():
        torch.testing.assert_close(weight, merged_theirs[name], rtol=0, atol=1e-6, msg=name)
    changed = [n for n, w in merged_ours.items() if not torch.equal(w, base_model.state_dict()[n])]
    assert len(changed) == 3 * base_model.config.num_hidden_layers
