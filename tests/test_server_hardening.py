"""Hardening at the edge and in admission, against a real uvicorn server on 127.0.0.1: choices
admitted all or none, header and slow-client limits (raw sockets), the connection cap, queue
gauges as requests leave, names instead of server paths, the API key's checks, the prompt
refused by its size before tokenizing, and an OpenAPI schema that tells what is accepted."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest
import torch

from afa_serve.api import ApiOptions
from afa_serve.config import ServeConfig
from afa_serve.engine.base import GenerationRequest, SamplingParams
from afa_serve.engine.config import EngineConfig
from afa_serve.engine.torch_engine import TorchEngine
from tests.api_harness import TINY, idle, running_server, tiny_engine, wait_until
from tests.conftest import tiny_llama, truncated_copy

KEY = "k3y"
OPTIONS = ApiOptions(api_key=KEY, max_header_bytes=8192, request_timeout_s=1.0,
                     max_connections=32)
LONG = 3000  # tokens: a stream that outlives the test's checks


@pytest.fixture(scope="module")
def server(real_tokenizer):
    engine = tiny_engine(real_tokenizer, max_model_len=4096, max_num_seqs=2, max_queue=2)
    with running_server(engine, OPTIONS) as running:
        yield running


def address(server) -> tuple[str, int]:
    parts = urlsplit(server.url)
    return parts.hostname, parts.port


def read_all(sock: socket.socket, timeout_s: float) -> bytes:
    """What the server sends until it closes the connection (or the timeout passes)."""
    sock.settimeout(timeout_s)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        pass
    return received


def completion(server, **fields) -> httpx.Response:
    return server.post("/v1/completions", json={"model": TINY, "prompt": "hello",
                                                "max_tokens": 2, **fields})


class HeldStreams:
    """`count` long streaming completions on raw sockets, never read, until closed."""

    def __init__(self, server, count: int):
        body = json.dumps({"model": TINY, "prompt": "x", "max_tokens": LONG, "stream": True,
                           "ignore_eos": True}).encode()
        request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                   + KEY.encode() + b"\r\nContent-Type: application/json\r\n"
                   + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.sockets = [socket.create_connection(address(server), timeout=5)
                        for _ in range(count)]
        for sock in self.sockets:
            sock.sendall(request)
        assert wait_until(lambda: server.state.admission.reserved == count, timeout_s=10)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


# -- 1. admission that can succeed -----------------------------------------------------------


@pytest.mark.parametrize("fields", [{"n": 5}, {"n": 3, "prompt": ["a", "b"]}])
def test_choices_that_can_never_fit_are_400_naming_n(server, fields):
    response = completion(server, **fields)  # capacity: 2 running + 2 waiting
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "n"
    assert "Retry-After" not in response.headers


def test_choices_are_admitted_all_or_none(server):
    before = server.engine.stats().prompt_tokens
    held = HeldStreams(server, 3)
    try:  # two run (prefilled: one token each), one waits
        assert wait_until(lambda: server.engine.stats().prompt_tokens == before + 2)
        prompt_tokens = server.engine.stats().prompt_tokens
        refused = completion(server, n=2)
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        assert server.engine.stats().prompt_tokens == prompt_tokens  # no choice reached it
    finally:
        held.close()
    assert wait_until(lambda: idle(server))
    assert completion(server, n=4).status_code == 200


# -- 6. queue gauges -------------------------------------------------------------------------


def test_waiting_never_exceeds_max_queue_and_gauges_follow_aborts(server):
    seen = []
    sampling = threading.Event()

    def sample():
        while not sampling.is_set():
            stats = server.engine.stats()
            seen.append((stats.num_running, stats.num_waiting))
            time.sleep(0.001)  # a busy loop on the engine's lock would starve its scheduler

    sampler = threading.Thread(target=sample)
    sampler.start()
    statuses = []
    threads = [threading.Thread(target=lambda: statuses.append(completion(
        server, max_tokens=200, ignore_eos=True).status_code)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    sampling.set()
    sampler.join()
    assert statuses == [200] * 4  # two ran, two waited their turn, all were served
    assert max(waiting for _, waiting in seen) <= 2
    assert max(running for running, _ in seen) <= 2
    assert (2, 2) in seen  # the queue did fill

    async def abort_one_running() -> tuple[int, int]:
        request = GenerationRequest("gauge-test", tuple(range(5, 10)),
                                    SamplingParams(max_tokens=LONG, ignore_eos=True))
        stream = server.engine.generate(request)
        await anext(stream)
        before = server.engine.stats().num_running
        await server.engine.abort(request.request_id)
        after = server.engine.stats().num_running  # at once, not after a scheduling round
        await stream.aclose()
        return before, after

    assert asyncio.run(abort_one_running()) == (1, 0)
    metrics = server.metrics()
    assert metrics[("afa_serve_num_requests_running", frozenset())] == 0


# -- 2, 3. the edge: headers, slow clients, connections --------------------------------------


def test_oversized_headers_are_431_and_closed(server):
    with socket.create_connection(address(server), timeout=5) as sock:
        # twice the limit, in one read, and the header line never ends
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 16384)
        reply = read_all(sock, 5)
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:100]
    body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_header_fields_too_large"
    within = server.get("/v1/models", headers={"X-Fits": "a" * 4000})
    assert within.status_code == 200


def test_a_client_that_never_finishes_its_headers_gets_408(server):
    with socket.create_connection(address(server), timeout=5) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHo")
        started = time.monotonic()
        reply = read_all(sock, 5)
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:100]
    assert 0.9 < time.monotonic() - started < 3


def test_a_connection_that_sends_nothing_is_closed_at_the_request_timeout(server):
    with socket.create_connection(address(server), timeout=5) as sock:
        started = time.monotonic()
        reply = read_all(sock, 5)
    assert reply == b"" and 0.9 < time.monotonic() - started < 3


def test_a_client_that_stalls_mid_body_is_disconnected(server):
    with socket.create_connection(address(server), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"mo")
        started = time.monotonic()
        reply = read_all(sock, 5)
    assert reply == b"" and time.monotonic() - started < 3  # closed, unanswered
    assert wait_until(lambda: server.state.in_flight == 0)


def test_connections_beyond_the_cap_get_503_and_are_closed(real_tokenizer):
    options = ApiOptions(max_connections=4)
    with running_server(tiny_engine(real_tokenizer), options) as capped:
        held = [socket.create_connection(address(capped), timeout=5) for _ in range(4)]
        try:
            with socket.create_connection(address(capped), timeout=5) as extra:
                reply = read_all(extra, 5)
            assert reply.startswith(b"HTTP/1.1 503 "), reply[:100]
            assert b"retry-after: 1" in reply.lower()
        finally:
            for sock in held:
                sock.close()
        assert wait_until(lambda: httpx.get(f"{capped.url}/health").status_code == 200)


# -- 7. names, never paths -------------------------------------------------------------------


@pytest.mark.parametrize("served_name", [None, "my-model"])
def test_clients_see_model_names_not_server_paths(real_tokenizer, served_name):
    target = tiny_llama(vocab_size=len(real_tokenizer), layers=2)
    config = EngineConfig(target="/srv/models/tiny-target", draft="/srv/drafts/tiny-draft",
                          served_model_name=served_name, num_speculative_tokens=2,
                          max_model_len=128, speculation="fixed", confidence_threshold=0.0)
    engine = TorchEngine.from_models(target, real_tokenizer, truncated_copy(target, 1),
                                     config=config)
    name = served_name or "tiny-target"
    with running_server(engine) as named:
        card = named.get("/v1/models").json()["data"][0]
        assert (card["id"], card["root"], card["draft"]) == (name, "tiny-target", "tiny-draft")
        response = named.post("/v1/completions", json={"model": name, "prompt": "hi",
                                                       "max_tokens": 2})
        assert response.json()["model"] == name
        metrics = named.get("/metrics").text
        assert "/srv/" not in metrics
        assert f'model_name="{name}"' in metrics and 'target="tiny-target"' in metrics


# -- 8, 9. the API key, the prompt's size, the schema ----------------------------------------


def test_an_empty_api_key_is_a_start_up_error():
    env = {**os.environ, "AFA_SERVE_API_KEY": ""}
    started = subprocess.run([sys.executable, "-m", "afa_serve", "serve", "--engine", "torch"],
                             check=False, env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode != 0
    assert "API key is empty" in started.stdout + started.stderr
    with pytest.raises(ValueError, match="API key is empty"):
        ApiOptions(api_key=" ")


@pytest.mark.parametrize("authorization, status", [
    (f"Bearer {KEY}", 200), (f"bearer {KEY}", 200), (f"BEARER  {KEY}", 200),
    (f"Bearer {KEY.upper()}", 401), (f"Basic {KEY}", 401), (KEY, 401), ("Bearer", 401),
])
def test_the_bearer_scheme_is_case_insensitive_the_key_is_not(server, authorization, status):
    response = httpx.get(f"{server.url}/v1/models", headers={"Authorization": authorization})
    assert response.status_code == status


@pytest.mark.parametrize("path, field, param", [
    ("/v1/completions", {"prompt": "x" * 3_000_000}, "prompt"),
    ("/v1/completions", {"prompt": ["hi", "x" * 3_000_000]}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 3_000_000}]},
     "messages"),
])
def test_a_prompt_too_long_by_its_characters_is_refused_before_tokenizing(
    server, monkeypatch, path, field, param
):
    tokenizer = type(server.engine.tokenizer)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the prompt was tokenized")

    monkeypatch.setattr(tokenizer, "__call__", no_tokenizing)
    monkeypatch.setattr(tokenizer, "apply_chat_template", no_tokenizing)
    response = server.post(path, json={"model": TINY, **field})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and "characters" in error["message"]


def test_torch_threads_is_applied_at_start(real_tokenizer):
    target = tiny_llama(vocab_size=len(real_tokenizer), layers=2)
    engine = TorchEngine.from_models(target, real_tokenizer,
                                     config=EngineConfig(target=TINY, max_model_len=128),
                                     torch_threads=2)
    try:
        with running_server(engine) as threaded:
            assert completion(threaded).status_code == 200
            seen = []  # a thread that has not computed yet takes the process's setting
            thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
            thread.start()
            thread.join()
            assert seen == [2]
    finally:
        torch.set_num_threads(1)
    assert ServeConfig(torch_threads=3).torch_threads == 3


def test_the_openapi_schema_offers_only_what_is_accepted(server):
    schemas = server.get("/openapi.json").json()["components"]["schemas"]
    message = schemas["ChatMessage"]["properties"]
    assert message["role"]["enum"] == ["system", "developer", "user", "assistant"]
    parts = message["content"]["anyOf"][1]["items"]["oneOf"]
    assert [part["$ref"].rsplit("/", 1)[1] for part in parts] == ["TextPart", "RefusalPart"]
    chat = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    cases = [(path, schemas[model]["properties"], lambda name, value, base=base: {
        **base, name: value}) for model, path, base in (
        ("ChatCompletionRequest", "/v1/chat/completions", chat),
        ("CompletionRequest", "/v1/completions", {"model": TINY, "prompt": "hi",
                                                  "max_tokens": 1}),
    )] + [("/v1/chat/completions", message, lambda name, value: {
        **chat, "messages": [{"role": "user", "content": "hi", name: value}]})]
    tried = 0
    for path, fields, body in cases:
        for name, field in fields.items():
            if field.get("description", "").startswith("Not supported"):
                for value in field["enum"]:  # each value the schema offers is accepted
                    response = server.post(path, json=body(name, value))
                    assert response.status_code == 200, (name, value, response.text)
                    tried += 1
    assert tried >= 25
