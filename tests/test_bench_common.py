"""bench/: the spec-decode counters read from either server family's /metrics, the figures taken
from vLLM's benchmark client's result, and the side-by-side's afa-serve commands as the settings
`afa-serve serve` takes from them (fixed k and the draft alone where vLLM is matched)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from afa_serve import cli
from afa_serve.config import ServeConfig
from bench import common, side_by_side

AFA_METRICS = """\
afa_serve_spec_decode_drafts_total{model_name="m"} 10.0
afa_serve_spec_decode_draft_tokens_total{model_name="m"} 40.0
afa_serve_spec_decode_accepted_tokens_total{model_name="m"} 12.0
"""
VLLM_METRICS = """\
# TYPE vllm:spec_decode_num_drafts counter
vllm:spec_decode_num_drafts_total{engine="0"} 3.0
vllm:spec_decode_num_drafts_total{engine="1"} 1.0
# TYPE vllm:spec_decode_num_accepted_tokens counter
vllm:spec_decode_num_accepted_tokens_total{engine="0"} 2.0
"""


def test_spec_counters_are_summed_over_labels_and_zero_where_absent():
    afa = common.parse_spec_counts(AFA_METRICS, common.AFA_SPEC_COUNTERS)
    assert (afa.acceptance_rate, afa.mean_acceptance_length) == pytest.approx((0.3, 2.2))
    vllm = common.parse_spec_counts(VLLM_METRICS, common.VLLM_SPEC_COUNTERS)
    assert (vllm.num_drafts, vllm.num_draft_tokens, vllm.num_accepted_tokens) == (4, 0, 2)
    unchanged = common.counts_since(afa, afa)
    assert (unchanged.acceptance_rate, unchanged.mean_acceptance_length) == (None, None)


def test_client_figures_count_tokens_per_streamed_chunk():
    result = {"completed": 2, "total_output_tokens": 6, "duration": 2.0, "output_throughput": 3.0,
              "output_lens": [4, 2], "itls": [[0.1, 0.1], [0.2]], **{
                  f"{stat}_{metric}_ms": 1.0 for stat in ("p50", "p95", "median")
                  for metric in ("ttft", "itl", "tpot", "e2el")}}
    figures = common.client_figures(result)
    assert figures["tokens_per_chunk"] == 6 / 5
    table = common.markdown_table([figures, {}], (("tok/chunk", "tokens_per_chunk", "{:.2f}"),))
    assert table.splitlines()[2:] == ["| 1.20 |", "| n/a |"]


def test_headline_is_a_throughput_ratio_and_the_http_overhead_the_share_lost():
    rows = [{"config": c, "concurrency": 1, "throughput_tok_s": t}
            for c, t in (("vllm-spec", 20.0), ("afa-vllm-spec", 19.0), ("vllm-plain", 25.0))]
    heads = side_by_side.headline(rows, [1])
    assert heads["http_overhead_vs_vllm"][1] == pytest.approx(5.0)
    assert heads["vllm_spec_vs_vllm_plain"][1] == pytest.approx(80.0)
    assert heads["afa_torch_plain_vs_vllm_plain"] == {1: None}


def test_the_client_ignores_eos_unless_told_to_end_answers_there(tmp_path):
    def client(**eos: bool) -> list[str]:
        return common.ClientRun("http://127.0.0.1:1", "m", "t", tmp_path / "d.json", 2, 8, 1,
                                **eos).arguments()

    assert "--ignore-eos" in client()
    assert "--ignore-eos" not in client(ignore_eos=False)
    assert client(ignore_eos=False) == [a for a in client() if a != "--ignore-eos"]


SETTINGS = side_by_side.Settings(
    target="some/target", draft="some/draft", k=3, dtype="bfloat16", max_tokens=8,
    max_model_len=512, max_num_seqs=4, kv_cache_memory_bytes=1 << 28, enforce_eager=True,
    torch_threads=2, prompts="mt-bench", num_prompts=2, concurrencies=[1, 4], ignore_eos=True,
    rounds=1)


def served_config(monkeypatch, name: str) -> ServeConfig:
    """The settings `afa-serve serve` reads from the configuration's command."""
    seen: list[ServeConfig] = []

    def capture(config: ServeConfig) -> None:
        seen.append(config)
        raise SystemExit(0)

    monkeypatch.setattr(cli, "build_engine", capture)
    command = side_by_side.server_command(name, SETTINGS, 8123)
    result = CliRunner().invoke(cli.app, command[command.index("serve"):])
    assert result.exit_code == 0, result.output
    return seen[0]


def test_afa_torch_spec_speculates_as_vllm_does(monkeypatch):
    config = served_config(monkeypatch, "afa-torch-spec")
    assert (config.engine, config.draft, config.num_speculative_tokens, config.speculation,
            config.confidence_threshold, config.draft_vocab_size, config.prompt_lookup_max,
            config.torch_threads) == ("torch", "some/draft", 3, "fixed", 0.0, 0, 0, 2)
    assert config.ignored_by("torch") == []


def test_afa_torch_default_keeps_the_servers_own_speculation_defaults(monkeypatch):
    config = served_config(monkeypatch, "afa-torch-default")
    defaults = ServeConfig()
    assert (config.draft, config.num_speculative_tokens) == ("some/draft", 3)
    assert (config.speculation, config.confidence_threshold, config.draft_vocab_size,
            config.draft_weights, config.prompt_lookup_max) == (
        defaults.speculation, defaults.confidence_threshold, defaults.draft_vocab_size,
            defaults.draft_weights, defaults.prompt_lookup_max)


def test_afa_torch_plain_does_not_speculate(monkeypatch):
    config = served_config(monkeypatch, "afa-torch-plain")
    assert (config.draft, config.speculation) == (None, "off")


def test_afa_vllm_spec_gets_vllms_engine_settings_and_fixed_k(monkeypatch):
    config = served_config(monkeypatch, "afa-vllm-spec")
    assert (config.engine, config.draft, config.num_speculative_tokens, config.speculation,
            config.kv_cache_memory_bytes, config.enforce_eager) == (
        "vllm", "some/draft", 3, "fixed", 1 << 28, True)
    assert config.ignored_by("vllm") == []


def test_wait_healthy_returns_once_health_answers_and_fails_when_the_server_exits(tmp_path):
    (tmp_path / "health").write_text("ok")
    port = common.free_port()
    serving = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=tmp_path,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        common.wait_healthy(f"http://127.0.0.1:{port}", serving, timeout_s=30)
    finally:
        serving.terminate()
        serving.wait()
    exited = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(RuntimeError, match=r"exited \(3\)"):
        common.wait_healthy(f"http://127.0.0.1:{common.free_port()}", exited, timeout_s=30)


# A result vLLM's benchmark client saved (one client, 24 prompts, answers ending at EOS)
SAVED_RUN = Path(__file__).parents[1] / (
    "bench/results/side_by_side_full_2026-12-01_k1_eos_24_vllm-plain_first.json")


def saved_client_result() -> dict:
    return json.loads(SAVED_RUN.read_text())["runs"][0]["phases"][0]["client"]


def test_pooling_one_result_gives_back_the_figures_vllms_client_computed():
    result = saved_client_result()
    pooled = common.pool_results([result])
    for key in ("duration", "total_output_tokens", "output_throughput", "completed"):
        assert pooled[key] == pytest.approx(result[key])
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("median", "p50", "p95"):
            key = f"{stat}_{name}_ms"
            assert pooled[key] == pytest.approx(result[key], rel=1e-9), key


def test_pooled_rounds_count_tokens_over_summed_wall_time_and_keep_request_order():
    whole = saved_client_result()
    halves = []
    for part, (start, end) in enumerate(((0, 10), (10, 24))):
        half = {key: whole[key][start:end] for key in common.REQUEST_LISTS}
        half.update(completed=end - start, duration=5.0 * (part + 1),
                    total_output_tokens=sum(whole["output_lens"][start:end]))
        halves.append(half)
    pooled = common.pool_results(halves)
    assert pooled["generated_texts"] == whole["generated_texts"]
    assert pooled["completed"] == 24 and pooled["duration"] == 15.0
    assert pooled["output_throughput"] == pytest.approx(whole["total_output_tokens"] / 15.0)
    assert pooled["p95_itl_ms"] == pytest.approx(whole["p95_itl_ms"])  # over all requests
    assert common.client_figures(pooled)["throughput_tok_s"] == pooled["output_throughput"]


def test_slices_cover_the_prompts_in_order_and_rounds_rotate_who_goes_first(tmp_path):
    dataset = tmp_path / "prompts.json"
    dataset.write_text(json.dumps(list(range(7))))
    slices = common.slice_dataset(dataset, 3)
    assert [json.loads(path.read_text()) for path in slices] == [[0, 1], [2, 3, 4], [5, 6]]
    with pytest.raises(ValueError, match="cannot cut 7 prompts into 8"):
        common.slice_dataset(dataset, 8)
    names = ["vllm-plain", "vllm-spec"]
    firsts = [side_by_side.rotated(names, r)[0] for r in range(4)]
    assert firsts == ["vllm-plain", "vllm-spec", "vllm-plain", "vllm-spec"]


def test_vllms_server_speculates_with_a_feature_draft_as_eagle(tmp_path):
    from afa_serve.engine.feature_draft import FeatureDraft
    from tests.conftest import tiny_llama

    FeatureDraft.from_target(tiny_llama()).save(tmp_path)
    settings = dataclasses.replace(SETTINGS, draft=str(tmp_path))
    command = side_by_side.server_command("vllm-spec", settings, 8123)
    spec = json.loads(command[command.index("--speculative-config") + 1])
    assert spec == {"method": "eagle", "model": str(tmp_path), "num_speculative_tokens": 3}
