"""`afa-train generate --engine vllm` on real vLLM: the same records as the torch path (greedy,
float32: the same tokens), a rerun skips what is done without starting vLLM, and where vLLM
runs `auto` (the default) is vLLM, also for the mission, whose full profile then answers twice
the prompts."""

from __future__ import annotations

import json
import subprocess
import sys

from afa_serve.atomic import recover_jsonl
from draft_training.generate import GenerateConfig, generate_responses
from draft_training.pipeline import MissionConfig
from tests.vllm.harness import REPO_ROOT

PROMPTS = ["Name a colour.", "What is 2 + 2?", "Say hello in French."]


def afa_train_generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "draft_training.cli", "generate", *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          check=False)


def test_generate_with_vllm_writes_the_torch_paths_records(real_model_path, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    common = ["--target", str(real_model_path), "--prompts", str(prompts),
              "--max-new-tokens", "16", "--batch-size", "2", "--dtype", "float32"]

    first = afa_train_generate(*common, "--out", str(tmp_path / "v.jsonl"))  # auto
    assert first.returncode == 0, first.stderr[-3000:]
    # vLLM logs to stdout; its engine core process names its lines
    assert "3 responses generated" in first.stderr and "EngineCore" in first.stdout
    again = afa_train_generate(*common, "--engine", "vllm", "--out", str(tmp_path / "v.jsonl"))
    assert again.returncode == 0 and "0 responses generated" in again.stderr
    assert "3 already done" in again.stderr and "EngineCore" not in again.stdout

    generate_responses(GenerateConfig(target=str(real_model_path), prompts=str(prompts),
                                      out=tmp_path / "t.jsonl", max_new_tokens=16,
                                      batch_size=2, dtype="float32", engine="torch"))
    by_id = {r["id"]: r for r in recover_jsonl(tmp_path / "t.jsonl")}
    vllm_records = list(recover_jsonl(tmp_path / "v.jsonl"))
    assert len(vllm_records) == len(PROMPTS)
    for record in vllm_records:
        assert record == by_id[record["id"]]


def test_the_mission_answers_with_vllm_where_it_runs():
    full = MissionConfig(profile="full")
    assert (full.generate_engine, full.num_prompts) == ("vllm", 4000)
    on_torch = MissionConfig(profile="full", generate_engine="torch")
    assert (on_torch.generate_engine, on_torch.num_prompts) == ("torch", 2000)
