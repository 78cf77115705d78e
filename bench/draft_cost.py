"""c and v for draft shapes, head sizes and weight formats, timed by the engine's own start-up
calibration.

For each draft folder, trimmed-head size and draft weight format (the model's dtype or int8),
builds the torch engine's
`SpeculativeDecoder` and runs its `calibrate()` several times (each a median of a few
single-token draft forwards and target passes of 1 .. k + 1 tokens); reports the median c
(a draft forward over a one-token target pass) and v(k + 1), with the head's coverage of the
draft's training tokens (from `draft_vocab.json`; an untrained draft borrows another's file
through --vocab-from).

Each row also times the draft step through transformers' own forward beside the engine's
(compact, or int8) one, as `hf_forward_ms` / `engine_forward_ms`.

    python bench/draft_cost.py --target smollm2-135m-instruct --dtype bfloat16 \
        --drafts DRAFT_A DRAFT_B --head-sizes 0 8192 4096 --draft-weights dtype int8 \
        --out bench/results/draft_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from afa_serve.engine.draft_forward import HFDraftForward, draft_forward
from afa_serve.engine.draft_vocab import read_draft_vocab
from afa_serve.engine.loading import eos_token_ids, load_model, load_tokenizer, resolve_dtype
from afa_serve.engine.speculative import SpeculativeDecoder
from afa_serve.models import resolve_model


def measure(target, draft, head_ids, weights: str, k: int, rounds: int) -> dict:
    decoder = SpeculativeDecoder(target, draft, k, draft_vocab=head_ids, draft_weights=weights)
    c, v, target_ms, draft_ms = [], [], [], []
    for _ in range(rounds):
        decoder.calibrate()
        costs = decoder.policy.costs
        c.append(costs.draft_cost_ratio)
        v.append(costs.verify_cost_ratio(k + 1))
        target_ms.append(1e3 * costs.target_pass_s[0])
        draft_ms.append(1e3 * costs.draft_forward_s)
    return {"c": statistics.median(c), f"v{k + 1}": statistics.median(v),
            "target_step_ms": statistics.median(target_ms),
            "draft_forward_ms": statistics.median(draft_ms)}


def forward_ms(forward, context: list[int], steps: int = 32) -> float:
    """Median ms of a one-token draft forward after `context` (its argmax read back, as the
    decoder does, which also waits for a GPU)."""
    cache = forward.new_cache()
    forward.logits(cache, context)
    times = []
    for token in context[:steps]:
        started = time.perf_counter()
        int(forward.logits(cache, [token]).argmax())
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def compare_forwards(draft, head_ids, weights: str, vocab_size: int) -> dict:
    """The same draft step through transformers' forward and through the engine's own."""
    context = torch.randint(vocab_size, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    head = None if head_ids is None else torch.tensor(head_ids, device=draft.device)
    engines = draft_forward(draft, head, weights)
    return {"engine_forward": type(engines).__name__,
            "engine_forward_ms": forward_ms(engines, context),
            "hf_forward_ms": forward_ms(HFDraftForward(draft, head), context)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="smollm2-135m-instruct")
    parser.add_argument("--drafts", nargs="+", required=True)
    parser.add_argument("--vocab-from", help="draft folder whose draft_vocab.json to use for "
                        "drafts that have none")
    parser.add_argument("--head-sizes", nargs="+", type=int, default=[0, 8192],
                        help="0: the whole head")
    parser.add_argument("--draft-weights", nargs="+", default=["dtype", "int8"],
                        choices=["dtype", "int8"])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("-k", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    target = load_model(args.target, dtype, device)
    eos_ids = eos_token_ids(target, load_tokenizer(args.target))
    fallback_vocab = read_draft_vocab(resolve_model(args.vocab_from)) if args.vocab_from else None
    rows = []
    for folder in args.drafts:
        draft = load_model(folder, dtype, device)
        vocab = read_draft_vocab(resolve_model(folder)) or fallback_vocab
        for size in args.head_sizes:
            if size and vocab is None:
                raise SystemExit(f"{folder}: no draft_vocab.json (pass --vocab-from)")
            head_ids = vocab.head_ids(size, eos_ids) if size else None
            for weights in args.draft_weights:
                row = {"draft": folder, "layers": draft.config.num_hidden_layers,
                       "head_size": size or draft.config.vocab_size,
                       "coverage": vocab.coverage(size) if size else 1.0,
                       "draft_weights": weights, "dtype": args.dtype, "threads": args.threads,
                       **measure(target, draft, head_ids, weights, args.k, args.rounds),
                       **compare_forwards(draft, head_ids, weights, draft.config.vocab_size)}
                print(json.dumps(row))
                rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
