"""The feature draft (EAGLE-1 format): the serving forward equals the training module, the
folder round-trips, and speculative decoding with it stays lossless."""

from __future__ import annotations

import json

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from afa_serve.engine.draft_forward import FeatureDraftForward
from afa_serve.engine.feature_draft import ARCHITECTURE, FeatureDraft, is_feature_draft
from afa_serve.engine.speculative import SpeculativeDecoder
from afa_serve.engine.verify import SamplingSettings
from draft_training.feature_training import FeatureDraftLM
from tests.conftest import DEVICES, tiny_llama
from tests.test_verify import TARGET_SEED, sampling_p_value

GREEDY = SamplingSettings(temperature=0.0)


def trained_looking(target, seed: int = 1) -> FeatureDraft:
    """A feature draft whose weights are all non-trivial (fc, norms included)."""
    draft = FeatureDraft.from_target(target)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in draft.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return draft.eval()


def module_features(draft: FeatureDraft, features, embeddings) -> torch.Tensor:
    """The training module over a whole sequence (causal mask, positions from 0)."""
    count = features.shape[0]
    positions = torch.arange(count, device=features.device)[None]
    rotary = LlamaRotaryEmbedding(draft.config).to(features.device)
    mask = torch.full((count, count), float("-inf"), device=features.device).triu(1)[None, None]
    with torch.no_grad():
        return draft(features[None], embeddings[None],
                     rotary(features[None], positions), mask)[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_ids", [None, [0, 3, 5, 11, 27]], ids=["full-head", "trimmed"])
def test_serving_steps_equal_the_training_module_over_the_sequence(head_ids, device):
    target = tiny_llama(layers=2, seed=0).to(device)
    draft = trained_looking(target).to(device)
    head = None if head_ids is None else torch.tensor(head_ids, device=device)
    forward = FeatureDraftForward(draft, target, head)
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(27, (30,), generator=generator).tolist()
    features = torch.randn(30, 32, generator=generator).to(device)
    expected = module_features(draft, features, target.get_input_embeddings().weight[tokens])
    weight = target.get_output_embeddings().weight
    if head is not None:
        weight = weight[head]
    cache = forward.new_cache()
    logits, own = forward.step(cache, tokens[:20], features[:20])  # a catch-up
    tolerance = 1e-5 if device == "cpu" else 1e-4  # CUDA's kernels round differently
    close = {"rtol": tolerance, "atol": tolerance}
    torch.testing.assert_close(own, expected[19], **close)
    torch.testing.assert_close(logits, expected[19] @ weight.T, **close)
    for index in range(20, 30):  # one row at a time, as drafting does
        logits, own = forward.step(cache, [tokens[index]], features[index][None])
        torch.testing.assert_close(own, expected[index], **close)
    cache.crop(-4)  # a rejected draft
    _, own = forward.step(cache, tokens[26:28], features[26:28])
    torch.testing.assert_close(own, expected[27], **close)


@pytest.mark.parametrize("padded", [False, True], ids=["alone", "right-padded"])
def test_drafted_positions_equal_the_engine_drafting_from_its_own_features(padded):
    """`FeatureDraftLM(positions=4)`: pass p at row j is the engine's p-th drafted token after
    a target pass that gave features up to row j − p (its cache: rows 1..j − p + 1 from the
    target's features, then its own drafts), at every j, for a row alone or right-padded."""
    target = tiny_llama(layers=2, seed=0)
    draft = trained_looking(target)
    model = FeatureDraftLM(target, draft).eval()
    forward = FeatureDraftForward(draft, target)
    generator = torch.Generator().manual_seed(5)
    length = 24
    input_ids = torch.randint(27, (2, length + 6), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if padded:
        attention_mask[0, length:] = 0  # row 0 is `length` tokens, then padding
    with torch.no_grad():
        passes = model(input_ids, attention_mask, positions=4).drafted
    features = model.target_features(input_ids, attention_mask)[0]
    tokens = input_ids[0].tolist()
    for accepted in range(1, length - 3):
        cache = forward.new_cache()
        _, own = forward.step(cache, tokens[1 : accepted + 1], features[:accepted])
        torch.testing.assert_close(own, passes[0][0, accepted], rtol=1e-5, atol=1e-5)
        for drafted in range(1, 4):
            _, own = forward.step(cache, [tokens[accepted + drafted]], own[None])
            torch.testing.assert_close(own, passes[drafted][0, accepted + drafted],
                                       rtol=1e-5, atol=1e-5)


def test_heldout_matches_of_a_feature_draft_are_its_drafting_per_position():
    """`draft_matches` on a feature draft: row p of an example's [k, n] matches is whether the
    engine, drafting from its own features, gets the response token at each position right as
    its (p + 1)-th drafted token; examples of different lengths batched together."""
    from draft_training.agreement import draft_matches
    from draft_training.examples import Example

    target = tiny_llama(vocab_size=5, layers=2, seed=0)  # 5 tokens: many matches and misses
    draft = trained_looking(target)
    model = FeatureDraftLM(target, draft).eval()
    forward = FeatureDraftForward(draft, target)
    generator = torch.Generator().manual_seed(7)
    examples = [Example(tuple(torch.randint(5, (length,), generator=generator).tolist()), 5)
                for length in (20, 14, 17)]
    found = draft_matches(model, examples, 2, torch.device("cpu"), k=3)
    pooled = torch.cat(found, dim=1)
    assert pooled.any(dim=1).all() and not pooled.all(dim=1).any()
    assert not torch.equal(pooled[0], pooled[1])  # the later passes read other features
    for example, matches in zip(examples, found, strict=True):
        tokens = list(example.input_ids)
        features = model.target_features(torch.tensor([tokens]), torch.ones(1, len(tokens), dtype=torch.long))[0]
        assert matches.shape == (3, len(tokens) - 5)
        for position in range(5, len(tokens)):  # the response token at `position`...
            for drafted in range(3):  # ... as the (drafted + 1)-th token after a target pass
                accepted = position - 1 - drafted  # rows 1..accepted from the target's features
                if accepted < 1:
                    continue
                cache = forward.new_cache()
                logits, own = forward.step(cache, tokens[1 : accepted + 1], features[:accepted])
                for row in range(accepted + 1, position):
                    logits, own = forward.step(cache, [tokens[row]], own[None])
                wanted = int(logits.argmax()) == tokens[position]
                assert bool(matches[drafted, position - 5]) == wanted, (position, drafted)


def test_the_folder_is_vllms_eagle_format_and_round_trips(tmp_path):
    target = tiny_llama(layers=2, seed=0)
    draft = trained_looking(target)
    draft.save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE] and config["num_hidden_layers"] == 1
    assert is_feature_draft(tmp_path) and not is_feature_draft(tmp_path / "missing")
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", framework="pt") as handle:
        names = set(handle.keys())
    assert "fc.weight" in names and "layers.0.self_attn.q_proj.weight" in names
    assert not any("input_layernorm" in name or "embed" in name for name in names)
    loaded = FeatureDraft.load(tmp_path, torch.float32, torch.device("cpu"))
    for (name, want), got in zip(draft.state_dict().items(), loaded.state_dict().values(),
                                 strict=True):
        assert torch.equal(want, got), name


def test_feature_drafts_need_a_llama_target():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=28, n_embd=32, n_layer=1, n_head=4))
    with pytest.raises(ValueError, match="Llama targets"):
        FeatureDraft.from_target(gpt2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weights", ["dtype", "int8"])
@pytest.mark.parametrize("speculation", ["fixed", "adaptive"])
def test_speculative_greedy_with_a_feature_draft_equals_plain(weights, speculation, device):
    target = tiny_llama(layers=2, seed=0).to(device)
    plain = SpeculativeDecoder(target)
    decoder = SpeculativeDecoder(target, trained_looking(target).to(device), 4,
                                 speculation=speculation, draft_weights=weights)
    for prompt in ([3], [5, 9], list(range(20))):
        state = decoder.generate(prompt, 40, GREEDY)
        assert state.token_ids == plain.generate(prompt, 40, GREEDY).token_ids
        # the draft's cache never runs ahead of the features the target gave it
        pending = sum(len(chunk) for chunk in state.draft_features)
        assert state.draft_cache.get_seq_length() + pending == len(state.token_ids) - 1
        if speculation == "fixed" and len(prompt) > 1:
            assert state.spec.num_drafts > 0


@pytest.mark.parametrize("threshold,vocab", [(0.0, None), (0.3, [0, 2, 3])])
def test_sampling_with_a_feature_draft_follows_the_target(threshold, vocab):
    settings = SamplingSettings(temperature=1.0)
    target = tiny_llama(vocab_size=5, layers=2, seed=TARGET_SEED)
    decoder = SpeculativeDecoder(target, trained_looking(target), 2,
                                 confidence_threshold=threshold, draft_vocab=vocab)
    assert sampling_p_value(decoder, target, settings) > 1e-3


def test_a_feature_draft_made_for_another_target_is_refused():
    from afa_serve.engine.loading import IncompatibleDraftError, check_draft_compatible
    from tests.conftest import tiny_tokenizer

    other_target = tiny_llama(layers=2, seed=0)
    other_target.config.num_key_value_heads = 4  # the shapes the draft's config records
    other = FeatureDraft(other_target.config.__class__.from_dict(
        {**other_target.config.to_dict(), "num_hidden_layers": 1}))
    with pytest.raises(IncompatibleDraftError, match="num_key_value_heads"):
        check_draft_compatible(tiny_llama(layers=2), tiny_tokenizer(), other, tiny_tokenizer())
