"""trim-vocab: a draft with a vocabulary of its own, the tokens the target answers with most, so
that vLLM runs a small output head at every drafted token.

vLLM's `draft_model` method scores the draft's whole head for every drafted token; for a
2-layer SmolLM2 draft the 49,152-row head is most of the draft's arithmetic. vLLM (0.32) runs a
draft whose vocabulary differs from the target's by mapping the two by token string
(`use_heterogeneous_vocab`, greedy drafting), and afa-serve's vLLM engine turns that on for a
draft whose tokens are all the target's. This writes such a draft from a dense one:

- its rows: the tokenizer's added and special tokens, those its configs name (BOS, EOS, pad)
  and those of its chat template's framing (`<|im_start|>assistant` before every answer), then
  the most frequent tokens of the draft's `draft_vocab.json` (the target's response tokens,
  written by `merge`), in that order;
- the weights: the dense draft's, with the embedding (and an untied head) cut to those rows;
- the tokenizer: a word-level one over exactly those token strings, with the dense tokenizer's
  pre-tokenizer, decoder, added tokens and chat template; a token outside the set is the
  unknown token.

The draft can never propose a token outside the set, and a prompt token outside it reaches the
draft as the unknown token, so it is accepted somewhat less often; the target still verifies
every token, so output is unchanged. The torch engine trims the dense draft's head itself
(`--draft-vocab-size`) and keeps the whole vocabulary for the draft's input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from afa_serve.atomic import atomic_directory
from afa_serve.engine.draft_vocab import FILE_NAME as DRAFT_VOCAB_FILE
from afa_serve.engine.draft_vocab import read_draft_vocab

TOKENIZER_FILE = "tokenizer.json"
# Measured with the full profile's draft on vLLM-CPU at k = 1 (README): 4,096 rows lose 5 points
# of acceptance to unknown prompt tokens (15.9 % against 21.1 %); 14,102 (every response token
# seen) gain 1.5 points (22.6 %) but add about 0.6 ms to a draft step.
DEFAULT_ROWS = 8192
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


@dataclass(frozen=True)
class TrimReport:
    out: Path
    rows: int  # the trimmed draft's vocabulary size
    coverage: float  # share of the counted response tokens inside it


def trim_vocabulary(draft: Path, rows: int, out: Path, overwrite: bool = False) -> TrimReport:
    """Write `draft` with a vocabulary of at most `rows` tokens to `out` (see the module)."""
    vocab = read_draft_vocab(draft)
    if vocab is None:
        raise FileNotFoundError(
            f"{draft} has no {DRAFT_VOCAB_FILE} (the target's response tokens by frequency, "
            "which `afa-train merge` writes beside a draft)")
    tokenizer = AutoTokenizer.from_pretrained(draft)
    model = AutoModelForCausalLM.from_pretrained(draft, dtype="auto")
    special = sorted(set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids)
                     | set(_configured_ids(model)) | set(_template_ids(tokenizer)))
    if rows <= len(special):
        raise ValueError(f"rows must exceed the {len(special)} special tokens, got {rows}")
    always = set(special)
    frequent = [token for token in vocab.token_ids if token not in always]
    keep = special + frequent[: rows - len(special)]
    if len(keep) >= model.config.vocab_size:
        raise ValueError(f"all {model.config.vocab_size} of the draft's tokens would be kept: "
                         "there is nothing to trim (ask for fewer rows)")
    new_id = {old: new for new, old in enumerate(keep)}

    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    index = torch.tensor(keep)
    embeddings = torch.nn.Embedding.from_pretrained(
        model.get_input_embeddings().weight.detach()[index].clone(), freeze=False)
    head = torch.nn.Linear(model.config.hidden_size, len(keep), bias=False)
    head.weight = (embeddings.weight if tied else
                   torch.nn.Parameter(model.get_output_embeddings().weight.detach()[index].clone()))
    model.set_input_embeddings(embeddings)
    model.set_output_embeddings(head)
    model.config.vocab_size = len(keep)
    for config in (model.config, model.generation_config):
        for name in TOKEN_ID_FIELDS:
            value = getattr(config, name, None)
            if isinstance(value, int):
                setattr(config, name, new_id[value])
            elif isinstance(value, list):
                setattr(config, name, [new_id[item] for item in value])

    with atomic_directory(out, overwrite=overwrite) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _word_level_tokenizer(staging, tokenizer, keep, new_id)
    kept = set(keep)
    covered = sum(count for token, count in zip(vocab.token_ids, vocab.counts, strict=True)
                  if token in kept)
    return TrimReport(out=out, rows=len(keep), coverage=covered / vocab.total_tokens)


def _template_ids(tokenizer) -> list[int]:
    """The tokens of the chat template's framing around a turn (none without a template)."""
    if tokenizer.chat_template is None:
        return []
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": ""}], add_generation_prompt=True, tokenize=False)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def _configured_ids(model) -> list[int]:
    """The token ids the model's config and generation config name (BOS, EOS, pad, unknown)."""
    ids: list[int] = []
    for config in (model.config, model.generation_config):
        for name in TOKEN_ID_FIELDS:
            value = getattr(config, name, None)
            ids += [value] if isinstance(value, int) else list(value or [])
    return ids


def _word_level_tokenizer(folder: Path, tokenizer, keep: list[int], new_id: dict[int, int]
                          ) -> None:
    """Rewrite the saved tokenizer over the kept token strings, numbered as the trimmed rows."""
    path = folder / TOKENIZER_FILE
    saved = json.loads(path.read_text())
    strings = tokenizer.convert_ids_to_tokens(keep)
    if len(set(strings)) != len(strings):
        raise ValueError("two kept token ids share one token string: a word-level tokenizer "
                         "cannot number them both")
    unknown = tokenizer.unk_token or tokenizer.eos_token
    if unknown not in strings:
        raise ValueError(f"the tokenizer's unknown (or end) token {unknown!r} is not kept")
    saved["model"] = {"type": "WordLevel",
                      "vocab": {string: index for index, string in enumerate(strings)},
                      "unk_token": unknown}
    for added in saved["added_tokens"]:
        added["id"] = new_id[added["id"]]
    path.write_text(json.dumps(saved, ensure_ascii=False))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if "added_tokens_decoder" in config:
        config["added_tokens_decoder"] = {
            str(new_id[int(old)]): entry for old, entry in config["added_tokens_decoder"].items()}
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False))
