"""GGUF -> plain Hugging Face folder, once, so loads need neither dequantization nor `gguf`."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize `gguf_path` to float32 and save model, tokenizer and generation config.

    float32 keeps the dequantized weights exactly; load with `dtype=torch.bfloat16` for speed.
    transformers refuses to save a GGUF-loaded model, so the weights move into a model rebuilt
    from the same config without its `quantization_config`.
    """
    source = {"pretrained_model_name_or_path": gguf_path.parent, "gguf_file": gguf_path.name}
    loaded = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    config.architectures = [type(loaded).__name__]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(**source).save_pretrained(out_dir)
