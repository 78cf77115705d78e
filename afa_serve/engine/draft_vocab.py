"""The draft's output vocabulary: the target tokens its head scores, most frequent first.

The trainer counts the tokens of the target's responses it trained on and writes them beside
the merged draft as `draft_vocab.json`:

    {"format": 1, "token_ids": [...], "counts": [...], "total_tokens": N}

`token_ids` in order of falling count. The engine takes the first `size` of them (the
end-of-generation tokens always added) and computes the draft's logits over those rows of its
head only; `coverage(size)` is the share of the training responses' tokens they cover, an
upper bound on how often the draft can propose the target's token. The checkpoint itself stays
a full-vocabulary model that any engine (vLLM included) loads as it is.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from afa_serve.atomic import write_json

FILE_NAME = "draft_vocab.json"
FORMAT = 1
DEFAULT_DRAFT_VOCAB_SIZE = 4096  # measured: c falls ~10 % from 8192, held-out α unchanged (README)


@dataclass(frozen=True)
class DraftVocab:
    token_ids: tuple[int, ...]  # most frequent first
    counts: tuple[int, ...]
    total_tokens: int

    def coverage(self, size: int) -> float:
        """The share of counted tokens that the `size` most frequent ones cover."""
        return sum(self.counts[:size]) / self.total_tokens if self.total_tokens else 0.0

    def head_ids(self, size: int, always: Iterable[int] = ()) -> list[int]:
        """The first `size` ids plus `always` (e.g. end-of-generation tokens), ascending."""
        return sorted(set(self.token_ids[:size]) | set(always))


def count_tokens(responses: Iterable[Iterable[int]]) -> DraftVocab:
    counter: Counter[int] = Counter()
    for response in responses:
        counter.update(response)
    ranked = sorted(counter.items(), key=lambda item: (-item[1], item[0]))
    return DraftVocab(
        token_ids=tuple(token for token, _ in ranked),
        counts=tuple(count for _, count in ranked),
        total_tokens=sum(counter.values()),
    )


def write_draft_vocab(folder: Path, vocab: DraftVocab) -> Path:
    path = Path(folder) / FILE_NAME
    write_json(path, {
        "format": FORMAT,
        "token_ids": list(vocab.token_ids),
        "counts": list(vocab.counts),
        "total_tokens": vocab.total_tokens,
    })
    return path


def read_draft_vocab(folder: str | Path) -> DraftVocab | None:
    """The draft's vocabulary file, or None when the folder has none."""
    path = Path(folder) / FILE_NAME
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown format {record.get('format')!r} (expected {FORMAT})")
    token_ids, counts = record["token_ids"], record["counts"]
    if len(token_ids) != len(counts):
        raise ValueError(f"{path}: token_ids and counts differ in length")
    return DraftVocab(tuple(token_ids), tuple(counts), int(record["total_tokens"]))
