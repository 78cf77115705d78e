"""Every PromQL expression the deployment ships: dashboard panels and variables, and rules.

The tests read them from here to check them statically (known metric names, valid PromQL) and
to run them against a real Prometheus scraping a real server.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

DEPLOY_DIR = Path(__file__).resolve().parent
DASHBOARD_DIR = DEPLOY_DIR / "grafana" / "dashboards"
RULES_DIR = DEPLOY_DIR / "prometheus" / "rules"

QueryKind = Literal["panel", "variable", "record", "alert"]

# afa_serve_* names as written in PromQL; recording-rule names (level:metric:ops) are skipped.
_METRIC_NAME = re.compile(r"(?<![\w:])afa_serve_\w+(?![\w:])")
_GRAFANA_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<selector>.+),\s*)?(?P<label>\w+)\s*\)\s*$")


@dataclass(frozen=True)
class Query:
    kind: QueryKind
    source: str  # where it is: file and panel/variable/rule
    expr: str


def panels(dashboard: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Every panel, including those inside collapsed rows; rows themselves are skipped."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def dashboard_queries(path: Path) -> list[Query]:
    dashboard = json.loads(path.read_text(encoding="utf-8"))
    found = [
        Query("panel", f"{path.name}: {panel['title']} [{target.get('refId', '?')}]",
              target["expr"])
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            expr = query["query"] if isinstance(query, dict) else query
            found.append(Query("variable", f"{path.name}: ${variable['name']}", expr))
    return found


def rule_queries(path: Path) -> list[Query]:
    groups = yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
    return [
        Query("record" if "record" in rule else "alert",
              f"{path.name}: {rule.get('record') or rule['alert']}", rule["expr"])
        for group in groups
        for rule in group["rules"]
    ]


def shipped_queries() -> list[Query]:
    queries = [q for path in sorted(DASHBOARD_DIR.glob("*.json")) for q in dashboard_queries(path)]
    return queries + [q for path in sorted(RULES_DIR.glob("*.yml")) for q in rule_queries(path)]


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Grafana's `$name`, `${name}` and `[[name]]` replaced by `values[name]` (all must be given)."""
    def replace(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        if name not in values:
            raise KeyError(f"no value for Grafana variable ${name} in {expr!r}")
        return values[name]

    return _GRAFANA_VARIABLE.sub(replace, expr)


def grafana_variables(expr: str) -> set[str]:
    return {next(g for g in m.groups() if g) for m in _GRAFANA_VARIABLE.finditer(expr)}


def label_values_query(expr: str) -> tuple[str | None, str]:
    """`label_values(selector, label)` (a Grafana variable query) -> (selector, label)."""
    match = _LABEL_VALUES.match(expr)
    if match is None:
        raise ValueError(f"not a label_values(...) query: {expr!r}")
    return match["selector"], match["label"]


def metric_names(expr: str) -> set[str]:
    """The afa_serve_* metric names an expression reads."""
    return set(_METRIC_NAME.findall(expr))
