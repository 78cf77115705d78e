"""Held-out agreement of a draft by trimmed-head size: does scoring only the N most frequent
tokens cost acceptance? Teacher-forced on `afa-train generate` records, the draft's pick among
the head's rows against the target's token, and the share of target tokens the head covers.

    python bench/head_size_alpha.py --draft DRAFT --data HELDOUT.jsonl \
        --sizes 0 8192 4096 2048 --out bench/results/draft_head_size_alpha.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from afa_serve.engine.draft_vocab import read_draft_vocab
from afa_serve.engine.loading import eos_token_ids, load_tokenizer

CONTEXT_TOKENS = 300  # of each prompt's end: what the draft sees before the response


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draft", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--sizes", nargs="+", type=int, default=[0, 8192, 4096, 2048],
                        help="0: the whole head")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=torch.float32).eval()
    vocab = read_draft_vocab(args.draft)
    always = eos_token_ids(draft, load_tokenizer(args.draft))  # as the engine adds them
    heads = {size: torch.tensor(vocab.head_ids(size, always)) for size in args.sizes if size}
    agreed = dict.fromkeys(args.sizes, 0)
    covered = dict.fromkeys(args.sizes, 0)
    total = 0
    with torch.inference_mode():
        for line in args.data.open():
            record = json.loads(line)
            prompt = record["prompt_token_ids"][-CONTEXT_TOKENS:]
            response = torch.tensor(record["response_token_ids"])
            logits = draft(torch.tensor([prompt + response.tolist()])).logits[0]
            logits = logits[len(prompt) - 1:-1]
            total += len(response)
            for size in args.sizes:
                if size == 0:
                    picks, inside = logits.argmax(-1), len(response)
                else:
                    rows = heads[size]
                    picks = rows[logits[:, rows].argmax(-1)]
                    inside = int(torch.isin(response, rows).sum())
                agreed[size] += int((picks == response).sum())
                covered[size] += inside
    results = {"draft": args.draft, "data": str(args.data), "tokens": total, "by_size": [
        {"head_size": size or draft.config.vocab_size, "alpha": agreed[size] / total,
         "coverage": covered[size] / total} for size in args.sizes]}
    print(json.dumps(results, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
