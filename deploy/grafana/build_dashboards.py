"""Builds the Grafana dashboards as code (grafana-foundation-sdk) and writes their JSON.

    python -m deploy.grafana.build_dashboards          # rewrite deploy/grafana/dashboards/*.json
    python -m deploy.grafana.build_dashboards --check  # exit 1 if the committed JSON is stale

Every panel filters on the template variables `$model_name` and `$instance` and rates over
Grafana's `$__rate_interval`; metric names are those of afa_serve/metrics.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard, prometheus, table, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    DataTransformerConfig,
    VariableOption,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from afa_serve.atomic import atomic_file

DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboards"
DATASOURCE_UID = "afa-prometheus"  # provisioning/datasources/prometheus.yml gives it this uid
DATASOURCE = DataSourceRef(type_val="prometheus", uid=DATASOURCE_UID)
SELECTOR = 'model_name=~"$model_name", instance=~"$instance"'
RATE_INTERVAL = "$__rate_interval"
QUANTILES = (0.5, 0.95, 0.99)

Target = tuple[str, str]  # (PromQL, legend)


def selected(metric: str, matchers: str = "") -> str:
    """`metric{...}` restricted to the chosen models and instances (plus `matchers`)."""
    return f"{metric}{{{SELECTOR}{', ' + matchers if matchers else ''}}}"


def rate(metric: str, by: str = "model_name", matchers: str = "") -> str:
    return f"sum by ({by}) (rate({selected(metric, matchers)}[{RATE_INTERVAL}]))"


def quantile(q: float, histogram: str) -> str:
    return f"histogram_quantile({q}, {rate(histogram + '_bucket', by='model_name, le')})"


def queries(targets: list[Target]) -> list[prometheus.Dataquery]:
    return [
        prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(chr(ord("A") + i))
        for i, (expr, legend) in enumerate(targets)
    ]


def graph(title: str, description: str, unit: str, targets: list[Target],
          width: int = 8) -> timeseries.Panel:
    panel = (
        timeseries.Panel().title(title).description(description).datasource(DATASOURCE)
        .unit(unit).span(width).height(8).fill_opacity(10).line_width(1)
        .legend(common_builders.VizLegendOptions().display_mode(common.LegendDisplayMode.LIST)
                .placement(common.LegendPlacement.BOTTOM).show_legend(True))
        .tooltip(common_builders.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI)
                 .sort(common.SortOrder.DESCENDING))
    )
    for query in queries(targets):
        panel = panel.with_target(query)
    return panel


def latency(title: str, description: str, histogram: str, width: int = 8) -> timeseries.Panel:
    targets = [(quantile(q, histogram), f"p{round(q * 100)} {{{{model_name}}}}")
               for q in QUANTILES]
    return graph(title, description, "s", targets, width)


def template_variable(name: str, label: str, query: str) -> dashboard.QueryVariable:
    return (
        dashboard.QueryVariable(name).label(label).datasource(DATASOURCE).query(query)
        .multi(True).include_all(True).all_value(".*")
        .current(VariableOption(selected=True, text="All", value="$__all"))
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
    )


def speculative_decoding_panels() -> list[timeseries.Panel | table.Panel]:
    accepted = "afa_serve_spec_decode_accepted_tokens_total"
    drafted = "afa_serve_spec_decode_draft_tokens_total"
    drafts = "afa_serve_spec_decode_drafts_total"
    per_position = "afa_serve_spec_decode_accepted_tokens_per_pos_total"
    drafted_per_step = "afa_serve_spec_decode_num_drafted_tokens"
    plain_steps = 'le="0"'  # the histogram's bucket of the steps that drafted nothing
    per_position_share = (f"{rate(per_position, by='model_name, position')}"
                          f" / ignoring (position) group_left {rate(drafts)}")
    return [
        graph("Draft acceptance rate",
              "Share of drafted tokens the target accepted. Falls first when the prompt mix "
              "drifts away from the draft's training data or the draft is broken.",
              "percentunit", [(f"{rate(accepted)} / {rate(drafted)}", "{{model_name}}")])
        .min(0).max(1),
        graph("Mean acceptance length",
              "Tokens emitted per target verify step: 1 + accepted / drafts "
              "(1 = no gain, k + 1 = every draft token accepted).",
              "none", [(f"1 + {rate(accepted)} / {rate(drafts)}", "{{model_name}}")])
        .min(1).decimals(2),
        graph("Acceptance by draft position",
              "Share of verify steps whose draft token at position i (0-based) was accepted; "
              "position i is only reached when positions 0..i-1 were.",
              "percentunit",
              [(per_position_share, "position {{position}} {{model_name}}")])
        .min(0).max(1),
        graph("Drafted and accepted tokens/s",
              "Tokens the draft proposed, and those of them the target kept.", "short",
              [(rate(drafted), "drafted {{model_name}}"),
               (rate(accepted), "accepted {{model_name}}")]).axis_label("tokens/s"),
        graph("Output tokens from the draft",
              "Share of generated tokens that were accepted draft tokens: the work the "
              "target did not have to do one token at a time.", "percentunit",
              [(f"{rate(accepted)} / {rate('afa_serve_generation_tokens_total')}",
                "{{model_name}}")]).min(0).max(1),
        graph("Tokens drafted per step",
              "The k the speculation policy chose per decoding step, cut short where the draft "
              "was unsure: the mean, and the share of plain steps (k = 0: drafting would lose, "
              "or the draft declined). Torch engine.", "none",
              [(f"{rate(drafted_per_step + '_sum')} / {rate(drafted_per_step + '_count')}",
                "mean {{model_name}}"),
               ((f"{rate(drafted_per_step + '_bucket', matchers=plain_steps)} / "
                 f"{rate(drafted_per_step + '_count')}"), "plain share {{model_name}}")])
        .min(0),
        graph("Measured draft and verify cost",
              "What the policy weighs, measured live: c, a draft forward over a plain target "
              "step; v, a target pass over k + 1 tokens over a one-token pass. "
              "Speedup = τ / (k·c + v). Torch engine.", "none",
              [(f"max by (model_name) ({selected('afa_serve_spec_decode_draft_cost_ratio')})",
                "c {{model_name}}"),
               (f"max by (model_name) ({selected('afa_serve_spec_decode_verify_cost_ratio')})",
                "v {{model_name}}")]).min(0).decimals(2),
        table.Panel().title("Served models")
        .description("Target, draft, k and engine of each served model.")
        .datasource(DATASOURCE).span(8).height(8)
        .with_target(prometheus.Dataquery().expr(selected("afa_serve_model_info")).instant()
                     .format(PromQueryFormat.TABLE).ref_id("A"))
        .with_transformation(DataTransformerConfig(id_val="organize", options={
            "excludeByName": {"Time": True, "Value": True, "__name__": True, "job": True}})),
    ]


def latency_panels() -> list[timeseries.Panel]:
    return [
        latency("Time to first token", "Arrival to first output token, p50/p95/p99.",
                "afa_serve_time_to_first_token_seconds"),
        latency("Time per output token",
                "Per request: (last token - first token) / (output tokens - 1), p50/p95/p99.",
                "afa_serve_request_time_per_output_token_seconds"),
        latency("End-to-end request latency", "Arrival to last output token, p50/p95/p99.",
                "afa_serve_e2e_request_latency_seconds"),
        latency("Inter-token latency",
                "Between successive streamed chunks of a request, p50/p95/p99.",
                "afa_serve_inter_token_latency_seconds", width=12),
        latency("Queue time", "Arrival to being scheduled, p50/p95/p99.",
                "afa_serve_request_queue_time_seconds", width=12),
    ]


def traffic_panels() -> list[timeseries.Panel]:
    requests = "afa_serve_requests_total"
    return [
        graph("Requests by status", "Answered API requests per second, by HTTP status.",
              "reqps", [(rate(requests, by="status"), "{{status}}")], width=12),
        graph("Errors by status and endpoint",
              "Requests answered with anything but 2xx: 4xx are client mistakes or refusals "
              "(429: queue full), 5xx are the server's.", "reqps",
              [(rate(requests, by="status, endpoint", matchers='status!~"2.."'),
                "{{status}} {{endpoint}}")], width=12),
        graph("Running and waiting requests",
              "Requests being decoded, and requests queued for a slot.", "short",
              [(f"sum by (model_name) ({selected('afa_serve_num_requests_running')})",
                "running {{model_name}}"),
               (f"sum by (model_name) ({selected('afa_serve_num_requests_waiting')})",
                "waiting {{model_name}}")], width=12),
        graph("Prompt and generation tokens/s", "Prompt tokens prefilled and tokens generated.",
              "short", [(rate("afa_serve_prompt_tokens_total"), "prompt {{model_name}}"),
                        (rate("afa_serve_generation_tokens_total"), "generated {{model_name}}")],
              width=12).axis_label("tokens/s"),
    ]


def afa_serve_dashboard() -> dashboard.Dashboard:
    board = (
        dashboard.Dashboard("afa-serve: speculative decoding").uid("afa-serve")
        .description("Draft acceptance, latency and load of afa-serve.")
        .tags(["afa-serve", "llm", "speculative-decoding"])
        .time("now-1h", "now").refresh("10s").timezone("browser")
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .with_variable(template_variable(
            "model_name", "model", "label_values(afa_serve_model_info, model_name)"))
        .with_variable(template_variable(
            "instance", "instance",
            'label_values(afa_serve_model_info{model_name=~"$model_name"}, instance)'))
    )
    sections = [("Speculative decoding", speculative_decoding_panels()),
                ("Latency", latency_panels()),
                ("Traffic and load", traffic_panels())]
    for title, panels in sections:
        board = board.with_row(dashboard.Row(title))
        for panel in panels:
            board = board.with_panel(panel)
    return board


DASHBOARDS = {"afa-serve.json": afa_serve_dashboard}


def render(name: str) -> str:
    built = DASHBOARDS[name]().build()
    return json.dumps(built, cls=JSONEncoder, indent=2) + "\n"


def write_dashboard(path: Path, text: str) -> None:
    with atomic_file(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
        temporary.chmod(0o644)  # Grafana's container user reads it through the bind mount


def stale_dashboards(directory: Path = DASHBOARD_DIR) -> list[Path]:
    """The dashboard files whose content differs from what the code builds."""
    stale = []
    for name in DASHBOARDS:
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != render(name):
            stale.append(path)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only report stale dashboard files; exit 1 if there are any")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_dashboards()
        for path in stale:
            print(f"stale: {path} (run python -m deploy.grafana.build_dashboards)",
                  file=sys.stderr)
        return 1 if stale else 0
    for name in DASHBOARDS:
        write_dashboard(DASHBOARD_DIR / name, render(name))
        print(DASHBOARD_DIR / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
