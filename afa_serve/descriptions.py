"""The descriptions of settings that several configs share, written once (they become the
options' help through `config_cli`)."""

TARGET_HELP = "Target model: packaged name (e.g. smollm2-135m-instruct), local HF folder or hub id."
PROMPTS_HELP = (
    "A named prompt set (sharegpt, alpaca-eval, arena-hard-en, mt-bench, humaneval, ...; "
    "NAME:N mixes), a .jsonl file (`prompt` or `messages` per line) or a text file (one prompt "
    "per line)."
)
DTYPE_HELP = "auto: bfloat16 on CUDA, float32 on CPU (where greedy equality holds best)."
DEVICE_HELP = "auto: CUDA when available."
