"""Learning curves of fit runs on the same data: held-out α and τ(4) against response tokens
trained, from each run's own `metrics.jsonl` (its teacher-forced held-out evaluations).

    python bench/arms_at_scale.py --data WORK/data.jsonl --runs WORK/runs/full-a \\
        WORK/runs/lora-r16 ... --out bench/results/arms_at_scale

writes OUT.json (every evaluation of every run, with its settings), OUT.md (a table of the best
and last evaluations) and OUT.png (τ(4) against tokens trained).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure

from afa_serve.atomic import write_json
from draft_training.run import metrics_path, read_config


def response_lengths(data: Path) -> list[int]:
    return [len(json.loads(line)["response_token_ids"]) for line in data.open()]


def describe(run: Path) -> dict:
    config = read_config(run)
    adapter = config.adapter
    arm = "full" if adapter is None else f"{adapter.method} r{adapter.rank}"
    if adapter is not None and adapter.method == "afa-lora":
        arm += f" ({adapter.activation}, {adapter.schedule}, anneal {adapter.anneal_fraction:g})"
    return {"run": str(run), "arm": arm, "draft": config.draft, "lr": config.lr,
            "batch_size": config.batch_size, "max_steps": config.max_steps,
            "trainable": "every weight" if adapter is None else "adapter + norms"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the runs' training data")
    parser.add_argument("--runs", type=Path, nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True, help="path without extension")
    args = parser.parse_args()

    lengths = response_lengths(args.data)
    per_sequence = sum(lengths) / len(lengths)
    results = []
    for run in args.runs:
        row = describe(run)
        evals = [json.loads(line) for line in metrics_path(run).open()]
        row["evals"] = [
            {"step": e["step"] + 1, "tokens": round((e["step"] + 1) * row["batch_size"]
                                                    * per_sequence),
             "alpha": e["alpha"], "tau": e["tau"],
             "acceptance_per_position": e["acceptance_per_position"]}
            for e in evals if e.get("kind") == "eval"]
        results.append(row)

    write_json(args.out.with_suffix(".json"), {
        "data": str(args.data), "sequences": len(lengths), "response_tokens": sum(lengths),
        "mean_response_tokens": per_sequence, "runs": results})
    header = ("| arm | draft | lr | best α | best τ(4) | at step | last step | last α | "
              "per position (best) |")
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in results:
        best = max(row["evals"], key=lambda e: e["tau"])
        last = row["evals"][-1]
        per_position = " / ".join(f"{p:.2f}" for p in best["acceptance_per_position"])
        lines.append(f"| {row['arm']} | {Path(row['draft']).name} | {row['lr']:g} | "
                     f"{best['alpha']:.3f} | {best['tau']:.3f} | {best['step']} | "
                     f"{last['step']} | {last['alpha']:.3f} | {per_position} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    for row in results:
        axes.plot([e["tokens"] / 1e3 for e in row["evals"]], [e["tau"] for e in row["evals"]],
                  marker="o", label=f"{row['arm']}, {Path(row['draft']).name}")
    axes.set_xlabel(
        f"response tokens trained (thousands; one epoch = {sum(lengths) / 1e3:.0f} k)")
    axes.set_ylabel("held-out τ(4), teacher-forced")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(args.out.with_suffix(".png"), dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
