"""The OpenAI-compatible API over a real (tiny) engine, on a real uvicorn server, through the
official `openai` client: outputs, streaming, choices, and every refusal in OpenAI's format."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from afa_serve.api import ApiOptions
from afa_serve.engine.base import SamplingParams
from tests.api_harness import (
    TINY,
    chat_prompt_ids,
    engine_alone,
    idle,
    running_server,
    tiny_engine,
    wait_until,
)

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name three colours."}]


LONG = 1800  # output tokens that keep the tiny engine busy for a good while


@pytest.fixture(scope="module")
def server(real_tokenizer):
    with running_server(tiny_engine(real_tokenizer, max_model_len=2048)) as running:
        yield running


def stream_text(chunks, kind: str) -> tuple[dict[int, str], dict[int, str]]:
    """Text and finish reason per choice index, from a stream of chunks."""
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            piece = choice.text if kind == "completion" else (choice.delta.content or "")
            texts[choice.index] = texts.get(choice.index, "") + piece
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    return texts, finish


@pytest.mark.parametrize("stream", [False, True])
def test_completion_text_equals_the_engine_alone(server, real_tokenizer, stream):
    client = server.client()
    prompt = "The quick brown fox"
    kwargs = {"model": TINY, "prompt": prompt, "max_tokens": 24, "temperature": 0}
    if stream:
        texts, finish = stream_text(client.completions.create(stream=True, **kwargs), "completion")
        text, reason = texts[0], finish[0]
    else:
        response = client.completions.create(**kwargs)
        text, reason = response.choices[0].text, response.choices[0].finish_reason
        assert response.usage.completion_tokens == 24
        assert response.usage.prompt_tokens == len(real_tokenizer(prompt)["input_ids"])
    expected = engine_alone(server.engine, real_tokenizer(prompt)["input_ids"],
                            SamplingParams(max_tokens=24, temperature=0.0))
    assert text == expected and text
    assert reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_chat_text_equals_the_engine_alone_with_a_seed(server, real_tokenizer, stream):
    client = server.client()
    kwargs = {"model": TINY, "messages": MESSAGES, "max_completion_tokens": 20,
              "temperature": 0.9, "top_p": 0.95, "seed": 1234}
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        assert chunks[0].choices[0].delta.role == "assistant"
        texts, _ = stream_text(chunks, "chat")
        text = texts[0]
    else:
        text = client.chat.completions.create(**kwargs).choices[0].message.content
    expected = engine_alone(
        server.engine, chat_prompt_ids(real_tokenizer, MESSAGES),
        SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=1234),
    )
    assert text == expected and text


def test_n_choices_use_seed_plus_index_and_stream_interleaved(server, real_tokenizer):
    client = server.client()
    kwargs = {"model": TINY, "prompt": "Once upon", "max_tokens": 12, "temperature": 1.0,
              "seed": 7, "n": 3}
    response = client.completions.create(**kwargs)
    assert [c.index for c in response.choices] == [0, 1, 2]
    ids = real_tokenizer("Once upon")["input_ids"]
    for i, choice in enumerate(response.choices):
        expected = engine_alone(server.engine, ids,
                                SamplingParams(max_tokens=12, temperature=1.0, seed=7 + i))
        assert choice.text == expected
    assert response.usage.completion_tokens == 36
    assert response.usage.prompt_tokens == len(ids)  # the prompt counts once, as OpenAI's

    chunks = list(client.completions.create(stream=True, **kwargs))
    texts, finish = stream_text(chunks, "completion")
    assert texts == {c.index: c.text for c in response.choices}
    assert set(finish) == {0, 1, 2}
    order = [chunk.choices[0].index for chunk in chunks if chunk.choices]
    assert order != sorted(order)  # the choices' chunks interleave


def test_batched_prompts_each_get_n_choices(server):
    response = server.client().completions.create(
        model=TINY, prompt=["Hello", "Goodbye"], max_tokens=5, temperature=0, n=2)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert response.choices[0].text == response.choices[1].text  # greedy: same per prompt
    assert response.choices[0].text != response.choices[2].text


def test_token_id_prompts_are_accepted(server, real_tokenizer):
    ids = real_tokenizer("The quick brown fox")["input_ids"]
    by_ids = server.client().completions.create(model=TINY, prompt=ids, max_tokens=8,
                                                temperature=0)
    by_text = server.client().completions.create(model=TINY, prompt="The quick brown fox",
                                                 max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_penalties_and_filters_are_honoured(server, real_tokenizer):
    extensions = {"repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.5,
                  "top_k": 50, "min_p": 0.01, "min_tokens": 4, "logit_bias": {"42": 3}}
    kwargs = {"model": TINY, "prompt": "Once upon", "max_tokens": 16, "temperature": 0.8, "seed": 3}
    text = server.client().completions.create(**kwargs, extra_body=extensions).choices[0].text
    ids = real_tokenizer("Once upon")["input_ids"]
    expected = engine_alone(server.engine, ids, SamplingParams(
        max_tokens=16, temperature=0.8, seed=3, repetition_penalty=1.3, presence_penalty=0.5,
        frequency_penalty=0.5, top_k=50, min_p=0.01, min_tokens=4, logit_bias=((42, 3.0),)))
    plain = engine_alone(server.engine, ids, SamplingParams(max_tokens=16, temperature=0.8,
                                                            seed=3))
    assert text == expected != plain


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(server, real_tokenizer, skip):
    im_start = real_tokenizer.convert_tokens_to_ids("<|im_start|>")
    choice = server.client().completions.create(
        model=TINY, prompt="hi", max_tokens=3, temperature=0,
        extra_body={"logit_bias": {str(im_start): 100}, "skip_special_tokens": skip}).choices[0]
    assert choice.text == ("" if skip else "<|im_start|>" * 3)


def test_stop_string_ends_the_text_before_it(server):
    client = server.client()
    free = client.completions.create(model=TINY, prompt="Once upon", max_tokens=30,
                                     temperature=0).choices[0].text
    stop = free[8:11]
    assert stop.strip() and stop not in free[:8]
    choice = client.completions.create(model=TINY, prompt="Once upon", max_tokens=30,
                                       temperature=0, stop=[stop]).choices[0]
    assert choice.text == free[: free.index(stop)]
    assert choice.finish_reason == "stop"
    assert choice.model_extra["stop_reason"] == stop


def test_stream_usage_and_metrics_on_the_last_chunk(server):
    chunks = list(server.client().chat.completions.create(
        model=TINY, messages=MESSAGES, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert all(chunk.usage is None for chunk in chunks[:-1])
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.completion_tokens == 10
    spec = last.model_extra["metrics"]["speculative_decoding"]
    assert 1 <= spec["num_drafts"] and spec["num_draft_tokens"] <= 3 * spec["num_drafts"]
    assert spec["num_accepted_draft_tokens"] == sum(spec["num_accepted_tokens_per_pos"])
    assert spec["mean_acceptance_length"] == pytest.approx(
        1 + spec["num_accepted_draft_tokens"] / spec["num_drafts"])
    histogram = spec["acceptance_histogram"]  # vLLM's: steps that accepted exactly j tokens
    assert len(histogram) == 4 and sum(histogram) == spec["num_spec_steps"]
    assert sum(j * n for j, n in enumerate(histogram)) == spec["num_accepted_draft_tokens"]
    timings = last.model_extra["metrics"]
    assert timings["queue_time_ms"] >= 0 and timings["generation_time_ms"] > 0
    assert timings["tokens_per_second"] > 0 and timings["mean_itl_ms"] > 0
    assert last.model_extra["metrics"]["time_to_first_token_ms"] > 0


def test_models_lists_and_retrieves_the_served_model(server):
    client = server.client()
    models = client.models.list()
    assert [m.id for m in models.data] == [TINY]
    card = client.models.retrieve(TINY)
    assert card.model_extra["max_model_len"] == 2048
    assert card.model_extra["num_speculative_tokens"] == 3
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_health_and_openapi(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    schema = server.get("/openapi.json").json()
    responses = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "422" not in responses and {"400", "404", "413", "429"} <= set(responses)


# -- refusals ------------------------------------------------------------------------------


def refusal(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value


@pytest.mark.parametrize("extra, param", [
    ({"logprobs": 6}, "logprobs"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_p": 1.5}, "min_p"),
    ({"logit_bias": {"4200000": 5}}, "logit_bias"),
    ({"logit_bias": {"hello": 5}}, "logit_bias.hello"),
    ({"logit_bias": {"01": 5, "1": -5}}, "logit_bias"),  # two keys for one token
    ({"logit_bias": {"42": 101}}, "logit_bias"),
    ({"min_tokens": 5}, "min_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"suffix": "end"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"no_such_parameter": 1}, "no_such_parameter"),
    ({"max_tokens": 10**12}, "max_tokens"),
])
def test_completion_refusals_name_the_parameter(server, extra, param):
    error = refusal(lambda: server.client().completions.create(
        model=TINY, prompt="hi", max_tokens=4, extra_body=extra))
    assert (error.status_code, error.param, error.type) == (400, param, "invalid_request_error")


@pytest.mark.parametrize("extra, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "see"}, {
        "type": "image_url", "image_url": {"url": "http://x"}}]}]}, "messages[0].content[1]"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None,
      "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f",
                                                                  "arguments": "{}"}}]}]},
     "messages[1].tool_calls"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi", "colour": "red"}]}, "messages[0].colour"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"audio": {"voice": "alloy", "format": "mp3"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens"),
    ({"max_completion_tokens": 10**9}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "word " * 2100}]}, "messages"),
])
def test_chat_refusals_name_the_parameter(server, extra, param):
    body = {"messages": MESSAGES, **extra}
    messages = body.pop("messages")
    error = refusal(lambda: server.client().chat.completions.create(
        model=TINY, messages=messages, extra_body=body))
    assert (error.status_code, error.param) == (400, param)
    assert error.body["message"]


def test_harmless_defaults_are_accepted(server):
    response = server.client().chat.completions.create(
        model=TINY, messages=MESSAGES, max_tokens=2, user="someone", presence_penalty=0,
        frequency_penalty=0, logprobs=False, n=1, response_format={"type": "text"},
        temperature=None)
    assert response.choices[0].finish_reason == "length"


def test_platform_fields_and_neutral_extensions_leave_the_output_alone(server):
    """OpenAI's platform-only fields (LangChain's named messages, store, metadata, ...) and
    vLLM's extensions at their neutral values (what `vllm bench serve` sends) change nothing."""
    plain = server.client().chat.completions.create(
        model=TINY, messages=MESSAGES, max_tokens=8, temperature=0)
    named = [{**message, "name": "someone"} for message in MESSAGES]
    chunks = list(server.client().chat.completions.create(
        model=TINY, messages=named, max_tokens=8, temperature=0, store=False,
        metadata={"run": "1"}, service_tier="auto", safety_identifier="x",
        prompt_cache_key="k", parallel_tool_calls=True, tool_choice="auto", tools=[],
        modalities=["text"], verbosity="medium", prediction={"type": "content", "content": "x"},
        stream=True, stream_options={"include_usage": True, "include_obfuscation": False},
        extra_body={"repetition_penalty": 1.0, "min_p": 0.0, "top_k": -1, "min_tokens": 0,
                    "skip_special_tokens": True, "ignore_eos": False, "stop_token_ids": [],
                    "chat_template_kwargs": {}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content


def test_continuous_usage_stats_put_usage_on_every_chunk(server):
    chunks = list(server.client().completions.create(
        model=TINY, prompt="Once upon", max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert all(chunk.usage is not None for chunk in chunks)
    generated = [c.usage.completion_tokens for c in chunks]
    assert generated == sorted(generated) and generated[-1] == 6


def test_unknown_model_is_404(server):
    error = refusal(lambda: server.client().completions.create(model="gpt-4", prompt="hi"))
    assert (error.status_code, error.code, error.param) == (404, "model_not_found", "model")


def test_oversized_bodies_are_413_by_header_and_by_stream(real_tokenizer):
    options = ApiOptions(max_body_bytes=2048)
    with running_server(tiny_engine(real_tokenizer), options) as small:
        big = json.dumps({"model": TINY, "prompt": "x" * 4096}).encode()
        declared = small.post("/v1/completions", content=big,
                              headers={"Content-Type": "application/json"})
        assert declared.status_code == 413
        assert declared.json()["error"]["code"] == "request_too_large"

        def chunks():
            for start in range(0, len(big), 512):
                yield big[start:start + 512]

        streamed = small.post("/v1/completions", content=chunks(),
                              headers={"Content-Type": "application/json"})
        assert streamed.status_code == 413
        assert small.post("/v1/completions", json={"model": TINY, "prompt": "x",
                                                   "max_tokens": 2}).status_code == 200


def test_unknown_routes_and_methods_answer_in_openai_format(server):
    missing = server.get("/v1/nothing")
    assert missing.status_code == 404 and "error" in missing.json()
    wrong_method = server.get("/v1/completions")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_api_key_guards_everything_but_health(real_tokenizer):
    options = ApiOptions(api_key="sekret")
    with running_server(tiny_engine(real_tokenizer), options) as guarded:
        for key in (None, "wrong"):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            for path in ("/v1/models", "/metrics", "/openapi.json"):
                response = httpx.get(f"{guarded.url}{path}", headers=headers)
                assert response.status_code == 401, path
                assert response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{guarded.url}/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="wrong",
                          max_retries=0).models.list()
        assert guarded.client().completions.create(model=TINY, prompt="hi", max_tokens=2)


def test_full_queue_is_429_with_retry_after(real_tokenizer):
    engine = tiny_engine(real_tokenizer, max_model_len=2048, max_num_seqs=1, max_queue=0)
    with running_server(engine) as one_slot:
        client = one_slot.client()
        stream = client.completions.create(model=TINY, prompt="x", max_tokens=LONG,
                                           temperature=0, stream=True)
        next(iter(stream))  # the one slot is taken
        response = one_slot.post("/v1/completions", json={"model": TINY, "prompt": "y"})
        assert response.status_code == 429
        assert response.headers["Retry-After"] == "1"
        assert response.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=TINY, prompt="y", max_tokens=2)
        stream.close()
        assert wait_until(lambda: idle(one_slot))
        assert client.completions.create(model=TINY, prompt="y", max_tokens=2)


def test_draining_refuses_new_work_with_503(real_tokenizer):
    with running_server(tiny_engine(real_tokenizer, max_model_len=2048)) as draining:
        # a draining server exits once nothing is in flight: keep one request going meanwhile
        stream = draining.client().completions.create(
            model=TINY, prompt="x", max_tokens=LONG, temperature=0, stream=True,
            extra_body={"ignore_eos": True})
        next(iter(stream))
        draining.state.draining = True
        response = draining.post("/v1/completions", json={"model": TINY, "prompt": "y"})
        assert response.status_code == 503 and response.headers["Retry-After"]
        assert httpx.get(f"{draining.url}/health").status_code == 503
        stream.close()


# -- clients that leave ----------------------------------------------------------------------


def test_a_stream_closed_early_frees_its_slot(server):
    before = server.engine.stats().generation_tokens
    stream = server.client().completions.create(model=TINY, prompt="x", max_tokens=LONG,
                                                temperature=0, stream=True,
                                                extra_body={"ignore_eos": True})
    for number, _chunk in enumerate(stream):
        if number == 2:
            break
    stream.close()
    assert wait_until(lambda: idle(server), timeout_s=2)
    generated = server.engine.stats().generation_tokens - before
    assert generated < LONG / 4  # aborted at once, far from its end


def test_a_non_streaming_request_whose_client_left_is_aborted(server):
    before = server.engine.stats().generation_tokens
    with pytest.raises(httpx.TimeoutException):
        server.post("/v1/completions", json={"model": TINY, "prompt": "x", "max_tokens": LONG,
                                             "ignore_eos": True}, timeout=0.15)
    assert wait_until(lambda: idle(server), timeout_s=2)
    assert server.engine.stats().generation_tokens - before < LONG / 4
