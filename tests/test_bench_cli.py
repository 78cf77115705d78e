"""`afa-serve bench` on the real SmolLM2 with a truncated draft: every arm stays lossless and
the figures it reports are there (speed itself lives in bench/results, not in tests)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from afa_serve.cli import app
from afa_serve.engine.draft_vocab import count_tokens, write_draft_vocab
from tests.conftest import truncated_copy


def test_bench_reports_every_arm_and_each_is_lossless(tmp_path, real_model_path, real_target,
                                                      real_tokenizer):
    draft_folder = tmp_path / "draft"
    truncated_copy(real_target, 2).save_pretrained(draft_folder)
    real_tokenizer.save_pretrained(draft_folder)
    # a trimmed head of the tokens of a few English words: the default arm scores only those
    write_draft_vocab(draft_folder, count_tokens([real_tokenizer.encode(
        " the a of and to is in that it for on with as was I you be this are")]))
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, [
        "bench", "--target", str(real_model_path), "--draft", str(draft_folder),
        "--prompts", "mt-bench", "--limit", "2", "--max-new-tokens", "12", "--dtype", "float32",
        "--out", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    for arm in ("", "fixed_k_", "draft_only_"):
        assert results[f"{arm}greedy_identical"] == 2  # float32 greedy: equal to plain
        assert f"{arm}acceptance_per_position" in results
    steps = results["fixed_k_steps_by_draft_length"]
    assert steps[4] > sum(steps[:4])  # fixed k drafts 4 but where the budget is shorter
    assert results["draft_vocab_size"] < 64 and results["settings"]["prompt_lookup"] == [1, 3]
    for key in ("speedup", "fixed_k_speedup", "draft_only_speedup", "draft_cost_ratio",
                "verify_cost_ratio"):
        assert results[key] > 0
