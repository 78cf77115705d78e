"""Where the output stops never depends on how many tokens a speculative step produced."""

from __future__ import annotations

import pytest

from afa_serve.engine.base import SamplingParams
from afa_serve.engine.output import OutputAssembler

TEXT = " one two END three four five six seven"


def assemble(tokenizer, token_ids, params, chunk_sizes):
    """Feed `token_ids` in chunks of the given sizes (cycled) until the output finishes."""
    assembler = OutputAssembler(tokenizer, tuple(tokenizer.encode("Count:")), params,
                                frozenset({tokenizer.eos_token_id}))
    text, kept, position, step = "", [], 0, 0
    while position < len(token_ids):
        size = chunk_sizes[step % len(chunk_sizes)]
        update = assembler.add(token_ids[position:position + size])
        text += update.text
        kept.extend(update.token_ids)
        position, step = position + size, step + 1
        if update.finish_reason is not None:
            return text, kept, update.finish_reason, update.stop_reason
    return text, kept, None, None


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=64, stop=("END",), min_tokens=5),  # the stop string is too early
    SamplingParams(max_tokens=64, stop=("END",)),
    SamplingParams(max_tokens=64, stop=("two", "one two three")),  # the first to complete wins
    SamplingParams(max_tokens=6),
    SamplingParams(max_tokens=64, stop=("four",), min_tokens=3),
])
@pytest.mark.parametrize("chunk_sizes", [[5, 1], [3], [2, 4], [64]])
def test_chunked_tokens_stop_where_one_at_a_time_does(real_tokenizer, params, chunk_sizes):
    for text in (TEXT, " one two three four five"):
        token_ids = real_tokenizer.encode(text) + [real_tokenizer.eos_token_id]
        assert assemble(real_tokenizer, token_ids, params, chunk_sizes) == \
            assemble(real_tokenizer, token_ids, params, [1])


def test_one_at_a_time_semantics(real_tokenizer):
    token_ids = real_tokenizer.encode(TEXT)
    text, kept, reason, stop = assemble(
        real_tokenizer, token_ids, SamplingParams(max_tokens=64, stop=("END",), min_tokens=5),
        [1])
    assert reason is None and "END" in text  # completed before min_tokens: never a stop
    text, kept, reason, stop = assemble(
        real_tokenizer, token_ids, SamplingParams(max_tokens=64, stop=("two", "one two three")),
        [len(token_ids)])
    assert (text, reason, stop) == (" one ", "stop", "two")
    assert len(kept) < len(token_ids)  # the tokens after the stop are not counted
