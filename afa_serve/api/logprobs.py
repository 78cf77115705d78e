"""The engine's `TokenLogprob`s in OpenAI's two shapes: chat's `logprobs.content` and the
completions' `tokens` / `token_logprobs` / `top_logprobs` / `text_offset`.

A token's text is the tokenizer's decoding of it alone (a piece of a multi-byte character
decodes to U+FFFD; chat's `bytes` then hold that text's UTF-8, as vLLM's). A logprob of -inf
(a token that penalties or a bias ruled out cannot show here: these are raw logprobs) would not
be valid JSON; it is written as vLLM writes it, -9999.0.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from afa_serve.api.schemas import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob
from afa_serve.engine.base import TokenLogprob

LOWEST_LOGPROB = -9999.0


def _finite(logprob: float) -> float:
    return max(logprob, LOWEST_LOGPROB)


class LogprobFormatter:
    """Formats logprobs with one tokenizer's token texts (cached: a vocabulary is finite)."""

    def __init__(self, tokenizer):
        self.token_text = lru_cache(maxsize=65536)(
            lambda token_id: tokenizer.decode([token_id]))

    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        text = self.token_text(token_id)
        return TopLogprob(token=text, logprob=_finite(logprob), bytes=list(text.encode()))

    def chat(self, logprobs: Sequence[TokenLogprob]) -> ChatLogprobs:
        return ChatLogprobs(content=[
            ChatTokenLogprob(**self._top(entry.token_id, entry.logprob).model_dump(),
                             top_logprobs=[self._top(t, lp) for t, lp in entry.top])
            for entry in logprobs
        ])

    def completion(self, logprobs: Sequence[TokenLogprob | None], token_ids: Sequence[int],
                   text_offset: int) -> CompletionLogprobs:
        """`token_ids[i]`'s entry is `logprobs[i]`, None for a first prompt token; offsets
        count from `text_offset`. The chosen token is always among `top_logprobs`, as OpenAI's."""
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for token_id, entry in zip(token_ids, logprobs, strict=True):
            text = self.token_text(token_id)
            tokens.append(text)
            offsets.append(text_offset)
            text_offset += len(text)
            if entry is None:
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            token_logprobs.append(_finite(entry.logprob))
            top = {self.token_text(t): _finite(lp) for t, lp in entry.top}
            top.setdefault(text, _finite(entry.logprob))
            top_logprobs.append(top)
        return CompletionLogprobs(tokens=tokens, token_logprobs=token_logprobs,
                                  top_logprobs=top_logprobs, text_offset=offsets)
