"""Prompt sets: files (JSONL, plain text), the packaged named sets, and prompt tokenization."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from afa_serve.models.pull import pull
from afa_serve.prompts import NAMED_SETS, Prompt, load_prompts, prompt_token_ids

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
            "writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"
        )
    }
    assert prompts[0].id == "mt-bench/81"
    assert prompts[0].messages[0]["content"].startswith("Compose an engaging travel blog post")
    assert load_prompts("mt-bench", limit=5) == prompts[:5]


def test_humaneval_as_chat_and_as_completion():
    chat, completion = load_prompts("humaneval"), load_prompts("humaneval-completion")
    assert len(chat) == len(completion) == 164
    assert [p.id for p in chat] == [f"HumanEval/{i}" for i in range(164)] == [
        p.id for p in completion
    ]
    assert completion[0].text.startswith("from typing import List\n\n\ndef has_close_elements(")
    for asked, raw in zip(chat, completion):
        assert asked.messages[0]["role"] == "user" and raw.text in asked.messages[0]["content"]
    assert set(NAMED_SETS) == {"mt-bench", "humaneval", "humaneval-completion"}


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
