"""The dashboards and rules against the real thing: `afa-serve serve` (torch engine, SmolLM2-135M
with a 2-layer draft, an API key) scraped by a real Prometheus (Debian package) running the
repo's scrape config adapted to 127.0.0.1. After real traffic through the openai client, every
PromQL expression of every dashboard panel, variable and rule goes through Prometheus' HTTP API.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from deploy.promql import (
    RULES_DIR,
    Query,
    label_values_query,
    shipped_queries,
    substitute,
)
from draft_training.init_draft import InitDraftConfig, init_draft

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
API_KEY = "deploy-test-key"
MODEL = "smollm2-deploy"
SCRAPE_INTERVAL_S = 1
RATE_INTERVAL = "1m"  # what $__rate_interval becomes: many 1 s scrapes, all of the traffic
GRAFANA_VALUES = {"model_name": ".*", "instance": ".*", "__rate_interval": RATE_INTERVAL}
QUERIES = shipped_queries()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Process:
    """A started command whose output goes to a log file (read back when it fails)."""
    popen: subprocess.Popen
    log: Path

    @classmethod
    def start(cls, command: list[str], log: Path, env: dict[str, str] | None = None) -> Process:
        with log.open("w") as output:
            popen = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
        return cls(popen, log)

    def check_running(self, what: str) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(f"{what}: exited with {self.popen.returncode}\n"
                               f"{self.log.read_text()}")


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str,
               process: Process | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None:
            process.check_running(what)
        try:
            if condition():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what}: not within {timeout_s} s")


def stop(process: Process) -> None:
    process.popen.terminate()
    try:
        process.popen.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.popen.kill()
        process.popen.wait()


def prometheus_binaries() -> tuple[str, str]:
    if not (shutil.which("prometheus") and shutil.which("promtool")):
        subprocess.run(["bash", str(REPO / "scripts" / "install_prometheus.sh")], check=True)
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    assert prometheus and promtool, "prometheus/promtool missing after install_prometheus.sh"
    return prometheus, promtool


def adapted_scrape_config(server_port: int, key_file: Path) -> dict[str, Any]:
    """The shipped prometheus.yml, pointed at 127.0.0.1, scraping and evaluating every second."""
    config = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=f"{SCRAPE_INTERVAL_S}s",
                            evaluation_interval=f"{SCRAPE_INTERVAL_S}s")
    config["rule_files"] = [str(RULES_DIR / "*.yml")]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{server_port}"]}]
    job["authorization"]["credentials_file"] = str(key_file)
    return config


@dataclass
class Stack:
    server_url: str
    prometheus_url: str
    promtool: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.prometheus_url}/api/v1/query", params={"query": expr},
                             timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def server_metrics(self) -> str:
        response = httpx.get(f"{self.server_url}/metrics", timeout=10,
                             headers={"Authorization": f"Bearer {API_KEY}"})
        response.raise_for_status()
        return response.text

    def server_sample(self, name: str) -> float:
        return sum(sample.value for family in text_string_to_metric_families(self.server_metrics())
                   for sample in family.samples if sample.name == name)


def send_traffic(server_url: str) -> None:
    """Chat and completions, streamed and not, two at a time; and requests that fail (404, 400)."""
    client = openai.OpenAI(base_url=f"{server_url}/v1", api_key=API_KEY, max_retries=0,
                           timeout=120)
    questions = ["What is the capital of France?", "Name three colours.",
                 "Count from one to five.", "What do bees make?"]

    def chat(question: str) -> None:
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=12,
            temperature=0, stream=True)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

    def complete(prompt: str) -> None:
        completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12,
                                               temperature=0)
        assert completion.usage.completion_tokens > 1

    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [pool.submit(chat, q) for q in questions]
        jobs += [pool.submit(complete, p) for p in ("The sky is", "Once upon a time")]
        for job in jobs:
            job.result()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=4, temperature=-1)


@pytest.fixture(scope="module")
def stack(real_model_path: Path, tmp_path_factory) -> Iterator[Stack]:
    prometheus, promtool = prometheus_binaries()
    work = tmp_path_factory.mktemp("deploy-live")
    draft = init_draft(InitDraftConfig(target=str(real_model_path), num_layers=2,
                                       out=work / "draft-2l"))

    server_port, prometheus_port = free_port(), free_port()
    server_url = f"http://127.0.0.1:{server_port}"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AFA_SERVE_")},
           "OMP_NUM_THREADS": "2"}
    server = Process.start(
        [sys.executable, "-m", "afa_serve", "serve", "--target", str(real_model_path),
         "--draft", str(draft), "-k", "3", "--speculation", "fixed", "--engine", "torch",
         "--host", "127.0.0.1",
         "--port", str(server_port), "--api-key", API_KEY, "--served-model-name", MODEL,
         "--max-num-seqs", "2", "--log-level", "warning"], work / "server.log", env)
    processes = [server]
    try:
        wait_until(lambda: httpx.get(f"{server_url}/health", timeout=2).status_code == 200,
                   180, "afa-serve /health", server)

        key_file = work / "api_key"
        key_file.write_text(API_KEY)
        config_file = work / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(adapted_scrape_config(server_port, key_file)))
        check = subprocess.run([promtool, "check", "config", str(config_file)], check=False,
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        prometheus_url = f"http://127.0.0.1:{prometheus_port}"
        processes.append(Process.start(
            [prometheus, f"--config.file={config_file}", f"--storage.tsdb.path={work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prometheus_port}", "--log.level=warn"],
            work / "prometheus.log"))
        wait_until(lambda: httpx.get(f"{prometheus_url}/-/ready", timeout=2).status_code == 200,
                   60, "prometheus /-/ready", processes[-1])
        stack = Stack(server_url, prometheus_url, promtool)
        wait_until(lambda: stack.query('up{job="afa-serve"} == 1') != [], 30,
                   "a first successful scrape")

        send_traffic(server_url)
        generated = stack.server_sample("afa_serve_generation_tokens_total")
        wait_until(lambda: [float(r["value"][1]) for r in
                            stack.query("afa_serve_generation_tokens_total")] == [generated],
                   30, "Prometheus scraping the final counters")
        time.sleep(3 * SCRAPE_INTERVAL_S)  # two more samples of the late series; rules evaluated
        yield stack
    finally:
        for process in reversed(processes):
            stop(process)


def test_prometheus_scrapes_the_server_with_its_api_key(stack):
    (up,) = stack.query('up{job="afa-serve"}')
    assert up["value"][1] == "1"
    (info,) = stack.query("afa_serve_model_info")
    assert info["metric"]["model_name"] == MODEL
    assert info["metric"]["num_speculative_tokens"] == "3"
    assert info["metric"]["engine"] == "torch"


def test_served_metrics_pass_promtool_lint(stack):
    lint = subprocess.run([stack.promtool, "check", "metrics"], input=stack.server_metrics(),
                          check=False, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def finite_values(result: list[dict[str, Any]]) -> list[float]:
    return [v for v in (float(r["value"][1]) for r in result) if math.isfinite(v)]


@pytest.mark.parametrize("query", [q for q in QUERIES if q.kind == "panel"],
                         ids=lambda q: q.source)
def test_dashboard_panel_query_returns_data(stack, query: Query):
    result = stack.query(substitute(query.expr, GRAFANA_VALUES))
    assert finite_values(result), f"{query.source}: no finite value from {query.expr}: {result}"


@pytest.mark.parametrize("query", [q for q in QUERIES if q.kind == "variable"],
                         ids=lambda q: q.source)
def test_dashboard_variable_has_values(stack, query: Query):
    selector, label = label_values_query(substitute(query.expr, GRAFANA_VALUES))
    params = {"match[]": selector} if selector else {}
    response = httpx.get(f"{stack.prometheus_url}/api/v1/label/{label}/values", params=params,
                         timeout=10).json()
    assert response["status"] == "success" and response["data"], (query, response)


@pytest.mark.parametrize("query", [q for q in QUERIES if q.kind == "record"],
                         ids=lambda q: q.source)
def test_recording_rule_returns_data(stack, query: Query):
    assert finite_values(stack.query(query.expr)), query
    recorded = query.source.split(": ")[1]
    assert stack.query(recorded), f"Prometheus has not recorded {recorded}"


@pytest.mark.parametrize("query", [q for q in QUERIES if q.kind == "alert"],
                         ids=lambda q: q.source)
def test_alert_rule_evaluates(stack, query: Query):
    stack.query(query.expr)  # asserts status success


def test_prometheus_evaluates_every_shipped_rule_without_error(stack):
    groups = httpx.get(f"{stack.prometheus_url}/api/v1/rules", timeout=10).json()["data"]
    rules = {rule["name"]: rule for group in groups["groups"] for rule in group["rules"]}
    shipped = {q.source.split(": ")[1] for q in QUERIES if q.kind in ("record", "alert")}
    assert set(rules) == shipped
    for name, rule in rules.items():
        assert rule["health"] == "ok" and not rule.get("lastError"), (name, rule)
