"""Malformed and hostile requests: no 5xx, no hang, every refusal in OpenAI's error format.

Two parts against a live server: schemathesis generating valid and invalid requests from the
app's own OpenAPI schema (at least 1,000 of each), and hand-written hostile cases.
"""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation.modes import GenerationMode

from tests.api_harness import TINY, idle, running_server, tiny_engine, wait_until

REQUEST_TIMEOUT_S = 20  # a hang fails the test
GENERATED_PER_MODE = 1000


@pytest.fixture(scope="module")
def server(real_tokenizer):
    engine = tiny_engine(real_tokenizer, max_model_len=256, max_num_seqs=4, max_queue=16)
    with running_server(engine) as running:
        yield running


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_schemathesis_finds_no_server_error(server, mode):
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    strategy = schema.as_strategy(generation_mode=mode)
    checks = CHECKS + ([negative_data_rejection] if mode == GenerationMode.NEGATIVE else [])
    sent = 0

    @given(case=strategy, served_model=st.booleans())
    @settings(max_examples=GENERATED_PER_MODE, deadline=None, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case, served_model):
        nonlocal sent
        if (mode == GenerationMode.POSITIVE and served_model and isinstance(case.body, dict)
                and "model" in case.body):
            case.body["model"] = TINY  # past the model check, into planning and generation
        response = case.call(base_url=server.url, timeout=REQUEST_TIMEOUT_S)
        sent += 1
        case.validate_response(response, checks=checks)

    run()
    assert sent >= GENERATED_PER_MODE
    assert wait_until(lambda: idle(server), timeout_s=10)


def post_raw(server, body: bytes, content_type: str = "application/json") -> httpx.Response:
    return server.post("/v1/completions", content=body, headers={"Content-Type": content_type},
                       timeout=REQUEST_TIMEOUT_S)


def deeply_nested(depth: int) -> bytes:
    return b'{"model": "tiny-llama", "prompt": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize("body", [
    b"", b"{not json", b"\xff\xfe\x00garbage", b'{"model": "\xc3\x28", "prompt": "x"}',
    b"[1, 2]", b"null", b'"just a string"', b"[" * 200_000 + b"]" * 200_000,
    deeply_nested(50_000), deeply_nested(500),
    b'{"model": "tiny-llama", "prompt": "x", "temperature": NaN}',
    b'{"model": "tiny-llama", "prompt": "x", "max_tokens": Infinity}',
    b'{"model": "tiny-llama", "prompt": "x", "max_tokens": 1e400}',
    b'{"model": "tiny-llama", "prompt": "\\ud800 lone surrogate"}',
    b'{"model": "\\udfff", "prompt": "x"}',
    b'{"model": "tiny-llama", "prompt": "x", "\\ud800": 1}',
])
def test_unparsable_bodies_are_400(server, body):
    response = post_raw(server, body)
    assert response.status_code == 400, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("fields, param", [
    ({"model": 5}, "model"),
    ({"prompt": {"a": 1}}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt[0]"),  # a list of strings or of ids: neither
    ({"prompt": []}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [2**40]}, "prompt"),
    ({"prompt": [-1]}, "prompt[0]"),
    ({"prompt": ["x"] * 17}, "prompt"),
    ({"n": "three"}, "n"),
    ({"n": 16, "prompt": ["a", "b"]}, "n"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 2**80}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"seed": 2**70}, "seed"),
    ({"stop": [1, 2]}, "stop[0]"),
    ({"stop": ["s"] * 1000}, "stop"),
    ({"stop": ""}, "stop"),
    ({"stop_token_ids": [10**9]}, "stop_token_ids"),
    ({"stream": "yes please"}, "stream"),
    ({"prompt": "word " * 300}, "prompt"),
])
def test_wrong_types_and_values_are_400_naming_the_parameter(server, fields, param):
    body = {"model": TINY, "prompt": "hello", "max_tokens": 4, **fields}
    response = post_raw(server, json.dumps(body).encode())
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ("hello", "messages"),
    ([{"role": "user", "content": "hi"}] * 5000, "messages"),
    ([{"role": "user", "content": None}], "messages[0].content"),
    ([{"role": "user", "content": []}], "messages[0].content"),
    ([{"role": "user", "content": "hi", "name": 5}], "messages[0].name"),
    ([{"role": "assistant", "tool_calls": []}], "messages[0].content"),
])
def test_hostile_chat_messages_are_400(server, messages, param):
    response = server.post("/v1/chat/completions", json={"model": TINY, "messages": messages},
                           timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_other_content_types_are_400(server):
    body = json.dumps({"model": TINY, "prompt": "x", "max_tokens": 2}).encode()
    assert post_raw(server, body, "text/plain").status_code == 400
    assert post_raw(server, body, "application/x-www-form-urlencoded").status_code == 400


def test_a_client_that_stalls_mid_body_then_leaves_does_not_hurt(server):
    host, port = urlsplit(server.url).hostname, urlsplit(server.url).port
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\"")
        time.sleep(0.2)
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b"GARBAGE\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400")
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(b"GARBAGE / HTTP/9.9\r\n\r\n")  # h11 parses it: an unknown route
        assert sock.recv(100).startswith(b"HTTP/1.1 404")
    response = server.post("/v1/completions", json={"model": TINY, "prompt": "x",
                                                    "max_tokens": 2})
    assert response.status_code == 200
    assert wait_until(lambda: idle(server))


@pytest.mark.parametrize("fields", [
    {"top_p": 5e-324}, {"top_p": 1e-300, "temperature": 2.0}, {"top_p": 1e-10},
    {"temperature": 1e-5}, {"temperature": 1e-300}, {"top_k": 1}, {"top_k": 10**30},
    {"seed": -(2**63)}, {"seed": 2**63 - 1, "n": 16}, {"stop_token_ids": [0]},
    {"stop": ["\u0000"]}, {"ignore_eos": True, "max_tokens": 40},
])
def test_extreme_but_valid_values_are_served(server, fields):
    body = {"model": TINY, "prompt": "hello", "max_tokens": 4, **fields}
    response = post_raw(server, json.dumps(body).encode())
    assert response.status_code == 200, response.text
