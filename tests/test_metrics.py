"""/metrics: the contract's names, and counters that move by exactly what responses report."""

from __future__ import annotations

import math
import threading

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api_harness import TINY, idle, running_server, tiny_engine, wait_until

K = 3
MESSAGES = [{"role": "user", "content": "Count to five."}]

CONTRACT = {
    "counter": [
        "afa_serve_spec_decode_drafts", "afa_serve_spec_decode_draft_tokens",
        "afa_serve_spec_decode_accepted_tokens", "afa_serve_spec_decode_accepted_tokens_per_pos",
        "afa_serve_prompt_tokens", "afa_serve_generation_tokens", "afa_serve_requests",
    ],
    "histogram": [
        "afa_serve_time_to_first_token_seconds",
        "afa_serve_request_time_per_output_token_seconds",
        "afa_serve_inter_token_latency_seconds", "afa_serve_e2e_request_latency_seconds",
        "afa_serve_request_queue_time_seconds", "afa_serve_spec_decode_num_drafted_tokens",
    ],
    # The info metric reads as a gauge (value 1) in Prometheus' text format.
    "gauge": ["afa_serve_num_requests_running", "afa_serve_num_requests_waiting",
              "afa_serve_model_info", "afa_serve_spec_decode_draft_cost_ratio",
              "afa_serve_spec_decode_verify_cost_ratio"],
}


@pytest.fixture(scope="module")
def server(real_tokenizer):
    with running_server(tiny_engine(real_tokenizer, k=K)) as running:
        yield running


def test_every_contract_metric_is_exported_with_model_name(server):
    server.client().completions.create(model=TINY, prompt="warm", max_tokens=3)
    families = {f.name: f for f in text_string_to_metric_families(server.get("/metrics").text)}
    for kind, names in CONTRACT.items():
        for name in names:
            assert name in families, name
            assert families[name].type == kind, name
            assert all(s.labels.get("model_name") == TINY for s in families[name].samples), name
    positions = {s.labels["position"] for s in families[
        "afa_serve_spec_decode_accepted_tokens_per_pos"].samples}
    assert positions == {"0", "1", "2"}
    info = families["afa_serve_model_info"].samples[0].labels
    assert info == {"model_name": TINY, "target": TINY, "draft": f"{TINY}-draft",
                    "num_speculative_tokens": "3", "engine": "torch", "speculation": "fixed",
                    "dtype": "float32", "device": "cpu"}


def test_counters_move_by_exactly_what_the_responses_report(server):
    client = server.client()
    before = server.metrics()
    reported = []  # (usage, metrics, number of choices)
    response = client.completions.create(model=TINY, prompt="Once upon a time", max_tokens=17,
                                         temperature=0)
    reported.append((response.usage, response.model_extra["metrics"], 1))
    response = client.completions.create(model=TINY, prompt="Two roads", max_tokens=9,
                                         temperature=0.8, seed=3, n=2)
    reported.append((response.usage, response.model_extra["metrics"], 2))
    chunks = list(client.chat.completions.create(
        model=TINY, messages=MESSAGES, max_tokens=13, stream=True,
        stream_options={"include_usage": True}))
    reported.append((chunks[-1].usage, chunks[-1].model_extra["metrics"], 1))
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=TINY, prompt="x", max_tokens=10**6)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")
    assert wait_until(lambda: idle(server))
    after = server.metrics()

    def moved(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    spec = [m["speculative_decoding"] for _, m, _ in reported]
    assert moved("afa_serve_spec_decode_drafts_total") == sum(s["num_drafts"] for s in spec)
    assert moved("afa_serve_spec_decode_draft_tokens_total") == sum(
        s["num_draft_tokens"] for s in spec)
    assert moved("afa_serve_spec_decode_accepted_tokens_total") == sum(
        s["num_accepted_draft_tokens"] for s in spec)
    for position in range(K):
        assert moved("afa_serve_spec_decode_accepted_tokens_per_pos_total",
                     position=str(position)) == sum(
            s["num_accepted_tokens_per_pos"][position] for s in spec)
    assert moved("afa_serve_spec_decode_num_drafted_tokens_count") == sum(
        sum(s["draft_length_histogram"]) for s in spec)
    assert moved("afa_serve_spec_decode_num_drafted_tokens_sum") == sum(
        s["num_draft_tokens"] for s in spec)
    assert all(s["draft_cost_ratio"] > 0 and s["verify_cost_ratio"] > 0 for s in spec)
    assert moved("afa_serve_generation_tokens_total") == sum(
        u.completion_tokens for u, _, _ in reported)
    # A prompt with n choices is prefilled n times; its usage counts it once, as OpenAI's does.
    assert moved("afa_serve_prompt_tokens_total") == sum(u.prompt_tokens * n
                                                         for u, _, n in reported)
    assert moved("afa_serve_requests_total", endpoint="/v1/completions", status="200") == 2
    assert moved("afa_serve_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert moved("afa_serve_requests_total", endpoint="/v1/completions", status="400") == 1
    assert moved("afa_serve_requests_total", endpoint="/v1/completions", status="404") == 1

    engine_requests = sum(n for _, _, n in reported)
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                      "request_queue_time_seconds", "request_time_per_output_token_seconds"):
        assert moved(f"afa_serve_{histogram}_count") == engine_requests, histogram
    # One chunk per engine step: between ceil((tokens - 1) / (k + 1)) and tokens - 1 gaps.
    tokens = [17, 9, 9, 13]
    gaps = moved("afa_serve_inter_token_latency_seconds_count")
    assert sum(math.ceil((t - 1) / (K + 1)) for t in tokens) <= gaps <= sum(t - 1 for t in tokens)
    assert after[("afa_serve_num_requests_running", frozenset())] == 0
    assert after[("afa_serve_num_requests_waiting", frozenset())] == 0


def test_gauges_show_running_and_waiting_requests(real_tokenizer):
    engine = tiny_engine(real_tokenizer, max_model_len=2048, max_num_seqs=1, max_queue=4)
    with running_server(engine) as one_slot:
        client = one_slot.client()
        stream = client.completions.create(model=TINY, prompt="x", max_tokens=1800,
                                           temperature=0, stream=True)
        next(iter(stream))
        waiting = threading.Thread(target=lambda: client.completions.create(
            model=TINY, prompt="y", max_tokens=2))
        waiting.start()

        def gauges() -> tuple[float, float]:
            scraped = one_slot.metrics()
            return (scraped[("afa_serve_num_requests_running", frozenset())],
                    scraped[("afa_serve_num_requests_waiting", frozenset())])

        assert wait_until(lambda: gauges() == (1, 1))
        stream.close()
        waiting.join(timeout=10)
        assert wait_until(lambda: gauges() == (0, 0))
