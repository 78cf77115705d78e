"""Prompt-lookup drafting: propose what followed the last occurrence of the latest n-gram.

The sequence so far (prompt and generated tokens) is its own draft: when its last n tokens
(n from `max_ngram` down to `min_ngram`) occurred earlier, the tokens that followed that
occurrence are proposed (Saxena's prompt lookup decoding; vLLM's `ngram` method). It costs no
forward pass, so it pays whenever the target repeats itself or its prompt: code edits,
quotations, lists, and the loops small models fall into. The proposal is deterministic (a
point mass), so verification stays lossless, greedy or sampled.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptLookup:
    min_ngram: int = 1
    max_ngram: int = 3

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError("prompt lookup needs 1 <= min_ngram <= max_ngram")

    def propose(self, token_ids: list[int], max_tokens: int) -> list[int]:
        """Up to `max_tokens` tokens that followed the latest earlier occurrence of the longest
        matching suffix of `token_ids`; [] when none of the suffixes occurred before."""
        if max_tokens < 1:
            return []
        length = len(token_ids)
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            suffix = token_ids[length - n:]
            last = suffix[-1]
            # the latest end e < length - 1 with token_ids[e - n + 1 : e + 1] == suffix
            for end in range(length - 2, n - 2, -1):
                if token_ids[end] == last and token_ids[end - n + 1:end + 1] == suffix:
                    return token_ids[end + 1:end + 1 + max_tokens]
        return []
