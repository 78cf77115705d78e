"""/tokenize, /detokenize and /version (vLLM's shapes), and CORS, on a real server: the tiny
engine over the real SmolLM2 tokenizer and chat template, under uvicorn."""

from __future__ import annotations

import httpx
import pytest

from afa_serve import __version__
from afa_serve.api import ApiOptions
from tests.api_harness import TINY, chat_prompt_ids, running_server, tiny_engine

MAX_MODEL_LEN = 192
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]


@pytest.fixture(scope="module")
def server(real_tokenizer):
    with running_server(tiny_engine(real_tokenizer, max_model_len=MAX_MODEL_LEN)) as running:
        yield running


def tokenize(server, **body) -> dict:
    response = server.post("/tokenize", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_tokenize_a_prompt_gives_the_tokens_completions_count(server, real_tokenizer):
    text = "The capital of France is"
    answer = tokenize(server, model=TINY, prompt=text, return_token_strs=True)
    ids = real_tokenizer(text)["input_ids"]
    assert answer == {"count": len(ids), "max_model_len": MAX_MODEL_LEN, "tokens": ids,
                      "token_strs": real_tokenizer.convert_ids_to_tokens(ids)}
    usage = server.client().completions.create(model=TINY, prompt=text, max_tokens=1).usage
    assert usage.prompt_tokens == answer["count"]
    assert tokenize(server, prompt=text, add_special_tokens=False)["tokens"] == \
        real_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_tokenize_messages_gives_the_tokens_chat_completions_count(server, real_tokenizer):
    answer = tokenize(server, model=TINY, messages=CHAT)
    assert answer["tokens"] == chat_prompt_ids(real_tokenizer, CHAT)
    assert answer["token_strs"] is None
    usage = server.client().chat.completions.create(model=TINY, messages=CHAT,
                                                    max_tokens=1).usage
    assert usage.prompt_tokens == answer["count"]

    without = tokenize(server, messages=CHAT, add_generation_prompt=False)["tokens"]
    assert answer["tokens"][:len(without)] == without and len(without) < answer["count"]
    prefill = [*CHAT, {"role": "assistant", "content": "Hello"}]
    continued = tokenize(server, messages=prefill, continue_final_message=True)["tokens"]
    assert real_tokenizer.decode(continued).endswith("Hello")


def test_detokenize_gives_the_text_back(server, real_tokenizer):
    ids = real_tokenizer("Speculative decoding, losslessly.")["input_ids"]
    response = server.post("/detokenize", json={"model": TINY, "tokens": ids})
    assert response.status_code == 200, response.text
    assert response.json() == {"prompt": real_tokenizer.decode(ids)}


def test_version(server):
    response = server.get("/version")
    assert response.status_code == 200 and response.json() == {"version": __version__}


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {"model": "other", "prompt": "hi"}, 404, "model"),
    ("/detokenize", {"model": "other", "tokens": [1]}, 404, "model"),
    ("/tokenize", {"model": TINY}, 400, None),
    ("/tokenize", {"prompt": "hi", "foo": 1}, 400, "foo"),
    ("/tokenize", {"messages": [{"role": "user", "content": "hi"}], "prompt": "hi"}, 400,
     "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": "hi"}],
                   "add_generation_prompt": True, "continue_final_message": True}, 400,
     "continue_final_message"),
    ("/tokenize", {"messages": [{"role": "x", "content": "hi"}]}, 400, "messages[0].role"),
    ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens[0]"),
])
def test_bad_requests_are_openai_errors(server, path, body, status, param):
    response = server.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"]


def test_the_api_key_guards_them(real_tokenizer):
    with running_server(tiny_engine(real_tokenizer), ApiOptions(api_key="k")) as guarded:
        assert guarded.post("/tokenize", json={"prompt": "hi"}).status_code == 200
        for method, path in (("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/version")):
            response = httpx.request(method, f"{guarded.url}{path}", json={"prompt": "hi"})
            assert response.status_code == 401, path


PREFLIGHT = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}


def test_cors_is_off_by_default(server):
    response = httpx.options(f"{server.url}/v1/chat/completions", headers=PREFLIGHT)
    assert "access-control-allow-origin" not in response.headers
    answer = server.get("/version", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in answer.headers


def test_allowed_origins_may_call_the_api_with_its_key(real_tokenizer):
    options = ApiOptions(api_key="k", allowed_origins=("https://app.example",))
    with running_server(tiny_engine(real_tokenizer), options) as cors:
        preflight = httpx.options(f"{cors.url}/v1/chat/completions", headers=PREFLIGHT)
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        answer = cors.post("/tokenize", json={"prompt": "hi"},
                           headers={"Origin": "https://app.example"})
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == "https://app.example"
        refused = httpx.options(f"{cors.url}/v1/chat/completions",
                                headers={**PREFLIGHT, "Origin": "https://evil.example"})
        assert refused.status_code == 400
        assert "access-control-allow-origin" not in refused.headers
