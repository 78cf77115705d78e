"""Refusing a prompt that cannot fit the context before tokenizing it.

Tokenizing costs CPU in proportion to the text (a 4 MiB prompt: seconds), so a prompt that is
certainly too long is refused by its length in characters first, against a generous bound:
no token stands for more characters than the longest token string of the vocabulary has
(byte-level BPE and SentencePiece token strings have at least one character per character of
text they stand for), so a text longer than `max_model_len` such tokens cannot fit.
"""

from __future__ import annotations

from afa_serve.api.errors import invalid_request
from afa_serve.api.schemas import ChatCompletionRequest, CompletionRequest


def max_prompt_chars(tokenizer, max_model_len: int) -> int:
    """The most characters a prompt of `max_model_len` tokens can have."""
    return max_model_len * max(len(token) for token in tokenizer.get_vocab())


def check_prompt_size(
    body: CompletionRequest | ChatCompletionRequest, max_chars: int, max_model_len: int
) -> None:
    """A 400 naming the prompt (or messages) when its text alone cannot fit the context."""
    if isinstance(body, ChatCompletionRequest):
        param, sizes = "messages", [sum(len(message.text) for message in body.messages)]
    else:
        param, sizes = "prompt", [len(p) for p in body.prompts if isinstance(p, str)]
    longest = max(sizes, default=0)
    if longest > max_chars:
        raise invalid_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"{param} has {longest} characters, more than {max_model_len} tokens can hold.",
            param)
