"""From generated token ids to text deltas, with the stop rules: EOS, stop tokens, stop strings."""

from __future__ import annotations

from dataclasses import dataclass

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from afa_serve.engine.base import FinishReason, SamplingParams

# Prompt tokens decoded before the first generated one, so that tokenizers which
# drop a leading space at the start of a decode (SentencePiece) get it right.
_PROMPT_CONTEXT_TOKENS = 5


@dataclass(frozen=True)
class OutputUpdate:
    token_ids: tuple[int, ...]  # the tokens this update keeps (cut after a stop token)
    text: str  # text now safe to emit
    finish_reason: FinishReason | None
    stop_reason: str | int | None


class OutputAssembler:
    """Follows one request's output; `add` takes new tokens and says what to emit."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: tuple[int, ...],
        params: SamplingParams,
        eos_token_ids: frozenset[int],
    ):
        self._tokenizer = tokenizer
        self._params = params
        self._end_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_token_ids)
        self._ids = list(prompt_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._text = ""
        self._emitted = 0
        self._hold_back = max((len(s) for s in params.stop), default=1) - 1
        self.num_generated = 0

    def add(self, token_ids: list[int]) -> OutputUpdate:
        """Take a step's new tokens one at a time, exactly as if each came in a step of its
        own, so that where the output stops never depends on how many tokens a step made."""
        kept: list[int] = []
        finish_reason: FinishReason | None = None
        stop_reason: str | int | None = None
        for token in token_ids:
            kept.append(token)
            finish_reason, stop_reason = self._add_one(token)
            if finish_reason is not None:
                break
        return OutputUpdate(tuple(kept), self._take_text(finish_reason is not None),
                            finish_reason, stop_reason)

    def _add_one(self, token: int) -> tuple[FinishReason | None, str | int | None]:
        self.num_generated += 1
        self._ids.append(token)
        finish_reason: FinishReason | None = None
        stop_reason: str | int | None = None
        if token in self._end_ids:
            finish_reason = "stop"
            stop_reason = token if token in self._params.stop_token_ids else None
        text_before = len(self._text)
        self._text += self._decode_new(final=finish_reason is not None)
        # as vLLM: no stop string ends the output before min_tokens
        hit = (self._find_stop_string(text_before)
               if self.num_generated >= self._params.min_tokens else None)
        if hit is not None:
            position, stop = hit
            self._text = self._text[:position]
            return "stop", stop
        if finish_reason is None and self.num_generated >= self._params.max_tokens:
            self._text += self._decode_new(final=True)
            finish_reason = "length"
        return finish_reason, stop_reason

    def _decode_new(self, final: bool) -> str:
        """Text of the tokens not decoded yet; held back while it ends in a partial character."""
        decode = self._tokenizer.decode
        skip = self._params.skip_special_tokens
        prefix = decode(self._ids[self._prefix_offset : self._read_offset],
                        skip_special_tokens=skip)
        full = decode(self._ids[self._prefix_offset :], skip_special_tokens=skip)
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full[len(prefix) :]

    def _find_stop_string(self, text_before: int) -> tuple[int, str] | None:
        """The earliest stop string that ends in the new text, if any."""
        earliest: tuple[int, str] | None = None
        for stop in self._params.stop:
            start = self._text.find(stop, max(0, text_before - len(stop) + 1))
            if start != -1 and (earliest is None or start < earliest[0]):
                earliest = (start, stop)
        return earliest

    def _take_text(self, finished: bool) -> str:
        """New text, keeping back a tail that might still grow into a stop string."""
        end = len(self._text) if finished else max(self._emitted, len(self._text) - self._hold_back)
        chunk = self._text[self._emitted : end]
        self._emitted = end
        return chunk
