"""The embedded engine on tiny random models: equality, stops, limits, concurrency, aborts."""

from __future__ import annotations

import asyncio

import pytest

from afa_serve.engine import speculative
from afa_serve.engine.base import (
    EngineClosedError,
    GenerationRequest,
    InvalidRequestError,
    QueueFullError,
    SamplingParams,
)
from afa_serve.engine.config import EngineConfig
from afa_serve.engine.loading import IncompatibleDraftError
from afa_serve.engine.speculative import SpeculativeDecoder
from afa_serve.engine.torch_engine import TorchEngine
from afa_serve.engine.verify import SamplingSettings
from tests.conftest import tiny_llama, tiny_tokenizer

GREEDY = SamplingSettings(temperature=0.0)


def make_engine(draft=True, k=3, speculation="fixed", confidence_threshold=0.0,
                prompt_lookup_max=0, **config) -> TorchEngine:
    """A tiny engine whose draft model drafts every step by default, to exercise the
    speculative path (prompt lookup off unless asked for)."""
    target = tiny_llama(layers=2, seed=0)
    draft_model = tiny_llama(layers=1, seed=1) if draft else None
    return TorchEngine.from_models(
        target, tiny_tokenizer(), draft_model,
        EngineConfig(target="tiny", num_speculative_tokens=k, speculation=speculation,
                          confidence_threshold=confidence_threshold,
                          prompt_lookup_max=prompt_lookup_max, **config),
    )


async def collect(engine, request_id, prompt, **params):
    deltas = [d async for d in engine.generate(
        GenerationRequest(request_id, tuple(prompt), SamplingParams(**params)))]
    return deltas


@pytest.mark.parametrize("draft_layers,k", [(1, 1), (1, 4), (2, 3)])
def test_speculative_greedy_equals_plain_greedy(draft_layers, k):
    target = tiny_llama(layers=2, seed=0)
    # seed 0 with 2 layers is the target itself: every draft accepted
    draft = tiny_llama(layers=draft_layers, seed=0 if draft_layers == 2 else 5)
    plain = SpeculativeDecoder(target)
    spec = SpeculativeDecoder(target, draft, k)
    for prompt in ([3], [1, 2, 3], list(range(20))):
        expected = plain.generate(prompt, 40, GREEDY).token_ids
        state = spec.generate(prompt, 40, GREEDY)
        assert state.token_ids == expected
        assert state.spec.num_draft_tokens > 0
        if draft_layers == 2:
            assert state.spec.acceptance_rate == 1.0


def test_cache_rollback_keeps_draft_and_target_in_step():
    target, draft = tiny_llama(layers=2, seed=0), tiny_llama(layers=1, seed=3)
    decoder = SpeculativeDecoder(target, draft, 4)
    state = decoder.prefill([1, 2, 3], GREEDY)
    for _ in range(6):
        decoder.step(state, 100)
        assert state.target_cache.get_seq_length() == len(state.token_ids) - 1
        assert state.draft_cache.get_seq_length() <= len(state.token_ids) - 1


def test_prompt_logprobs_scored_in_chunks_equal_those_of_one_pass(monkeypatch):
    target = tiny_llama(layers=2, seed=0)
    decoder = SpeculativeDecoder(target, tiny_llama(layers=1, seed=1), 3)
    prompt = [(7 * i) % 27 for i in range(23)]
    one_pass = decoder.prefill(prompt, GREEDY, num_prompt_logprobs=2)
    expected = [decoder.step(one_pass, 100).tokens for _ in range(4)]

    monkeypatch.setattr(speculative, "PROMPT_LOGPROBS_CHUNK", 5)
    head_rows = []
    hook = target.lm_head.register_forward_hook(
        lambda module, args, out: head_rows.append(out.shape[1]))
    try:
        chunked = decoder.prefill(prompt, GREEDY, num_prompt_logprobs=2)
    finally:
        hook.remove()
    assert head_rows == [5, 5, 5, 5, 2]  # never the whole prompt's logits at once
    assert len(chunked.prompt_logprobs) == len(prompt) and chunked.prompt_logprobs[0] is None
    # equal up to float rounding: a chunk's attention sums in another order than one pass's
    for got, want in zip(chunked.prompt_logprobs[1:], one_pass.prompt_logprobs[1:], strict=True):
        assert got.token_id == want.token_id
        assert [t for t, _ in got.top] == [t for t, _ in want.top]
        assert [got.logprob, *(v for _, v in got.top)] == pytest.approx(
            [want.logprob, *(v for _, v in want.top)], abs=1e-5)
    assert chunked.target_cache.get_seq_length() == len(prompt) - 1
    assert [decoder.step(chunked, 100).tokens for _ in range(4)] == expected


async def test_engine_streams_what_the_decoder_produces():
    engine = make_engine()
    await engine.start()
    try:
        deltas = await collect(engine, "a", [1, 2, 3], max_tokens=25, temperature=0.0,
                               ignore_eos=True)
        tokens = [t for d in deltas for t in d.token_ids]
        expected = SpeculativeDecoder(engine._decoder.target).generate([1, 2, 3], 25, GREEDY)
        assert tokens == expected.token_ids[3:]
        assert deltas[-1].finish_reason == "length" and deltas[-1].num_generated_tokens == 25
        decode = engine.tokenizer.decode
        continuation = decode([1, 2, 3] + tokens)[len(decode([1, 2, 3])):]
        assert "".join(d.text for d in deltas) == continuation
        # one delta per step; the last step has room for one token, so it drafts nothing
        assert deltas[-1].spec.num_drafts == len(deltas) - 1
    finally:
        await engine.shutdown()


async def test_stop_string_cuts_text_and_is_never_streamed():
    engine = make_engine()
    await engine.start()
    try:
        full = await collect(engine, "full", [4, 5], max_tokens=30, temperature=0.0,
                             ignore_eos=True)
        text = "".join(d.text for d in full)
        stop = text[6:8]
        deltas = await collect(engine, "cut", [4, 5], max_tokens=30, temperature=0.0,
                               ignore_eos=True, stop=(stop,))
        assert "".join(d.text for d in deltas) == text[: text.index(stop)]
        assert deltas[-1].finish_reason == "stop" and deltas[-1].stop_reason == stop
    finally:
        await engine.shutdown()


async def test_stop_token_and_eos_end_the_request():
    engine = make_engine()
    await engine.start()
    try:
        full = await collect(engine, "full", [7], max_tokens=20, temperature=0.0, ignore_eos=True)
        tokens = [t for d in full for t in d.token_ids]
        stop_token = tokens[4]
        deltas = await collect(engine, "t", [7], max_tokens=20, temperature=0.0,
                               ignore_eos=True, stop_token_ids=(stop_token,))
        got = [t for d in deltas for t in d.token_ids]
        assert got == tokens[: tokens.index(stop_token) + 1]
        assert deltas[-1].stop_reason == stop_token
    finally:
        await engine.shutdown()


async def test_invalid_requests_are_refused_with_the_parameter_named():
    engine = make_engine(max_model_len=32)
    await engine.start()
    try:
        cases = [
            ([], {"max_tokens": 4}, "prompt"),
            (list(range(20)) + list(range(12)), {"max_tokens": 4}, "prompt"),
            ([1, 2], {"max_tokens": 31}, "max_tokens"),
            ([1, 2], {"max_tokens": 0}, "max_tokens"),
            ([1, 999], {"max_tokens": 4}, "prompt"),
            ([1, 2], {"temperature": -1.0}, "temperature"),
            ([1, 2], {"top_p": 0.0}, "top_p"),
        ]
        for prompt, params, param in cases:
            with pytest.raises(InvalidRequestError) as error:
                await collect(engine, "bad", prompt, **params)
            assert error.value.param == param
        assert engine.stats().num_running == engine.stats().num_waiting == 0
    finally:
        await engine.shutdown()


async def test_concurrent_requests_interleave_and_a_full_queue_refuses():
    engine = make_engine(max_num_seqs=2, max_queue=1)
    await engine.start()
    try:
        async def run(i):
            return await collect(engine, f"r{i}", [1, i + 1], max_tokens=20, temperature=0.0,
                                 ignore_eos=True)

        results = await asyncio.gather(*(run(i) for i in range(4)), return_exceptions=True)
        refused = [r for r in results if isinstance(r, QueueFullError)]
        served = [r for r in results if isinstance(r, list)]
        assert len(refused) == 1 and len(served) == 3
        assert all(r[-1].num_generated_tokens == 20 for r in served)
        stats = engine.stats()
        assert stats.num_running == stats.num_waiting == 0
        assert stats.generation_tokens == 60
    finally:
        await engine.shutdown()


async def test_closing_the_stream_aborts_and_frees_the_slot():
    engine = make_engine(max_num_seqs=1, max_queue=0)
    await engine.start()
    try:
        stream = engine.generate(GenerationRequest(
            "long", (1, 2), SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)))
        await stream.__anext__()
        await stream.aclose()
        for _ in range(100):
            if engine.stats().num_running == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.stats().num_running == 0
        # the one slot is free again
        deltas = await collect(engine, "next", [3], max_tokens=5, temperature=0.0,
                               ignore_eos=True)
        assert deltas[-1].num_generated_tokens == 5
        assert engine.stats().generation_tokens < 200
    finally:
        await engine.shutdown()


async def test_shutdown_ends_running_and_queued_requests_and_refuses_new_ones():
    engine = make_engine(draft=False, k=0, max_num_seqs=1, max_queue=1)
    await engine.start()
    long = SamplingParams(max_tokens=250, temperature=0.0, ignore_eos=True)
    running = engine.generate(GenerationRequest("running", (1, 2), long))
    first = await running.__anext__()
    queued = engine.generate(GenerationRequest("queued", (3, 4), long))
    queued_first = asyncio.ensure_future(queued.__anext__())
    await asyncio.sleep(0)
    assert engine.stats().num_waiting == 1

    await asyncio.wait_for(engine.shutdown(), timeout=10)

    rest = await asyncio.wait_for(_drain(running), timeout=10)  # ends: no hang
    assert rest[-1].finish_reason == "abort" and rest[-1].token_ids == ()
    generated = first.num_generated_tokens + sum(len(d.token_ids) for d in rest)
    assert rest[-1].num_generated_tokens == generated < 250
    with pytest.raises(EngineClosedError):
        await asyncio.wait_for(queued_first, timeout=10)
    assert engine.stats().num_running == engine.stats().num_waiting == 0
    with pytest.raises(EngineClosedError):
        await collect(engine, "late", [5], max_tokens=4)


async def _drain(stream) -> list:
    return [delta async for delta in stream]


async def test_seeded_sampling_is_reproducible():
    engine = make_engine()
    await engine.start()
    try:
        runs = [await collect(engine, f"s{i}", [1, 2], max_tokens=20, temperature=1.0, seed=7,
                              ignore_eos=True) for i in range(2)]
        other = await collect(engine, "s3", [1, 2], max_tokens=20, temperature=1.0, seed=8,
                              ignore_eos=True)
        tokens = [[t for d in run for t in d.token_ids] for run in (*runs, other)]
        assert tokens[0] == tokens[1] != tokens[2]
    finally:
        await engine.shutdown()


def test_a_draft_with_another_vocabulary_is_refused_at_load():
    target = tiny_llama(vocab_size=28)
    with pytest.raises(IncompatibleDraftError, match="vocabularies differ"):
        TorchEngine.from_models(target, tiny_tokenizer(28), tiny_llama(vocab_size=30),
                                draft_tokenizer=tiny_tokenizer(30))


def test_a_served_model_name_is_kept_as_given_even_where_a_folder_has_that_name(
        tmp_path, monkeypatch):
    (tmp_path / "org" / "llama").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    engine = make_engine(served_model_name="org/llama")
    assert engine.info.name == "org/llama"
    folder_target = TorchEngine.from_models(
        tiny_llama(layers=1, seed=0), tiny_tokenizer(), None,
        EngineConfig(target=str(tmp_path / "org" / "llama")))
    assert folder_target.info.name == folder_target.info.target == "llama"  # never the path


async def test_the_engine_loads_a_feature_draft_folder_and_serves_what_the_target_alone_does(
        tmp_path):
    from afa_serve.engine.feature_draft import FeatureDraft

    target = tiny_llama(layers=2, seed=0)
    target.save_pretrained(tmp_path / "target")
    tiny_tokenizer().save_pretrained(tmp_path / "target")
    FeatureDraft.from_target(target).save(tmp_path / "feature")  # no tokenizer: the target's
    engine = TorchEngine(EngineConfig(target=str(tmp_path / "target"),
                                      draft=str(tmp_path / "feature"), num_speculative_tokens=3,
                                      speculation="fixed", prompt_lookup_max=0, dtype="float32"))
    await engine.start()
    try:
        assert isinstance(engine._decoder.draft, FeatureDraft)
        deltas = await collect(engine, "a", [1, 2, 3], max_tokens=20, temperature=0.0,
                               ignore_eos=True)
        expected = SpeculativeDecoder(engine._decoder.target).generate([1, 2, 3], 20, GREEDY)
        assert [t for d in deltas for t in d.token_ids] == expected.token_ids[3:]
        assert sum(d.spec.num_drafts for d in deltas) > 0
    finally:
        await engine.shutdown()
