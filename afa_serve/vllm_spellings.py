"""vLLM's spellings of `afa-serve serve`'s settings, so that a `vllm serve` command line works:
`serve MODEL` and `--model` for `--target`, and `--speculative-config JSON` for the draft,
k and prompt lookup. Each maps onto `ServeConfig`'s own fields; none is a setting of its own.
"""

from __future__ import annotations

import json
from typing import Any

from afa_serve.config_cli import Spelling

# The speculative methods afa-serve runs, and the keys of vLLM's speculative config each takes,
# as the fields they set.
_METHOD_KEYS = {
    "draft_model": {"model": "draft", "num_speculative_tokens": "num_speculative_tokens",
                    "draft_tensor_parallel_size": "draft_tensor_parallel_size"},
    "ngram": {"num_speculative_tokens": "num_speculative_tokens",
              "prompt_lookup_max": "prompt_lookup_max",
              "prompt_lookup_min": "prompt_lookup_min"},
}
_NGRAM_MODEL = ("ngram", "[ngram]")  # vLLM's names of the ngram "model"


def speculative_fields(text: str) -> dict[str, Any]:
    """vLLM's `--speculative-config` as the fields it sets: method draft_model (the default,
    as vLLM's, when a model is named) sets the draft and k; ngram sets k and prompt lookup."""
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise TypeError('must be a JSON object, e.g. \'{"model": "DRAFT", '
                        '"num_speculative_tokens": 4, "method": "draft_model"}\'')
    method = config.pop("method", None)
    if method is None:
        method = "ngram" if config.get("model") in _NGRAM_MODEL else "draft_model"
    method = "ngram" if method in _NGRAM_MODEL else method
    if method not in _METHOD_KEYS:
        raise ValueError(
            f"method {method!r} is not supported: afa-serve speculates with a draft model "
            "(draft_model) or prompt lookup (ngram)")
    if method == "ngram" and config.get("model") in _NGRAM_MODEL:
        del config["model"]
    keys = _METHOD_KEYS[method]
    if unknown := sorted(config.keys() - keys.keys()):
        raise ValueError(f"method {method} takes {', '.join(keys)}; not {', '.join(unknown)}")
    if method == "draft_model" and "model" not in config:
        raise ValueError("method draft_model needs the draft's model")
    return {keys[key]: value for key, value in config.items()}


SERVE_SPELLINGS = (
    Spelling("MODEL", "vLLM's spelling of --target (`afa-serve serve MODEL`).",
             lambda model: {"target": model}),
    Spelling("--model", "vLLM's spelling of --target.", lambda model: {"target": model}),
    Spelling("--speculative-config", "vLLM's spelling of --draft, -k and prompt lookup: JSON "
             'such as \'{"model": "DRAFT", "num_speculative_tokens": 4, "method": '
             '"draft_model"}\' or \'{"method": "ngram", "num_speculative_tokens": 4, '
             '"prompt_lookup_max": 3}\'.', speculative_fields),
)
