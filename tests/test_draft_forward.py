"""The draft's compact forward: HF's logits without transformers' module stack, and in int8."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from afa_serve.engine.draft_forward import (
    INITIAL_CAPACITY,
    CompactDraftForward,
    HFDraftForward,
    draft_forward,
    resolve_draft_weights,
    unsupported_reason,
)
from afa_serve.engine.speculative import SpeculativeDecoder
from afa_serve.engine.verify import SamplingSettings
from tests.conftest import DEVICES, tiny_llama

GREEDY = SamplingSettings(temperature=0.0)


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    """Qwen2 has q/k/v biases, which the compact forward must add."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=28, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, rope_theta=10000.0)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # HF initialises biases to zero: make them count
        for layer in model.model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                               layer.self_attn.v_proj):
                projection.bias.normal_(0, 0.5)
    return model


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=28, n_embd=32, n_layer=1, n_head=4)).eval()


def _hf_logits(model, cache: DynamicCache, token_ids: list[int], head: torch.Tensor | None):
    return HFDraftForward(model, head).logits(cache, token_ids)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make", [lambda: tiny_llama(layers=2, seed=3), tiny_qwen2],
                         ids=["llama", "qwen2-with-biases"])
@pytest.mark.parametrize("head_ids", [None, [0, 4, 7, 9, 27]], ids=["full-head", "trimmed"])
def test_compact_logits_equal_hf_through_catch_up_steps_crops_and_growth(make, head_ids, device):
    model = make().to(device)
    head = None if head_ids is None else torch.tensor(head_ids, device=device)
    compact = CompactDraftForward(model, head)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(27, (INITIAL_CAPACITY + 40,), generator=generator).tolist()
    ours, theirs = compact.new_cache(), DynamicCache(config=model.config)

    def check(chunk: list[int]) -> None:
        expected = _hf_logits(model, theirs, chunk, head)
        got = compact.logits(ours, chunk)
        tolerance = 1e-5 if device == "cpu" else 1e-4  # CUDA's kernels round differently
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
        assert ours.get_seq_length() == theirs.get_seq_length()

    check(tokens[:20])  # a prefill
    for token in tokens[20:25]:  # single-token steps
        check([token])
    for cache in (ours, theirs):  # a rejected draft: drop 3 positions, as the decoder does
        cache.crop(-3)
    check(tokens[22:26])  # a catch-up over several tokens after the crop
    check(tokens[26:])  # past the initial capacity: the cache grows and keeps what it held
    assert ours.keys.shape[2] > INITIAL_CAPACITY


def test_int8_weights_stay_close_to_the_models_and_keep_its_picks():
    model = tiny_llama(layers=2, seed=3)
    exact, int8 = CompactDraftForward(model), CompactDraftForward(model, int8=True)
    assert all(layer.gate_up.weight.dtype == torch.int8 for layer in int8.layers)
    assert int8.head.weight.dtype == torch.int8
    generator = torch.Generator().manual_seed(2)
    tokens = torch.randint(27, (60,), generator=generator).tolist()
    exact_cache, int8_cache = exact.new_cache(), int8.new_cache()
    same_pick = 0
    for index in range(10, 60):
        chunk = tokens[:10] if index == 10 else [tokens[index - 1]]
        want, got = exact.logits(exact_cache, chunk), int8.logits(int8_cache, chunk)
        # per-row int8 rounding: a small error against the logits' spread
        assert (got - want).abs().max() < 0.05 * want.std()
        same_pick += int(got.argmax() == want.argmax())
    assert same_pick >= 48


def test_models_the_compact_forward_does_not_cover_keep_the_hf_forward():
    gpt2 = tiny_gpt2()
    assert "gpt2" in unsupported_reason(gpt2)
    assert isinstance(draft_forward(gpt2), HFDraftForward)
    with pytest.raises(ValueError, match="int8 draft weights need the compact draft forward"):
        draft_forward(gpt2, weights="int8")
    scaled = tiny_llama(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                         "rope_theta": 10000.0})
    assert "rope type 'linear'" in unsupported_reason(scaled)
    assert isinstance(draft_forward(tiny_llama()), CompactDraftForward)


def test_auto_weights_are_int8_on_cpu_for_covered_models_only():
    assert resolve_draft_weights("auto", tiny_llama()) == "int8"
    assert resolve_draft_weights("auto", tiny_gpt2()) == "dtype"
    assert resolve_draft_weights("dtype", tiny_llama()) == "dtype"
    # the decoder resolves the setting itself and says what its draft runs in
    target = tiny_llama()
    assert SpeculativeDecoder(target, tiny_llama(), 4, draft_weights="auto").draft_weights == "int8"
    assert SpeculativeDecoder(target, tiny_gpt2(), 4, draft_weights="auto").draft_weights == "dtype"
    assert SpeculativeDecoder(target).draft_weights is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weights", ["dtype", "int8"])
def test_speculative_greedy_with_the_compact_draft_equals_plain(weights, device):
    target = tiny_llama(layers=2, seed=0).to(device)
    plain = SpeculativeDecoder(target)
    for draft in (tiny_llama(layers=2, seed=0), tiny_llama(layers=1, seed=5), tiny_qwen2()):
        draft = draft.to(device)
        decoder = SpeculativeDecoder(target, draft, 4, speculation="fixed",
                                     draft_weights=weights)
        for prompt in ([3], list(range(20))):
            state = decoder.generate(prompt, 40, GREEDY)
            assert state.token_ids == plain.generate(prompt, 40, GREEDY).token_ids
            assert state.spec.num_drafts > 0
