"""lm-eval's `local-completions` model against afa-serve (real SmolLM2 with a truncated draft):
a multiple-choice task (loglikelihood: `echo`, `logprobs: 1`, `max_tokens: 1`, as every
MMLU/HellaSwag/ARC-style benchmark sends) and a generate_until task, both from small local task
files (lm-eval's bundled tasks fetch their data from a hub). Every request succeeds and each
loglikelihood is the target's own, from a plain forward."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from afa_serve.engine.config import EngineConfig
from afa_serve.engine.torch_engine import TorchEngine
from tests.api_harness import Server, running_server

NAME = "smollm2"
QUESTIONS = [
    {"question": "What is the capital of France?", "choices": ["Paris", "Rome", "Madrid"],
     "answer": 0},
    {"question": "How many legs does a spider have?", "choices": ["six", "eight", "four"],
     "answer": 1},
]
ARITHMETIC = [{"question": "What is 2 + 2?", "answer": "4"},
              {"question": "What is 3 + 5?", "answer": "8"}]


def _task(folder: Path, name: str, rows: list[dict], spec: str) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"test_split: test\n{spec}")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    _task(folder, "afa_choice", QUESTIONS,
          'output_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
          'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
          "metric_list:\n  - metric: acc\n")
    _task(folder, "afa_generate", ARITHMETIC,
          'output_type: generate_until\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
          'doc_to_target: " {{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n'
          "  max_gen_toks: 8\n  do_sample: false\n"
          "metric_list:\n  - metric: exact_match\n")
    return folder


@pytest.fixture(scope="module")
def server(real_model_path, real_target, real_tokenizer, real_draft) -> Iterator[Server]:
    config = EngineConfig(target=NAME, draft=f"{NAME}-draft", num_speculative_tokens=3,
                          speculation="fixed", confidence_threshold=0.0,
                          served_model_name=NAME, max_model_len=512)
    engine = TorchEngine.from_models(real_target, real_tokenizer, real_draft, config=config)
    with running_server(engine) as running:
        yield running


def _evaluate(server: Server, tasks: Path, model_path: Path, task: str) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_args = (f"model={NAME},base_url={server.url}/v1/completions,tokenizer={model_path},"
                  "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1")
    return lm_eval.simple_evaluate(
        model="local-completions", model_args=model_args, tasks=[task],
        task_manager=TaskManager(include_path=str(tasks)), log_samples=True)


def test_loglikelihoods_are_the_targets(server, tasks, real_model_path, real_target,
                                        real_tokenizer):
    results = _evaluate(server, tasks, real_model_path, "afa_choice")
    samples = results["samples"]["afa_choice"]
    assert len(samples) == len(QUESTIONS)
    correct = 0
    for sample in samples:
        context = f"Question: {sample['doc']['question']}\nAnswer:"
        context_ids = real_tokenizer(context)["input_ids"]
        for choice, response in zip(sample["doc"]["choices"], sample["resps"], strict=True):
            loglikelihood, _greedy = response[0]
            ids = real_tokenizer(f"{context} {choice}")["input_ids"]  # lm-eval's delimiter " "
            with torch.inference_mode():
                logprobs = real_target(torch.tensor([ids])).logits[0].log_softmax(-1)
            expected = sum(float(logprobs[i - 1, ids[i]]) for i in range(len(context_ids),
                                                                         len(ids)))
            assert loglikelihood == pytest.approx(expected, abs=1e-3)
        scores = [response[0][0] for response in sample["resps"]]
        correct += scores.index(max(scores)) == sample["doc"]["answer"]
    assert results["results"]["afa_choice"]["acc,none"] == correct / len(QUESTIONS)


def test_generate_until_completes(server, tasks, real_model_path):
    results = _evaluate(server, tasks, real_model_path, "afa_generate")
    samples = results["samples"]["afa_generate"]
    assert len(samples) == len(ARITHMETIC)
    assert all(isinstance(s["resps"][0][0], str) and s["resps"][0][0] for s in samples)
    assert "exact_match,none" in results["results"]["afa_generate"]
